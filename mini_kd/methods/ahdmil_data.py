"""What AHDMIL's training steps run on: each slide as one bag of its 20x tiles' features and
1.25x crops, the slide sampler, and the plumbing of the fit loop.

:func:`build_bags` reads the HR features of every tissue tile from the cohort's feature files
(:func:`mini_kd.features.cohort_features` extracts them once) and cuts the 1.25x crop of each
from one read of the level; :func:`slide_loader` draws one slide per step, class-balanced, as the
authors' sampler does; :func:`fit_config` gives each step its own folder of epoch checkpoints, so
that an interrupted :func:`mini_kd.methods.ahdmil.fit` resumes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mini_kd.data import to_tensor
from mini_kd.features import cohort_features, cohort_grids
from mini_kd.progress import progress
from mini_kd.slides import open_slide
from mini_kd.tiling import read_from_level, same_footprint
from mini_kd.train import FitConfig


@dataclass
class Bag:
    """One slide as the training steps see it: every tissue tile, in grid order."""
    slide_id: str
    features: torch.Tensor          # (N, D) HR features
    crops: torch.Tensor             # (N, 3, t, t) normalised 1.25x crops
    label: int

    def item(self) -> dict:
        return {"features": self.features, "crops": self.crops,
                "label": torch.tensor(self.label, dtype=torch.long)}


def build_bags(cohort, slide_ids, config, encoder: nn.Module, device=None) -> dict:
    """{slide_id: Bag}: the HR features of every tissue tile at ``config.hr_mag`` /
    ``config.hr_tile`` (extracted once, then read from the cohort's feature files) and the crop
    of each at ``config.screen_mag``."""
    grids = cohort_grids(cohort, config.hr_mag, config.hr_tile)
    grids = {slide_id: grids[slide_id] for slide_id in slide_ids}
    features = cohort_features(cohort, grids, encoder, device=device)
    bags = {}
    for slide_id in progress(slide_ids, desc="1.25x crops"):
        with open_slide(cohort.slide_path(slide_id)) as slide:
            crops = read_from_level(slide, same_footprint(grids[slide_id], config.screen_mag))
        bags[slide_id] = Bag(slide_id, features[slide_id], to_tensor(crops),  # (N, 3, t, t)
                             int(cohort.labels([slide_id])[0]))
    return bags


def read_crops(run, grid, mag: float) -> torch.Tensor:
    """(N, 3, t, t): the normalised crops at ``mag`` of the tiles of ``grid`` on the slide of
    ``run`` (a :class:`~mini_kd.inference.SlideRun`), cut from one read of the level (stage
    ``read_lr``) and counted as tiles read at ``mag``."""
    screen_grid = same_footprint(grid, mag)
    with run.timer.stage("read_lr"):
        crops = to_tensor(read_from_level(run.slide, screen_grid))  # (N, 3, t, t)
    run.tiles_read[screen_grid.mag] = run.tiles_read.get(screen_grid.mag, 0) + len(screen_grid)
    return crops


def slide_loader(bags: list[Bag], seed: int):
    """One slide per batch, drawn with class-balancing weights (the paper's sampler)."""
    labels = np.array([bag.label for bag in bags])
    weights = torch.as_tensor(1.0 / np.bincount(labels)[labels])
    sampler = torch.utils.data.WeightedRandomSampler(weights, len(bags), replacement=True,
                                                     generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader([bag.item() for bag in bags], batch_size=None, sampler=sampler)


@contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode (dropout off) inside the block, its own mode restored after."""
    was_training = module.training
    try:
        yield module.eval()
    finally:
        module.train(was_training)


def fit_config(schedule, step: str, **fields) -> FitConfig:
    """The :class:`~mini_kd.train.FitConfig` of one training step on ``schedule.device``; with
    ``schedule.checkpoint_dir`` its epochs are checkpointed in a folder ``step`` of their own."""
    folder = None if schedule.checkpoint_dir is None else str(Path(schedule.checkpoint_dir) / step)
    return FitConfig(device=schedule.device, checkpoint_dir=folder, **fields)
