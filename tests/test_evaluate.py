"""Metrics against scikit-learn on hand-made cases, ResKD's bootstrap, splits, timers and FLOPs."""

import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn

from mini_kd import MiniKDError
from mini_kd.inference import StageTimer
from mini_kd.evaluate import (slide_metrics, bootstrap_ci, bootstrap_indices, class_balanced_weights,
                              classification_metrics, count_flops, format_mean_std, gflops,
                              kfold_splits, repeated_splits, summarize)
from mini_kd.experiments import Experiment

# six slides, two classes: one tumour slide is missed (P = 0.4) and one normal slide is called tumour
Y_BINARY = [0, 0, 0, 1, 1, 1]
P_TUMOUR = [0.1, 0.3, 0.6, 0.4, 0.8, 0.9]


def test_binary_metrics_match_scikit_learn():
    metrics = classification_metrics(Y_BINARY, P_TUMOUR)
    predicted = [0, 0, 1, 0, 1, 1]
    assert metrics["auc"] == pytest.approx(roc_auc_score(Y_BINARY, P_TUMOUR))
    assert metrics["auc"] == pytest.approx(8 / 9)   # 8 of the 9 (tumour, normal) pairs are ordered right
    assert metrics["accuracy"] == pytest.approx(accuracy_score(Y_BINARY, predicted)) == pytest.approx(4 / 6)
    assert metrics["f1"] == pytest.approx(f1_score(Y_BINARY, predicted, average="weighted"))
    assert metrics["balanced_accuracy"] == pytest.approx(4 / 6)
    assert metrics["auc_defined"]


def test_multiclass_auc_is_one_vs_rest_macro():
    y = np.array([0, 1, 2, 0, 1, 2, 2, 0])
    probs = np.array([[.7, .2, .1], [.2, .5, .3], [.1, .3, .6], [.3, .4, .3],
                      [.5, .3, .2], [.2, .2, .6], [.3, .3, .4], [.6, .3, .1]])
    metrics = classification_metrics(y, probs)
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    weighted = f1_score(y, probs.argmax(1), average="weighted")   # LRMIL's F1: weighted by support
    assert metrics["f1"] == pytest.approx(weighted)
    assert weighted != pytest.approx(f1_score(y, probs.argmax(1), average="macro"))


def test_auc_of_a_single_class_is_nan_not_an_exception():
    metrics = classification_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert math.isnan(metrics["auc"]) and not metrics["auc_defined"]
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_metrics_refuse_mismatched_lengths():
    with pytest.raises(MiniKDError, match="one row of probabilities per label"):
        classification_metrics([0, 1, 1], [[0.5, 0.5]])


def test_class_balanced_resampling_draws_every_class_equally_often():
    y = np.array([0] * 90 + [1] * 10)                       # 9 : 1 imbalance
    weights = class_balanced_weights(y)
    assert weights[:90].sum() == pytest.approx(0.5) and weights[90:].sum() == pytest.approx(0.5)
    drawn = y[bootstrap_indices(y, n=2000, seed=0)]         # (2000, 100) labels of the resamples
    assert drawn.mean() == pytest.approx(0.5, abs=0.01)
    assert y[bootstrap_indices(y, n=2000, class_balanced=False)].mean() == pytest.approx(0.1, abs=0.01)


def test_bootstrap_ci_brackets_the_point_and_repeats_with_its_seed():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 300)
    y_pred = np.where(rng.random(300) < 0.8, y_true, rng.integers(0, 3, 300))
    point, low, high = bootstrap_ci(y_true, y_pred, metric="f1", n=2000, seed=1)
    assert low < point < high and high - low < 0.2
    assert bootstrap_ci(y_true, y_pred, metric="f1", n=2000, seed=1) == (point, low, high)
    assert bootstrap_ci(y_true, y_pred, metric="f1", n=2000, seed=2) != (point, low, high)


def test_bootstrap_point_is_the_per_class_one_vs_rest_mean():
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [0, 0, 0, 1, 1, 0]
    # class 0 against the rest: 4 of 6 right; class 1 against the rest: the same 4 of 6
    assert bootstrap_ci(y_true, y_pred, "accuracy", n=100, class_balanced=False)[0] == pytest.approx(4 / 6)
    # recall: class 0 finds 3 of 4, class 1 finds 1 of 2 -> (0.75 + 0.5) / 2, whatever the weighting
    assert bootstrap_ci(y_true, y_pred, "recall", n=100)[0] == pytest.approx(0.625)
    with pytest.raises(MiniKDError, match="unknown bootstrap metric"):
        bootstrap_ci(y_true, y_pred, "auc")


def test_ten_thousand_draws_are_fast():
    y = np.arange(1000) % 3
    start = time.perf_counter()
    bootstrap_ci(y, np.roll(y, 1), n=10_000)
    assert time.perf_counter() - start < 3.0


def test_summarize_gives_mean_and_sample_std_over_runs():
    runs = [{"auc": 0.8, "accuracy": 0.7, "auc_defined": True},
            {"auc": 0.9, "accuracy": 0.9, "auc_defined": True},
            {"auc": math.nan, "accuracy": 0.8, "auc_defined": False}]
    summary = summarize(runs)
    assert summary["accuracy"] == pytest.approx((0.8, 0.1))
    assert summary["auc"][0] == pytest.approx(0.85)          # the undefined AUC is left out
    assert "auc_defined" not in summary
    assert format_mean_std(*summary["accuracy"]) == "0.800 ± 0.100"
    assert format_mean_std(*summarize(runs[:1])["accuracy"]) == "0.700"


def test_repeated_splits_are_stratified_disjoint_and_repeatable():
    ids = [f"slide_{i:02d}" for i in range(20)]
    labels = [i % 2 for i in range(20)]
    splits = repeated_splits(ids, labels, n_splits=3, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert splits == repeated_splits(ids, labels, n_splits=3, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert splits[0] != splits[1]
    for split in splits:
        assert sorted(split["train"] + split["val"] + split["test"]) == ids
        assert len(split["test"]) == 4 and len(split["val"]) == 4
        for part in split.values():                          # both classes equally in every part
            assert sum(labels[ids.index(i)] for i in part) == len(part) / 2


def test_repeated_splits_explain_a_cohort_too_small_to_stratify():
    with pytest.raises(MiniKDError, match="larger cohort"):
        repeated_splits(["a", "b", "c"], [0, 0, 1], n_splits=1, test_fraction=0.3)


def test_kfold_splits_test_every_slide_once_with_validation_from_the_folds_own_training_part():
    ids = [f"slide_{i:02d}" for i in range(24)]
    labels = [i % 2 for i in range(24)]
    folds = kfold_splits(ids, labels, k=4, seed=0)
    assert folds == kfold_splits(ids, labels, k=4, seed=0) != kfold_splits(ids, labels, k=4, seed=1)
    assert sorted(i for fold in folds for i in fold["test"]) == ids  # every slide tested once
    for fold in folds:
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == ids
        assert not set(fold["val"]) & set(fold["test"]) and not set(fold["train"]) & set(fold["val"])
        assert len(fold["test"]) == 6 and len(fold["val"]) == 4
        for part in fold.values():                           # both classes equally in every part
            assert sum(labels[ids.index(i)] for i in part) == len(part) / 2
    with pytest.raises(MiniKDError, match="at least k"):
        kfold_splits(ids[:6], labels[:6], k=4)              # 3 slides per class, 4 folds


def test_an_experiment_pools_out_of_fold_predictions_with_a_bootstrap_interval():
    experiment = Experiment("smoke", "cohort", [{"test": list("abc")}, {"test": list("def")}],
                            {"m": "a model"})
    experiment.record(0, "m", ["a", "b", "c"], [0, 1, 1], [0.1, 0.9, 0.4])
    experiment.record(1, "m", ["d", "e", "f"], [0, 0, 1], [0.6, 0.2, 0.8])
    pooled = experiment.pooled()["m"]
    assert pooled["n_slides"] == 6
    assert pooled["auc"] == pytest.approx(roc_auc_score([0, 1, 1, 0, 0, 1], [0.1, 0.9, 0.4, 0.6, 0.2, 0.8]))
    assert pooled["auc_ci"][0] <= pooled["auc"] <= pooled["auc_ci"][1] and pooled["auc_ci"][0] < 1
    row = experiment.summary()[0]
    assert row["auc_mean"] == pytest.approx(np.mean([1.0, 1.0]))  # each fold ranks its slides right
    out = experiment.to_json()
    assert out["m"]["auc"] == pytest.approx(pooled["auc"]) and out["m"]["auc_fold_mean"] == 1.0
    assert len(out["predictions"]) == 6
    assert experiment.table()[0]["auc"].startswith(f"{pooled['auc']:.3f} [")


def test_stage_timer_adds_up_repeated_stages():
    timer = StageTimer()
    for _ in range(2):
        with timer.stage("read"):
            time.sleep(0.01)
    with timer.stage("encode"):
        pass
    assert list(timer.seconds) == ["read", "encode"]
    assert timer.seconds["read"] >= 0.02
    assert timer.total == pytest.approx(timer.seconds["read"] + timer.seconds["encode"])


def test_flops_of_a_linear_layer_are_two_per_multiply_add():
    layer = nn.Linear(10, 20).train()
    assert count_flops(layer, torch.randn(4, 10)) == 2 * 4 * 10 * 20
    assert gflops(layer, torch.randn(4, 10)) == pytest.approx(1600 / 1e9)
    assert layer.training                                    # its mode is given back


def test_plain_makes_strict_json_of_numpy_values_and_undefined_metrics():
    import json
    from pathlib import Path

    from mini_kd.evaluate import plain

    value = {"auc": float("nan"), "n": np.int64(3), "ci": (np.float32(0.5), 1.0),
             "rows": np.array([1, 2]), "path": Path("a/b"), 4: [np.inf]}
    out = plain(value)
    assert out == {"auc": None, "n": 3, "ci": [0.5, 1.0], "rows": [1, 2], "path": "a/b", "4": [None]}
    json.dumps(out, allow_nan=False)  # raises ValueError on any NaN left


# -- slide metrics with a stratified bootstrap over slides ----------------------------------------
def test_slide_metrics_by_hand_and_their_intervals():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.9])  # pairs (tumour > normal): 0.4>0.1, 0.9>0.1, 0.9>0.6 -> 3/4
    out = slide_metrics(y, p, n=4000, seed=1)
    assert out["auc"] == 0.75 and out["accuracy"] == 0.5 and out["n_slides"] == 4
    assert out["auc_ci"][0] < 0.75 < out["auc_ci"][1] and out["auc_ci"][1] == 1.0
    separated = slide_metrics(y, np.array([0.1, 0.2, 0.8, 0.9]), n=500)
    assert separated["auc_ci"] == [1.0, 1.0] and separated["accuracy_ci"] == [1.0, 1.0]


def test_slide_metrics_interval_narrows_with_more_slides_and_matches_a_resample_by_hand():
    rng = np.random.default_rng(0)

    def cohort(size):
        y = np.repeat([0, 1], size // 2)
        return y, np.clip(0.35 * y + 0.65 * rng.random(size), 0, 1)

    small, large = slide_metrics(*cohort(20), n=1000), slide_metrics(*cohort(400), n=1000)
    width = lambda out: out["auc_ci"][1] - out["auc_ci"][0]  # noqa: E731
    assert width(large) < width(small) / 2.5  # about 1/sqrt(20) of the width
    y, p = cohort(30)
    out = slide_metrics(y, p, n=3000, seed=3)
    # the bootstrap distribution is centred on the point estimate (a stratified resample by hand)
    draws = [classification_metrics(y[i], p[i])["auc"] for i in
             (np.concatenate([rng.choice(np.flatnonzero(y == c), 15) for c in (0, 1)])
              for _ in range(300))]
    assert abs(np.mean(draws) - out["auc"]) < 0.03
    assert out["auc_ci"][0] < np.mean(draws) < out["auc_ci"][1]
