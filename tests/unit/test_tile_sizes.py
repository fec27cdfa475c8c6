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
