"""ResKD per fold for the side-by-side benchmark: the teacher at 20x and the ÷4 KD student at 5x
as slide classifiers, trained once per fold and loaded from disk after."""

import json
import shutil

import pytest
import torch

from mini_kd import methods, presets
from mini_kd.experiments import reskd as experiment
from mini_kd.methods import reskd
from mini_kd.phantom import load_cohort


class Retrained(Exception):
    """Raised by a ``fit`` that must not be called."""


def _no_fit(*args, **kwargs):
    raise Retrained


@pytest.fixture(scope="module")
def cohort(session_data):
    return presets.phantom_cohort("smoke")


@pytest.fixture(scope="module")
def split(cohort):
    return {name: cohort.ids(name) for name in ("train", "val", "test")}


@pytest.fixture(scope="module")
def models(cohort, split):
    return experiment.slide_classifiers(cohort, split, "smoke")


def test_a_fold_gives_the_teacher_at_20x_and_the_x4_student_at_5x(models, cohort, split):
    assert list(models) == ["reskd_teacher", "reskd_student"]
    teacher, student = models["reskd_teacher"], models["reskd_student"]
    assert isinstance(teacher, reskd.Trained) and isinstance(student, reskd.Trained)
    assert (teacher.config.factor, student.config.factor) == (1, 4)
    assert teacher.config.top_k == student.config.top_k == experiment.FOLD_CONFIG["top_k"]
    assert teacher.region_size == student.region_size == experiment.FOLD_SCHEDULE["smoke"]["region_size"]
    slide = cohort.slide_path(split["test"][0])
    by_teacher, by_student = teacher.predictor("cpu")(slide), student.predictor("cpu")(slide)
    assert isinstance(by_student, methods.Prediction)
    # the same tissue squares, read at 20x (128 px) by the teacher and at 5x (32 px) by the student
    assert list(by_teacher.tiles_read) == [20.0] and list(by_student.tiles_read) == [5.0]
    assert by_teacher.tiles_read[20.0] == by_student.tiles_read[5.0] > 0
    assert by_teacher.details["grid"].coords.tolist() == by_student.details["grid"].coords.tolist()
    assert by_student.probability == pytest.approx(by_student.details["p_tumour"].max())  # top_k 1
    assert not torch.equal(teacher.network.classifier.weight, student.network.classifier.weight)


def test_a_second_call_loads_both_networks_and_trains_nothing(models, cohort, split, monkeypatch):
    monkeypatch.setattr(reskd, "fit", _no_fit)
    # other test slides, the same train and val slides: the same fold's networks
    again = experiment.slide_classifiers(cohort, {**split, "test": split["test"][:1]}, "smoke")
    for name, model in models.items():
        assert again[name].config == model.config
        for key, value in model.network.state_dict().items():
            assert torch.equal(again[name].network.state_dict()[key], value), (name, key)
    with pytest.raises(Retrained):  # other validation slides: another fold, trained anew
        experiment.slide_classifiers(cohort, {**split, "val": split["val"][:1]}, "smoke")


def test_a_cohort_made_again_with_other_settings_is_trained_anew(models, cohort, split, tmp_path,
                                                                monkeypatch):
    root = tmp_path / "cohort"
    shutil.copytree(cohort.root, root, ignore=shutil.ignore_patterns("grids", "features"))
    copy = load_cohort(root)
    experiment.slide_classifiers(copy, split, "smoke")
    settings = json.loads((root / "cohort.json").read_text())
    (root / "cohort.json").write_text(json.dumps({**settings, "difficulty": 0.9}))
    monkeypatch.setattr(reskd, "fit", _no_fit)
    with pytest.raises(Retrained):
        experiment.slide_classifiers(copy, split, "smoke")
