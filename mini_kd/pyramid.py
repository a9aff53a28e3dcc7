"""Write pyramidal, JPEG-tiled TIFFs laid out like Aperio SVS files.

A scanner stores a whole-slide image as a pyramid so that a viewer (or a low-resolution model)
never has to decode level 0 to see the whole slide. Level ``k`` of the pyramid holds the slide
shrunk by an integer downsample ``d_k`` (here 1, 4, 16: 20x, 5x, 1.25x for a 20x scan), each of
its pixels the *area average* of the ``d_k x d_k`` level-0 pixels it covers:

    L_k[i, j] = 1/d_k² · Σ_{a,b < d_k} L_0[d_k·i + a, d_k·j + b]

so a level has ``floor(W / d_k) x floor(H / d_k)`` pixels and its pixel (i, j) covers exactly the
level-0 square starting at (d_k·j, d_k·i) -- the alignment tiffslide assumes when it maps level-0
coordinates to a level.

The file follows the Aperio SVS layout that tifffile and tiffslide (and OpenSlide) recognise:

    page 0      level 0, tiled JPEG, ImageDescription "Aperio Image Library ...|AppMag = 20|MPP = 0.5"
    page 1      a small stripped thumbnail
    page 2, 3   the reduced levels, tiled JPEG, largest first

The reduced levels are ordinary (NewSubfileType 0) tiled pages, as in scanner-made SVS files:
tifffile reads the pages after the thumbnail as resolution levels until the first *reduced*
(NewSubfileType 1) page, which SVS reserves for label and macro images. Every page carries the
TIFF resolution tags (pixels per centimetre = 10⁴ / mpp at its level), so readers that ignore the
description still find the pixel size.

Level 0 is written band by band: ``image`` may be any object with ``.shape == (H, W, 3)`` whose
row slices ``image[y0:y1]`` return uint8 arrays (a numpy array, a memmap, or a lazy renderer such
as the phantom's), so a 16k x 16k slide never has to be held in memory -- only one band of
``tile`` rows and the reduced levels (1/16 and 1/256 of level 0) are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
import tiffslide
from PIL import Image

from mini_kd.errors import MiniKDError
from mini_kd.slides import open_slide

THUMBNAIL_SIDE = 1024  # longest side of the page-1 thumbnail, in pixels


def aperio_description(width: int, height: int, tile: int, quality: int,
                       magnification: float, mpp: float, level_size=None) -> str:
    """The ImageDescription Aperio scanners write; ``level_size`` marks a reduced page."""
    header = f"Aperio Image Library mini_kd\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    if level_size is not None:
        header += f" -> {level_size[0]}x{level_size[1]}"
    return f"{header} JPEG/RGB Q={quality}|AppMag = {magnification:g}|MPP = {mpp:g}"


def _check_arguments(shape, mpp, magnification, downsamples, tile) -> tuple[int, ...]:
    """Raise MiniKDError for arguments that cannot make a valid pyramid; return the downsamples."""
    if len(shape) != 3 or shape[2] != 3:
        raise MiniKDError(f"the image must be RGB with shape (H, W, 3), got {tuple(shape)}; "
                          "drop an alpha channel with image[..., :3]")
    if not (mpp and mpp > 0 and magnification and magnification > 0):
        raise MiniKDError(f"mpp ({mpp}) and magnification ({magnification}) must be positive; "
                          "a 20x scan has mpp=0.5, magnification=20")
    downsamples = tuple(int(d) for d in downsamples)
    if downsamples[0] != 1 or any(b <= a for a, b in zip(downsamples, downsamples[1:])):
        raise MiniKDError(f"downsamples must start at 1 and increase, got {downsamples}; "
                          "e.g. (1, 4, 16)")
    if tile % 16 or any(tile % d for d in downsamples):
        raise MiniKDError(f"tile={tile} must be a multiple of 16 and of every downsample "
                          f"{downsamples}; use tile=256")
    if min(shape[:2]) < downsamples[-1]:
        raise MiniKDError(f"an image of {shape[1]}x{shape[0]} px is smaller than the largest "
                          f"downsample {downsamples[-1]}; use fewer levels or a larger image")
    return downsamples


def _area_average(band: np.ndarray, downsample: int) -> np.ndarray:
    """uint8 (h // d, w // d, 3): mean of each d x d block of ``band`` (h, w, 3), edges dropped."""
    h, w = band.shape[0] // downsample, band.shape[1] // downsample
    if h == 0 or w == 0:  # the last band can be thinner than one block
        return np.empty((h, w, 3), np.uint8)
    blocks = Image.fromarray(np.ascontiguousarray(band[: h * downsample, : w * downsample]))
    return np.asarray(blocks.reduce(downsample))  # PIL's box reduction: the block mean, rounded


def _tiles(band: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """The (tile, tile, 3) tiles of one band, left to right; edge tiles padded by repeating the edge."""
    for x in range(0, band.shape[1], tile):
        piece = band[:, x: x + tile]  # (h <= tile, w <= tile, 3)
        pad = ((0, tile - piece.shape[0]), (0, tile - piece.shape[1]), (0, 0))
        yield np.pad(piece, pad, mode="edge") if any(p[1] for p in pad) else piece


def _level0_tiles(image, tile: int, reduced: dict[int, np.ndarray]) -> Iterator[np.ndarray]:
    """Level-0 tiles in row-major order; fills each ``reduced[d]`` band by band as a side effect."""
    height, width = image.shape[:2]
    for y in range(0, height, tile):
        band = np.asarray(image[y: y + tile])  # (min(tile, H - y), W, 3)
        if band.shape != (min(tile, height - y), width, 3) or band.dtype != np.uint8:
            raise MiniKDError(f"rows {y}:{y + tile} of the image came back as {band.dtype} "
                              f"{band.shape}; the image source must give uint8 (rows, {width}, 3)")
        for downsample, level in reduced.items():
            small = _area_average(band, downsample)  # (rows // d, W // d, 3)
            level[y // downsample: y // downsample + len(small)] = small
        yield from _tiles(band, tile)


def _thumbnail(level: np.ndarray) -> np.ndarray:
    """The coarsest level, shrunk by an integer factor until its longest side fits THUMBNAIL_SIDE."""
    factor = -(-max(level.shape[:2]) // THUMBNAIL_SIDE)  # ceil
    return level if factor == 1 else _area_average(level, factor)


def _resolution(mpp: float) -> dict:
    """TIFF resolution tags for a pixel of ``mpp`` µm: pixels per centimetre."""
    return dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")


def write_pyramid(path, image, mpp: float, magnification: float, downsamples=(1, 4, 16),
                  tile: int = 256, quality: int = 90) -> Path:
    """Write ``image`` (H, W, 3) uint8 as an Aperio-SVS-like pyramidal TIFF at ``path``.

    ``image`` is an array or any object with ``.shape`` and row slicing (see the module docstring).
    Level k has downsample ``downsamples[k]`` and ``floor(W / d) x floor(H / d)`` pixels made by area
    averaging. ``mpp`` (µm/px) and ``magnification`` (objective power) describe level 0.
    """
    shape = tuple(image.shape)
    downsamples = _check_arguments(shape, mpp, magnification, downsamples, tile)
    height, width = shape[:2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reduced = {d: np.empty((height // d, width // d, 3), np.uint8) for d in downsamples[1:]}
    jpeg = dict(compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                metadata=None)
    bigtiff = width * height * 3 > 2**31  # JPEG rarely gets near 4 GB, but never risk the offsets
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(_level0_tiles(image, tile, reduced), shape=shape, dtype=np.uint8,
                  tile=(tile, tile), subfiletype=0, **_resolution(mpp), **jpeg,
                  description=aperio_description(width, height, tile, quality, magnification, mpp))
        thumbnail = _thumbnail(reduced[downsamples[-1]] if reduced else np.asarray(image))
        thumb_mpp = mpp * width / thumbnail.shape[1]
        tif.write(thumbnail, subfiletype=0, **_resolution(thumb_mpp), **jpeg,
                  description=aperio_description(width, height, tile, quality, magnification, mpp,
                                                 thumbnail.shape[1::-1]))
        for downsample, level in reduced.items():
            tif.write(level, tile=(tile, tile), subfiletype=0, **_resolution(mpp * downsample),
                      **jpeg, description=aperio_description(width, height, tile, quality,
                                                             magnification, mpp, level.shape[1::-1]))
    return path


class _SlideRows:
    """Level 0 of an open tiffslide slide as a lazy (H, W, 3) image: ``rows[y0:y1]`` reads one band."""

    def __init__(self, slide):
        self.slide = slide
        width, height = slide.dimensions
        self.shape = (height, width, 3)

    def __getitem__(self, rows: slice) -> np.ndarray:
        y0, y1, _ = rows.indices(self.shape[0])
        band = self.slide.read_region((0, y0), 0, (self.shape[1], y1 - y0), as_array=True)
        return np.ascontiguousarray(band[..., :3])  # (y1 - y0, W, 3), alpha dropped


def pyramid_from_slide(src, dst, downsamples=(1, 4, 16), mpp: float | None = None) -> Path:
    """Turn any slide tiffslide opens (its level 0) into a pyramid written by write_pyramid.

    Resolution comes from :func:`mini_kd.slides.open_slide`: the source's mpp and objective power,
    or ``mpp`` when the source lacks one or reports an absurd value (then magnification = 10 / mpp).
    Level 0 is copied band by band, so the source never has to fit in memory.
    """
    with open_slide(src, mpp=mpp) as source:
        level_mpp, magnification = source.mpp, source.magnification
    with tiffslide.TiffSlide(src) as slide:
        return write_pyramid(dst, _SlideRows(slide), level_mpp, magnification, downsamples)
