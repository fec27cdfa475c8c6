"""Tile sizes of the default CPU schedules (schedules/cpu/tiles.py, float_default.py), checked
against their definitions: no build."""

import pytest

from qcompile.schedules.cpu import float_default
from qcompile.schedules.cpu.tiles import fewest_tiles, largest_divisor


@pytest.mark.parametrize("n", list(range(1, 200)) + [3136, 12544])
@pytest.mark.parametrize("at_most", [4, 8])
def test_fewest_tiles_covers_the_axis_in_as_few_tiles_as_any_tile_can(n, at_most):
    tile = fewest_tiles(n, at_most)
    tiles = -(-n // tile)
    assert 1 <= tile <= at_most
    assert tiles == -(-n // min(n, at_most))  # as few tiles as the widest tile gives
    assert all(-(-n // t) > tiles for t in range(1, tile))  # and no smaller tile does
    if n % at_most == 0 or largest_divisor(n, at_most) == tile:
        assert n % tile == 0


@pytest.mark.parametrize("n, tile", [(13, 7), (26, 7), (52, 8), (12, 6), (9, 5), (7, 7)])
def test_fewest_tiles_of_feature_map_widths(n, tile):
    assert fewest_tiles(n, 8) == tile


@pytest.mark.parametrize("extent, lanes, tile", [
    (96, 16, 16), (384, 16, 16), (24, 16, 8), (40, 16, 8), (112, 16, 16), (12, 16, 6),
    (96, 8, 8), (384, 4, 8)])
def test_vector_tiles_take_the_register_width_only_where_it_divides(extent, lanes, tile):
    from tvm.tirx import IntImm

    assert float_default._vector_tile(IntImm("int64", extent), lanes) == tile


@pytest.mark.parametrize("width, blocks, rows", [
    (112, 1, 112), (56, 2, 56), (28, 3, 28), (28, 15, 28), (14, 30, 14), (7, 72, 7),
    (7, 80, 7), (13, 12, 13), (1, 80, 1), (1, 63, 1), (3, 7, 1)])
def test_int8_conv_tiles_read_the_fewest_operands_per_instruction(width, blocks, rows):
    """A packed int8 conv tile (int8_default.conv_tile) against its definition, by brute
    force over every pair of divisors."""
    from qcompile.schedules.cpu import int8_default as d

    pixels, per = d.conv_tile(width, blocks, rows)
    assert width % pixels == 0 and blocks % per == 0 and pixels <= d.TILE_PIXELS_MOST

    def allowed(p, c):
        most = d.ALL_BLOCKS if c == blocks else d.ACCUMULATORS
        return p * c <= most and rows * (blocks // c) >= min(d.MIN_PARALLEL, rows * blocks)

    assert allowed(pixels, per)
    loads = (pixels + per) / (pixels * per)
    for p in range(1, d.TILE_PIXELS_MOST + 1):
        for c in range(1, blocks + 1):
            if width % p == 0 and blocks % c == 0 and allowed(p, c):
                other = (p + c) / (p * c)
                assert loads < other or loads == other and pixels * per >= p * c


@pytest.mark.parametrize("width, blocks, rows, tile", [
    (28, 3, 28, (7, 3)), (7, 72, 7, (7, 2)), (28, 15, 28, (4, 3)), (112, 1, 112, (16, 1))])
def test_int8_conv_tiles_of_efficientnet_shapes(width, blocks, rows, tile):
    from qcompile.schedules.cpu.int8_default import conv_tile

    assert conv_tile(width, blocks, rows) == tile


@pytest.mark.parametrize("width, blocks, rows", [
    (112, 1, 112), (56, 2, 56), (28, 3, 28), (28, 15, 28), (14, 30, 14), (7, 72, 7), (1, 63, 1)])
def test_int8_tiles_fit_avx2_registers(width, blocks, rows):
    """On AVX2 (16 ymm registers, two per 16-lane accumulator) a tile keeps at most its
    DotProduct's accumulators, 3/2 as many where it covers every output channel."""
    from qcompile.schedules.cpu import int8_default as d
    from qcompile.schedules.cpu.intrinsics import AVX2

    most = AVX2.accumulators
    pixels, per = d.conv_tile(width, blocks, rows, most)
    assert pixels * per <= (most * 3 // 2 if per == blocks else most)
    assert d.column_blocks(blocks, 1, rows, most) <= most


@pytest.mark.parametrize("blocks, rows, per", [(63, 1, 7), (24, 64, 2), (24, 8, 2), (8, 1, 1)])
def test_int8_matmul_tiles_keep_enough_parallel_tasks(blocks, rows, per):
    """Output blocks per matmul tile: up to 16 accumulators with the tile's rows, at least 8
    tasks (a one-row product of 1000 columns: 63 blocks in 9 tasks of 7)."""
    from qcompile.schedules.cpu.int8_default import TILE_ROWS, column_blocks
    from qcompile.schedules.cpu.tiles import largest_divisor

    tile = largest_divisor(rows, TILE_ROWS)
    assert column_blocks(blocks, tile, rows // tile) == per


@pytest.mark.parametrize("blocks, threads", [(36, 2), (36, 4), (36, 8), (96, 2), (3072, 4),
                                             (256, 2), (7, 2), (12, 8), (40, 3)])
def test_one_row_tasks_split_as_evenly_as_any_divisor_allows(blocks, threads):
    """Of the ways to cut `blocks` column blocks into tasks of at most 4 (at least 8 tasks),
    the chosen one leaves no more of the threads' time idle than any other, and takes the
    most blocks per task among those that idle as little."""
    from qcompile.schedules.cpu.tiles import even_blocks_per_task

    def idle(d):
        tasks = blocks // d
        return -(-tasks // threads) * threads - tasks

    chosen = even_blocks_per_task(blocks, 4, 8, threads)
    assert blocks % chosen == 0 and chosen <= 4
    others = [d for d in range(1, 5) if blocks % d == 0 and blocks // d >= 8]
    if not others:
        assert chosen == 1
        return
    assert idle(chosen) / (blocks // chosen) <= min(idle(d) / (blocks // d) for d in others)
    assert chosen == max(d for d in others
                         if idle(d) / (blocks // d) == idle(chosen) / (blocks // chosen))
    if (blocks, threads) == (36, 2):
        assert chosen == 3                      # 12 tasks of 3, not 9 of 4


@pytest.mark.parametrize("k, n, turns", [(576, 49152, 4), (576, 1536, 1), (576, 576, 1),
                                         (4096, 4096, 1), (1536, 49152, 2), (128, 65536, 8)])
def test_one_row_streams_read_adjacent_blocks_only_on_wide_layers_of_short_columns(k, n, turns):
    """A column block of 16 outputs holds k * 8 bytes of 4-bit weights; a stream reads adjacent
    blocks in turn up to about 16 KB, where enough blocks remain for 128 tasks of 4 streams."""
    from qcompile.schedules.cpu.packed_int4 import STREAMS, _rounds

    blocks = n // 16
    chosen = _rounds(blocks, k * 8)
    assert chosen == turns
    assert blocks % chosen == 0 and (chosen == 1 or blocks // chosen >= STREAMS * 128)
