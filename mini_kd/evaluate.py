"""How the three papers score a model, and what it costs: metrics, confidence intervals, time, FLOPs.

- Slide-level metrics as LRMIL and AHDMIL report them: AUC (binary: ROC AUC of P(class 1);
  multi-class: one-vs-rest, macro), accuracy, weighted F1 (LRMIL), balanced accuracy.
- ResKD's confidence intervals (DiPalma et al. 2021): 10,000 bootstrap resamples drawn with
  class-balanced probabilities, a per-class one-vs-rest metric averaged over the classes, and the
  2.5 / 97.5 percentiles.
- Spread over folds or repeated stratified splits: mean ± standard deviation.
- Cost: FLOPs counted by ``torch.utils.flop_counter`` (a multiply-add counts as 2); seconds per
  stage come from the slide pipeline (:mod:`mini_kd.inference`).
"""

from __future__ import annotations

import math
import warnings
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch.utils.flop_counter import FlopCounterMode

from mini_kd.errors import MiniKDError


# -- classification metrics ------------------------------------------------------------------------
def classification_metrics(y_true, probs) -> dict:
    """AUC, accuracy, weighted F1 and balanced accuracy of class probabilities.

    ``y_true``: (N,) integer labels 0..C-1. ``probs``: (N, C) class probabilities, or (N,) P(class 1)
    for two classes. The prediction is the most probable class.

    AUC is one-vs-rest per class, averaged over classes (for two classes: the ROC AUC of P(class 1)).
    It needs every class in ``y_true``; when one is missing (a small validation split) ``auc`` is
    NaN and ``auc_defined`` is False, instead of an exception halfway through a notebook.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)  # (N, 2)
    if probs.ndim != 2 or len(probs) != len(y_true) or len(y_true) == 0:
        raise MiniKDError(f"classification_metrics needs y_true (N,) and probs (N, C) with N > 0, got "
                          f"{y_true.shape} and {probs.shape}; pass one row of probabilities per label")
    n_classes = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    auc_defined = n_classes >= 2 and set(range(n_classes)) <= set(y_true.tolist())
    if not auc_defined:
        auc = math.nan
    elif n_classes == 2:
        auc = roc_auc_score(y_true, probs[:, 1])
    else:
        auc = float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in range(n_classes)]))
    return {
        "auc": float(auc),
        "auc_defined": bool(auc_defined),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
    }


def _balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes of ``y_true``; a predicted class absent from ``y_true`` is
    simply an error, so scikit-learn's warning about it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))


# -- ResKD's class-balanced bootstrap --------------------------------------------------------------
METRICS = ("accuracy", "f1", "precision", "recall")


def class_balanced_weights(y_true) -> np.ndarray:
    """float (N,): the probability of drawing each sample, 1 / (C * n_c) for a sample of class c.

    Every class is then drawn with probability 1/C, whatever its size in ``y_true``.
    """
    _, inverse, counts = np.unique(np.asarray(y_true), return_inverse=True, return_counts=True)
    return 1.0 / (len(counts) * counts[inverse])


def bootstrap_indices(y_true, n: int = 10_000, class_balanced: bool = True, seed: int = 0) -> np.ndarray:
    """int64 (n, N): the samples of each of ``n`` bootstrap resamples of size N, with replacement."""
    return np.concatenate(list(_index_chunks(np.asarray(y_true), n, class_balanced, seed)))


def _index_chunks(y_true: np.ndarray, n: int, class_balanced: bool, seed: int):
    """The resamples of :func:`bootstrap_indices`, a few million indices at a time.

    Class-balanced draws pick a class uniformly, then a sample of it uniformly: probability
    (1/C)(1/n_c) per sample, as :func:`class_balanced_weights` says, without a search per draw.
    """
    rng = np.random.default_rng(seed)
    size = len(y_true)
    by_class = np.argsort(y_true, kind="stable")                 # sample indices grouped by class
    _, first, counts = np.unique(y_true[by_class], return_index=True, return_counts=True)
    per_chunk = max(1, 2_000_000 // size)
    for start in range(0, n, per_chunk):
        shape = (min(per_chunk, n - start), size)
        if not class_balanced:
            yield rng.integers(0, size, size=shape)               # (draws, N)
            continue
        drawn_class = rng.integers(0, len(counts), size=shape)   # (draws, N)
        within = (rng.random(shape) * counts[drawn_class]).astype(np.int64)
        yield by_class[first[drawn_class] + within]               # (draws, N)


def _one_vs_rest(confusion: np.ndarray, metric: str, classes: np.ndarray) -> np.ndarray:
    """``metric`` of each class against the rest, averaged over ``classes``.

    ``confusion``: (..., C, C) counts, rows = true class, columns = predicted class. A ratio
    with nothing to count (no prediction of a class, for precision) is 0, as in scikit-learn.
    """
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)            # (..., C)
    fp = confusion.sum(axis=-2) - tp                            # predicted c, true another class
    fn = confusion.sum(axis=-1) - tp                            # true c, predicted another class
    total = confusion.sum(axis=(-2, -1))[..., None]             # (..., 1)
    numerator, denominator = {
        "accuracy": (total - fp - fn, total),
        "precision": (tp, tp + fp),
        "recall": (tp, tp + fn),
        "f1": (2 * tp, 2 * tp + fp + fn),
    }[metric]
    per_class = np.divide(numerator, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    return per_class[..., classes].mean(axis=-1)


def bootstrap_ci(y_true, y_pred, metric: str = "accuracy", n: int = 10_000,
                 class_balanced: bool = True, seed: int = 0, alpha: float = 0.05):
    """``(point, low, high)``: a metric and its (1 - alpha) percentile bootstrap interval (ResKD).

    Each of the ``n`` resamples draws N samples with replacement; with ``class_balanced`` a sample
    of class c is drawn with probability 1 / (C n_c) (inverse class frequency), so every resample
    holds the classes in about equal numbers. On each resample, ``metric`` ("accuracy", "f1",
    "precision" or "recall") is computed for every class of ``y_true`` against the rest, and the
    classes are averaged with equal weights. ``point`` is the same metric on the distribution the
    resamples are drawn from: ``y_true`` with each sample weighted by its drawing probability
    (with ``class_balanced=False``, the plain metric of ``y_true`` and ``y_pred``).
    """
    if metric not in METRICS:
        raise MiniKDError(f"unknown bootstrap metric {metric!r}; choose one of {', '.join(METRICS)}")
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise MiniKDError(f"bootstrap_ci needs y_true and y_pred of the same shape (N,), got "
                          f"{y_true.shape} and {y_pred.shape}")
    labels = np.union1d(y_true, y_pred)
    true_index = np.searchsorted(labels, y_true)
    cells = true_index * len(labels) + np.searchsorted(labels, y_pred)   # (N,) confusion cell of each sample
    classes = np.unique(true_index)                                       # averaged over y_true's classes
    n_cells = len(labels) ** 2

    weights = class_balanced_weights(y_true) if class_balanced else np.ones(len(y_true))
    confusion = np.bincount(cells, weights=weights, minlength=n_cells).reshape(len(labels), -1)
    point = float(_one_vs_rest(confusion, metric, classes))

    values = []
    for indices in _index_chunks(y_true, n, class_balanced, seed):       # (draws, N)
        draws = len(indices)
        offsets = np.arange(draws)[:, None] * n_cells                     # one confusion matrix per draw
        counts = np.bincount((cells[indices] + offsets).ravel(), minlength=draws * n_cells)
        values.append(_one_vs_rest(counts.reshape(draws, len(labels), len(labels)), metric, classes))
    low, high = np.percentile(np.concatenate(values), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(low), float(high)


# -- slide-level metrics with a bootstrap interval over slides ------------------------------------
def slide_metrics(y_true, p, n: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """AUC, accuracy and weighted F1 of slide probabilities ``p`` (N,) = P(class 1) for labels
    ``y_true`` (N,) in {0, 1}, each with its (1 - alpha) percentile interval over ``n`` bootstrap
    resamples of the slides.

    The resamples are stratified: each draws n_1 tumour and n_0 normal slides with replacement, so
    every resample holds both classes (the AUC is defined) in the proportions of ``y_true``. The
    AUC of a resample is the Mann-Whitney statistic, P(p_tumour > p_normal) + ½ P(tie).
    Returns ``{"auc", "auc_ci", "accuracy", "accuracy_ci", "f1", "f1_ci", "n_slides"}``.
    """
    y_true, p = np.asarray(y_true).astype(np.int64), np.asarray(p, dtype=np.float64)
    point = classification_metrics(y_true, p)
    out = {"n_slides": int(len(y_true))}
    positives, negatives = p[y_true == 1], p[y_true == 0]
    if not len(positives) or not len(negatives):
        return {**out, **{k: point[k] for k in ("auc", "accuracy", "f1")},
                "auc_ci": [math.nan] * 2, "accuracy_ci": [math.nan] * 2, "f1_ci": [math.nan] * 2}
    rng = np.random.default_rng(seed)
    pos = positives[rng.integers(0, len(positives), (n, len(positives)))]  # (n, n_1)
    neg = negatives[rng.integers(0, len(negatives), (n, len(negatives)))]  # (n, n_0)
    greater = (pos[:, :, None] > neg[:, None, :]).mean(axis=(1, 2))
    ties = (pos[:, :, None] == neg[:, None, :]).mean(axis=(1, 2))
    tp, fn = (pos > 0.5).sum(1), (pos <= 0.5).sum(1)  # (n,) per resample; > 0.5 as argmax
    tn, fp = (neg <= 0.5).sum(1), (neg > 0.5).sum(1)
    total = len(positives) + len(negatives)
    f1_tumour = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    f1_normal = 2 * tn / np.maximum(2 * tn + fn + fp, 1)
    draws = {"auc": greater + ties / 2, "accuracy": (tp + tn) / total,
             "f1": (len(positives) * f1_tumour + len(negatives) * f1_normal) / total}
    for name, values in draws.items():
        out[name] = point[name]
        out[f"{name}_ci"] = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)]).tolist()
    return out


# -- spread over folds and splits ------------------------------------------------------------------
def summarize(runs: list[dict]) -> dict:
    """``{metric: (mean, std)}`` over runs (folds, repeated splits) for every numeric metric.

    NaN values (an AUC undefined on one split) are left out of that metric's mean; the standard
    deviation is the sample one (n - 1) and NaN when fewer than two runs have the metric.
    Booleans and non-numbers are skipped.
    """
    keys = dict.fromkeys(key for run in runs for key in run)
    summary = {}
    for key in keys:
        values = [run[key] for run in runs if key in run]
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            continue
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if len(values) else math.nan
        std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        summary[key] = (mean, std)
    return summary


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"0.912 ± 0.013"``; only the mean when the spread is unknown (a single run)."""
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def repeated_splits(ids, labels, n_splits: int = 5, seed: int = 0, val_fraction: float = 0.2,
                    test_fraction: float = 0.2) -> list[dict]:
    """``n_splits`` random train/val/test splits of ``ids``, each stratified by ``labels``.

    Returns ``[{"train": [...], "val": [...], "test": [...]}, ...]`` (ids in their original order);
    the same arguments give the same splits. Repeating the experiment over these splits gives the
    mean ± std the MIL papers report over folds.
    """
    ids, labels = np.asarray(ids), np.asarray(labels)
    if len(ids) != len(labels):
        raise MiniKDError(f"repeated_splits got {len(ids)} ids and {len(labels)} labels; "
                          "pass one label per id")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise MiniKDError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no "
                          "training set; use fractions >= 0 whose sum is below 1")
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(n_splits):
        split_seed = int(rng.integers(2**31))
        rest, test = _split_off(np.arange(len(ids)), labels, test_fraction, split_seed)
        train, val = _split_off(rest, labels, val_fraction / (1 - test_fraction), split_seed)
        splits.append({name: ids[np.sort(part)].tolist()
                       for name, part in (("train", train), ("val", val), ("test", test))})
    return splits


def kfold_splits(ids, labels, k: int = 4, seed: int = 0, val_fraction: float = 0.2) -> list[dict]:
    """``k`` stratified folds of ``ids``: every id is a test id of exactly one fold.

    Each fold's validation ids are a stratified ``val_fraction`` of *its own* training part (at
    least one per class), never another fold's test ids; pooling the folds' test predictions
    scores every slide once, out of fold. Returns ``[{"train", "val", "test"}, ...]`` (ids in
    their original order); the same arguments give the same folds.
    """
    ids, labels = np.asarray(ids), np.asarray(labels)
    counts = np.unique(labels, return_counts=True)[1]
    if len(ids) != len(labels) or k < 2 or len(counts) < 2 or counts.min() < k + 1:
        raise MiniKDError(f"cannot cut {len(ids)} slides ({counts.tolist()} per class) into {k} "
                          "stratified folds with validation slides: every class needs at least "
                          f"k + 1 = {k + 1} slides and k must be at least 2")
    folds = []
    for fold, (rest, test) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed)
                                        .split(ids, labels)):
        n_val = max(len(counts), round(val_fraction * len(rest)))
        train, val = _split_off(rest, labels, n_val / len(rest), seed + fold)
        folds.append({name: ids[np.sort(part)].tolist()
                      for name, part in (("train", train), ("val", val), ("test", test))})
    return folds


def _split_off(index: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    """``(kept, split_off)``: a stratified ``fraction`` of ``index`` split off."""
    if fraction == 0:
        return index, index[:0]
    try:
        return train_test_split(index, test_size=fraction, stratify=labels[index], random_state=seed)
    except ValueError as error:
        raise MiniKDError(f"cannot split {len(index)} slides into stratified parts ({error}); use a "
                          "larger cohort, fewer classes, or larger val/test fractions") from error


# -- cost: time per stage and FLOPs ----------------------------------------------------------------
def count_flops(model: torch.nn.Module, example_input) -> int:
    """Floating-point operations of one forward pass (a multiply-add = 2), in eval mode, no grad.

    ``example_input``: a tensor, or a tuple of the forward's arguments. Counts the matrix
    multiplications and convolutions, which dominate; element-wise ops are not counted.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def gflops(model: torch.nn.Module, example_input) -> float:
    """:func:`count_flops` in units of 10^9."""
    return count_flops(model, example_input) / 1e9


# -- results as JSON ----------------------------------------------------------------------------
def plain(value):
    """``value`` with numpy scalars, arrays, tuples and paths turned into JSON types, and NaN or
    infinity into ``None`` (strict JSON has no NaN: an AUC on a one-class split is undefined)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
