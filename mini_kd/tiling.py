"""Tile grids at any magnification, and the two HR <-> LR correspondences the papers rely on.

A :class:`TileGrid` is CLAM's convention made explicit: level-0 top-left corners ``coords`` (N, 2)
int64, plus the magnification the tiles are read at, their size in output pixels, and the footprint
they cover in level-0 pixels (``footprint = tile_size · slide_mag / mag``).

Two correspondences between a high-resolution (HR) and a low-resolution (LR) grid:

(a) **Same footprint, 1:1** (AHDMIL). The LR grid has the *same* coordinates in the *same* order,
    read at a lower magnification: a 256-px tile at 20x and a 16-px crop at 1.25x cover the same
    tissue, because 256 · 1.25 / 20 = 16. Index n of one grid is index n of the other.
(b) **Coarse, 1 : k×k** (LRMIL). Each LR tile covers a k×k block of HR tiles: a 256-px tile at 5x
    covers 4×4 HR tiles of 256 px at 20x. :class:`CoarseMap` stores both directions:
    ``parent[n]`` is the LR tile holding HR tile n, and ``children[j, i*k + c]`` is the HR tile at
    block row i, column c of LR tile j (or -1 where that HR tile is missing: slide edge, no tissue).

Grids are tiled on one lattice anchored at (0, 0), so that the LR lattice (step k·footprint) is an
exact coarsening of the HR lattice (step footprint).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mini_kd.errors import MiniKDError
from mini_kd.runtime import write_atomically
from mini_kd.slides import LEVEL_TOLERANCE, Slide, open_slide
from mini_kd.tissue import tissue_fraction, tissue_mask

MASK_MAG = 1.25  # tissue is found on a thumbnail at this magnification (or the slide's, if lower)
GRID_ATTRIBUTES = {  # HDF5 attribute on 'coords' (TRIDENT's and CLAM's name) -> TileGrid field
    "patch_size": "tile_size", "patch_size_level0": "footprint",
    "target_magnification": "mag", "level0_magnification": "slide_mag",
}


@dataclass
class TileGrid:
    """Non-overlapping square tiles of one slide at one magnification."""

    coords: np.ndarray  # (N, 2) int64, level-0 (x, y) of each tile's top-left corner
    mag: float  # magnification the tiles are read at
    tile_size: int  # output pixels per side
    footprint: int  # level-0 pixels per side
    slide_mag: float  # magnification of level 0
    slide_id: str = ""

    def __post_init__(self):
        coords = np.asarray(self.coords)
        if coords.size and (coords.ndim != 2 or coords.shape[1] != 2):
            raise MiniKDError(f"tile coordinates must be (N, 2) level-0 (x, y) corners, got shape "
                              f"{coords.shape}; pass one (x, y) row per tile")
        if coords.size and not np.array_equal(coords, np.round(coords)):
            raise MiniKDError("tile coordinates must be whole level-0 pixels; round them, or "
                              "re-tile the slide with mini_kd.tiling.tile_grid")
        self.coords = coords.astype(np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.coords)

    def __repr__(self) -> str:
        return (f"TileGrid({self.slide_id!r}: {len(self)} tiles of {self.tile_size} px at "
                f"{self.mag:g}x, footprint {self.footprint} px)")

    def save(self, path) -> Path:
        """HDF5 with a ``coords`` dataset and TRIDENT/CLAM-style attributes on it.

        Written to a ``.partial`` file beside ``path`` and renamed: an interrupted save leaves no half grid.
        """
        path = Path(path)
        if path.is_dir():
            raise MiniKDError(f"{path} is a folder; give the grid a file name, e.g. {path / 'grid.h5'}")
        def write(partial: Path) -> None:
            with h5py.File(partial, "w") as f:
                dataset = f.create_dataset("coords", data=self.coords)  # (N, 2) int64
                dataset.attrs.update({name: getattr(self, field) for name, field in GRID_ATTRIBUTES.items()})
                dataset.attrs.update(overlap=0, name=self.slide_id)

        try:
            write_atomically(path, write)
        except OSError as error:
            raise MiniKDError(f"cannot write the grid to {path} ({error}); choose another path") from error
        return path

    @classmethod
    def load(cls, path) -> "TileGrid":
        """Read a grid written by :meth:`save` (or by TRIDENT, which uses the same attributes)."""
        path = Path(path)
        expected = ("expected HDF5 with a 'coords' dataset (N, 2) and attributes "
                    + ", ".join(GRID_ATTRIBUTES) + "; re-tile the slide with `mini-kd tile`")
        if not path.is_file():
            raise MiniKDError(f"no tile grid at {path}; make one with `mini-kd tile` (or "
                              "TileGrid.save), or check the path")
        try:
            with h5py.File(path, "r") as f:
                attrs, coords = dict(f["coords"].attrs), f["coords"][()]
        except OSError as error:
            raise MiniKDError(f"{path} is not a tile grid: not an HDF5 file ({error}); {expected}") from error
        except (KeyError, AttributeError, TypeError):  # no 'coords', or a group of that name
            raise MiniKDError(f"{path} is not a tile grid: it has no 'coords' dataset; {expected}") from None
        missing = [name for name in GRID_ATTRIBUTES if name not in attrs]
        if missing:
            raise MiniKDError(f"{path} is not a tile grid: 'coords' lacks the attribute(s) "
                              f"{', '.join(missing)}; {expected}")
        try:
            geometry = {field: float(np.asarray(attrs[name]).item())
                        for name, field in GRID_ATTRIBUTES.items()}
        except (TypeError, ValueError) as error:
            raise MiniKDError(f"{path} is not a tile grid: an attribute is not a number ({error}); {expected}") from None
        if min(geometry.values()) <= 0 or geometry["tile_size"] % 1 or geometry["footprint"] % 1:
            raise MiniKDError(f"{path} records tile_size, footprint, mag and slide_mag of "
                              f"{[geometry[k] for k in ('tile_size', 'footprint', 'mag', 'slide_mag')]}: "
                              f"sizes must be whole and all must be positive; {expected}")
        name = attrs.get("name", "")
        try:
            return cls(coords, mag=geometry["mag"], tile_size=int(geometry["tile_size"]),
                       footprint=int(geometry["footprint"]), slide_mag=geometry["slide_mag"],
                       slide_id=name.decode() if isinstance(name, bytes) else str(name))
        except MiniKDError as error:  # coordinates of the wrong shape
            raise MiniKDError(f"{path} is not a tile grid: {error}") from None


def _lattice(width: int, height: int, step: int) -> np.ndarray:
    """(N, 2) int64 top-left corners of every whole step×step square in a width×height image."""
    xs = np.arange(0, width - step + 1, step)
    ys = np.arange(0, height - step + 1, step)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)


def _check_tile_arguments(slide: Slide, mag: float, tile_size: int, min_tissue: float,
                          allow_upsampling: bool) -> None:
    """Raise for a grid that cannot be made (or only by inventing pixels the scan does not have)."""
    if not (isinstance(tile_size, (int, np.integer)) and tile_size >= 1):
        raise MiniKDError(f"tile_size={tile_size!r} must be a whole number of pixels >= 1, e.g. 256")
    if not 0.0 <= min_tissue <= 1.0:
        raise MiniKDError(f"min_tissue={min_tissue!r} is a fraction of each tile and must lie in "
                          "[0, 1], e.g. 0.5 (0 keeps every tile)")
    if not 0.0 < mag < math.inf:
        raise MiniKDError(f"mag={mag!r} must be a positive magnification, e.g. 20, 5 or 1.25")
    if mag > slide.magnification * (1 + LEVEL_TOLERANCE) and not allow_upsampling:
        raise MiniKDError(
            f"{slide.slide_id} was scanned at {slide.magnification:g}x (level 0), so tiles at "
            f"{mag:g}x would be the scan enlarged {mag / slide.magnification:g} times, with no more "
            f"detail; choose mag <= {slide.magnification:g}, or pass allow_upsampling=True "
            "(--allow-upsampling) to enlarge it anyway"
        )
    if slide.footprint(tile_size, mag) < 1:
        raise MiniKDError(f"a {tile_size}-px tile at {mag:g}x covers less than one level-0 pixel of "
                          f"{slide.slide_id}; use a larger tile_size or a lower magnification")


def tile_grid(slide: Slide, mag: float, tile_size: int, min_tissue: float = 0.5,
              tissue: np.ndarray | None = None, allow_upsampling: bool = False) -> TileGrid:
    """Tile ``slide`` at ``mag`` into ``tile_size``-px tiles with at least ``min_tissue`` tissue.

    ``tissue`` is a precomputed mask at :data:`MASK_MAG` (or the slide's own magnification when
    lower); by default it is computed here. A slide without tissue gives an empty grid and a warning.
    A ``mag`` above the slide's own magnification is refused unless ``allow_upsampling``.
    """
    _check_tile_arguments(slide, mag, tile_size, min_tissue, allow_upsampling)
    footprint = slide.footprint(tile_size, mag)
    width, height = slide.dimensions
    if footprint > min(width, height):
        raise MiniKDError(
            f"{slide.slide_id} ({width}x{height} px at level 0) is smaller than one tile: a "
            f"{tile_size}-px tile at {mag:g}x covers {footprint} px; use a smaller tile_size or a "
            "higher magnification"
        )
    coords = _lattice(width, height, footprint)
    mask_mag = min(MASK_MAG, slide.magnification)
    if tissue is None:
        tissue = tissue_mask(slide.thumbnail(mask_mag))
    fraction = tissue_fraction(tissue, coords, footprint, slide.downsample(mask_mag))
    coords = coords[fraction >= min_tissue]
    if len(coords) == 0:
        warnings.warn(f"{slide.slide_id}: no tile has {min_tissue:.0%} tissue; the grid is empty",
                      stacklevel=2)
    return TileGrid(coords, mag, tile_size, footprint, slide.magnification, slide.slide_id)


# -- (a) the same footprint at another magnification: 1:1 -----------------------------------------
def same_footprint(grid: TileGrid, mag: float) -> TileGrid:
    """The tiles of ``grid`` read at ``mag``: same coords, same order, smaller (or larger) pixels."""
    size = grid.footprint * mag / grid.slide_mag
    if not math.isclose(size, round(size), abs_tol=1e-6) or round(size) < 1:
        raise MiniKDError(
            f"a {grid.footprint}-px footprint at {mag:g}x is {size:g} px, not a whole number of "
            f"pixels; choose a magnification where footprint·mag/{grid.slide_mag:g} is whole"
        )
    return TileGrid(grid.coords.copy(), mag, int(round(size)), grid.footprint, grid.slide_mag,
                    grid.slide_id)


def check_same_footprint(hr: TileGrid, lr: TileGrid) -> None:
    """Raise unless ``lr`` is ``hr`` seen at another magnification (correspondence (a))."""
    problems = []
    if hr.slide_id != lr.slide_id:
        problems.append(f"slides differ ({hr.slide_id!r} vs {lr.slide_id!r})")
    if hr.footprint != lr.footprint:
        problems.append(f"footprints differ ({hr.footprint} vs {lr.footprint} px)")
    if hr.coords.shape != lr.coords.shape or not np.array_equal(hr.coords, lr.coords):
        problems.append(f"coordinates differ ({len(hr)} vs {len(lr)} tiles)")
    if problems:
        raise MiniKDError("HR and LR grids do not correspond 1:1: " + "; ".join(problems)
                          + "; build the LR grid with mini_kd.tiling.same_footprint(hr_grid, mag)")


# -- (b) a coarse grid whose tiles cover k×k HR tiles ---------------------------------------------
@dataclass
class CoarseMap:
    """Index maps between an HR grid and a coarse LR grid with k×k HR tiles per LR tile."""

    k: int
    parent: np.ndarray  # (N_hr,) int64: LR tile containing each HR tile
    children: np.ndarray  # (N_lr, k*k) int64: HR tile at block slot i*k + c, or -1

    def offsets(self) -> np.ndarray:
        """(k*k, 2) int64 block position (row, col) of each child slot."""
        rows, cols = np.divmod(np.arange(self.k * self.k), self.k)
        return np.stack([rows, cols], axis=1)


def coarse_grid(hr: TileGrid, k: int, lr_mag: float) -> tuple[TileGrid, CoarseMap]:
    """LR tiles of footprint k·hr.footprint read at ``lr_mag``, one per k×k block holding HR tiles."""
    if k < 1:
        raise MiniKDError(f"k must be a positive number of HR tiles per LR side, got {k}")
    if np.any(hr.coords % hr.footprint):
        raise MiniKDError(
            f"the HR grid of {hr.slide_id!r} is not on the lattice anchored at (0, 0) with step "
            f"{hr.footprint} (grids made per tissue contour, as CLAM does, are offset); re-tile "
            "with mini_kd.tiling.tile_grid"
        )
    step = k * hr.footprint
    lr_size = step * lr_mag / hr.slide_mag
    if not math.isclose(lr_size, round(lr_size), abs_tol=1e-6):
        raise MiniKDError(f"a {step}-px LR footprint at {lr_mag:g}x is {lr_size:g} px, not whole")
    block = hr.coords // step  # (N_hr, 2) block (col, row) of each HR tile
    blocks, parent = np.unique(block, axis=0, return_inverse=True)  # (N_lr, 2), (N_hr,)
    parent = parent.reshape(-1).astype(np.int64)
    slot_col, slot_row = ((hr.coords - block * step) // hr.footprint).T  # (N_hr,) each
    children = np.full((len(blocks), k * k), -1, dtype=np.int64)
    children[parent, slot_row * k + slot_col] = np.arange(len(hr))
    lr = TileGrid(blocks * step, lr_mag, int(round(lr_size)), step, hr.slide_mag, hr.slide_id)
    return lr, CoarseMap(k, parent, children)


# -- reading tiles in batches ---------------------------------------------------------------------
class TileDataset(Dataset):
    """Item i = uint8 tensor (S, S, 3) of tile i. The slide opens lazily, once per worker process."""

    def __init__(self, slide_path, grid: TileGrid, mpp: float | None = None,
                 magnification: float | None = None):
        self.slide_path = Path(slide_path)
        self.grid = grid
        self.mpp = mpp
        self.magnification = magnification
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.grid)

    def _open(self) -> Slide:
        if self._slide is None:
            self._slide = open_slide(self.slide_path, mpp=self.mpp, magnification=self.magnification)
        return self._slide

    def close(self) -> None:
        """Close the slide this process opened (a worker's copy closes with its process)."""
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getitem__(self, index: int) -> torch.Tensor:
        x, y = self.grid.coords[index]
        return torch.from_numpy(self._open().read(x, y, self.grid.tile_size, self.grid.mag))

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """A whole batch at once (the DataLoader calls this when it exists): one windowed
        :meth:`~mini_kd.slides.Slide.read_tiles`, so neighbouring tiles share their decoding."""
        tiles = self._open().read_tiles(self.grid.coords[indices], self.grid.tile_size, self.grid.mag)
        return list(torch.from_numpy(tiles))


def tile_loader(slide_path, grid: TileGrid, batch_size: int = 64, num_workers: int = 0,
                mpp: float | None = None, magnification: float | None = None) -> DataLoader:
    """Batches of uint8 tiles (B, S, S, 3) in grid order."""
    dataset = TileDataset(slide_path, grid, mpp=mpp, magnification=magnification)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=False)


# -- many small tiles of one low level, cut from one read of it (AHDMIL's 1.25x screen) --------
def read_from_level(slide: Slide, lr_grid: TileGrid) -> np.ndarray:
    """uint8 (N, t, t, 3): every tile of ``lr_grid`` (e.g. AHDMIL's 1.25x crops of a
    :func:`same_footprint` grid), cut from one read of the whole level at ``lr_grid.mag``: equal
    to ``slide.read_tiles``, and cheaper for many small tiles. Grids off the level's pixel
    lattice are read tile by tile."""
    xy = lr_grid.coords * (lr_grid.mag / lr_grid.slide_mag)  # (N, 2) pixels at lr_grid.mag
    if not np.allclose(xy, np.round(xy)):
        return slide.read_tiles(lr_grid.coords, lr_grid.tile_size, lr_grid.mag)
    return cut_crops(slide.thumbnail(lr_grid.mag), np.round(xy).astype(np.int64), lr_grid.tile_size)


def cut_crops(image: np.ndarray, xy: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3): squares of ``image`` at pixel corners ``xy`` (N, 2), white outside."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, size), (0, size), (0, 0)), constant_values=255)  # (H+s, W+s, 3)
    crops = np.empty((len(xy), size, size, 3), np.uint8)
    for i, (x, y) in enumerate(np.clip(xy, 0, [width, height]).tolist()):
        crops[i] = padded[y:y + size, x:x + size]
    return crops
