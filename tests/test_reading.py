"""Reading decodes each stored JPEG tile that a request overlaps once, and nothing else.

The test slide is 1040 x 784 px at 20x, stored in 256-px JPEG tiles: level 0 is a grid of
5 columns x 4 rows of stored tiles (index = 5 · row + column; the last column and row are
partly padding), level 1 (4x down, 260 x 196 px) is 2 x 1 stored tiles. Decodes are counted by
wrapping the JPEG decoder that tifffile calls, and each decoded byte string is matched to the
stored tile it came from.
"""

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from mini_kd import MiniKDError
from mini_kd.cli import main
from mini_kd.pyramid import write_pyramid
from mini_kd.slides import open_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = np.full((784, 1040, 3), 240, np.uint8)
    image[100:700, 150:950] = (190, 100, 160)  # "tissue" on glass
    image = (image - rng.integers(0, 40, image.shape)).astype(np.uint8)  # texture for JPEG
    path = tmp_path_factory.mktemp("reading") / "grid.svs"
    return write_pyramid(path, image, mpp=0.5, magnification=20, downsamples=(1, 4), tile=256)


def _stored_tiles(path, page_index):
    """{bytes of stored tile: its index} of one page, read with tifffile alone."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[page_index]
        stored = {}
        for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            tif.filehandle.seek(offset)
            stored[tif.filehandle.read(count)] = index
    return stored


@pytest.fixture
def decoded(monkeypatch):
    """The list that every JPEG decode appends its input bytes to."""
    inputs = []
    decode = imagecodecs.jpeg_decode

    def counting(data, *args, **kwargs):
        inputs.append(bytes(data))
        return decode(data, *args, **kwargs)

    monkeypatch.setattr(imagecodecs, "jpeg_decode", counting)
    return inputs


def _indices(decoded, path, page_index=0):
    stored = _stored_tiles(path, page_index)
    return sorted(stored[data] for data in decoded)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_sparse_request_decodes_only_the_stored_tiles_under_its_tiles(slide_path, decoded, threads):
    coords = [[0, 0],       # stored tile 0
              [128, 128],   # stored tile 0 again: not decoded twice
              [200, 0],     # x 200..327 straddles columns 0 and 1: tiles 0, 1
              [768, 512],   # row 2, column 3: tile 13
              [1000, 700]]  # partly outside: columns 3, 4 x rows 2, 3: tiles 13, 14, 18, 19
    with open_slide(slide_path) as slide:
        slide.decode_threads = threads
        slide.read_tiles(coords, 128, 20)
    assert _indices(decoded, slide_path) == [0, 1, 13, 14, 18, 19]  # 6 of the 20 stored tiles


def test_a_dense_request_decodes_each_stored_tile_once(slide_path, decoded):
    xs, ys = np.meshgrid(np.arange(0, 1040, 128), np.arange(0, 784, 128))  # 9 x 7 tiles, 63
    with open_slide(slide_path) as slide:
        tiles = slide.read_tiles(np.stack([xs, ys], -1).reshape(-1, 2), 128, 20)
    assert tiles.shape == (63, 128, 128, 3)
    assert _indices(decoded, slide_path) == list(range(20))  # 63 tiles, 20 decodes


def test_tiles_on_the_stored_grid_are_decoded_straight_into_the_batch(slide_path, decoded):
    coords = [[0, 0], [256, 256], [512, 0], [256, 256], [100, 100]]  # 3 on the grid, one twice
    with open_slide(slide_path) as slide, openslide.OpenSlide(str(slide_path)) as reference:
        tiles = slide.read_tiles(coords, 256, 20)
        theirs = np.stack([np.asarray(reference.read_region((x, y), 0, (256, 256)))[..., :3]
                           for x, y in coords])
    np.testing.assert_array_equal(tiles, theirs)
    assert _indices(decoded, slide_path) == [0, 1, 2, 5, 6]  # (100, 100) also needs 1, 5 and 6


def test_a_lower_magnification_decodes_the_coarser_level_only(slide_path, decoded):
    with open_slide(slide_path) as slide:
        slide.read_tiles([[0, 0], [512, 0], [1000, 0]], 32, 5)  # level-1 x 0..31, 128..159, 250..259
    # level 1 is page 2 (page 1 is the thumbnail): x < 256 is its stored tile 0, x >= 256 tile 1
    assert _indices(decoded, slide_path, page_index=2) == [0, 1]


def test_tiles_equal_openslide_pixel_for_pixel(slide_path):
    rng = np.random.default_rng(1)
    with open_slide(slide_path) as slide, openslide.OpenSlide(str(slide_path)) as reference:
        for level, size, mag in [(0, 128, 20), (0, 300, 20), (1, 64, 5)]:
            step = 4 ** level  # corners on the level's pixel lattice, as openslide maps them
            coords = step * rng.integers(0, [1040 // step - size, 784 // step - size], (12, 2))
            ours = slide.read_tiles(coords, size, mag)
            theirs = np.stack([np.asarray(reference.read_region((int(x), int(y)), level, (size, size)))
                               for x, y in coords])  # (12, size, size, 4) RGBA
            np.testing.assert_array_equal(ours, theirs[..., :3])


def test_tiles_partly_outside_match_openslide_inside_and_are_white_outside(slide_path):
    with open_slide(slide_path) as slide, openslide.OpenSlide(str(slide_path)) as reference:
        [ours] = slide.read_tiles([[960, 700]], 128, 20)  # 80 x 84 px inside the slide
        theirs = np.asarray(reference.read_region((960, 700), 0, (128, 128)))
    np.testing.assert_array_equal(ours[:84, :80], theirs[:84, :80, :3])
    assert (ours[84:] == 255).all() and (ours[:, 80:] == 255).all()


def test_resampled_reads_equal_reading_tile_by_tile(slide_path):
    coords = [[0, 0], [333, 517], [1000, 700], [-50, 20]]
    with open_slide(slide_path) as slide:
        for size, mag in [(64, 10), (48, 3), (16, 1.25)]:  # no level stores 10x, 3x or 1.25x
            one_by_one = np.stack([slide.read(x, y, size, mag) for x, y in coords])
            np.testing.assert_array_equal(slide.read_tiles(coords, size, mag), one_by_one)


def test_two_threads_read_the_same_pixels_as_one(slide_path):
    coords = np.random.default_rng(2).integers(-100, 1100, (30, 2))
    with open_slide(slide_path) as slide:
        slide.decode_threads = 1
        alone = slide.read_tiles(coords, 96, 20)
        slide.decode_threads = 2
        np.testing.assert_array_equal(slide.read_tiles(coords, 96, 20), alone)


# -- pixel formats ------------------------------------------------------------------------------
RESOLUTION = dict(resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # 0.5 µm/px


def test_a_greyscale_slide_reads_as_rgb_with_the_grey_in_every_channel(tmp_path):
    grey = np.arange(300 * 520, dtype=np.uint32).reshape(300, 520).astype(np.uint8)  # (H, W)
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, tile=(256, 256), compression="zlib", **RESOLUTION)  # lossless
    with open_slide(path) as slide:
        tile = slide.read(200, 100, 128, 20)  # straddles stored tiles 0 and 1
        thumbnail = slide.thumbnail(20)
    assert tile.shape == (128, 128, 3)
    np.testing.assert_array_equal(tile, np.repeat(grey[100:228, 200:328, None], 3, axis=2))
    np.testing.assert_array_equal(thumbnail[..., 1], grey)


def test_the_cli_tiles_a_greyscale_slide(tmp_path):
    grey = np.full((512, 512), 240, np.uint8)
    grey[:256, :256] = 90  # one quarter of dark "tissue"
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, tile=(256, 256), compression="zlib", **RESOLUTION)
    assert main(["tile", str(path), "--mag", "20", "--tile-size", "128", "--out",
                 str(tmp_path / "grid.h5")]) == 0


@pytest.mark.parametrize("image, options, message", [
    (np.zeros((300, 300, 3), np.uint16), dict(photometric="rgb"), "16-bit uint16 samples"),
    (np.zeros((300, 300), np.float32), dict(), "32-bit float32 samples"),
    (np.zeros((300, 300), np.uint8), dict(photometric="miniswhite"), "as MINISWHITE"),
])
def test_pixel_formats_we_do_not_read_are_refused_clearly(tmp_path, image, options, message):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, image, tile=(256, 256), **RESOLUTION, **options)
    with open_slide(path) as slide, pytest.raises(MiniKDError, match=message + ".*convert it"):
        slide.read(0, 0, 64, 20)


def test_a_damaged_stored_tile_is_a_clear_error(slide_path, tmp_path):
    data = bytearray(slide_path.read_bytes())
    with tifffile.TiffFile(slide_path) as tif:
        offset = tif.pages[0].dataoffsets[6]  # row 1, column 1
    data[offset: offset + 64] = bytes(64)  # no JPEG start marker any more
    damaged = tmp_path / "damaged.svs"
    damaged.write_bytes(bytes(data))
    with open_slide(damaged) as slide:
        slide.read(0, 0, 128, 20)  # stored tile 0 is intact
        for x, size in [(300, 128), (256, 256)]:  # cut from stored tile 6; decoded straight
            with pytest.raises(MiniKDError, match="cannot decode stored tile 6 .* download it again"):
                slide.read(x, x, size, 20)


@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
def test_a_tile_decoded_straight_equals_tifffiles_decode(tmp_path, photometric):
    image = np.random.default_rng(3).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    path = tmp_path / f"{photometric}.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="jpeg",
                     compressionargs={"outcolorspace": photometric}, **RESOLUTION)
    # "rgb": stored as RGB JPEGs without a JFIF marker, as Aperio does
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC[photometric.upper()]
        reference = tif.pages[0].asarray()  # (512, 512, 3), tifffile's own decoding
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read(256, 0, 256, 20), reference[:256, 256:])
