"""How the methods are measured: splits, repeated runs, timing from the slide files, tables, JSON.

A method file (:mod:`mini_kd.methods`) says what a paper does; this package says how we measure
it. Each method has its experiment here (:mod:`~mini_kd.experiments.reskd`,
:mod:`~mini_kd.experiments.lrmil`, :mod:`~mini_kd.experiments.ahdmil`); what they share is below:

- **Folds.** :func:`folds` cuts every slide of a cohort into K stratified folds
  (``labels.csv``'s own split column is not used): each slide is tested exactly once, and each
  fold's validation slides come from its own training part. Anything tuned -- a sweep, an epoch,
  a threshold -- is tuned on *the same fold's* validation slides, never another's. (:func:`splits`
  draws one or more random train / validation / test splits, for a method trained once.)
- **Timing.** :func:`time_pipelines` runs every predictor on every timed slide from the slide file,
  in an order drawn afresh per slide (seeded), so that no pipeline always pays the cold file cache.
- **Results.** :class:`Experiment` keeps, per fold and model, its test metrics and every test
  slide's probability (:meth:`Experiment.record`), and one row per slide and pipeline of seconds;
  :meth:`Experiment.pooled` scores the pooled out-of-fold predictions with bootstrap 95 % CIs over
  slides, :meth:`Experiment.summary` adds the mean ± std over the folds,
  :meth:`Experiment.speed` the mean seconds per stage, :meth:`Experiment.to_json` the strict JSON
  the benchmarks write (NaN -> null). The keys the tests and chapters read are listed in
  :data:`JSON_KEYS`.
- **Threads and workers.** The small networks train on one torch thread on the CPU (see
  :func:`mini_kd.runtime.torch_threads`), and the folds of an experiment train side by side in
  worker processes, one per core (:func:`mini_kd.runtime.map_jobs`); every fold seeds its own
  training, so the results are those of one fold after another. What is timed from the slide
  files runs afterwards, in the calling process alone: no pipeline is timed while another trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mini_kd.errors import MiniKDError
from mini_kd.evaluate import (classification_metrics, format_mean_std, kfold_splits, plain,
                              repeated_splits, slide_metrics, summarize)
from mini_kd.progress import progress
from mini_kd.runtime import write_atomically

# The keys of a model's entry in Experiment.to_json(), which the chapters and tests read.
JSON_KEYS = ("auc", "auc_ci", "auc_std", "accuracy", "accuracy_std", "f1", "f1_std",
             "seconds_per_slide", "seconds_by_stage", "tiles_read", "pixels_decoded", "speedup")


def splits(cohort, n_splits: int, seed: int = 0) -> list[dict]:
    """``n_splits`` stratified train/val/test splits over every slide of ``cohort``."""
    ids = cohort.ids()
    return repeated_splits(ids, cohort.labels(ids), n_splits, seed)


def folds(cohort, k: int, seed: int = 0) -> list[dict]:
    """``k`` stratified folds over every slide of ``cohort`` (:func:`mini_kd.evaluate.kfold_splits`)."""
    ids = cohort.ids()
    return kfold_splits(ids, cohort.labels(ids), k, seed)


def learned(auc: float, reference_auc: float, margin: float = 0.05) -> bool:
    """Did a model that a target compares against learn? Its AUC at least ``reference_auc`` (a
    standard model on the same features) minus ``margin``: a claim against a reference that did
    not learn reports nothing."""
    return bool(auc >= reference_auc - margin)


def source_fingerprint() -> str:
    """A short hash of mini_kd's source files: a cached result is reused only by the code that
    made it."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def results_path(cohort, method: str, preset: str) -> Path:
    """Where the preset's own run of ``method``'s experiment (its default config and schedule)
    keeps its JSON in the cohort folder, for the side-by-side comparison to gather
    (:mod:`mini_kd.experiments.compare`) instead of training the same models again."""
    return Path(cohort.root) / "results" / f"{method}-{preset}-{source_fingerprint()}.json"


def time_pipelines(slide_paths: dict, predictors: dict, seed: int = 0) -> list[dict]:
    """Seconds per stage of each predictor on each slide, read from the slide file.

    ``slide_paths`` {slide_id: path}; ``predictors`` {name: predict}, each ``predict(path) ->``
    :class:`~mini_kd.methods.Prediction`. Every predictor first runs once, untimed, on the first
    slide (lazy imports, memory). Then, slide by slide, all predictors classify the slide in an
    order drawn afresh for every slide from ``numpy.random.default_rng(seed)``: the first to open
    a slide pays its cold file cache, and the shuffle spreads that cost over the pipelines
    instead of always charging the same one (the same seed gives the same orders).

    One row per slide and predictor, in the order they ran: ``model``, ``slide_id``, ``position``
    (0 = first on its slide), ``tiles_read`` (all magnifications; ``tiles_5x``... per
    magnification), ``pixels_decoded``, the
    seconds of every stage and their ``total``.
    """
    if not slide_paths:
        raise MiniKDError("time_pipelines got no slide to time; pass at least one test slide")
    names = list(predictors)
    for predict in predictors.values():
        predict(next(iter(slide_paths.values())))
    rng = np.random.default_rng(seed)
    rows = []
    for slide_id, path in progress(slide_paths.items(), desc="timing"):
        for position, index in enumerate(rng.permutation(len(names)).tolist()):
            prediction = predictors[names[index]](path)
            rows.append({"model": names[index], "slide_id": slide_id, "position": position,
                         "tiles_read": sum(prediction.tiles_read.values()),
                         **{f"tiles_{mag:g}x": n for mag, n in prediction.tiles_read.items()},
                         "pixels_decoded": prediction.pixels_decoded, **prediction.seconds,
                         "total": prediction.total_seconds})
    return rows


def where_it_looks(cohort, test_ids, labels: dict, predictors: dict) -> dict:
    """What each predictor looks at on one slide, for a figure: the test tumour slide with the
    most tumour (the first test tumour slide, and ``label_map`` None, without label maps), its
    thumbnail, and per predictor its grid, probability and ``values`` (N,) over the tiles: the
    attention α, else a tile classifier's P(tumour), else 1 for the tiles a screen kept."""
    from mini_kd.phantom import TUMOUR
    from mini_kd.slides import open_slide
    from mini_kd.tiling import MASK_MAG

    tumour_ids = [s for s in test_ids if labels[s] == 1] or list(test_ids)
    slide_id = tumour_ids[0]
    if cohort.has_label_maps:
        slide_id = max(tumour_ids, key=lambda s: (cohort.label_map(s)[0] == TUMOUR).sum())
    path = cohort.slide_path(slide_id)
    predictions = {name: predict(path) for name, predict in predictors.items()}
    with open_slide(path) as slide:
        thumbnail = slide.thumbnail(MASK_MAG)
    return {"slide_id": slide_id, "thumbnail": thumbnail, "thumb_mag": MASK_MAG,
            "label_map": cohort.label_map(slide_id)[0] if cohort.has_label_maps else None,
            "maps": {name: {"grid": p.details["grid"], "values": _tile_values(p.details),
                            "probability": p.probability} for name, p in predictions.items()}}


def _tile_values(details: dict) -> np.ndarray:
    for key in ("attention", "p_tumour"):
        if details.get(key) is not None:
            return np.asarray(details[key], dtype=np.float64)
    return np.asarray(details["keep"]).reshape(len(details["grid"]), -1).any(axis=1).astype(float)


@dataclass
class Experiment:
    """What a ``run_experiment`` measured: plain values (``pandas.DataFrame(runs)``), except
    ``models`` (split 0's trained networks, for figures).

    ``descriptions`` maps each model name to what it is, in the order of the tables; ``base`` is
    the pipeline the speed-ups are measured against; ``targets(json) -> dict`` computes the
    method's targets from the JSON entries.
    """

    preset: str
    cohort: str
    splits: list[dict]
    descriptions: dict[str, str]
    base: str | None = None
    runs: list[dict] = field(default_factory=list)      # one row per split and model: test metrics
    predictions: list[dict] = field(default_factory=list)  # one row per split, model, test slide
    timing: list[dict] = field(default_factory=list)    # one row per slide and pipeline: seconds
    timed_as: dict[str, str] = field(default_factory=dict)  # model -> the pipeline it runs
    extras: dict = field(default_factory=dict)          # the method's own results (JSON-ready)
    models: dict = field(default_factory=dict)          # split 0's trained networks
    checkpoint: Path | None = None
    seconds: float = 0.0
    targets: Callable[[dict], dict] | None = field(default=None, repr=False)

    def record(self, split: int, model: str, slide_ids, labels, probabilities, **metrics) -> None:
        """``model``'s predictions on ``split``'s test slides: P(class 1) (S,) of each slide,
        their AUC / accuracy / F1 on this split and any further ``metrics`` (keep rate...)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        point = classification_metrics(labels, probabilities)
        self.runs.append({"split": split, "model": model,
                          **{k: point[k] for k in ("auc", "accuracy", "f1")}, **metrics})
        self.predictions += [{"split": split, "model": model, "slide_id": s, "label": int(y),
                              "probability": float(p)}
                             for s, y, p in zip(slide_ids, labels, probabilities)]

    def pooled(self, seed: int = 0) -> dict[str, dict]:
        """Per model, AUC, accuracy and F1 over all its recorded test predictions at once -- with
        folds, every slide once, out of fold -- each with a bootstrap 95 % CI over the slides
        (:func:`mini_kd.evaluate.slide_metrics`)."""
        out = {}
        for model in dict.fromkeys(row["model"] for row in self.predictions):
            rows = [row for row in self.predictions if row["model"] == model]
            out[model] = slide_metrics([r["label"] for r in rows], [r["probability"] for r in rows],
                                       seed=seed)
        return out

    def summary(self) -> list[dict]:
        """Each model's test metrics: mean and std over the splits (``auc_mean``, ``auc_std``...)
        and, for recorded predictions, the pooled ones with their CIs (``auc``, ``auc_ci``...)."""
        rows, pooled = [], self.pooled()
        for model, description in self.descriptions.items():
            runs = [{k: v for k, v in run.items() if k not in ("split", "model")}
                    for run in self.runs if run["model"] == model]
            if runs:
                rows.append({"model": model, "description": description, "splits": len(runs),
                             **{f"{k}_{part}": v[i] for k, v in summarize(runs).items()
                                for i, part in enumerate(("mean", "std"))},
                             **pooled.get(model, {})})
        return rows

    def table(self, metrics=("auc", "accuracy", "f1", "keep_rate", "tumour_recall")) -> list[dict]:
        """The results table: per model its description and each of ``metrics`` it has -- pooled
        over the folds with its 95 % CI where predictions were recorded ("0.912 [0.85, 0.96]",
        and the AUC's mean ± std over the folds beside it), else "mean ± std" over the splits."""
        def cell(row, key):
            if f"{key}_ci" in row:
                return f"{row[key]:.3f} [{row[f'{key}_ci'][0]:.2f}, {row[f'{key}_ci'][1]:.2f}]"
            return format_mean_std(row[f"{key}_mean"], row[f"{key}_std"])

        return [{"model": row["model"], "what": row["description"],
                 **{key: cell(row, key) for key in metrics if f"{key}_mean" in row},
                 **({"auc per fold": format_mean_std(row["auc_mean"], row["auc_std"])}
                    if "auc_ci" in row else {})}
                for row in self.summary()]

    def speed(self) -> list[dict]:
        """Mean seconds per slide and stage of each timed pipeline, and its speed-up over
        ``base``."""
        rows = []
        for model in dict.fromkeys(row["model"] for row in self.timing):
            timed = [row for row in self.timing if row["model"] == model]
            keys = dict.fromkeys(k for row in timed for k in row
                                 if k not in ("model", "slide_id", "position"))
            rows.append({"model": model, **{k: float(np.mean([r.get(k, 0.0) for r in timed]))
                                            for k in keys}})
        base = next((row for row in rows if row["model"] == self.base), None)
        for row in rows if base else []:
            row["speedup"] = base["total"] / row["total"]
        return rows

    def save_json(self, path) -> Path:
        """Write :meth:`to_json` to ``path`` (atomically)."""
        return write_atomically(path, lambda partial: partial.write_text(json.dumps(self.to_json())))

    def to_json(self) -> dict:
        """The benchmark's JSON: per model the test metrics (pooled with CIs where predictions
        were recorded, and mean and std over the splits) and, for a timed pipeline, the seconds
        per slide; the targets; every recorded prediction; the method's extras."""
        out = {"preset": self.preset, "cohort": self.cohort, "n_splits": len(self.splits),
               "n_test_slides": [len(s["test"]) for s in self.splits], "splits": self.splits,
               "timed_slides": len({row["slide_id"] for row in self.timing}),
               "seconds_experiment": round(self.seconds, 1)}
        speed = {row["model"]: row for row in self.speed()}
        for row in self.summary():
            entry = {k.removesuffix("_mean"): v for k, v in row.items() if k.endswith("_mean")}
            entry.update({k: v for k, v in row.items() if k.endswith("_std")})
            if "auc_ci" in row:  # pooled out-of-fold metrics; the folds' mean beside them
                entry.update({f"{k}_fold_mean": entry[k] for k in ("auc", "accuracy", "f1")})
                entry.update({k: row[k] for k in ("auc", "auc_ci", "accuracy", "accuracy_ci",
                                                  "f1", "f1_ci", "n_slides")})
            timed = speed.get(self.timed_as.get(row["model"], row["model"]))
            if timed is not None:
                stages = {k: v for k, v in timed.items() if not k.startswith("tiles_") and k
                          not in ("model", "total", "pixels_decoded", "speedup")}
                entry.update(seconds_per_slide=timed["total"], seconds_by_stage=stages,
                             tiles_read=timed["tiles_read"], pixels_decoded=timed["pixels_decoded"],
                             speedup=timed.get("speedup"))
            out[row["model"]] = entry
        if self.targets is not None:
            out["targets"] = self.targets(out)
        out["predictions"] = self.predictions
        out.update(self.extras)
        return plain(out)
