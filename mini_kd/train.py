"""One fit loop for every network in the course.

All three papers train the same way once the maths is inside a *step function*: read a batch,
compute a loss, back-propagate, step Adam, check a validation score each epoch, keep the best
epoch, stop when it stops improving. What differs is only what happens inside the step:

- ResKD (DiPalma et al. 2021): variable-size images, so batches of one image with gradient
  accumulation over 32 (``accumulate=32``); the student's KD step never reads a label.
- LRMIL (Shin & Jeong 2026): the HR teacher MIL selects by validation AUC (``monitor="val_auc"``,
  ``mode="max"``); stage 1 has no validation set and keeps the lowest training loss
  (``monitor="train_loss"``); stage 2 trains the LR student MIL like the teacher.
- AHDMIL (Dong et al. 2025): step 1 selects only after ``stop_epoch`` (``min_epochs=50``); step 2
  updates two networks on every slide, DB-LIPN first and DMIN second, with two Adam optimisers
  (a dict of step functions with a dict of optimisers, see :func:`fit`), skips a slide whose
  distillation loss is NaN (the step returns ``None``) and keeps a checkpoint only when the
  validation keep-rate lies in [0.3, 1] (``accept``).

Gradient accumulation. With ``accumulate = k``, the gradients of k batches are summed and divided
by the number of batches that contributed before the optimiser steps, so one step sees

    g = (1 / k) * sum_{i=1..k} grad L(batch_i),

the gradient of the mean loss over the k batches: for batches of one sample and a loss averaged
over its batch, exactly the gradient of one batch of k samples. A window cut short by the end of
the epoch (or by skipped batches) is averaged over the batches it did see.

Precision. Training steps and validation run in float32 on every device, as do feature caching
(:func:`mini_kd.features.encode_tiles`) and the methods' predictors: the epoch selected on its
validation score is scored at test time by the same arithmetic (under a reduced-precision autocast
AHDMIL's keep gate 1[S > 0] and the degree-12 Chebyshev recurrence of its heads would move).

Checkpoints. With ``checkpoint_dir`` the loop writes ``last.pt`` after every epoch (weights,
optimisers, history and every random-number state) and ``best.pt`` whenever the monitored score
improves; both are written to a temporary file first and renamed, so an interruption never leaves
half a file. ``fit`` called again with ``resume=True`` carries on from ``last.pt`` and, on a CPU,
produces the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import functools
import math
import pickle
import random
import re
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from mini_kd.errors import MiniKDError
from mini_kd.progress import progress
from mini_kd.runtime import pick_device, seed_everything, write_atomically


# -- frozen teachers ------------------------------------------------------------------------------
def freeze(module: nn.Module) -> nn.Module:
    """Make ``module`` a fixed teacher: no gradients, eval mode, and it stays in eval mode.

    ``nn.Module.train()`` recurses into children, so a teacher held inside a student's wrapper
    would otherwise switch back to train mode (dropout on, normalisation statistics updating)
    every time the fit loop calls ``wrapper.train()``. The default optimiser of :func:`fit` only
    takes parameters that require gradients, so a frozen teacher is never updated.
    """
    module.requires_grad_(False)
    module.eval()
    module.train = functools.partial(_stay_in_eval, module)  # a partial pickles, a method does not
    return module


def _stay_in_eval(self, mode: bool = True):
    return self


def move_to(batch, device: torch.device):
    """``batch`` with every tensor moved to ``device``, through nested tuples, lists and dicts."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


# -- configuration and history ---------------------------------------------------------------------
@dataclass
class FitConfig:
    """How to train; each method's config fills these with its paper's values."""

    epochs: int = 10
    lr: float = 1e-3                  # of the default Adam
    weight_decay: float = 0.0         # of the default Adam
    accumulate: int = 1               # batches per optimiser step (ResKD: 32 images of batch size 1)
    patience: int | None = None       # stop after this many epochs without improvement; None = never
    monitor: str = "val_loss"         # epoch metric that picks the best epoch ("train_loss", "val_auc", ...)
    mode: str = "min"                 # "min" or "max": which direction of `monitor` is better
    min_epochs: int = 1               # epochs before this one are neither selected nor counted for patience
    seed: int = 0
    device: str | None = None         # None = pick_device()
    grad_clip: float | None = None    # max gradient norm per optimiser step; None = no clipping
    checkpoint_dir: str | Path | None = None   # None = keep everything in memory
    resume: bool = True               # carry on from checkpoint_dir/last.pt when it exists
    progress: bool = True             # tqdm bars (silent anyway when MINI_KD_QUIET=1)


@dataclass
class History:
    """What :func:`fit` did: one row per epoch, the best epoch, and the best weights.

    Each row holds ``epoch``, ``train_loss``, ``train_<metric>`` for what the step reported,
    ``val_<metric>`` for what the validation step reported, ``skipped`` (batches a step skipped)
    and ``seconds``; with several named steps the per-step values are ``train_<name>_loss`` and
    ``train_<name>_<metric>``, and ``train_loss`` is their sum. ``pandas.DataFrame(history.rows)``
    gives the table.
    """

    monitor: str
    mode: str
    rows: list[dict] = field(default_factory=list)
    best_epoch: int | None = None     # None when no epoch was selectable (min_epochs, accept)
    best_score: float | None = None
    stopped_early: bool = False
    best_state: dict | None = field(default=None, repr=False)   # CPU copy of the best weights

    @property
    def seconds(self) -> float:
        """Wall-clock seconds of all epochs, resumed runs included."""
        return sum(row["seconds"] for row in self.rows)

    def column(self, key: str) -> list:
        """One metric over the epochs, e.g. ``history.column("val_loss")`` for a plot."""
        return [row.get(key, math.nan) for row in self.rows]

    def to_dict(self) -> dict:
        """Everything but the weights, as plain python values (JSON-ready)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "best_state"}
        return {**out, "seconds": self.seconds}


# -- the fit loop ----------------------------------------------------------------------------------
def fit(model: nn.Module, train_step, train_data, config: FitConfig | None = None, *,
        val_step: Callable | None = None, val_data=None, optimizer=None,
        accept: Callable[[dict], bool] | None = None,
        on_epoch_end: Callable[[nn.Module, int], None] | None = None) -> History:
    """Train ``model`` on ``train_data`` for ``config.epochs`` epochs; return its :class:`History`.

    ``train_step(model, batch)`` returns the loss (a scalar tensor), or ``(loss, metrics)`` with a
    dict of floats to log, or ``None`` to skip this batch (nothing is back-propagated; the skip
    is counted in the history). The batch arrives on the model's device. A non-finite loss raises
    :class:`MiniKDError` naming the epoch and batch.

    To update several networks per batch with their own optimisers, pass ``train_step`` as a dict
    ``{name: step}`` and ``optimizer`` as a dict with the same names. The steps run in the dict's
    order, and each one's loss is back-propagated and its optimiser stepped before the next step
    runs, so a later step sees the networks an earlier one has just updated. A step that returns
    ``None`` skips the rest of the batch. Each step should give gradients only to its own
    optimiser's parameters (run the other networks under ``torch.no_grad()``).

    ``optimizer``: None (Adam over the parameters that require gradients, with ``config.lr`` and
    ``config.weight_decay``), an optimiser, a dict of them (see above), or a callable
    ``model -> optimiser or dict`` called after the model is on its device.

    ``val_step(model, batch)`` returns a dict of floats per batch of ``val_data``; each metric is
    the mean over batches, every batch weighing the same (a slide per batch for MIL = per-slide
    mean). For a metric of the whole set, such as AUC, leave ``val_data`` None: ``val_step(model)``
    is then called once per epoch and returns the set's metrics. Either way it runs in eval mode
    under ``torch.no_grad()``, and its keys are stored with a ``val_`` prefix (``"auc"`` ->
    ``"val_auc"``), which is what ``config.monitor`` and ``accept`` see.

    ``accept(val_metrics) -> bool`` decides whether an epoch may be selected at all (AHDMIL keeps
    a checkpoint only when the keep-rate is in [0.3, 1]). The best epoch is the selectable one
    (epoch >= ``min_epochs``, accepted) with the best finite ``config.monitor``; its weights are
    loaded back into ``model`` at the end and kept in ``History.best_state``. When no epoch was
    selectable the model keeps its last weights and ``best_epoch`` is None.

    ``on_epoch_end(model, epoch)`` runs after each epoch's training, before validation (AHDMIL's
    cross-EMA between the DB-LIPN branches).
    """
    config = config or FitConfig()
    _check_config(config, val_step)
    device = pick_device(config.device)
    seed_everything(config.seed)
    model.to(device)
    steps = train_step if isinstance(train_step, dict) else {"": train_step}
    optimizers = _optimizers(model, optimizer, steps, config)
    generators = _data_generators(train_data)
    history = History(config.monitor, config.mode)
    directory = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        if config.resume and (directory / "last.pt").exists():
            history = _resume(directory, model, optimizers, generators)

    done = len(history.rows)
    last = done if history.stopped_early else config.epochs
    bar = _bar(range(done + 1, last + 1), config, desc="fit", initial=done, total=max(last, done))
    for epoch in bar:
        start = time.perf_counter()
        row = {"epoch": epoch, **_train_epoch(model, steps, optimizers, train_data, config,
                                              device, epoch)}
        if on_epoch_end is not None:
            on_epoch_end(model, epoch)
        val_metrics = {}
        if val_step is not None:
            val_metrics = _validate(model, val_step, val_data, device)
        row.update(val_metrics)
        row["seconds"] = time.perf_counter() - start
        history.rows.append(row)

        improved = _select(history, row, val_metrics, config, accept)
        if improved:
            history.best_state = _snapshot(model)
        history.stopped_early = (config.patience is not None
                                 and _stale_epochs(history, config.min_epochs) >= config.patience)
        if directory is not None:
            _save_checkpoint(directory, model, optimizers, history, generators, improved)
        bar.set_postfix({"train_loss": row["train_loss"], config.monitor: row[config.monitor]})
        if history.stopped_early:
            break
    bar.close()

    if history.best_state is not None:
        model.load_state_dict(history.best_state)
    return history


def _bar(iterable, config: FitConfig, **kwargs):
    """A tqdm bar over ``iterable``, hidden when ``config.progress`` is off."""
    if not config.progress:
        kwargs["disable"] = True
    return progress(iterable, **kwargs)


def _check_config(config: FitConfig, val_step) -> None:
    if config.mode not in ("min", "max"):
        raise MiniKDError(f"FitConfig.mode is {config.mode!r}; use 'min' (losses) or 'max' (AUC, accuracy)")
    if int(config.accumulate) != config.accumulate or config.accumulate < 1:
        raise MiniKDError(f"FitConfig.accumulate is {config.accumulate!r}; use a whole number >= 1")
    if val_step is None and config.monitor.startswith("val_"):
        raise MiniKDError(f"FitConfig.monitor is {config.monitor!r} but fit got no val_step; pass "
                          "val_step (and val_data) or monitor a training metric such as 'train_loss'")


def _optimizers(model, optimizer, steps: dict, config: FitConfig) -> dict:
    """The optimisers as a dict with the same names as the steps."""
    if callable(optimizer):
        optimizer = optimizer(model)
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise MiniKDError("the model has no parameter that requires a gradient, so there is "
                              "nothing to train; unfreeze the student or pass an optimizer")
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    optimizers = optimizer if isinstance(optimizer, dict) else {"": optimizer}
    if optimizers.keys() != steps.keys():
        raise MiniKDError(f"train_step names {sorted(steps)} and optimizer names {sorted(optimizers)} "
                          "differ; pass one step and one optimiser, or two dicts with the same keys")
    return optimizers


def _train_epoch(model, steps: dict, optimizers: dict, data, config: FitConfig, device,
                 epoch: int) -> dict:
    """One pass over ``data``; returns the epoch's mean training metrics and skipped-batch count."""
    model.train()
    totals, counts = defaultdict(float), defaultdict(int)
    window = dict.fromkeys(steps, 0)   # batches whose summed gradients wait in each optimiser
    skipped = 0
    batches = _bar(data, config, desc=f"epoch {epoch}", leave=False)
    for batch_number, batch in enumerate(batches, start=1):
        batch = move_to(batch, device)
        for name, step in steps.items():
            out = step(model, batch)
            if out is None:  # the step chose to skip this batch (AHDMIL: a NaN L_AD)
                skipped += 1
                break
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            value = _finite_loss(loss, epoch, batch_number, name, config)
            loss.backward()
            window[name] += 1
            if window[name] == config.accumulate:
                _optimizer_step(optimizers[name], window[name], config.grad_clip)
                window[name] = 0
            for key, number in {"loss": value, **metrics}.items():
                key = "_".join(filter(None, ("train", name, key)))
                totals[key] += float(number)
                counts[key] += 1
    for name, waiting in window.items():
        if waiting:  # the epoch ended inside an accumulation window
            _optimizer_step(optimizers[name], waiting, config.grad_clip)
    if not counts:
        raise MiniKDError(f"epoch {epoch} trained on no batch: train_data is empty or every "
                          "batch was skipped; check the data and the step's skip condition")
    row = {key: totals[key] / counts[key] for key in totals}
    if len(steps) > 1:
        row["train_loss"] = sum(row.get(f"train_{name}_loss", 0.0) for name in steps)
    return {"train_loss": row.pop("train_loss"), **row, "skipped": skipped}


def _finite_loss(loss, epoch: int, batch_number: int, name: str, config: FitConfig) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        which = f" of step {name!r}" if name else ""
        raise MiniKDError(
            f"the loss{which} is {value} at epoch {epoch}, batch {batch_number}; lower the learning "
            f"rate (lr={config.lr}), set grad_clip, check the batch for NaN/inf inputs, or return "
            "None from the step to skip batches it cannot use")
    return value


def _optimizer_step(optimizer: torch.optim.Optimizer, n_batches: int, grad_clip) -> None:
    """Average the summed gradients of ``n_batches`` batches, clip, step, clear."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if n_batches > 1:
        for p in params:
            p.grad.div_(n_batches)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _validate(model, val_step, val_data, device) -> dict:
    """The validation metrics, ``val_``-prefixed: per-batch means, or one call on the whole set."""
    model.eval()
    if val_data is None:
        metrics = val_step(model)
        return {f"val_{key}": float(value) for key, value in metrics.items()}
    totals, counts = defaultdict(float), defaultdict(int)
    for batch in val_data:
        metrics = val_step(model, move_to(batch, device))
        for key, value in metrics.items():
            totals[key] += float(value)
            counts[key] += 1
    if not counts:
        raise MiniKDError("val_data gave no batch (or val_step returned no metric); pass a "
                          "non-empty validation set or leave val_step out")
    return {f"val_{key}": totals[key] / counts[key] for key in totals}


def _select(history: History, row: dict, val_metrics: dict, config: FitConfig, accept) -> bool:
    """Record ``row``'s epoch as the best when it is selectable and beats the best so far."""
    if config.monitor not in row:
        raise MiniKDError(f"FitConfig.monitor {config.monitor!r} is not among the epoch's metrics "
                          f"{sorted(row)}; pick one of them")
    score = row[config.monitor]
    selectable = row["epoch"] >= config.min_epochs and (accept is None or accept(val_metrics))
    better = math.isfinite(score) and (
        history.best_score is None
        or (score < history.best_score if config.mode == "min" else score > history.best_score))
    if selectable and better:
        history.best_epoch, history.best_score = row["epoch"], score
    return selectable and better


def _stale_epochs(history: History, min_epochs: int) -> int:
    """Epochs counted for patience: since the best epoch, and never before ``min_epochs``."""
    after = history.best_epoch or 0
    return sum(1 for row in history.rows if row["epoch"] >= min_epochs and row["epoch"] > after)


def _snapshot(model: nn.Module) -> dict:
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


# -- checkpoints -----------------------------------------------------------------------------------
def _data_generators(data) -> list[torch.Generator]:
    """The torch generators that shuffle or sample ``data`` (a DataLoader's or its sampler's)."""
    found = [getattr(data, "generator", None), getattr(getattr(data, "sampler", None), "generator", None)]
    unique = {id(g): g for g in found if isinstance(g, torch.Generator)}
    return list(unique.values())


def _rng_state(generators: list[torch.Generator]) -> dict:
    kind, key, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, key.tolist(), position, has_gauss, gauss],  # lists load with weights_only
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": [g.get_state() for g in generators],
    }


def _set_rng_state(state: dict, generators: list[torch.Generator]) -> None:
    random.setstate(state["python"])
    kind, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(generators, state["data"]):
        generator.set_state(saved)


def write_checkpoint(obj, path) -> Path:
    """``torch.save(obj, path)`` written atomically (:func:`mini_kd.runtime.write_atomically`),
    creating the folder: an interruption never leaves half a checkpoint (the counterpart of
    :func:`read_checkpoint`)."""
    return write_atomically(path, lambda partial: torch.save(obj, partial))


def _save_checkpoint(directory: Path, model, optimizers: dict, history: History, generators,
                     improved: bool) -> None:
    if improved:  # best.pt first, so last.pt never points at a best epoch that is not on disk
        write_checkpoint({"model": history.best_state, "epoch": history.best_epoch,
                          "score": history.best_score, "monitor": history.monitor},
                         directory / "best.pt")
    write_checkpoint({"model": model.state_dict(),
                      "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                      "history": history.to_dict(),
                      "rng": _rng_state(generators)}, directory / "last.pt")


def _resume(directory: Path, model, optimizers: dict, generators) -> History:
    """Load ``last.pt`` (and the best weights from ``best.pt``) back into the training state."""
    checkpoint = load_checkpoint(directory / "last.pt", model)
    if checkpoint["optimizers"].keys() != optimizers.keys():
        raise MiniKDError(f"{directory / 'last.pt'} holds optimisers {sorted(checkpoint['optimizers'])} "
                          f"but this run has {sorted(optimizers)}; pass resume=False or another "
                          "checkpoint_dir")
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    saved = checkpoint["history"]
    history = History(**{f.name: saved[f.name] for f in fields(History) if f.name in saved})
    if history.best_epoch is not None:
        if not (directory / "best.pt").is_file():
            raise MiniKDError(f"{directory / 'last.pt'} records a best epoch {history.best_epoch} but "
                              f"{directory / 'best.pt'} is gone; pass resume=False to train again")
        history.best_state = torch.load(directory / "best.pt", map_location="cpu",
                                        weights_only=True)["model"]
    _set_rng_state(checkpoint["rng"], generators)
    return history


# What torch.load and load_state_dict raise for a file that is not the checkpoint they expect:
# a truncated zip, a text file, a pickle of something else, a dict with other keys or shapes.
CHECKPOINT_ERRORS = (KeyError, AttributeError, TypeError, ValueError, RuntimeError, OSError,
                     EOFError, pickle.UnpicklingError)


def read_checkpoint(path, kind: str, how: str) -> dict:
    """The dict saved at ``path`` by ``torch.save``, loaded on the CPU.

    A missing file, a file torch cannot read, or one that holds no dict is a :class:`MiniKDError`
    that names the ``kind`` of checkpoint expected and ``how`` to get one.
    """
    path = Path(path)
    if path.is_dir():
        raise MiniKDError(f"{path} is a folder, not a {kind} checkpoint file; {how}")
    if not path.is_file():
        raise MiniKDError(f"no {kind} checkpoint at {path}; {how}")
    if path.stat().st_size == 0:
        raise MiniKDError(f"{path} is empty (0 bytes), not a {kind} checkpoint; {how}")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except CHECKPOINT_ERRORS as error:
        first_sentence = re.split(r"(?<=\.)\s", str(error).strip(), maxsplit=1)[0]
        raise MiniKDError(f"{path} is not a readable {kind} checkpoint (not written by torch.save, "
                          f"or damaged: {type(error).__name__}: {first_sentence}); {how}") from error
    if not isinstance(saved, dict):
        raise MiniKDError(f"{path} holds a {type(saved).__name__}, not a {kind} checkpoint; {how}")
    return saved


@contextmanager
def foreign_checkpoint(path, kind: str, how: str):
    """Inside the block, an error of :data:`CHECKPOINT_ERRORS` (a missing key, weights of another
    shape) becomes one :class:`MiniKDError`: "``path`` is not ``kind`` (...); ``how``"."""
    try:
        yield
    except CHECKPOINT_ERRORS as error:
        raise MiniKDError(f"{path} is not {kind} ({type(error).__name__}: {error}); {how}") from error


def load_checkpoint(path, model: nn.Module) -> dict:
    """Load the weights of a ``best.pt`` or ``last.pt`` written by :func:`fit` into ``model``.

    Returns the whole checkpoint (epoch, score, history, ...) for inspection.
    """
    path = Path(path)
    how = "train first (fit with checkpoint_dir) or fix the path"
    checkpoint = read_checkpoint(path, "mini_kd", how)
    if "model" not in checkpoint:
        raise MiniKDError(f"{path} is not a mini_kd checkpoint (no 'model' entry); pass a best.pt "
                          "or last.pt written by mini_kd.train.fit")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise MiniKDError(f"{path} does not fit this model ({str(error).splitlines()[0]}); build the "
                          "model with the config it was trained with, or delete the checkpoint") from error
    return checkpoint
