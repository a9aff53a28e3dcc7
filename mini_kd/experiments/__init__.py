"""How the methods are measured: splits, repeated runs, timing from the slide files, tables, JSON.

A method file (:mod:`mini_kd.methods`) says what a paper does; this package says how we measure
it. Each method has its experiment here (:mod:`~mini_kd.experiments.reskd`,
:mod:`~mini_kd.experiments.lrmil`, :mod:`~mini_kd.experiments.ahdmil`); what they share is below:

- **Splits.** :func:`splits` draws repeated stratified train / validation / test splits over every
  slide of a cohort (``labels.csv``'s own split column is not used). Anything tuned -- a sweep, an
  epoch, a threshold -- is tuned on *the same split's* validation slides, never another's.
- **Timing.** :func:`time_pipelines` runs every predictor on every timed slide from the slide file,
  in an order drawn afresh per slide (seeded), so that no pipeline always pays the cold file cache.
- **Results.** :class:`Experiment` keeps one row per split and model of test metrics and one row
  per slide and pipeline of seconds; :meth:`Experiment.summary` gives mean ± std over the splits,
  :meth:`Experiment.speed` the mean seconds per stage, :meth:`Experiment.to_json` the strict JSON
  the benchmarks write (NaN -> null). The keys the tests and chapters read are listed in
  :data:`JSON_KEYS`.
- **Threads.** The small networks train on one torch thread on the CPU (see
  :func:`mini_kd.runtime.torch_threads`); that is the only thread policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mini_kd.errors import MiniKDError
from mini_kd.evaluate import format_mean_std, plain, repeated_splits, summarize
from mini_kd.progress import progress

# The keys of a model's entry in Experiment.to_json(), which the chapters and tests read.
JSON_KEYS = ("auc", "auc_std", "accuracy", "accuracy_std", "f1", "f1_std",
             "seconds_per_slide", "seconds_by_stage", "tiles_read", "pixels_decoded", "speedup")


def splits(cohort, n_splits: int, seed: int = 0) -> list[dict]:
    """``n_splits`` stratified train/val/test splits over every slide of ``cohort``."""
    ids = cohort.ids()
    return repeated_splits(ids, cohort.labels(ids), n_splits, seed)


def time_pipelines(slide_paths: dict, predictors: dict, seed: int = 0) -> list[dict]:
    """Seconds per stage of each predictor on each slide, read from the slide file.

    ``slide_paths`` {slide_id: path}; ``predictors`` {name: predict}, each ``predict(path) ->``
    :class:`~mini_kd.methods.Prediction`. Every predictor first runs once, untimed, on the first
    slide (lazy imports, memory). Then, slide by slide, all predictors classify the slide in an
    order drawn afresh for every slide from ``numpy.random.default_rng(seed)``: the first to open
    a slide pays its cold file cache, and the shuffle spreads that cost over the pipelines
    instead of always charging the same one (the same seed gives the same orders).

    One row per slide and predictor, in the order they ran: ``model``, ``slide_id``, ``position``
    (0 = first on its slide), ``tiles_read`` (all magnifications), ``pixels_decoded``, the
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
                         "pixels_decoded": prediction.pixels_decoded, **prediction.seconds,
                         "total": prediction.total_seconds})
    return rows


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
    timing: list[dict] = field(default_factory=list)    # one row per slide and pipeline: seconds
    timed_as: dict[str, str] = field(default_factory=dict)  # model -> the pipeline it runs
    extras: dict = field(default_factory=dict)          # the method's own results (JSON-ready)
    models: dict = field(default_factory=dict)          # split 0's trained networks
    checkpoint: Path | None = None
    seconds: float = 0.0
    targets: Callable[[dict], dict] | None = field(default=None, repr=False)

    def summary(self) -> list[dict]:
        """Mean and std over the splits of each model's test metrics."""
        rows = []
        for model, description in self.descriptions.items():
            runs = [{k: v for k, v in run.items() if k not in ("split", "model")}
                    for run in self.runs if run["model"] == model]
            if runs:
                rows.append({"model": model, "description": description, "splits": len(runs),
                             **{f"{k}_{part}": v[i] for k, v in summarize(runs).items()
                                for i, part in enumerate(("mean", "std"))}})
        return rows

    def table(self, metrics=("auc", "accuracy", "f1", "keep_rate", "tumour_recall")) -> list[dict]:
        """The results table: per model its description and each of ``metrics`` it has as
        "mean ± std" over the splits."""
        return [{"model": row["model"], "what": row["description"],
                 **{key: format_mean_std(row[f"{key}_mean"], row[f"{key}_std"])
                    for key in metrics if f"{key}_mean" in row}}
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

    def to_json(self) -> dict:
        """The benchmark's JSON: per model the test metrics (mean and std over the splits) and,
        for a timed pipeline, the seconds per slide; the targets; the method's extras."""
        out = {"preset": self.preset, "cohort": self.cohort, "n_splits": len(self.splits),
               "n_test_slides": [len(s["test"]) for s in self.splits],
               "timed_slides": len({row["slide_id"] for row in self.timing}),
               "seconds_experiment": round(self.seconds, 1)}
        speed = {row["model"]: row for row in self.speed()}
        for row in self.summary():
            entry = {k.removesuffix("_mean"): v for k, v in row.items() if k.endswith("_mean")}
            entry.update({k: v for k, v in row.items() if k.endswith("_std")})
            timed = speed.get(self.timed_as.get(row["model"], row["model"]))
            if timed is not None:
                stages = {k: v for k, v in timed.items() if k not in
                          ("model", "total", "tiles_read", "pixels_decoded", "speedup")}
                entry.update(seconds_per_slide=timed["total"], seconds_by_stage=stages,
                             tiles_read=timed["tiles_read"], pixels_decoded=timed["pixels_decoded"],
                             speedup=timed.get("speedup"))
            out[row["model"]] = entry
        if self.targets is not None:
            out["targets"] = self.targets(out)
        out.update(self.extras)
        return plain(out)
