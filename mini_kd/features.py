"""Feature extraction with an on-disk cache in CLAM's layout, for one slide or a whole cohort.

Every tile of a :class:`~mini_kd.tiling.TileGrid` is encoded once and stored as one HDF5 file
per slide, the layout CLAM and TRIDENT write and read,

    {cache_dir}/{encoder.name}-{fingerprint}/{mag}x_{tile}px/{slide_id}.h5
        features  (N, D) float32        coords  (N, 2) int64 level-0 (x, y)        + attributes

The *fingerprint* is a hash of the encoder's weights (:func:`mini_kd.encoders.fingerprint`): a
retrained or distilled encoder of the same name writes to a new folder instead of silently
reusing stale features, and the features of several encoders (e.g. one distilled encoder per
split) live side by side. A file is reused only when its coordinates equal the grid's; it is
written atomically, so an interrupted run never leaves a half-written file and resumes where it
stopped.

**Sharding.** :func:`extract_cohort` takes ``slides[rank::world_size]``: a pure function of the
slide list and the rank. Under ``torchrun --nproc-per-node N`` each process reads its ``RANK`` and
``WORLD_SIZE`` (:func:`shard_from_env`) and writes disjoint files; no process group is needed.

Features are computed in float32 on every device, the precision of the predictors that encode the
same tiles at inference (:mod:`mini_kd.inference`), so a cached feature equals a predictor's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from mini_kd.data import to_tensor
from mini_kd.encoders import Encoder, fingerprint
from mini_kd.errors import MiniKDError
from mini_kd.progress import progress
from mini_kd.runtime import pick_device, write_atomically
from mini_kd.slides import open_slide
from mini_kd.tiling import TileGrid, tile_grid, tile_loader


@torch.inference_mode()
def encode_tiles(slide_path, grid: TileGrid, encoder: nn.Module, batch_size: int = 64,
                 device=None, num_workers: int = 0, mpp: float | None = None) -> np.ndarray:
    """float32 (N, D): ``encoder`` applied to every tile of ``grid``, in grid order, no caching.

    Tiles are read with the grid's own level-0 magnification, so that they cover the grid's
    footprint. The encoder is moved to ``device`` (default: CUDA when available), run in eval
    mode and in float32 on every device -- the precision of the predictors that encode the same
    tiles at inference, so a cached feature equals the one a predictor computes -- and given back
    its training mode afterwards.
    """
    device = pick_device(device)
    was_training = encoder.training
    encoder.to(device).eval()
    loader = tile_loader(slide_path, grid, batch_size=batch_size, num_workers=num_workers, mpp=mpp,
                         magnification=grid.slide_mag)
    batches = []
    try:
        for tiles in progress(loader, desc=f"encode {grid.slide_id}", total=len(loader),
                              leave=False):
            x = to_tensor(tiles.to(device, non_blocking=True))  # (B, 3, S, S)
            batches.append(encoder(x).cpu().numpy())  # (B, D)
    finally:
        encoder.train(was_training)
        loader.dataset.close()
    if not batches:
        return np.empty((0, encoder.embed_dim), np.float32)
    return np.concatenate(batches)  # (N, D)


def feature_path(cache_dir, encoder: Encoder, grid: TileGrid, slide_id: str | None = None) -> Path:
    """``{cache_dir}/{name}-{fingerprint}/{mag}x_{tile}px/{slide_id}.h5``."""
    return (Path(cache_dir) / f"{encoder.name}-{fingerprint(encoder)}"
            / f"{grid.mag:g}x_{grid.tile_size}px" / f"{slide_id or grid.slide_id}.h5")


def _is_current(path: Path, grid: TileGrid, embed_dim: int) -> bool:
    """True when ``path`` holds features of exactly ``grid``'s tiles."""
    try:
        with h5py.File(path, "r") as f:
            return (f.attrs["footprint"] == grid.footprint
                    and f["features"].shape == (len(grid), embed_dim)
                    and np.array_equal(f["coords"][:], grid.coords))
    except (OSError, KeyError):  # missing or unreadable: compute it (again)
        return False


def _write(path: Path, features: np.ndarray, grid: TileGrid, attrs: dict) -> None:
    """The features file, written atomically (:func:`mini_kd.runtime.write_atomically`)."""
    def write(partial: Path) -> None:
        with h5py.File(partial, "w") as f:
            f.create_dataset("features", data=features)  # (N, D) float32
            f.create_dataset("coords", data=grid.coords)  # (N, 2) int64
            f.attrs.update(attrs)

    write_atomically(path, write)


def cache_features(slide_path, grid: TileGrid, encoder: Encoder, cache_dir, batch_size: int = 64,
                   device=None, num_workers: int = 0, mpp: float | None = None,
                   slide_id: str | None = None) -> Path:
    """The cache file of this slide, grid and encoder; encoded first unless already current."""
    slide_id = slide_id or grid.slide_id or Path(slide_path).stem
    path = feature_path(cache_dir, encoder, grid, slide_id)
    if _is_current(path, grid, encoder.embed_dim):
        return path
    features = encode_tiles(slide_path, grid, encoder, batch_size, device, num_workers, mpp)
    _write(path, features, grid, dict(
        encoder=encoder.name, fingerprint=fingerprint(encoder), slide_id=slide_id, mag=grid.mag,
        tile_size=grid.tile_size, footprint=grid.footprint, slide_mag=grid.slide_mag))
    return path


def load_features(path) -> tuple[torch.Tensor, np.ndarray]:
    """(features float32 (N, D), coords int64 (N, 2)) from a cache file (CLAM's layout): row n
    of the features belongs to the tile at coords[n]."""
    path = Path(path)
    how = "run mini-kd extract (or mini_kd.features.extract_cohort) first"
    if not path.is_file():
        raise MiniKDError(f"no features at {path}; {how}")
    try:
        with h5py.File(path, "r") as f:
            features, coords = f["features"][()], f["coords"][()]
    except OSError as error:
        raise MiniKDError(f"{path} is not an HDF5 features file ({error}); delete it and {how}") from error
    except (KeyError, AttributeError, TypeError):  # a dataset missing, or a group of that name
        raise MiniKDError(f"{path} lacks the 'features' (N, D) or 'coords' (N, 2) dataset of CLAM's "
                          f"layout; delete it and {how}") from None
    if (features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2
            or len(features) != len(coords)):
        raise MiniKDError(f"{path} holds features of shape {features.shape} for coords of shape "
                          f"{coords.shape}, not (N, D) and (N, 2) with one row per tile; delete it "
                          f"and {how}")
    return torch.from_numpy(features.astype(np.float32, copy=False)), coords.astype(np.int64, copy=False)


def extract_features(slide_path, grid: TileGrid, encoder: Encoder, cache_dir,
                     batch_size: int = 64, device=None, num_workers: int = 0,
                     mpp: float | None = None, slide_id: str | None = None) -> torch.Tensor:
    """float32 (N, D): one embedding per tile of ``grid``, row n for ``grid.coords[n]``.

    Read from the cache when it holds this slide's grid for this encoder's weights; otherwise
    encoded (:func:`encode_tiles`) and cached first.
    """
    path = cache_features(slide_path, grid, encoder, cache_dir, batch_size, device, num_workers,
                          mpp, slide_id)
    return load_features(path)[0]


class CachedFeatures(Mapping):
    """slide_id -> features (N, D), read from the cache file on each access (a cohort of
    features may not fit in memory); ``paths`` maps slide_id -> file."""

    def __init__(self, paths: dict[str, Path]):
        self.paths = paths

    def __getitem__(self, slide_id: str) -> torch.Tensor:
        return load_features(self.paths[slide_id])[0]

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def extract_cohort(slides, encoder: Encoder, cache_dir, rank: int = 0, world_size: int = 1,
                   batch_size: int = 64, device=None, num_workers: int = 0,
                   mpp: float | None = None) -> CachedFeatures:
    """Cache the features of ``slides[rank::world_size]``, a list of (slide_id, slide_path, grid).

    The shard is a pure function of the list and the rank, and slides already cached are
    skipped, so an interrupted run resumes where it stopped. To spread a cohort over several
    GPUs (or processes), run the same script under ``torchrun --nproc_per_node=G script.py``
    with, in the script::

        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        extract_cohort(slides, encoder, cache_dir, rank=rank, world_size=world_size, device=device)

    Every rank must build ``slides`` in the same order. No process group is needed: ranks write
    disjoint files. Returns the features of this rank's shard, loaded on access.
    """
    if not 0 <= rank < world_size:
        raise MiniKDError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    shard = slides[rank::world_size]
    paths = {}
    for slide_id, slide_path, grid in progress(shard, desc=f"features {encoder.name}"):
        paths[slide_id] = cache_features(slide_path, grid, encoder, cache_dir, batch_size,
                                         device, num_workers, mpp, slide_id)
    return CachedFeatures(paths)

def shard_from_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's ``RANK`` and ``WORLD_SIZE``; (0, 1) outside torchrun."""
    try:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise MiniKDError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE="
                          f"{os.environ.get('WORLD_SIZE')!r} must be whole numbers (torchrun sets "
                          "them)") from None
    return rank, world_size


# -- a cohort: one grid and one feature matrix per slide ------------------------------------------
def cohort_grids(cohort, mag: float, tile_size: int, min_tissue: float = 0.5) -> dict:
    """slide_id -> TileGrid for every slide of ``cohort``, cached as HDF5 inside the cohort folder."""
    folder = cohort.root / "grids" / f"{mag:g}x_{tile_size}px_tissue{min_tissue:g}"
    grids = {}
    for slide_id in progress(cohort.ids(), desc=f"grids {mag:g}x"):
        path = folder / f"{slide_id}.h5"
        if path.exists():
            grids[slide_id] = TileGrid.load(path)
            continue
        with open_slide(cohort.slide_path(slide_id)) as slide:
            grids[slide_id] = tile_grid(slide, mag, tile_size, min_tissue=min_tissue)
        grids[slide_id].save(path)
    return grids


def cohort_features(cohort, grids: dict, encoder, batch_size: int = 64, device=None) -> dict:
    """slide_id -> features (N, D) of every tile of ``grids``, cached inside the cohort folder."""
    slides = [(slide_id, cohort.slide_path(slide_id), grids[slide_id]) for slide_id in grids]
    return extract_cohort(slides, encoder, cohort.root / "features", batch_size=batch_size,
                          device=device)


# -- intermediate layers: LRMIL's stage-1 targets --------------------------------------------------
def layer_targets(slide_path, hr_grid: TileGrid, indices: np.ndarray, encoder: Encoder,
                  layers, cache_dir) -> dict:
    """{l: (len(indices), C_l)}: the HR encoder's pooled layer-l outputs on those 20x tiles
    (LRMIL's stage-1 targets).

    Cached per slide in ``cache_dir`` (a file holds every HR tile of the slide, NaN where not yet
    computed); only the missing tiles are read and encoded. ``layers`` must exclude the final
    layer, whose output is the HR feature already cached by :func:`mini_kd.features.cohort_features`.
    """
    layers = list(layers)
    path = Path(cache_dir) / f"{encoder.name}-{fingerprint(encoder)}" / \
        f"{hr_grid.mag:g}x_{hr_grid.tile_size}px_{'-'.join(layers)}" / f"{hr_grid.slide_id}.h5"
    stored = _read_targets(path, hr_grid, encoder, layers)
    missing = np.unique(indices[np.isnan(stored[layers[0]][indices, 0])])
    if len(missing):
        device = pick_device()
        encoder.to(device).eval()
        with open_slide(slide_path, magnification=hr_grid.slide_mag) as slide, torch.inference_mode():
            for start in range(0, len(missing), 64):
                chunk = missing[start:start + 64]
                tiles = slide.read_tiles(hr_grid.coords[chunk], hr_grid.tile_size, hr_grid.mag)
                pooled = encoder.embeddings(to_tensor(tiles).to(device), layers)  # {l: (b, C_l)}
                for layer in layers:
                    stored[layer][chunk] = pooled[layer].float().cpu().numpy()

        def write(partial: Path) -> None:
            with h5py.File(partial, "w") as f:
                for layer in layers:
                    f.create_dataset(layer, data=stored[layer])  # (N, C_l)
                f.create_dataset("coords", data=hr_grid.coords)

        write_atomically(path, write)
    return {layer: torch.from_numpy(stored[layer][indices]) for layer in layers}


def _read_targets(path: Path, grid: TileGrid, encoder: Encoder, layers) -> dict:
    try:
        with h5py.File(path, "r") as f:
            if np.array_equal(f["coords"][:], grid.coords):
                return {layer: f[layer][:] for layer in layers}
    except (OSError, KeyError):
        pass
    return {layer: np.full((len(grid), encoder.channels[layer]), np.nan, np.float32)
            for layer in layers}
