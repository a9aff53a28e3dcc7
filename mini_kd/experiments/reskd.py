"""ResKD measured: every factor, the CE baseline, unlabeled slides, view sources, FLOPs, slides.

:func:`run_experiment` runs the steps of :mod:`mini_kd.methods.reskd` -- regions, augmentation,
the teacher, its targets, the students -- for every factor N of the preset's schedule, and adds
what the paper measures around the method:

1. regions of the train / val / test slides at 20x and every 20x / N (cached on disk); class-pure
   regions from label maps, or weakly labeled ones where the cohort has none;
2. ``n_views`` augmented copies of the training regions;
3. the HR teacher (L_CE), frozen, and its outputs on every copy;
4. for every N: the KD student (L_KD, no labels) and the CE student (L_CE) on the same LR copies,
   scored on the test regions (bootstrap CI) read from the pyramid and resized in software;
5. FLOPs per region of each network;
6. the KD student at ÷``unlabeled_factor`` with 0, 8, ... extra unlabeled slides of a second
   phantom cohort;
7. every network as a slide classifier (:meth:`~mini_kd.methods.reskd.Trained.predictor`) on the
   test slides: AUC, accuracy, F1, and the seconds per slide by stage
   (:func:`mini_kd.experiments.time_pipelines`; the CE student of a factor costs what its KD
   student costs).

The split is the cohort's own (``labels.csv``), or one drawn by :func:`mini_kd.experiments.splits`
when that has no train, val or test slide; all selection uses that split's validation slides.
Every network is checkpointed after every epoch under ``$MINI_KD_DATA/reskd/<preset>-<hash>``: a
second call with the same settings resumes or reloads instead of training again. The teacher
trains alone on torch's default threads (a batch of 32 regions of 256 px took 2.7 s on one
thread and 1.4-1.6 s on two here); then the students train side by side in worker processes, one
per core, on one thread each (:func:`train_student`, :func:`mini_kd.runtime.map_jobs`).

:func:`slide_classifiers` trains the side-by-side benchmark's two ResKD rows on one fold -- the
teacher at 20x and the ÷4 KD student at 5x, each a slide classifier -- on a shorter schedule
(:data:`FOLD_SCHEDULE`), and loads them from disk when that fold was trained before.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from mini_kd import methods, presets
from mini_kd.data import region_views
from mini_kd.encoders import TinyResNetGN
from mini_kd.evaluate import bootstrap_ci, classification_metrics, count_flops
from mini_kd.experiments import Experiment, splits, time_pipelines
from mini_kd.inference import StageTimer
from mini_kd.methods import reskd
from mini_kd.methods.reskd import Regions, TeacherTargets
from mini_kd.paths import data_dir
from mini_kd.progress import progress
from mini_kd.runtime import map_jobs, torch_threads, write_atomically
from mini_kd.slides import open_slide
from mini_kd.tiling import tile_grid

UNLABELED_SEED = 1  # seed of the second phantom cohort that holds the unlabeled slides


def run_experiment(preset: str = "book", cohort=None, config: reskd.Config | None = None,
                   schedule: reskd.Schedule | None = None, view_source: str = "pyramid") -> Experiment:
    """The ResKD experiment of ``preset`` on ``cohort`` (default :func:`mini_kd.presets.cohort`
    with ``regions``: the phantom with foci large enough for labelled regions);
    ``config`` and ``schedule`` default to the preset's, ``view_source`` is where the LR views
    of training come from (the other source is scored too). See the module docstring."""
    start = time.perf_counter()
    cohort = cohort or presets.cohort(preset, regions=True)
    config = config or presets.config("reskd", preset)
    schedule = schedule or presets.schedule("reskd", preset)
    if schedule.checkpoint_dir is None:
        schedule = replace(schedule, checkpoint_dir=str(_checkpoint_root(preset, cohort, config,
                                                                         schedule, view_source)))
    split = _split(cohort, schedule.seed)
    study = _Study(preset, cohort, split, config, schedule, view_source)
    region_scores, models = study.students()
    unlabeled = study.unlabeled_curve()
    probabilities, timing = study.slides(models)
    descriptions = {"teacher": f"teacher at {config.hr_mag:g}x (L_CE)"}
    for factor in schedule.factors:
        mag = f"{config.hr_mag / factor:g}x"
        descriptions[f"kd_x{factor}"] = f"KD student at {mag} (÷{factor}, L_KD, no label)"
        descriptions[f"ce_x{factor}"] = f"CE student at {mag} (÷{factor}, L_CE)"
    path = Path(schedule.checkpoint_dir) / f"reskd_x{config.factor}.pt"
    checkpoint = models[f"kd_x{config.factor}"].save(path) if f"kd_x{config.factor}" in models else None
    extras = {"classes": list(study.classes), "region_labels": study.region_labels,
              "regions": study.counts, "region_scores": region_scores, "unlabeled": unlabeled,
              "view_sources": study.view_sources,
              "flop_reduction_by_region_size": flop_reductions(), "seconds_by_step": study.timer.seconds}
    experiment = Experiment(preset=preset, cohort=str(cohort.root), splits=[split],
                            descriptions=descriptions, base="teacher", timing=timing,
                            timed_as={f"ce_x{n}": f"kd_x{n}" for n in schedule.factors},
                            extras=extras, models=models, checkpoint=checkpoint,
                            seconds=time.perf_counter() - start,
                            targets=lambda _: check_targets(region_scores))
    for name, probability in probabilities.items():
        experiment.record(0, name, split["test"], cohort.labels(split["test"]), probability)
    return experiment


class _Study:
    """The networks of one run and the regions they share, trained and scored step by step."""

    def __init__(self, preset, cohort, split, config, schedule, view_source):
        self.preset, self.cohort, self.split = preset, cohort, split
        self.config, self.schedule = config, schedule
        self.view_source, self.timer = view_source, StageTimer()
        self.classes = reskd.classes_of(cohort)
        self.region_labels = "label maps" if cohort.has_label_maps else "slide labels (weak)"
        self.other = "resize" if view_source == "pyramid" else "pyramid"
        with self.timer.stage("regions"):
            self.train, self.val, self.test = (self.regions(name) for name in ("train", "val", "test"))
            self.test_other = self.regions("test", self.other)
        with self.timer.stage("augment"):
            self.bank = reskd.augment(self.train, config, schedule)
        with self.timer.stage("teacher"):
            self.teacher, self.teacher_history = reskd.train_ce(
                self.bank, 1, config, schedule, val=self.val, n_classes=len(self.classes))
            self.targets = reskd.teacher_targets(self.teacher, self.bank.views[1], schedule.device)
            self.val_targets = reskd.teacher_targets(self.teacher, self.val.views[1], schedule.device)
        self.counts = {"train": len(self.train.coords), "train_copies": len(self.bank.coords),
                       "val": len(self.val.coords), "test": len(self.test.coords),
                       "test_per_class": np.bincount(self.test.labels,
                                                     minlength=len(self.classes)).tolist()}
        self.view_sources, self.kd_students = [], {}

    def regions(self, name: str, source: str | None = None) -> Regions:
        """The labeled regions of the split's ``name`` slides at every factor, cached on disk."""
        source = source or self.view_source
        ids = self.split[name]
        key = _cache_key("labeled", str(self.cohort.root), ids, name, source, self.cohort.has_label_maps,
                         self._geometry("region_stride", "purity", "regions_per_class"))
        return _cached_regions(key, lambda: reskd.labeled_regions(
            self.cohort, ids, self.config, self.schedule, _all_factors(self.schedule), source))

    def _geometry(self, *extra) -> dict:
        keys = ("region_size", "hr_mag", "factors", "unlabeled_factor", "seed", "min_tissue", *extra)
        settings = {**asdict(self.config), **asdict(self.schedule)}
        return {k: settings[k] for k in keys}

    def score(self, model, regions: Regions, factor: int) -> dict:
        """The paper's accuracy (per-class one-vs-rest, averaged, on class-balanced bootstrap
        resamples, with its 95 % interval) and plain balanced accuracy of ``model`` on ``regions``."""
        probs = reskd.predict(model, regions.views[factor], self.schedule.device)
        point, low, high = bootstrap_ci(regions.labels, probs.argmax(axis=1), "accuracy",
                                        n=self.schedule.bootstrap, seed=self.schedule.seed)
        return {"accuracy": point, "accuracy_ci": [low, high],
                "balanced_accuracy": classification_metrics(regions.labels, probs)["balanced_accuracy"]}

    def trained(self, network, factor: int) -> reskd.Trained:
        return reskd.Trained(replace(self.config, factor=factor), network,
                             self.schedule.region_size, self.classes)

    def students(self) -> tuple[dict, dict]:
        """Region scores of the teacher and of the KD and CE students at every factor, and every
        network as a :class:`~mini_kd.methods.reskd.Trained`."""
        config, schedule, test = self.config, self.schedule, self.test
        teacher_gflops = measure_flops(self.teacher, schedule.region_size)
        scores = {"teacher": {"magnification": config.hr_mag, "input_px": schedule.region_size,
                              **self.score(self.teacher, test, 1), "gflops": teacher_gflops,
                              "best_epoch": self.teacher_history.best_epoch,
                              "train_seconds": self.teacher_history.seconds},
                  "students": []}
        models = {"teacher": self.trained(self.teacher, 1)}
        with self.timer.stage("students"):
            jobs = [self.job(kind, factor, self.bank, self.targets)
                    for factor in schedule.factors for kind in ("kd", "ce")]
            trained = iter(map_jobs(train_student, jobs, self.val_targets, config, schedule,
                                    len(self.classes), device=schedule.device, desc="students"))
        for factor in schedule.factors:
            side = schedule.region_size // factor
            (kd, kd_history), (ce, ce_history) = next(trained), next(trained)
            self.kd_students[factor] = kd
            models[f"kd_x{factor}"], models[f"ce_x{factor}"] = self.trained(kd, factor), self.trained(ce, factor)
            kd_score, ce_score = self.score(kd, test, factor), self.score(ce, test, factor)
            gflops = measure_flops(kd, side)
            scores["students"].append({
                "factor": factor, "magnification": config.hr_mag / factor, "input_px": side,
                **{f"kd_{k}": v for k, v in kd_score.items()}, **{f"ce_{k}": v for k, v in ce_score.items()},
                "gflops": gflops, "ce_gflops": measure_flops(ce, side),
                "flop_reduction": teacher_gflops / gflops,
                f"kd_accuracy_{self.other}": self.score(kd, self.test_other, factor)["accuracy"],
                "kd_train_seconds": kd_history.seconds, "ce_train_seconds": ce_history.seconds})
            self.view_sources.append({"factor": factor, "magnification": config.hr_mag / factor,
                                      "psnr_db": psnr(test.views[factor], self.test_other.views[factor])})
        return scores, models

    def job(self, kind: str, factor: int, regions: Regions, targets: TeacherTargets,
            name: str | None = None) -> dict:
        """A :func:`train_student` job: what the ``kind`` student at ÷``factor`` trains on."""
        def at(part: Regions) -> Regions:  # only the ÷factor views travel to the worker
            return replace(part, views={factor: part.views[factor]})

        return {"kind": kind, "factor": factor, "regions": at(regions), "targets": targets,
                "val": at(self.val), "name": name}

    def unlabeled_curve(self) -> list[dict]:
        """KD students at ÷unlabeled_factor on the training copies (labels dropped) plus the
        regions of n extra unlabeled slides, for every n of ``unlabeled_slides``."""
        config, schedule, factor = self.config, self.schedule, self.schedule.unlabeled_factor
        extra = [n for n in schedule.unlabeled_slides if n > 0]
        rows = []
        with self.timer.stage("unlabeled"):
            if extra:
                pool_cohort = unlabeled_cohort(self.preset, schedule)
                pool_ids = pool_cohort.ids()[:max(extra)]
                pool = reskd.augment(self._unlabeled_regions(pool_cohort, pool_ids), config, schedule)
                pool_targets = reskd.teacher_targets(self.teacher, pool.views[1], schedule.device)
            runs = []  # (n extra slides, their regions, the student's job)
            for n in schedule.unlabeled_slides:
                regions, targets, n_regions = self.bank, self.targets, 0
                if n > 0:
                    keep = np.isin(pool.slide_ids, pool_ids[:n])
                    regions = Regions.concat([replace(self.bank, labels=None),
                                              Regions(pool.slide_ids[keep], pool.coords[keep], None,
                                                      {k: v[keep] for k, v in pool.views.items()})])
                    targets = TeacherTargets(torch.cat([self.targets.logits, pool_targets.logits[keep]]),
                                             torch.cat([self.targets.maps, pool_targets.maps[keep]]))
                    n_regions = int(keep.sum()) // schedule.n_views
                runs.append((n, n_regions, self.job("kd", factor, regions, targets,
                                                    f"kd_x{factor}_unlabeled{n}" if n else None)))
            reused = lambda n: n == 0 and factor in self.kd_students  # noqa: E731 (the ÷N student)
            trained = iter(map_jobs(train_student, [job for n, _, job in runs if not reused(n)],
                                    self.val_targets, config, schedule, len(self.classes),
                                    device=schedule.device, desc="unlabeled students"))
            for n, n_regions, _ in runs:
                student = self.kd_students[factor] if reused(n) else next(trained)[0]
                result = self.score(student, self.test, factor)
                rows.append({"n_slides": n, "n_regions": n_regions, "factor": factor,
                             **{f"kd_{k}": v for k, v in result.items()}})
        return rows

    def _unlabeled_regions(self, cohort, slide_ids) -> Regions:
        """``unlabeled_regions`` tissue squares drawn at random from each slide; no label is read."""
        config, schedule = self.config, self.schedule
        key = _cache_key("unlabeled", str(cohort.root), list(slide_ids), self.view_source,
                         self._geometry("unlabeled_regions"))

        def build() -> Regions:
            parts, factors = [], _all_factors(schedule)
            for index, slide_id in enumerate(progress(slide_ids, desc="regions unlabeled")):
                with open_slide(cohort.slide_path(slide_id)) as slide:
                    grid = tile_grid(slide, config.hr_mag, schedule.region_size, config.min_tissue)
                    rng = np.random.default_rng([schedule.seed, 10_000 + index])
                    coords = grid.coords[rng.permutation(len(grid))[:schedule.unlabeled_regions]]
                    views = region_views(slide, coords, schedule.region_size, factors,
                                               mag=config.hr_mag, source=self.view_source)
                parts.append(Regions(np.array([slide_id] * len(coords)), coords, None,
                                     dict(zip([1, *factors], views))))
            return Regions.concat(parts)

        return _cached_regions(key, build)

    def slides(self, models: dict) -> tuple[dict, list[dict]]:
        """Every network's P(tumour) of each test slide (``{model: [p, ...]}``, in the split's
        order) and the seconds per slide and stage of the teacher's and KD students' pipelines."""
        ids = self.split["test"]
        paths = {slide_id: self.cohort.slide_path(slide_id) for slide_id in ids}
        probability = {name: {} for name in models}

        def recorded(name):
            def predict(path):
                prediction = predictors[name](path)
                probability[name][prediction.slide_id] = prediction.probability
                return prediction
            return predict

        predictors = {name: trained.predictor(self.schedule.device) for name, trained in models.items()}
        with self.timer.stage("slides"):
            timed = [name for name in models if not name.startswith("ce_")]
            timing = time_pipelines(paths, {name: recorded(name) for name in timed}, self.schedule.seed)
            for name in progress([n for n in models if n not in timed], desc="CE students on slides"):
                for path in paths.values():
                    recorded(name)(path)
        return {name: [probability[name][Path(paths[i]).stem] for i in ids]
                for name in models}, timing


def train_student(job: dict, val_targets: TeacherTargets, config: reskd.Config,
                  schedule: reskd.Schedule, n_classes: int):
    """``(network, history)`` of one student ``job`` (:meth:`_Study.job`): the KD student
    (:func:`~mini_kd.methods.reskd.distill`, against the job's teacher ``targets``) or the CE
    student (:func:`~mini_kd.methods.reskd.train_ce`) at ÷``factor``, on one torch thread. The
    students of a run train side by side in worker processes (:func:`mini_kd.runtime.map_jobs`);
    each seeds its own training."""
    factor, regions, val = job["factor"], job["regions"], job["val"]
    with torch_threads(1, schedule.device):
        if job["kind"] == "kd":
            return reskd.distill(regions, job["targets"], factor, config, schedule, val, val_targets,
                                 name=job["name"])
        return reskd.train_ce(regions, factor, config, schedule, val=val, n_classes=n_classes)


def _split(cohort, seed: int) -> dict:
    """labels.csv's split, or one drawn with ``seed`` when it leaves train, val or test empty."""
    split = {name: cohort.ids(name) for name in ("train", "val", "test")}
    return split if all(split.values()) else splits(cohort, 1, seed)[0]


def _all_factors(schedule: reskd.Schedule) -> list[int]:
    return sorted(set(schedule.factors) | {schedule.unlabeled_factor})


def unlabeled_cohort(preset: str, schedule: reskd.Schedule):
    """A second phantom cohort (another seed, the size of the preset's phantom) for the unlabeled
    pool; only its first ``max(unlabeled_slides)`` slides are used."""
    from mini_kd.phantom import ensure_cohort

    n_slides = max(schedule.unlabeled_slides)
    # the phantom needs at least 6 slides (its stratified split)
    settings = {**presets.REGION_COHORTS[preset], "n_slides": max(n_slides, 6), "seed": UNLABELED_SEED}
    root = data_dir() / "phantom" / f"{preset}-unlabeled-seed{UNLABELED_SEED}-{n_slides}"
    return ensure_cohort(root, **settings)


# -- slide classifiers per fold (the side-by-side benchmark) --------------------------------------
# The side-by-side benchmark (mini_kd.experiments.compare) trains ResKD on every fold of K folds,
# four folds per cohort within one notebook: these override the preset's Config and Schedule so
# that one book fold trains in well under 90 s on 2 CPU cores (about 30 s measured on either book
# cohort, up to 85 s with the cores shared with other work). Its phantom holds micro-metastases
# (0.1-2 % of the tissue), smaller than a 256-px region at 20x: there, fold 0's teacher found no
# region a fifth tumour in most training slides and scored a test AUC under 0.5. So 128-px regions,
# a region at least a fifth tumour being tumour (min_tumour, deviation 8 of
# mini_kd.methods.reskd), at the price of a 1 x 1 last map for the ÷4 student (32 px): L_pix
# then matches the teacher's pooled map. One view, 16 regions per class and split, a 2-epoch
# teacher and a 4-epoch student: a fold costs about 45 s on one core with 32 regions, 3 + 8
# epochs (26 s to train, 17 s for the teacher to read and classify every 20x region of the 20
# test slides, 2 s for the student), which put notebook 05 over its 10 minutes. P(slide) = the mean of the top_k region P(tumour) with k = 1,
# the maximum: a tumour slide holds few tumour regions, and a larger k averages them with normal
# tissue. The gpu preset keeps its own schedule.
FOLD_SCHEDULE = {
    "smoke": dict(region_size=128, region_stride=64, regions_per_class=6, n_views=1,
                  teacher_epochs=1, epochs=1, batch_size=8),
    "book": dict(region_size=128, region_stride=32, regions_per_class=16, n_views=1,
                 teacher_epochs=2, epochs=4, epochs_by_factor={}, batch_size=4),
}
FOLD_CONFIG = {"top_k": 1, "min_tumour": 0.2}
FOLD_MODELS = ("reskd_teacher", "reskd_student")


def slide_classifiers(cohort, split: dict, preset: str) -> dict[str, reskd.Trained]:
    """``{"reskd_teacher": ..., "reskd_student": ...}`` of one fold: ``reskd.fit`` on
    ``split["train"]`` (selected on ``split["val"]``; ``split["test"]`` is not read) with the
    preset's config and schedule, :data:`FOLD_CONFIG` and :data:`FOLD_SCHEDULE` on top.
    The teacher (factor 1, at hr_mag) and the ÷``factor`` KD student are each a slide classifier
    (:meth:`~mini_kd.methods.reskd.Trained.predictor`: P(slide) = top-k mean region P(tumour)).

    Both are saved under ``$MINI_KD_DATA/reskd/<preset>-<hash>/``, the hash of the cohort (its
    folder and ``cohort.json``), the train and val ids, the config, the schedule and the phantom
    generator's version: a second call with the same arguments loads them and trains nothing.
    """
    config = presets.config("reskd", preset, **FOLD_CONFIG)
    schedule = replace(presets.schedule("reskd", preset), **FOLD_SCHEDULE.get(preset, {}))
    root = _checkpoint_root(preset, cohort, config, schedule, "folds", split["train"], split["val"],
                            _cohort_settings(cohort))
    paths = {name: root / f"{name}.pt" for name in FOLD_MODELS}
    if not all(path.is_file() for path in paths.values()):
        with torch_threads(1, schedule.device):
            trained = reskd.fit(cohort, split, config, schedule, return_teacher=True)
        for model, path in zip(trained, paths.values()):
            model.save(path)
    return {name: methods.load(path, "reskd") for name, path in paths.items()}


def _cohort_settings(cohort) -> str | None:
    """``cohort.json`` of a generated cohort (phantom, real tissue), or None for a user's folder:
    a cohort made again in the same folder with other settings never reuses old checkpoints."""
    path = Path(cohort.root) / "cohort.json"
    return path.read_text() if path.is_file() else None


# -- caches ----------------------------------------------------------------------------------------
def _cache_key(*parts) -> str:
    """A short hash of ``parts`` and of the phantom generator's version (cached regions and
    checkpoints of an older phantom are never reused)."""
    from mini_kd.phantom import GENERATOR_VERSION

    return hashlib.sha256(json.dumps([GENERATOR_VERSION, *parts], sort_keys=True,
                                     default=str).encode()).hexdigest()[:12]


def _checkpoint_root(preset, cohort, config, schedule, *parts) -> Path:
    """$MINI_KD_DATA/reskd/<preset>-<hash of the cohort's folder, config, schedule and ``parts``>."""
    settings = {k: v for k, v in asdict(schedule).items() if k not in ("device", "checkpoint_dir")}
    key = _cache_key(str(cohort.root), asdict(config), settings, *parts)
    return data_dir() / "reskd" / f"{preset}-{key}"


def _cached_regions(key: str, build) -> Regions:
    """``build()``, saved under $MINI_KD_DATA/reskd/regions/<key>.npz and loaded from there next time."""
    path = data_dir() / "reskd" / "regions" / f"{key}.npz"
    if path.exists():
        with np.load(path) as f:
            labels = f["labels"] if f["labeled"] else None
            views = {int(k[5:]): f[k] for k in f.files if k.startswith("view_")}
            return Regions(f["slide_ids"], f["coords"], labels, views)
    regions = build()

    def write(partial: Path) -> None:
        with open(partial, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, slide_ids=regions.slide_ids, coords=regions.coords,
                     labeled=regions.labels is not None,
                     labels=regions.labels if regions.labels is not None else np.zeros(0, np.int64),
                     **{f"view_{n}": v for n, v in regions.views.items()})

    write_atomically(path, write)
    return regions


# -- cost and targets ------------------------------------------------------------------------------
def measure_flops(model: torch.nn.Module, side: int) -> float:
    """GFLOPs of one forward pass on one ``side`` x ``side`` region (torch.utils.flop_counter)."""
    return count_flops(model.cpu(), torch.zeros(1, 3, side, side)) / 1e9


def flop_reductions(region_sizes=(128, 256), factors=(2, 4, 8, 16)) -> list[dict]:
    """Teacher FLOPs / student FLOPs for each region size and factor (measured; N² until the
    student's last map is 1 x 1). Factors whose view is below the student's minimum input
    (:data:`~mini_kd.methods.reskd.MIN_INPUT_PX`) are skipped."""
    model = TinyResNetGN(n_classes=len(reskd.CLASSES))
    rows = []
    for size in region_sizes:
        teacher = measure_flops(model, size)
        rows += [{"region_px": size, "factor": n, "student_px": size // n,
                  "flop_reduction": teacher / measure_flops(model, size // n)}
                 for n in factors if size % n == 0 and size // n >= reskd.MIN_INPUT_PX]
    return rows


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 image stacks."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def check_targets(region_scores: dict) -> dict:
    """The chapter's two targets, on the region scores of :func:`run_experiment`
    (``extras["region_scores"]``):

    - the ÷8 student needs at least 64x fewer FLOPs (measured, to 1 %: the linear head's cost does
      not shrink) than the teacher and scores within 2 accuracy points of it;
    - at every factor the KD student scores at least as well as the CE student.
    """
    teacher = region_scores["teacher"]["accuracy"]
    x8 = next((row for row in region_scores["students"] if row["factor"] == 8), None)
    return {
        "x8_flop_reduction": x8 and x8["flop_reduction"],
        "x8_at_least_64x_fewer_flops": bool(x8 and x8["flop_reduction"] >= 0.99 * 64),
        "x8_gap_to_teacher": x8 and teacher - x8["kd_accuracy"],
        "x8_within_2_points_of_teacher": bool(x8 and teacher - x8["kd_accuracy"] <= 0.02),
        "kd_at_or_above_ce": {row["factor"]: row["kd_accuracy"] >= row["ce_accuracy"]
                              for row in region_scores["students"]},
    }
