"""Open a whole-slide image and read regions at any magnification.

A WSI is a pyramid: level 0 holds the full-resolution scan, each further level a downsampled copy
(typically 4x per level). Resolution is given in micrometres per pixel (mpp); the objective
magnification of level 0 follows from it by the microscopy convention

    magnification = 10 / mpp        (0.5 µm/px  =>  20x,  0.25 µm/px  =>  40x)

when the slide's metadata does not state it. A tile requested at magnification ``mag`` with
``size`` output pixels covers a *footprint* of

    footprint = size · mag_0 / mag          level-0 pixels,

so a 256-px tile at 5x on a 20x slide covers 1024 level-0 pixels. :meth:`Slide.read` takes that
footprint from the coarsest pyramid level that is still at least as fine as the request (with a
small tolerance: scanners store downsamples like 4.002 for a nominal 4) and resamples once.

Everything a user can get wrong (missing file, truncated or non-slide file, missing or absurd mpp)
raises :class:`~mini_kd.errors.MiniKDError` with a message that says how to fix it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import tifffile
import tiffslide
from PIL import Image

from mini_kd.errors import MiniKDError

MPP_RANGE = (0.05, 20.0)  # µm/px a real scan can have; outside it the metadata is wrong
LEVEL_TOLERANCE = 0.01  # a level at downsample 4.002 serves a request for 4
BACKGROUND = 255  # out-of-slide pixels are white glass, not black
READ_WINDOW = 1024  # level pixels per side of the regions read_tiles decodes at once


def _check_complete(path: Path, tif: tifffile.TiffFile) -> None:
    """Raise when the TIFF's image data runs past the end of the file (an interrupted download)."""
    file_size = path.stat().st_size
    for page in tif.pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > file_size:
            raise MiniKDError(
                f"{path} is truncated: its image data ends at byte {max(ends)} but the file "
                f"has {file_size} bytes; download it again"
            )


def _open_tiff(path: Path) -> tiffslide.TiffSlide:
    if not path.exists():
        raise MiniKDError(f"no slide at {path}: check the path")
    if not path.is_file():
        raise MiniKDError(f"{path} is a folder, not a slide file")
    slide = None
    try:
        slide = tiffslide.TiffSlide(path)
        _check_complete(path, slide.ts_tifffile)  # the pages tiffslide parsed anyway
        return slide
    except Exception as error:  # tifffile/tiffslide raise many types for a bad file
        if slide is not None:
            slide.close()
        if isinstance(error, MiniKDError):
            raise
        raise MiniKDError(
            f"cannot read {path} as a slide ({type(error).__name__}: {error}); "
            "is it a complete TIFF/SVS file?"
        ) from error


def _resolve_mpp(path: Path, properties: dict, mpp: float | None) -> float:
    if mpp is None:
        mpp = properties.get(tiffslide.PROPERTY_NAME_MPP_X)
        if mpp is None:
            raise MiniKDError(
                f"{path} does not record its resolution (mpp); pass mpp=... "
                "(or --mpp), e.g. 0.5 for a 20x scan or 0.25 for 40x"
            )
        source = "the slide reports"
    else:
        source = "the override gives"
    mpp = float(mpp)
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise MiniKDError(
            f"{source} {mpp:g} µm/px for {path}, outside the range of real scans "
            f"({MPP_RANGE[0]}–{MPP_RANGE[1]}); pass the true value as mpp=... (or --mpp)"
        )
    return mpp


class Slide:
    """A slide opened with tiffslide, with its resolution resolved and checked.

    Attributes: ``path``, ``slide_id`` (file stem), ``mpp`` (µm/px at level 0), ``magnification``
    (objective power of level 0), ``dimensions`` (level-0 width, height), ``level_count``,
    ``level_dimensions``, ``level_downsamples``.
    """

    def __init__(self, path, mpp: float | None = None, magnification: float | None = None):
        self.path = Path(path)
        self.slide_id = self.path.stem
        self._tiff = _open_tiff(self.path)
        properties = self._tiff.properties
        self.mpp = _resolve_mpp(self.path, properties, mpp)
        reported = properties.get(tiffslide.PROPERTY_NAME_OBJECTIVE_POWER)
        if magnification is None:
            # metadata wins unless the user corrected the mpp (then the metadata is suspect)
            magnification = reported if (reported and mpp is None) else 10.0 / self.mpp
        self.magnification = float(magnification)
        self.dimensions = tuple(self._tiff.dimensions)
        self.level_count = self._tiff.level_count
        self.level_dimensions = tuple(tuple(d) for d in self._tiff.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._tiff.level_downsamples)

    # -- geometry -------------------------------------------------------------------------------
    def downsample(self, mag: float) -> float:
        """How many level-0 pixels one pixel at ``mag`` spans: mag_0 / mag."""
        if mag <= 0:
            raise MiniKDError(f"magnification must be positive, got {mag}")
        return self.magnification / mag

    def footprint(self, size: int, mag: float) -> int:
        """Level-0 pixels covered by a ``size``-px tile read at ``mag``."""
        return int(round(size * self.downsample(mag)))

    def level_for(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (within the tolerance)."""
        fine_enough = [
            i for i, d in enumerate(self.level_downsamples)
            if d <= downsample * (1 + LEVEL_TOLERANCE)
        ]
        return max(fine_enough) if fine_enough else 0

    # -- reading --------------------------------------------------------------------------------
    def _read_level(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Pixels of ``level`` starting at level-0 (x, y); outside the slide is white."""
        level_ds = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = int(x / level_ds), int(y / level_ds)  # tiffslide's own level coordinates
        outside = x0 < 0 or y0 < 0 or x0 + width > level_w or y0 + height > level_h
        try:
            with warnings.catch_warnings(record=outside):  # we pad with white: no need to warn
                region = self._tiff.read_region((x, y), level, (width, height), as_array=True)
        except Exception as error:
            raise MiniKDError(
                f"cannot decode the region at ({x}, {y}) of {self.path} "
                f"({type(error).__name__}: {error}); the file may be corrupt: download it again"
            ) from error
        if region.shape[-1] != 3 or region.dtype != np.uint8:
            region = region[..., :3].astype(np.uint8)  # (h, w, 3), drop alpha
        if outside:
            region[:, : max(0, -x0)] = BACKGROUND
            region[: max(0, -y0)] = BACKGROUND
            region[:, max(0, level_w - x0):] = BACKGROUND
            region[max(0, level_h - y0):] = BACKGROUND
        return region

    def _plan(self, size: int, mag: float) -> tuple[int, int]:
        """(level to read, pixels to read there) for a ``size``-px tile at ``mag``."""
        downsample = self.downsample(mag)
        level = self.level_for(downsample)
        side = max(1, int(round(size * downsample / self.level_downsamples[level])))
        return level, side

    def read(self, x: int, y: int, size: int, mag: float) -> np.ndarray:
        """uint8 (size, size, 3): the level-0 square at (x, y) with footprint size·mag_0/mag."""
        level, side = self._plan(size, mag)
        region = self._read_level(int(x), int(y), level, side, side)  # (side, side, 3)
        return region if side == size else _resize(region, (size, size))

    def read_tiles(self, coords: np.ndarray, size: int, mag: float) -> np.ndarray:
        """uint8 (N, size, size, 3) for the level-0 top-left corners ``coords`` (N, 2).

        Equal to ``read`` tile by tile, but tiles are read in windows of about
        :data:`READ_WINDOW` level pixels, one ``read_region`` per window, and cut out of it:
        a stored (JPEG) tile that several small tiles share is decoded once, not once per tile.
        """
        level, side = self._plan(size, mag)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        at_level = np.trunc(coords / self.level_downsamples[level]).astype(np.int64)  # as tiffslide
        window = side * max(1, READ_WINDOW // side)
        _, group = np.unique(at_level // window, axis=0, return_inverse=True)
        tiles = np.empty((len(coords), size, size, 3), dtype=np.uint8)
        for members in _groups(group.reshape(-1)):
            first = at_level[members].min(axis=0)  # (2,) the window's corner at this level
            width, height = at_level[members].max(axis=0) - first + side
            x0 = coords[members[at_level[members, 0].argmin()], 0]  # level-0 x mapping to first[0]
            y0 = coords[members[at_level[members, 1].argmin()], 1]
            region = self._read_level(int(x0), int(y0), level, int(width), int(height))
            for i, (dx, dy) in zip(members, at_level[members] - first):
                tile = region[dy: dy + side, dx: dx + side]
                tiles[i] = tile if side == size else _resize(np.ascontiguousarray(tile), (size, size))
        return tiles

    def thumbnail(self, mag: float) -> np.ndarray:
        """uint8 (H, W, 3): the whole slide at magnification ``mag``."""
        downsample = self.downsample(mag)
        level = self.level_for(downsample)
        width, height = self.level_dimensions[level]
        image = self._read_level(0, 0, level, width, height)
        target = (max(1, round(self.dimensions[0] / downsample)),
                  max(1, round(self.dimensions[1] / downsample)))
        return image if (width, height) == target else _resize(image, target)

    # -- housekeeping ---------------------------------------------------------------------------
    def close(self) -> None:
        self._tiff.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (f"Slide({self.slide_id!r}, {w}x{h} px, {self.mpp:.3f} µm/px, "
                f"{self.magnification:g}x, {self.level_count} levels)")


def _groups(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each distinct value of ``labels`` (N,), one array per value."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample once: box (area) filter when shrinking, bicubic when enlarging."""
    shrinking = size[0] < image.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize(size, resample))


def open_slide(path, mpp: float | None = None, magnification: float | None = None) -> Slide:
    """Open a slide; ``mpp`` / ``magnification`` override wrong or missing metadata."""
    return Slide(path, mpp=mpp, magnification=magnification)

