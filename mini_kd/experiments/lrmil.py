"""LRMIL measured: the baselines, the stage-2 sweep per fold, time per slide, attention maps.

:func:`run_experiment` runs the steps of :mod:`mini_kd.methods.lrmil` on K stratified folds of a
cohort (:func:`mini_kd.experiments.folds`: every slide tested once; ``labels.csv``'s split column
is not used) and adds what the paper compares it with. Per fold, every model trains on the fold's
train slides, is selected on *its* validation slides and is scored on its test slides from the
cached features (:func:`train_fold`; the folds train side by side in worker processes):

- ``hr_abmil``: the HR teacher (ABMIL on every 20x tile), and ``hr_abmil_torchmil``, torchmil's
  ABMIL on the same features and split: a cross-check that ours learned what a standard library
  learns;
- ``lr_abmil``: ABMIL on the 5x features of the un-distilled encoder, no KD;
- ``stage1_only`` / ``stage2_only``: distilled 5x features with CE only / un-distilled 5x features
  with slide-level KD;
- ``lrmil``: both stages.

Stage 1 is cached on disk per fold (:func:`distil_encoder`). The λ's and temperatures of stage 2
are chosen per fold by :func:`sweep_stage2` -- fit on the fold's train slides, scored on its
validation slides -- and the winner trains that fold's stage-2 students. On fold 0 the LRMIL
checkpoint is saved, HR ABMIL, LR ABMIL and LRMIL are timed end to end from the slide files
(:func:`mini_kd.experiments.time_pipelines`, order shuffled per slide), and their attention on one
test tumour slide is kept for a figure (``models["heatmap"]``). The targets (:func:`targets`).

The experiment's budget per preset (:data:`BUDGET`: folds, timed slides, the sweep's grid) is
here; the training schedules are :data:`mini_kd.presets.SCHEDULES`. The MIL models train on one
torch thread on the CPU (:func:`mini_kd.mil.train_abmil`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import asdict, replace
from functools import partial

import torch.nn.functional as F

from mini_kd import presets
from mini_kd.encoders import build_encoder, copy_encoder, fingerprint
from mini_kd.experiments import (Experiment, folds, learned, results_path, time_pipelines,
                                  where_it_looks)
from mini_kd.features import cohort_features, cohort_grids
from mini_kd.methods import lrmil
from mini_kd.mil import abmil_predictor, bag_probabilities, bag_validation, make_bags, train_abmil
from mini_kd.runtime import map_jobs, seed_everything
from mini_kd.train import read_checkpoint, write_checkpoint

# What the experiment spends per preset besides the method's schedule: folds, test slides of
# fold 0 timed from the slide files, and the grid of the stage-2 sweep.
BUDGET = {
    "smoke": dict(n_folds=2, timing_slides=1, sweep=dict(lambda_soft=(0.0, 1.0))),
    "book": dict(n_folds=4, timing_slides=3,
                 sweep=dict(lambda_bag=(0.0, 1.0), lambda_soft=(0.0, 1.0))),
    "gpu": dict(n_folds=5, timing_slides=10,
                sweep=dict(lambda_bag=(0.0, 0.5, 1.0), lambda_soft=(0.0, 0.5, 1.0),
                           lambda_hard=(0.0, 0.5, 1.0), T_b=(1.0, 2.0, 4.0), T_a=(1.0, 2.0, 4.0))),
}
MODELS = {  # name -> what it is, in the order of the comparison table
    "hr_abmil": "HR ABMIL (teacher), 20x features",
    "hr_abmil_torchmil": "torchmil ABMIL, same 20x features (cross-check)",
    "lr_abmil": "LR ABMIL, 5x features of the un-distilled encoder, no KD",
    "stage1_only": "stage 1 only: distilled 5x features, CE only",
    "stage2_only": "stage 2 only: un-distilled 5x features, slide-level KD",
    "lrmil": "LRMIL: distilled 5x features and slide-level KD",
}
# The pipeline each model runs at inference: the same reads, encoder cost and MIL cost.
TIMED_AS = {"hr_abmil_torchmil": "hr_abmil", "stage2_only": "lr_abmil", "stage1_only": "lrmil"}
# The fields of Config that only stage 2 reads: stage 1's cache does not depend on them.
STAGE2_FIELDS = ("lambda_ce", "lambda_bag", "lambda_soft", "lambda_hard", "T_b", "T_a", "topk",
                 "teacher_attn_agg")


def run_experiment(preset: str = "book", cohort=None, config: lrmil.Config | None = None,
                   schedule: lrmil.Schedule | None = None, sweep: bool = True,
                   timing: bool = True, checkpoint_path=None) -> Experiment:
    """Every model of the comparison on ``cohort`` (default :func:`mini_kd.presets.cohort`) over
    the preset's folds; see the module docstring. ``config`` defaults to
    :func:`mini_kd.presets.config`, ``schedule`` to the preset's; without ``sweep`` the config's stage-2
    values train the students; ``timing=False`` skips the slide files."""
    start = time.perf_counter()
    own_run = all(x is None for x in (config, schedule, checkpoint_path)) and sweep and timing
    budget = BUDGET[presets.check_preset(preset)]
    cohort = cohort or presets.cohort(preset)
    config = config or presets.config("lrmil", preset)
    # each fold trains many models: none resumes from another's epoch checkpoints
    schedule = replace(schedule or presets.schedule("lrmil", preset), checkpoint_dir=None)
    ids = cohort.ids()
    labels = dict(zip(ids, cohort.labels(ids).tolist()))
    hr_grids = cohort_grids(cohort, config.hr_mag, config.hr_tile, config.min_tissue)
    lr_grids = cohort_grids(cohort, config.lr_mag, config.lr_tile, config.min_tissue)
    hr_encoder = build_encoder(config.encoder).eval()
    hr_features = cohort_features(cohort, hr_grids, hr_encoder, device=schedule.device)
    lr_plain = cohort_features(cohort, lr_grids, hr_encoder, device=schedule.device)  # no KD
    drawn = folds(cohort, budget["n_folds"], schedule.seed)
    experiment = Experiment(preset, str(cohort.root), drawn, MODELS, base="hr_abmil",
                            timed_as=TIMED_AS, targets=targets)
    extras = experiment.extras = {"stage1": [], "sweep": [], "stage2_setting": []}
    trained_folds = map_jobs(train_fold, list(enumerate(drawn)), cohort, labels, hr_grids, lr_grids,
                             hr_features, lr_plain, hr_encoder, config, schedule,
                             budget["sweep"] if sweep else None, device=schedule.device, desc="folds")
    for (r, split), fold in zip(enumerate(drawn), trained_folds):
        for name, probabilities in fold["probabilities"].items():
            experiment.record(r, name, split["test"], [labels[s] for s in split["test"]],
                              probabilities)
        for key in ("stage1", "sweep"):
            extras[key] += [{"split": r, **row} for row in fold[key]]
        extras["stage2_setting"].append({"split": r, **fold["stage2_setting"]})
    # fold 0, in this process alone: its checkpoint, its pipelines timed from the slide files
    models, split = trained_folds[0]["models"], drawn[0]
    trained = lrmil.Trained(models["stage2"], models["lr_encoder"], models["lrmil"])
    experiment.checkpoint = trained.save(checkpoint_path or cohort.root / "lrmil" / f"lrmil-{preset}.pt")
    predictors = {
        "hr_abmil": abmil_predictor(hr_encoder, models["hr_abmil"], config.hr_mag, config.hr_tile,
                                    config.min_tissue, schedule.device),
        "lr_abmil": abmil_predictor(hr_encoder, models["lr_abmil"], config.lr_mag, config.lr_tile,
                                    config.min_tissue, schedule.device),
        "lrmil": trained.predictor(schedule.device),
    }
    if timing:
        timed = split["test"][:budget["timing_slides"]]
        experiment.timing = time_pipelines({s: cohort.slide_path(s) for s in timed}, predictors,
                                           schedule.seed)
    experiment.models = {"lrmil": trained, "hr_abmil": models["hr_abmil"],
                         "lr_abmil": models["lr_abmil"],
                         "heatmap": where_it_looks(cohort, split["test"], labels, predictors)}
    extras["sweep_best"] = [next(row for row in extras["sweep"] if row["split"] == r)
                            for r in dict.fromkeys(row["split"] for row in extras["sweep"])]
    experiment.seconds = time.perf_counter() - start
    if own_run:  # the preset's own run, kept for the side-by-side comparison to gather
        experiment.save_json(results_path(cohort, "lrmil", preset))
    return experiment


def train_fold(job: tuple[int, dict], cohort, labels: dict, hr_grids, lr_grids, hr_features,
               lr_plain, hr_encoder, config: lrmil.Config, schedule: lrmil.Schedule,
               grid: dict | None) -> dict:
    """One fold ``job = (r, split)``: every model of :data:`MODELS` trained on the split's train
    slides and selected on its validation slides, the stage-2 students with the winner of the
    sweep over ``grid`` (None: the config's values). Returns each model's P(tumour) of the test
    slides, stage 1's history, the sweep's rows, the stage-2 setting and, for fold 0, the models
    (run in a worker process by :func:`mini_kd.runtime.map_jobs`)."""
    r, split = job
    teacher_model = lrmil.train_teacher(hr_features, labels, split, config, schedule)
    teacher = lrmil.teacher_outputs(teacher_model, hr_features, split["train"])
    guides = lrmil.teacher_guides(teacher, hr_grids, lr_grids, split["train"], config)
    lr_encoder, history = distil_encoder(cohort, split, hr_grids, lr_grids, hr_features, teacher,
                                         hr_encoder, config, schedule)
    lr_distilled = cohort_features(cohort, lr_grids, lr_encoder, device=schedule.device)
    stage2, rows = config, []  # the stage-2 students' settings: this fold's sweep winner
    if grid:  # on this fold's own train (fit) and validation (choice) slides only
        rows = sweep_stage2(lr_distilled, labels, split, teacher, guides, config, schedule, grid)
        stage2 = replace(config, **{k: rows[0][k] for k in grid})
    student = partial(lrmil.train_student, labels=labels, split=split, schedule=schedule)
    models = {
        "hr_abmil": (teacher_model, hr_features),
        "hr_abmil_torchmil": (train_torchmil_abmil(hr_features, labels, split, config, schedule),
                              hr_features),
        "lr_abmil": (student(lr_plain, config=config), lr_plain),
        "stage1_only": (student(lr_distilled, config=config), lr_distilled),
        "stage2_only": (student(lr_plain, config=stage2, teacher=teacher, guides=guides), lr_plain),
        "lrmil": (student(lr_distilled, config=stage2, teacher=teacher, guides=guides),
                  lr_distilled),
    }
    probabilities = {name: bag_probabilities(model, make_bags(features, labels, split["test"]))
                     for name, (model, features) in models.items()}
    setting = {k: getattr(stage2, k) for k in (grid or {})}
    kept = {"stage2": stage2, "lr_encoder": lr_encoder,
            **{name: models[name][0] for name in ("hr_abmil", "lr_abmil", "lrmil")}}
    return {"probabilities": probabilities, "stage1": history, "sweep": rows,
            "stage2_setting": setting, "models": kept if r == 0 else None}


# -- stage 1, cached; the stage-2 sweep; the torchmil cross-check ------------------------------------
def distil_encoder(cohort, split: dict, hr_grids, lr_grids, hr_features, teacher: dict,
                   hr_encoder, config: lrmil.Config, schedule: lrmil.Schedule):
    """Stage 1 for one split, cached in the cohort folder: (LR encoder, history rows). The cache
    key holds everything stage 1 depends on: the config but its stage-2 fields, the schedule, the
    split's train and validation slides (the teacher's) and the HR encoder's weights."""
    method = {k: v for k, v in asdict(config).items() if k not in STAGE2_FIELDS}
    budget = {k: v for k, v in asdict(schedule).items() if k not in ("device", "checkpoint_dir")}
    key = json.dumps([method, budget, sorted(split["train"]), sorted(split["val"]),
                      fingerprint(hr_encoder)], sort_keys=True, default=str)
    path = cohort.root / "lrmil" / f"stage1-{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt"
    if path.exists():
        lr_encoder = copy_encoder(hr_encoder).eval()
        saved = read_checkpoint(path, "stage-1 cache", f"delete {path} to train stage 1 again")
        lr_encoder.load_state_dict(saved["state_dict"])
        return lr_encoder, json.loads(saved["history"])
    items = lrmil.stage1_data(cohort, split["train"], hr_grids, lr_grids, hr_features, teacher,
                              hr_encoder, config, schedule, cohort.root / "lrmil" / "targets")
    lr_encoder, history = lrmil.train_stage1(hr_encoder, items, config, schedule)
    write_checkpoint({"state_dict": lr_encoder.state_dict(), "history": json.dumps(history.rows)},
                     path)
    return lr_encoder, history.rows


def sweep_stage2(features, labels: dict, split: dict, teacher: dict, guides: dict,
                 config: lrmil.Config, schedule: lrmil.Schedule, grid: dict) -> list[dict]:
    """Train the LRMIL student for every combination of ``grid`` ({field: values}) on the split's
    train slides and score it on its validation slides (cross-entropy, AUC); best first, the
    lowest cross-entropy being the best."""
    score = bag_validation(make_bags(features, labels, split["val"]))
    rows = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        student = lrmil.train_student(features, labels, split, replace(config, **setting),
                                      schedule, teacher, guides)
        val = score(student)
        rows.append({**setting, "val_ce": val["loss"], "val_auc": val["auc"]})
    return sorted(rows, key=lambda row: row["val_ce"])


def train_torchmil_abmil(hr_features, labels: dict, split: dict, config: lrmil.Config,
                         schedule: lrmil.Schedule):
    """torchmil's ABMIL (one logit, BCE) on the same features, split and schedule as the teacher,
    trained by the same :func:`mini_kd.mil.train_abmil`: a cross-check of ours."""
    from torchmil.models import ABMIL as TorchmilABMIL

    seed_everything(schedule.seed)
    in_dim = hr_features[split["train"][0]].shape[1]
    model = TorchmilABMIL(in_shape=(in_dim,), att_dim=config.hidden, gated=config.gated)

    def bce(model, bag):
        loss = F.binary_cross_entropy_with_logits(model(bag["X"]), bag["y"].float())
        return loss, {"bce": loss.item()}

    model, _ = train_abmil(make_bags(hr_features, labels, split["train"]),
                           make_bags(hr_features, labels, split["val"]),
                           lrmil.fit_config(schedule, "torchmil"), model, bce)
    return model.cpu()


# -- the targets -------------------------------------------------------------------------------------
def targets(out: dict) -> dict:
    """The paper's claims on our cohort, from :meth:`Experiment.to_json`'s entries: LRMIL's read +
    encode + MIL at least 12x faster per slide than HR ABMIL's (when timed), its AUC at least 98 %
    of HR ABMIL's and above LR ABMIL's. A claim against HR ABMIL is met only when HR ABMIL itself
    learned: its AUC at least torchmil's ABMIL's on the same features minus 0.05."""
    hr, ours = out.get("hr_abmil", {}), out.get("lrmil", {})
    result = {}
    if "seconds_by_stage" in hr and "seconds_by_stage" in ours:
        def read_encode_mil(entry):
            return sum(entry["seconds_by_stage"][stage] for stage in ("read", "encode", "MIL"))
        result["speedup_read_encode_mil"] = read_encode_mil(hr) / read_encode_mil(ours)
        result["speedup_at_least_12x"] = bool(result["speedup_read_encode_mil"] >= 12)
        result["speedup_total"] = hr["seconds_per_slide"] / ours["seconds_per_slide"]
    if "auc" in hr and "auc" in ours:
        result["hr_abmil_learned"] = learned(hr["auc"], out["hr_abmil_torchmil"]["auc"])
        result["auc_ratio_to_hr"] = ours["auc"] / hr["auc"]
        result["auc_at_least_98pct_of_hr_abmil"] = (result["hr_abmil_learned"]
                                                    and bool(ours["auc"] >= 0.98 * hr["auc"]))
        result["auc_above_lr_abmil"] = bool(ours["auc"] > out["lr_abmil"]["auc"])
    return result
