"""Tissue masks, tile grids, the two HR<->LR correspondences and batched reading."""

import numpy as np
import pytest
import torch

from mini_kd import MiniKDError
from mini_kd.pyramid import write_pyramid
from mini_kd.slides import open_slide
from mini_kd.tiling import (TileGrid, check_same_footprint, coarse_grid, same_footprint, tile_grid,
                            TileDataset, tile_loader)
from mini_kd.tissue import tissue_fraction, tissue_mask


def _grid(coords, footprint=256, mag=20.0, slide_id="s"):
    return TileGrid(np.array(coords), mag, footprint, footprint, 20.0, slide_id)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    """3072x2048 glass with one 1024x1024 square of tissue whose corner is at (1024, 512)."""
    image = np.full((2048, 3072, 3), 245, np.uint8)
    image[512:1536, 1024:2048] = (190, 100, 160)
    return write_pyramid(tmp_path_factory.mktemp("tiling") / "square.svs", image, 0.5, 20)


def test_tissue_mask_finds_the_square_and_not_the_glass():
    image = np.full((64, 64, 3), 245, np.uint8)
    image[16:48, 16:48] = (190, 100, 160)
    mask = tissue_mask(image)
    assert mask[20:44, 20:44].all() and not mask[:10].any()


def test_blank_slide_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = (240 + rng.integers(0, 10, (64, 64, 3))).astype(np.uint8)
    assert not tissue_mask(glass).any()


def test_tissue_fraction_of_hand_made_tiles():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # level-0 pixels [0, 32) x [0, 32) at downsample 16
    mask[3, 3] = True  # level-0 pixels [48, 64) x [48, 64)
    coords = [(0, 0), (16, 0), (32, 32), (48, 48)]
    fraction = tissue_fraction(mask, coords, footprint=32, mask_downsample=16)
    # the last tile hangs 3/4 outside the mask: that part counts as background
    np.testing.assert_allclose(fraction, [1.0, 0.5, 0.25, 0.25])


def test_grid_keeps_tissue_tiles_only(slide_path):
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, mag=20, tile_size=256)
    assert len(grid) == 16  # the 1024x1024 square holds 4x4 tiles
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (16, 2)
    assert grid.coords[:, 0].min() == 1024 and grid.coords[:, 1].min() == 512
    assert grid.footprint == 256 and grid.mag == 20


def test_grid_at_5x_has_a_larger_footprint(slide_path):
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, mag=5, tile_size=128)
    assert grid.footprint == 512 and len(grid) == 4


def test_slide_smaller_than_one_tile(slide_path):
    with open_slide(slide_path) as slide, pytest.raises(MiniKDError, match="smaller than one tile"):
        tile_grid(slide, mag=1.25, tile_size=256)


def test_slide_without_tissue_gives_an_empty_grid_and_a_warning(tmp_path):
    path = write_pyramid(tmp_path / "glass.svs", np.full((1024, 1024, 3), 245, np.uint8), 0.5, 20)
    with open_slide(path) as slide, pytest.warns(UserWarning, match="grid is empty"):
        grid = tile_grid(slide, mag=20, tile_size=256)
    assert len(grid) == 0 and grid.coords.shape == (0, 2)


def test_save_and_load_round_trip(tmp_path):
    grid = TileGrid(np.array([[0, 0], [256, 512]]), 5.0, 64, 256, 20.0, "s1")
    loaded = TileGrid.load(grid.save(tmp_path / "s1.h5"))
    np.testing.assert_array_equal(loaded.coords, grid.coords)
    assert (loaded.mag, loaded.tile_size, loaded.footprint, loaded.slide_mag, loaded.slide_id) == (
        5.0, 64, 256, 20.0, "s1")


def test_loading_a_file_that_is_not_a_grid(tmp_path):
    path = tmp_path / "x.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(MiniKDError, match="not a tile grid"):
        TileGrid.load(path)


def test_same_footprint_is_one_to_one():
    hr = _grid([[0, 0], [256, 0], [0, 256]])
    lr = same_footprint(hr, 1.25)
    assert lr.tile_size == 16 and lr.footprint == 256
    np.testing.assert_array_equal(lr.coords, hr.coords)
    check_same_footprint(hr, lr)
    with pytest.raises(MiniKDError, match="not a whole number"):
        same_footprint(hr, 1.3)


def test_mismatched_grids_are_refused():
    hr = _grid([[0, 0], [256, 0]])
    with pytest.raises(MiniKDError, match="coordinates differ"):
        check_same_footprint(hr, same_footprint(_grid([[0, 0]]), 1.25))
    with pytest.raises(MiniKDError, match="slides differ"):
        check_same_footprint(hr, same_footprint(_grid([[0, 0], [256, 0]], slide_id="t"), 1.25))


def test_coarse_grid_on_a_hand_made_3x3_block():
    # HR tiles on a 3x3 lattice, centre missing (no tissue); k = 2 blocks of 512 level-0 px
    coords = [[x, y] for y in (0, 256, 512) for x in (0, 256, 512) if (x, y) != (256, 256)]
    hr = _grid(coords)
    lr, links = coarse_grid(hr, k=2, lr_mag=10)
    assert lr.footprint == 512 and lr.tile_size == 256
    np.testing.assert_array_equal(lr.coords, [[0, 0], [0, 512], [512, 0], [512, 512]])
    # block (0, 0) holds HR (0,0), (256,0), (0,256); the slot of (256,256) is missing
    np.testing.assert_array_equal(links.children[0], [0, 1, 3, -1])
    np.testing.assert_array_equal(links.children[3], [7, -1, -1, -1])  # edge block: one child
    for hr_index, lr_index in enumerate(links.parent):  # both directions agree
        assert hr_index in links.children[lr_index]
    np.testing.assert_array_equal(links.offsets(), [[0, 0], [0, 1], [1, 0], [1, 1]])


def test_coarse_grid_refuses_an_offset_lattice():
    with pytest.raises(MiniKDError, match="not on the lattice"):
        coarse_grid(_grid([[100, 0], [356, 0]]), k=4, lr_mag=5)


def test_loader_reads_batches_in_grid_order(slide_path):
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, mag=20, tile_size=256)
        expected = np.stack([slide.read(x, y, 256, 20) for x, y in grid.coords])
    batches = list(tile_loader(slide_path, grid, batch_size=5))
    assert [len(b) for b in batches] == [5, 5, 5, 1]
    assert batches[0].dtype == torch.uint8 and batches[0].shape == (5, 256, 256, 3)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), expected)
    assert torch.equal(TileDataset(slide_path, grid)[7], torch.from_numpy(expected[7]))


def test_cli_tile_writes_a_grid(slide_path, tmp_path):
    from mini_kd.cli import main

    out = tmp_path / "grid.h5"
    assert main(["tile", str(slide_path), "--mag", "20", "--tile-size", "256", "--out", str(out)]) == 0
    assert len(TileGrid.load(out)) == 16


def test_loader_reads_whole_batches_not_tile_by_tile(slide_path, monkeypatch):
    from mini_kd.slides import Slide

    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, mag=20, tile_size=128)

    def one_tile(*args, **kwargs):
        raise AssertionError("the loader read a single tile")

    monkeypatch.setattr(Slide, "read", one_tile)
    assert sum(len(b) for b in tile_loader(slide_path, grid, batch_size=16)) == len(grid)
