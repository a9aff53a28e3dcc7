"""The phantom cohort: files, labels, determinism, tile fractions, and the premise it is built for."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from mini_kd import phantom
from mini_kd.errors import MiniKDError
from mini_kd.phantom import (MIMIC, NORMAL, TUMOUR, Cohort, ensure_cohort, make_cohort,
                             premise_check, render_slide)
from mini_kd.slides import open_slide

SMALL = dict(n_slides=6, seed=0, difficulty=0.5, slide_size=1536)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("phantom"), **SMALL)


def test_slides_are_20x_pyramids_with_5x_and_1_25x_levels(cohort):
    with open_slide(cohort.slide_path(cohort.ids()[0])) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.magnification == pytest.approx(20)
        assert slide.dimensions == (1536, 1536)
        assert slide.level_downsamples == pytest.approx((1, 4, 16))
    label_map, downsample = cohort.label_map(cohort.ids()[0])
    assert downsample == 4 and label_map.shape == (384, 384) and label_map.dtype == np.uint8


def test_labels_csv_holds_a_stratified_split(cohort):
    with open(cohort.root / "labels.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["slide_id", "label", "split"]
    assert len(rows) == 6 and sorted(int(row["label"]) for row in rows) == [0, 0, 0, 1, 1, 1]
    for split in ("train", "val", "test"):  # every split sees both classes
        assert sorted(cohort.labels(cohort.ids(split))) == [0, 1]
    assert json.loads((cohort.root / "cohort.json").read_text())["slide_size"] == 1536


def test_tumour_is_small_and_only_in_tumour_slides_while_mimics_are_everywhere(cohort):
    for slide_id, label in zip(cohort.ids(), cohort.labels(cohort.ids())):
        codes = np.bincount(cohort.label_map(slide_id)[0].ravel(), minlength=4)
        tissue = codes[NORMAL:].sum()
        assert 0.3 < tissue / codes.sum() < 0.65
        assert codes[MIMIC] > 0  # normal slides have dense look-alikes too
        if label == 1:
            assert 0.005 < codes[TUMOUR] / tissue < 0.15  # micro-metastasis sized
        else:
            assert codes[TUMOUR] == 0


def tumour_share(label_map: np.ndarray) -> float:
    codes = np.bincount(label_map.ravel(), minlength=4)
    return codes[TUMOUR] / codes[NORMAL:].sum()


def test_tumour_fraction_draws_each_tumour_slides_share_from_its_range():
    def shares(tumour_fraction):
        return [tumour_share(phantom.make_label_map(np.random.default_rng([0, index]), 512, True,
                                                    1.0, tumour_fraction)) for index in range(12)]

    small = shares((0.002, 0.03))
    assert 0.001 < min(small) and max(small) < 0.035 and max(small) / min(small) > 3
    assert min(shares(None)) > 0.008  # the difficulty's own share: 1-5 % at difficulty 1
    with pytest.raises(MiniKDError, match="tumour_fraction"):
        make_cohort("unused", tumour_fraction=(0.03, 0.002))


def test_same_seed_gives_the_same_slide_and_another_seed_does_not(cohort, tmp_path):
    slide_id, index = cohort.ids()[1], 1
    is_tumour = bool(cohort.labels([slide_id])[0])
    render_slide(tmp_path / "again.svs", tmp_path / "again.png", SMALL["seed"], index, is_tumour,
                 SMALL["difficulty"], SMALL["slide_size"])
    original = cohort.root / "masks" / f"{slide_id}.png"
    assert (tmp_path / "again.png").read_bytes() == original.read_bytes()
    with open_slide(cohort.slide_path(slide_id)) as a, open_slide(tmp_path / "again.svs") as b:
        assert np.array_equal(a.read(0, 0, 1536, 20), b.read(0, 0, 1536, 20))
    render_slide(tmp_path / "other.svs", tmp_path / "other.png", 1, index, is_tumour,
                 SMALL["difficulty"], SMALL["slide_size"])
    other = np.asarray(Image.open(tmp_path / "other.png"))
    assert not np.array_equal(other, cohort.label_map(slide_id)[0])


def test_tile_fractions_on_a_hand_made_label_map(tmp_path):
    (tmp_path / "masks").mkdir()
    label_map = np.zeros((8, 8), np.uint8)  # 32 x 32 level-0 px at downsample 4
    label_map[:4, :4] = NORMAL  # top-left quarter normal
    label_map[:2, 4:] = TUMOUR  # top-right: 2 rows of tumour over 2 rows of glass
    label_map[4:, 4:] = MIMIC  # bottom-right quarter mimic
    Image.fromarray(label_map).save(tmp_path / "masks" / "hand.png")
    cases = Cohort(tmp_path, [dict(slide_id="hand", label=1, split="train")])
    coords = np.array([[0, 0], [16, 0], [16, 16], [24, 24]])  # level-0 corners
    fractions = cases.tile_fractions("hand", coords, footprint=16)  # (4, 4)
    np.testing.assert_allclose(fractions, [
        [0, 1, 0, 0],  # all normal
        [0.5, 0, 0, 0.5],  # half tumour, half glass
        [0, 0, 1, 0],  # all mimic
        [0.75, 0, 0.25, 0],  # 3/4 of the tile lies beyond the slide edge
    ])


def test_calibration_equalises_low_resolution_colour_as_difficulty_rises():
    def mean_colours(difficulty):
        rng = np.random.default_rng(3)
        look = phantom.random_appearance(rng)
        look.tint = phantom.calibrate(rng, look, difficulty)
        means = {}
        for code in (MIMIC, TUMOUR):
            region = np.full((128, 128), code, np.uint8)  # a 512 x 512 px patch of one class
            pixels = phantom.PhantomImage(rng, region, 512, look)[:][64:-64, 64:-64]
            means[code] = pixels.reshape(-1, 3).mean(axis=0)
        return means

    hard, easy = mean_colours(1.0), mean_colours(0.0)
    assert np.abs(hard[MIMIC] - hard[TUMOUR]).max() < 3  # grey levels: the same purple smudge
    assert (easy[MIMIC] < easy[TUMOUR] - 2).all()  # at difficulty 0 the mimics stay darker


def test_premise_cue_visible_at_20x_and_faint_at_1_25x(cohort):
    result = premise_check(cohort, n_tiles=200, tile_size=128, seed=0)
    assert result["n_tiles"] == 200
    assert result["hr_accuracy"] >= 0.9
    assert result["lr_accuracy"] <= 0.7
    assert result["hr_accuracy"] - result["lr_accuracy"] >= 0.25


def test_ensure_cohort_reuses_a_matching_cohort_and_rebuilds_otherwise(tmp_path):
    config = dict(n_slides=6, seed=0, difficulty=0.5, slide_size=512)
    first = ensure_cohort(tmp_path, **config)
    mask = first.root / "masks" / f"{first.ids()[0]}.png"
    stamp = mask.stat().st_mtime_ns
    assert ensure_cohort(tmp_path, **config).ids() == first.ids()
    assert mask.stat().st_mtime_ns == stamp  # loaded, not regenerated
    rebuilt = ensure_cohort(tmp_path, **{**config, "seed": 1})
    assert json.loads((rebuilt.root / "cohort.json").read_text())["seed"] == 1
    assert mask.stat().st_mtime_ns != stamp


def test_impossible_configurations_say_how_to_fix_them(tmp_path):
    with pytest.raises(MiniKDError, match="n_slides >= 6"):
        make_cohort(tmp_path, n_slides=2)
    with pytest.raises(MiniKDError, match="difficulty"):
        make_cohort(tmp_path, difficulty=1.5)
    with pytest.raises(MiniKDError, match="labels.csv"):
        phantom.load_cohort(tmp_path / "nowhere")


def test_class_tiles_are_mostly_of_their_class_and_too_many_is_an_error(cohort):
    picks = phantom.class_tiles(cohort, TUMOUR, 12, 128, np.random.default_rng(0), min_fraction=0.7)
    assert picks.shape == (12, 3) and picks.dtype == np.int64
    for index, x, y in picks:
        fractions = cohort.tile_fractions(cohort.ids()[index], [[x, y]], footprint=128)[0]
        assert fractions[TUMOUR] >= 0.7
    tiles = phantom.read_cohort_tiles(cohort, picks[:2], 8, 1.25)
    assert tiles.shape == (2, 8, 8, 3) and tiles.dtype == np.uint8
    with pytest.raises(MiniKDError, match="fewer than"):
        phantom.class_tiles(cohort, TUMOUR, 10**6, 128, np.random.default_rng(0))


def test_a_public_cohort_folder_loads_for_the_gpu_preset(cohort, tmp_path, monkeypatch):
    from mini_kd.presets import cohort as preset_cohort

    public = tmp_path / "camelyon16"
    (public / "slides").mkdir(parents=True)
    first, second = cohort.ids()[:2]
    (public / "slides" / "tumor_001.tif").write_bytes(cohort.slide_path(first).read_bytes())
    (public / "slides" / "normal_001.tif.part").write_bytes(b"half a download")
    (public / "labels.csv").write_text("slide_id,label,split\ntumor_001,1,train\nnormal_001,0,test\n")
    monkeypatch.setenv("MINI_KD_COHORT", str(public))
    with pytest.raises(MiniKDError, match="missing from .*normal_001.*resumes"):
        preset_cohort("gpu")
    (public / "slides" / "normal_001.svs").write_bytes(cohort.slide_path(second).read_bytes())
    cases = preset_cohort("gpu")
    assert cases.slide_path("tumor_001").name == "tumor_001.tif"
    assert cases.slide_path("normal_001").name == "normal_001.svs"
    assert cases.labels(["tumor_001", "normal_001"]).tolist() == [1, 0]
    assert cohort.has_label_maps and not cases.has_label_maps
    with pytest.raises(MiniKDError, match="only phantom cohorts"):
        cases.label_map("tumor_001")
