"""One slide pipeline: what classifying a slide costs, stage by stage.

Every predictor of the package -- each method's, and each baseline's -- is this pipeline with its
own model at the end:

    open -> tissue -> grid(s) -> read / encode in batches -> model -> Prediction

:class:`SlideRun` holds one slide on its way through: the open :class:`~mini_kd.slides.Slide`,
its tissue mask, one :class:`StageTimer`, and the tiles read per magnification. A predictor
is a callable ``predict(run) -> (probability, details)`` handed to :func:`predict_slide`, which
opens the slide, finds the tissue, closes the slide whatever happens, and returns one
:class:`~mini_kd.methods.Prediction` with the seconds of every stage, the tiles read at each
magnification and the pixels of the stored (JPEG) tiles decoded to read them.

Stage names are shared so that the costs of different methods line up in one table: ``tissue``
(thumbnail and mask), ``grid``, ``read`` (tiles at the magnification the model looks at; a
method that reads at two magnifications names the second stage itself, e.g. ``read_lr``),
``encode``, and the model's own stages (``MIL``, ``screen``, ``classify`` ...).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from mini_kd.data import to_tensor
from mini_kd.errors import MiniKDError
from mini_kd.slides import Slide, open_slide
from mini_kd.tiling import MASK_MAG, TileGrid, tile_grid
from mini_kd.tissue import tissue_mask


class StageTimer:
    """Seconds spent per stage of a pipeline, summed over calls.

    >>> timer = StageTimer()
    >>> with timer.stage("read"):
    ...     tiles = slide.read_tiles(coords, 256, 20)      # doctest: +SKIP
    >>> timer.seconds                                      # doctest: +SKIP
    {'read': 0.41}

    On CUDA the GPU is synchronised at both ends of a stage, so queued kernels are charged to the
    stage that launched them.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass
class SlideRun:
    """One slide on its way through the pipeline (see the module docstring)."""

    slide: Slide
    tissue: np.ndarray                      # bool mask on the thumbnail at ``tissue_mag``
    tissue_mag: float
    timer: StageTimer
    tiles_read: dict[float, int] = field(default_factory=dict)  # magnification -> tiles

    def grid(self, mag: float, tile_size: int, min_tissue: float = 0.5) -> TileGrid:
        """The tissue tiles at ``mag`` (stage ``grid``); a slide without any is a clear error."""
        with self.timer.stage("grid"):
            grid = tile_grid(self.slide, mag, tile_size, min_tissue, tissue=self.tissue)
        if len(grid) == 0:
            raise MiniKDError(f"{self.slide.slide_id}: no {tile_size}-px tile at {mag:g}x is "
                              f"{min_tissue:.0%} tissue, so there is nothing to classify; check "
                              "the slide (is it blank, or out of focus?) or lower min_tissue")
        return grid

    def read(self, grid: TileGrid, coords: np.ndarray | None = None,
             stage: str = "read") -> np.ndarray:
        """uint8 (N, S, S, 3): the tiles of ``grid`` at ``coords`` (default: all), counted."""
        coords = grid.coords if coords is None else coords
        with self.timer.stage(stage):
            tiles = self.slide.read_tiles(coords, grid.tile_size, grid.mag)
        self.tiles_read[grid.mag] = self.tiles_read.get(grid.mag, 0) + len(coords)
        return tiles

    def encode(self, grid: TileGrid, encoder: nn.Module, coords: np.ndarray | None = None,
               batch_size: int = 64, device=None, stage: str = "read") -> torch.Tensor:
        """(N, D): ``encoder`` on the tiles of ``grid`` at ``coords`` (default: all), read and
        encoded in batches of ``batch_size`` (stages ``stage`` and ``encode``), float32."""
        coords = grid.coords if coords is None else coords
        device = next(encoder.parameters()).device if device is None else device
        features = []
        for start in range(0, len(coords), batch_size):
            tiles = self.read(grid, coords[start:start + batch_size], stage)  # (b, S, S, 3)
            with self.timer.stage("encode"):
                features.append(encoder(to_tensor(tiles).to(device)))  # (b, D)
        return torch.cat(features)  # (N, D)


def predict_slide(slide_path, predict: Callable[[SlideRun], tuple[float, dict]],
                  mpp: float | None = None, threshold: float = 0.5):
    """One :class:`~mini_kd.methods.Prediction` of ``predict`` on the slide at ``slide_path``.

    Stage ``tissue`` opens the slide (``mpp`` overrides missing or wrong metadata) and finds the
    tissue on a thumbnail at 1.25x (or the slide's own magnification, if lower); ``predict(run)``
    does the rest and returns (P(class 1), details). The slide is closed whatever happens.
    """
    from mini_kd.methods import Prediction

    timer = StageTimer()
    with timer.stage("tissue"):
        slide = open_slide(slide_path, mpp=mpp)
        tissue_mag = min(MASK_MAG, slide.magnification)
        tissue = tissue_mask(slide.thumbnail(tissue_mag))
    with slide, torch.inference_mode():
        run = SlideRun(slide, tissue, tissue_mag, timer)
        probability, details = predict(run)
    return Prediction(slide_id=Path(slide_path).stem, label=int(probability >= threshold),
                      probability=float(probability), tiles_read=run.tiles_read,
                      pixels_decoded=slide.pixels_decoded, seconds=timer.seconds,
                      details=details)
