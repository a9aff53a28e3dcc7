"""Opening slides, reading at any magnification, and every bad slide a user can hand us."""

import numpy as np
import pytest
import tifffile

from mini_kd import MiniKDError
from mini_kd.cli import main
from mini_kd.pyramid import write_pyramid
from mini_kd.slides import open_slide


def _tissue_image(width, height, seed=0):
    """A pink block of 'tissue' with noise on white glass."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 245, np.uint8)
    image[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = (200, 110, 170)
    return (image - rng.integers(0, 8, image.shape)).astype(np.uint8)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "block.svs"
    return write_pyramid(path, _tissue_image(2001, 1601), mpp=0.5, magnification=20)


def test_metadata_gives_mpp_magnification_and_pyramid(slide_path):
    with open_slide(slide_path) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.magnification == pytest.approx(20)
        assert slide.dimensions == (2001, 1601)
        assert slide.level_count == 3
        assert slide.slide_id == "block"


def test_level_choice_tolerates_rounded_downsamples(slide_path):
    with open_slide(slide_path) as slide:
        assert slide.level_downsamples[1] == pytest.approx(4.002, abs=1e-3)  # 2001 / 500
        assert slide.level_for(4.0) == 1  # 4.002 serves a request for 4
        assert slide.level_for(3.9) == 0
        assert slide.level_for(16.0) == 2
        assert slide.level_for(100.0) == 2


def test_read_at_lower_magnification_is_the_area_average(slide_path):
    with open_slide(slide_path) as slide:
        hr = slide.read(600, 480, 256, mag=20).astype(float)  # (256, 256, 3)
        lr = slide.read(600, 480, 64, mag=5).astype(float)  # same footprint, 4x fewer pixels per side
        assert hr.shape == (256, 256, 3) and lr.shape == (64, 64, 3)
        assert slide.footprint(64, 5) == 256
        pooled = hr.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
        assert np.abs(pooled - lr).mean() < 6  # JPEG at two levels, same tissue


def test_read_outside_the_slide_is_white(slide_path):
    with open_slide(slide_path) as slide:
        tile = slide.read(1900, 1500, 256, mag=20)
        assert tile.shape == (256, 256, 3)
        assert (tile[120:, :] == 255).all() and (tile[:, 120:] == 255).all()


def test_read_tiles_equals_reading_tile_by_tile(slide_path):
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.integers(0, 2000, (40, 2)),  # scattered, unaligned
                             [[1900, 1500], [0, 0], [2000, 1600], [128, 0], [256, 0]]])
    with open_slide(slide_path) as slide:
        for size, mag in [(128, 20), (64, 10), (32, 5), (8, 1.25), (48, 3)]:
            batch = slide.read_tiles(coords, size, mag)
            one_by_one = np.stack([slide.read(x, y, size, mag) for x, y in coords])
            assert batch.shape == (len(coords), size, size, 3)
            np.testing.assert_array_equal(batch, one_by_one)


def test_thumbnail_covers_the_slide(slide_path):
    with open_slide(slide_path) as slide:
        thumbnail = slide.thumbnail(1.25)
    assert thumbnail.shape == (100, 125, 3)  # 1601 / 16, 2001 / 16


def test_mpp_override_changes_magnification(slide_path):
    with open_slide(slide_path, mpp=0.25) as slide:
        assert slide.magnification == pytest.approx(40)


def test_missing_path(tmp_path):
    with pytest.raises(MiniKDError, match="no slide at"):
        open_slide(tmp_path / "nope.svs")


def test_truncated_slide(slide_path, tmp_path):
    data = slide_path.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MiniKDError, match="truncated|cannot read"):
        open_slide(cut)


def test_file_that_is_not_a_slide(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("these are not pixels")
    with pytest.raises(MiniKDError, match="cannot read"):
        open_slide(path)


def test_missing_mpp_needs_an_override(tmp_path):
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, _tissue_image(512, 512), tile=(256, 256), photometric="rgb")
    with pytest.raises(MiniKDError, match="does not record its resolution"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.magnification == pytest.approx(20)


def test_absurd_mpp_needs_an_override(tmp_path):
    path = tmp_path / "inch.tif"  # 28.35 px/inch reads as 896 µm/px, as some exported TIFFs do
    tifffile.imwrite(path, _tissue_image(512, 512), tile=(256, 256), photometric="rgb",
                     resolution=(28.35, 28.35), resolutionunit="INCH")
    with pytest.raises(MiniKDError, match="outside the range"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.svs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mini-kd: error: no slide at") and "\n" not in err


def test_cli_info(slide_path, capsys):
    assert main(["info", str(slide_path)]) == 0
    out = capsys.readouterr().out
    assert "20x" in out and "level 2" in out
