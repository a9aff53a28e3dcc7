"""Side by side: every method, and the baselines a user would pick instead, on the same folds.

The course's question: for a given cost per slide, which way of moving knowledge from 20x to a
lower resolution gives the best slide classifier? :func:`run_comparison` answers it on one
cohort. Every row trains on the same K stratified folds (:func:`mini_kd.experiments.folds`:
every slide is tested exactly once, validation slides come from the fold's own training part)
with the same EfficientNet-Lite0 encoder, and is scored on the pooled out-of-fold predictions of
all slides: AUC, accuracy and F1, each with a bootstrap 95 % CI over the slides
(:meth:`~mini_kd.experiments.Experiment.pooled`). The rows (:data:`ROWS`):

- at 20x, every tissue tile: ``hr_abmil`` (ABMIL), torchmil's ``clam_sb``, ``dsmil`` and
  ``transmil`` (:mod:`mini_kd.baselines`), and ``dmin`` (AHDMIL's DMIN after step 1);
- at 5x: ``lr_abmil`` (plain 5x features), LRMIL's ``stage1_only``, ``stage2_only`` and ``lrmil``;
- ResKD's tile classifiers, the slide score the mean of the top-k region P(tumour):
  ``reskd_student`` (the ÷4 student, 5x) and ``reskd_teacher`` (20x);
- ``ahdmil``: the 1.25x screen, then the 20x tiles it keeps.

What the method experiments train on these folds is gathered, not trained again: the LRMIL and
AHDMIL rows come from their preset's own run (:func:`mini_kd.experiments.results_path`, written
by notebooks 03 and 04), run here when missing. The torchmil baselines train here, and ResKD's
classifiers per fold (cached: :func:`mini_kd.experiments.reskd.slide_classifiers`), the folds
side by side in worker processes, one job per row and fold (:func:`train_rows`).

**Cost, the same way for every row.** Each row's pipeline classifies the same test slides of
fold 0 from the slide files, in an order drawn afresh per slide
(:func:`mini_kd.experiments.time_pipelines`): seconds per slide by stage, tiles read per
magnification, pixels decoded, and the encoders' FLOPs per slide (:func:`encoder_flops`). Rows
that run the same pipeline (stage 1 only runs LRMIL's, stage 2 only LR ABMIL's) share its cost.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import numpy as np

from mini_kd import baselines, presets
from mini_kd.encoders import build_encoder
from mini_kd.evaluate import count_flops
from mini_kd.experiments import (Experiment, folds, results_path, time_pipelines,
                                 where_it_looks)
from mini_kd.experiments import ahdmil as ahdmil_experiment
from mini_kd.experiments import lrmil as lrmil_experiment
from mini_kd.experiments import reskd as reskd_experiment
from mini_kd.features import cohort_features, cohort_grids
from mini_kd.methods import load, lrmil
from mini_kd.mil import abmil_predictor, bag_probabilities, make_bags
from mini_kd.runtime import map_jobs

# What the comparison spends per preset: folds (the method experiments' own), timed test slides.
BUDGET = {
    "smoke": dict(n_folds=2, timing_slides=1),
    "book": dict(n_folds=4, timing_slides=2),
    "gpu": dict(n_folds=5, timing_slides=10),
}
ROWS = {  # name -> (what it is, the magnifications it reads), in the order of the table
    "hr_abmil": ("ABMIL, every 20x tile", "20x"),
    **{name: (description, "20x") for name, description in baselines.MODELS.items()},
    "dmin": ("DMIN (AHDMIL step 1), every 20x tile", "20x"),
    "lr_abmil": ("ABMIL on plain 5x features", "5x"),
    "stage1_only": ("LRMIL stage 1 only: distilled 5x features, CE", "5x"),
    "stage2_only": ("LRMIL stage 2 only: plain 5x features, slide-level KD", "5x"),
    "lrmil": ("LRMIL: both stages", "5x"),
    "reskd_student": ("ResKD ÷4 student, mean of the top-k 5x regions", "5x"),
    "reskd_teacher": ("ResKD teacher, mean of the top-k 20x regions", "20x"),
    "ahdmil": ("AHDMIL: 1.25x screen, the kept 20x tiles", "1.25x + 20x"),
}
# row -> (the experiment it comes from, its name there)
GATHERED = {"hr_abmil": ("lrmil", "hr_abmil"), "lr_abmil": ("lrmil", "lr_abmil"),
            "stage1_only": ("lrmil", "stage1_only"), "stage2_only": ("lrmil", "stage2_only"),
            "lrmil": ("lrmil", "lrmil"), "dmin": ("ahdmil", "dmin_all"),
            "ahdmil": ("ahdmil", "ahdmil")}
TIMED_AS = {"stage1_only": "lrmil", "stage2_only": "lr_abmil"}
# what trains here, per fold, the longest first: each torchmil baseline, ResKD's two classifiers
TRAINED_HERE = ("transmil", "clam_sb", "reskd", "dsmil")
EXPERIMENTS = {"lrmil": lrmil_experiment, "ahdmil": ahdmil_experiment}


def run_comparison(preset: str = "book", cohort=None, timing: bool = True) -> Experiment:
    """Every row of :data:`ROWS` on ``cohort`` (default :func:`mini_kd.presets.cohort`) over the
    preset's folds; see the module docstring. ``models["looks"]``: what five of the rows look at
    on one test tumour slide (:func:`mini_kd.experiments.where_it_looks`)."""
    start = time.perf_counter()
    cohort = cohort or presets.cohort(preset)
    budget = BUDGET[presets.check_preset(preset)]
    config, schedule = presets.config("lrmil", preset), presets.schedule("lrmil", preset)
    drawn = folds(cohort, budget["n_folds"], schedule.seed)
    experiment = Experiment(preset, str(cohort.root), drawn, {k: v[0] for k, v in ROWS.items()},
                            base="hr_abmil", timed_as=TIMED_AS, targets=targets)
    for method in EXPERIMENTS:
        gather(experiment, method, gathered(method, preset, cohort))
    ids = cohort.ids()
    labels = dict(zip(ids, cohort.labels(ids).tolist()))
    encoder = build_encoder(config.encoder).eval()
    hr_grids = cohort_grids(cohort, config.hr_mag, config.hr_tile, config.min_tissue)
    hr_features = cohort_features(cohort, hr_grids, encoder, device=schedule.device)
    lr_grids = cohort_grids(cohort, config.lr_mag, config.lr_tile, config.min_tissue)
    features = {config.hr_mag: hr_features,
                config.lr_mag: cohort_features(cohort, lr_grids, encoder, device=schedule.device)}
    jobs = [(r, split, row) for row in TRAINED_HERE for r, split in enumerate(drawn)]
    jobs.append((0, drawn[0], "abmil"))  # HR and LR ABMIL of fold 0 again, for their pipelines
    fold0 = {}
    for (r, split, _), (probabilities, models) in zip(jobs, map_jobs(
            train_rows, jobs, cohort, preset, features, labels, device=schedule.device,
            desc="rows x folds")):
        for name, p in probabilities.items():
            experiment.record(r, name, split["test"], [labels[s] for s in split["test"]], p)
        fold0.update(models)
    predictors = pipelines(cohort, preset, fold0, encoder)
    if timing:
        timed = drawn[0]["test"][:budget["timing_slides"]]
        experiment.timing = time_pipelines({s: cohort.slide_path(s) for s in timed},
                                           {k: v[0] for k, v in predictors.items()}, schedule.seed)
        experiment.extras["encoder_gflops_per_slide"] = encoder_flops(experiment.timing,
                                                                      predictors)
    shown = ("hr_abmil", "clam_sb", "lrmil", "reskd_student", "ahdmil")
    experiment.models = {"looks": where_it_looks(cohort, drawn[0]["test"], labels,
                                                 {k: predictors[k][0] for k in shown})}
    experiment.seconds = time.perf_counter() - start
    return experiment


def train_rows(job: tuple[int, dict, str], cohort, preset: str, features: dict,
               labels: dict) -> tuple[dict, dict]:
    """One job ``(r, split, what)`` on fold r: a torchmil baseline of :data:`TRAINED_HERE` on the
    20x features (``features``: {magnification: {slide_id: (N, D)}}), ResKD's two slide
    classifiers, or (``"abmil"``) HR and LR ABMIL again, the same seeded computation as LRMIL's
    experiment, for their pipelines. Returns each row's P(tumour) of the test slides, and its
    models on fold 0 (run in a worker process by :func:`mini_kd.runtime.map_jobs`; one job per
    row and fold keeps both workers busy)."""
    r, split, what = job
    config, schedule = presets.config("lrmil", preset), presets.schedule("lrmil", preset)
    hr_features = features[config.hr_mag]
    if what == "abmil":
        return {}, {"hr_abmil": lrmil.train_teacher(hr_features, labels, split, config, schedule),
                    "lr_abmil": lrmil.train_student(features[config.lr_mag], labels, split, config,
                                                    schedule)}
    if what == "reskd":
        trained = reskd_experiment.slide_classifiers(cohort, split, preset)
        probabilities = {name: [model.predictor(schedule.device)(cohort.slide_path(s)).probability
                                for s in split["test"]] for name, model in trained.items()}
    else:
        bags = {part: make_bags(hr_features, labels, split[part]) for part in split}
        trained = {what: baselines.train(what, bags["train"], bags["val"],
                                         lrmil.fit_config(schedule, what))}
        probabilities = {what: bag_probabilities(trained[what], bags["test"])}
    return probabilities, trained if r == 0 else {}


# -- gathering what the method experiments trained ---------------------------------------------------
def gathered(method: str, preset: str, cohort) -> dict:
    """The JSON of ``method``'s experiment, the preset's own run on ``cohort``: read from the
    cohort folder, or run now (which also writes it) when this version of the code has not."""
    path = results_path(cohort, method, preset)
    if path.exists():
        return json.loads(path.read_text())
    return EXPERIMENTS[method].run_experiment(preset, cohort).to_json()


def gather(experiment: Experiment, method: str, out: dict) -> None:
    """Record the rows of :data:`GATHERED` that come from ``method``'s experiment JSON ``out``,
    fold by fold, after checking that it ran on the comparison's folds."""
    if out["splits"] != experiment.splits:
        raise ValueError(f"the {method} experiment ran on other folds than the comparison's; "
                         "rerun both with the same preset and schedule seed")
    for row, (source, name) in GATHERED.items():
        if source != method:
            continue
        for r in range(len(experiment.splits)):
            rows = [p for p in out["predictions"] if p["model"] == name and p["split"] == r]
            experiment.record(r, row, [p["slide_id"] for p in rows], [p["label"] for p in rows],
                              [p["probability"] for p in rows])


# -- every row's pipeline from the slide file --------------------------------------------------------
def pipelines(cohort, preset: str, fold0: dict, encoder) -> dict:
    """row -> (predict(slide_path), {magnification: (network, tile side)} it encodes with) of
    fold 0: the baselines and ResKD as trained here, LRMIL's and AHDMIL's checkpoints of their
    preset's own run, and HR / LR ABMIL trained again on fold 0 (:func:`train_rows`)."""
    config, schedule = presets.config("lrmil", preset), presets.schedule("lrmil", preset)
    device = schedule.device
    hr_abmil, lr_abmil = fold0["hr_abmil"], fold0["lr_abmil"]
    trained_lrmil = load(cohort.root / "lrmil" / f"lrmil-{preset}.pt", "lrmil")
    trained_ahdmil = load(cohort.root / "ahdmil" / f"ahdmil-{preset}.pt", "ahdmil")
    hr = {config.hr_mag: (encoder, config.hr_tile)}
    out = {"hr_abmil": (abmil_predictor(encoder, hr_abmil, config.hr_mag, config.hr_tile,
                                        config.min_tissue, device), hr),
           **{name: (abmil_predictor(encoder, fold0[name], config.hr_mag, config.hr_tile,
                                     config.min_tissue, device), hr) for name in baselines.MODELS},
           "dmin": (trained_ahdmil.predictor(device, screen=False), hr),
           "lr_abmil": (abmil_predictor(encoder, lr_abmil, config.lr_mag, config.lr_tile,
                                        config.min_tissue, device),
                        {config.lr_mag: (encoder, config.lr_tile)}),
           "lrmil": (trained_lrmil.predictor(device),
                     {config.lr_mag: (trained_lrmil.lr_encoder, config.lr_tile)})}
    for name in ("reskd_student", "reskd_teacher"):
        trained = fold0[name]
        side = trained.region_size // trained.config.factor
        out[name] = (trained.predictor(device),
                     {trained.config.hr_mag / trained.config.factor: (trained.network, side)})
    c = trained_ahdmil.config
    crop = round(c.hr_tile * c.screen_mag / c.hr_mag)  # DB-LIPN's crop: an HR tile's footprint
    out["ahdmil"] = (trained_ahdmil.predictor(device),
                     {c.screen_mag: (trained_ahdmil.model.lipn, crop),
                      c.hr_mag: (trained_ahdmil.encoder, c.hr_tile)})
    return out


def encoder_flops(timing: list[dict], predictors: dict) -> dict:
    """GFLOPs per slide of each pipeline's networks on its tiles: per magnification, the mean
    tiles read there times one tile's FLOPs through the network that reads them."""
    out = {}
    for name, (_, networks) in predictors.items():
        rows = [row for row in timing if row["model"] == name]
        out[name] = sum(np.mean([row.get(f"tiles_{mag:g}x", 0) for row in rows])
                        * _tile_flops(network, side) for mag, (network, side) in networks.items()) / 1e9
    return out


@lru_cache(maxsize=None)
def _tile_flops(network, side: int) -> float:
    import torch

    return float(count_flops(network, torch.zeros(1, 3, side, side)))


# -- the JSON and the targets ----------------------------------------------------------------
def to_rows(out: dict) -> dict:
    """``benchmarks/compare.py``'s JSON from :meth:`Experiment.to_json` ``out``: one row per
    method with its magnifications, pooled metrics and CIs, and costs."""
    gflops = out.get("encoder_gflops_per_slide", {})
    rows = []
    for name, (_, mags) in ROWS.items():
        entry = out.get(name)
        if entry is None:
            continue
        timed = TIMED_AS.get(name, name)
        rows.append({"method": name, "magnifications": mags,
                     **{k: entry.get(k) for k in ("auc", "auc_ci", "accuracy", "accuracy_ci", "f1",
                                                  "f1_ci", "seconds_per_slide", "seconds_by_stage",
                                                  "tiles_read", "pixels_decoded")},
                     "speedup_vs_hr_abmil": entry.get("speedup"),
                     "encoder_gflops_per_slide": gflops.get(timed)})
    return {"rows": rows, "folds": out["n_splits"], "slides": sum(out["n_test_slides"]),
            "preset": out["preset"], "cohort": out["cohort"], "targets": out.get("targets")}


def table(result: dict) -> list[dict]:
    """The chapter's table from :func:`to_rows`'s ``result``: per method what it reads, AUC,
    accuracy and F1 with their 95 % CIs, seconds per slide, speed-up over HR ABMIL, tiles read,
    Mpx decoded and encoder GFLOPs per slide."""
    def ci(row, key):
        low, high = row[f"{key}_ci"]
        return f"{row[key]:.3f} [{low:.2f}, {high:.2f}]"

    return [{"method": row["method"], "reads": row["magnifications"], "AUC [95 % CI]": ci(row, "auc"),
             "accuracy": ci(row, "accuracy"), "F1": ci(row, "f1"),
             "s / slide": row["seconds_per_slide"], "speed-up": row["speedup_vs_hr_abmil"],
             "tiles read": row["tiles_read"],
             "Mpx decoded": None if row["pixels_decoded"] is None else row["pixels_decoded"] / 1e6,
             "encoder GFLOPs": row["encoder_gflops_per_slide"]} for row in result["rows"]]


def pareto_front(rows: list[dict]) -> list[str]:
    """The methods no other beats on both axes: none is as fast or faster with a higher AUC."""
    timed = [r for r in rows if r.get("seconds_per_slide") is not None]
    return [r["method"] for r in timed
            if not any(o["seconds_per_slide"] <= r["seconds_per_slide"] and o["auc"] > r["auc"]
                       for o in timed)]


def targets(out: dict) -> dict:
    """The benchmark's calibration: HR ABMIL's pooled AUC below 0.97 (not saturated) with a 95 %
    CI narrower than ± 0.07, and LR ABMIL at least 0.08 below it (the premise: 5x alone loses)."""
    hr, lr = out.get("hr_abmil", {}), out.get("lr_abmil", {})
    if "auc_ci" not in hr:
        return {}
    half_width = (hr["auc_ci"][1] - hr["auc_ci"][0]) / 2
    return {"hr_abmil_auc": hr["auc"], "hr_abmil_auc_below_0.97": bool(hr["auc"] < 0.97),
            "hr_abmil_ci_half_width": half_width, "ci_narrower_than_0.07": bool(half_width < 0.07),
            "lr_abmil_gap": hr["auc"] - lr.get("auc", np.nan),
            "lr_abmil_at_least_0.08_below": bool(hr["auc"] - lr.get("auc", np.nan) >= 0.08)}
