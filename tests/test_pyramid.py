"""Writing Aperio-like pyramids that tiffslide (and so open_slide) reads with the right metadata."""

import numpy as np
import pytest
import tifffile
import tiffslide

from mini_kd.errors import MiniKDError
from mini_kd.pyramid import pyramid_from_slide, write_pyramid


def _stripes(width, height):
    """Smooth colour ramps: JPEG keeps them almost exactly, so pixel checks can be tight."""
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    red = np.broadcast_to(200 + 40 * np.sin(x / 50), (height, width))
    green = np.broadcast_to(120 + 60 * np.cos(y / 80), (height, width))
    blue = 150 + 30 * np.sin((x + y) / 90)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)  # (H, W, 3)


class Rows:
    """A lazy image that only ever hands out row bands, as the phantom's renderer does."""

    def __init__(self, image):
        self.image, self.shape, self.requests = image, image.shape, []

    def __getitem__(self, rows):
        self.requests.append(rows)
        return self.image[rows]


def test_tiffslide_reads_aperio_metadata_and_levels(tmp_path):
    path = write_pyramid(tmp_path / "ramp.svs", _stripes(1024, 768), mpp=0.5, magnification=20)
    with tiffslide.TiffSlide(path) as slide:
        assert slide.properties["tiffslide.vendor"] == "aperio"
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
        assert slide.properties["tiffslide.objective-power"] == pytest.approx(20)
        assert slide.level_count == 3
        assert slide.level_dimensions == ((1024, 768), (256, 192), (64, 48))
        assert slide.level_downsamples == pytest.approx((1, 4, 16))


def test_levels_hold_the_area_average_of_level0(tmp_path):
    image = _stripes(1024, 768)
    path = write_pyramid(tmp_path / "ramp.svs", image, mpp=0.5, magnification=20)
    with tiffslide.TiffSlide(path) as slide:
        level0 = slide.read_region((0, 0), 0, (1024, 768), as_array=True).astype(float)
        level2 = slide.read_region((0, 0), 2, (64, 48), as_array=True).astype(float)
    assert np.abs(level0 - image).mean() < 2  # JPEG Q=90 on smooth ramps
    block_means = image.reshape(48, 16, 64, 16, 3).mean(axis=(1, 3))  # (48, 64, 3)
    assert np.abs(level2 - block_means).mean() < 2


def test_odd_sized_image_keeps_floor_sized_levels(tmp_path):
    image = _stripes(1001, 517)  # neither a multiple of the 256-px tile nor of 16
    source = Rows(image)
    path = write_pyramid(tmp_path / "odd.svs", source, mpp=0.25, magnification=40)
    assert all(rows.stop - rows.start == 256 for rows in source.requests)  # read in bands only
    with tiffslide.TiffSlide(path) as slide:
        assert slide.properties["tiffslide.objective-power"] == pytest.approx(40)
        assert slide.level_dimensions == ((1001, 517), (250, 129), (62, 32))
        corner = slide.read_region((960, 480), 0, (41, 37), as_array=True).astype(float)
    assert np.abs(corner - image[480:, 960:]).mean() < 3  # the padded edge tile decodes right


def test_bad_arguments_say_how_to_fix_them(tmp_path):
    with pytest.raises(MiniKDError, match="mpp"):
        write_pyramid(tmp_path / "a.svs", _stripes(64, 64), mpp=0, magnification=20)
    with pytest.raises(MiniKDError, match="smaller than the largest downsample"):
        write_pyramid(tmp_path / "a.svs", _stripes(8, 8), mpp=0.5, magnification=20)
    with pytest.raises(MiniKDError, match="multiple of 16"):
        write_pyramid(tmp_path / "a.svs", _stripes(64, 64), mpp=0.5, magnification=20, tile=100)


def _single_level(path, image, mpp=None):
    """A plain tiled TIFF, as exported by many tools: one level, mpp only in the resolution tags."""
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb", **resolution)
    return path


def test_pyramid_from_a_single_level_slide(tmp_path):
    image = _stripes(900, 700)
    source = _single_level(tmp_path / "flat.tif", image, mpp=0.5)
    path = pyramid_from_slide(source, tmp_path / "pyramid.svs")
    with tiffslide.TiffSlide(path) as slide:
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
        assert slide.properties["tiffslide.objective-power"] == pytest.approx(20)  # 10 / mpp
        assert slide.level_dimensions == ((900, 700), (225, 175), (56, 43))
        level0 = slide.read_region((0, 0), 0, (900, 700), as_array=True).astype(float)
    assert np.abs(level0 - image).mean() < 2


def test_pyramid_from_slide_needs_a_believable_mpp(tmp_path):
    missing = _single_level(tmp_path / "missing.tif", _stripes(256, 256))
    with pytest.raises(MiniKDError, match="mpp"):
        pyramid_from_slide(missing, tmp_path / "out.svs")
    absurd = _single_level(tmp_path / "absurd.tif", _stripes(256, 256), mpp=1000)
    with pytest.raises(MiniKDError, match="outside the range"):
        pyramid_from_slide(absurd, tmp_path / "out.svs")
    path = pyramid_from_slide(absurd, tmp_path / "fixed.svs", mpp=0.25)  # the override fixes it
    with tiffslide.TiffSlide(path) as slide:
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.25)
        assert slide.properties["tiffslide.objective-power"] == pytest.approx(40)
