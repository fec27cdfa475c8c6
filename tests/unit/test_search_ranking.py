"""The precision search's ranking: output noise per unit of cost, from its definition."""

from qcompile.quantize.search import LayerSensitivity, rank


def layer(name, macs, alone_db, int8_us=None, fallback_us=None):
    return LayerSensitivity(name, "Conv", macs, alone_db, 0.0, int8_us, fallback_us)


def test_untimed_layers_rank_by_noise_per_mac():
    # same noise (30 dB), the small layer first; 10x the MACs for 10 dB (10x) more noise ties
    # on the ratio and breaks by name; a layer exact in int8 (inf dB) last
    layers = [layer("big", 1000, 30.0), layer("small", 10, 30.0), layer("noisy", 10_000, 20.0),
              layer("exact", 1, float("inf")), layer("broken", 10**9, float("-inf"))]
    assert rank(layers) == ["broken", "small", "big", "noisy", "exact"]


def test_timed_layers_rank_by_noise_per_added_microsecond():
    # "cheap" is as fast in fp32 as in int8: keeping it costs the floor (1% of 100 us), so it
    # comes first although its noise is 10x lower than "costly"'s, which adds 50 us
    layers = [layer("costly", 10, 30.0, int8_us=50.0, fallback_us=100.0),
              layer("cheap", 10**6, 40.0, int8_us=100.0, fallback_us=99.0),
              layer("mid", 10, 30.0, int8_us=10.0, fallback_us=20.0)]
    assert rank(layers) == ["cheap", "mid", "costly"]


def test_one_untimed_layer_ranks_all_by_macs_and_slow_layers_are_left_out():
    layers = [layer("a", 100, 30.0, int8_us=1.0, fallback_us=1000.0), layer("b", 1000, 30.0),
              layer("c", 10, 30.0, int8_us=1.0, fallback_us=2.0)]
    assert rank(layers) == ["c", "a", "b"]
    assert rank(layers, slow={"c"}) == ["a", "b"]
