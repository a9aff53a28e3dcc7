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

import logging
import logging.handlers
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
import tiffslide
from PIL import Image

from mini_kd.errors import MiniKDError

MPP_RANGE = (0.05, 20.0)  # µm/px a real scan can have; outside it the metadata is wrong
MAGNIFICATION_RANGE = (10 / MPP_RANGE[1], 10 / MPP_RANGE[0])  # the same range as objective power
LEVEL_TOLERANCE = 0.01  # a level at downsample 4.002 serves a request for 4
BACKGROUND = 255  # out-of-slide pixels are white glass, not black
DECODE_THREADS = 2  # threads per reader decoding stored tiles (the decoder releases the GIL)


def _first_page_offset(tif: tifffile.TiffFile) -> int:
    """The byte offset of the first page (IFD) that the TIFF header points to."""
    big = tif.tiff.version == 43  # BigTIFF: an 8-byte offset at byte 8; classic TIFF: 4 bytes at 4
    size, code = (8, "Q") if big else (4, "I")
    tif.filehandle.seek(size)
    return struct.unpack(tif.tiff.byteorder + code, tif.filehandle.read(size))[0]


def _check_complete(path: Path, tif: tifffile.TiffFile) -> None:
    """Raise when the TIFF has no readable page or its image data runs past the end of the file.

    An interrupted download of an SVS loses its pages (Aperio writes them after the pixels), so
    tifffile finds none and returns an empty list; a file whose pages come first keeps them, but
    their image data ends past the last byte.
    """
    file_size = path.stat().st_size
    if len(tif.pages) == 0:
        offset = _first_page_offset(tif)
        where = (f"its first page is at byte {offset} but the file has {file_size} bytes"
                 if offset >= file_size else f"no readable page at byte {offset}")
        raise MiniKDError(f"{path} is truncated or damaged ({where}); download it again")
    for page in tif.pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > file_size:
            raise MiniKDError(
                f"{path} is truncated: its image data ends at byte {max(ends)} but the file "
                f"has {file_size} bytes; download it again"
            )


@contextmanager
def _held_back_tifffile_log():
    """Hold back what tifffile logs inside the block (for a damaged file it logs, then returns no
    pages) and pass it on only if the block succeeds: a failure is reported once, as our error."""
    logger = logging.getLogger("tifffile")
    held = logging.handlers.BufferingHandler(capacity=10**6)
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(held)
    try:
        yield
    finally:
        logger.removeHandler(held)
        logger.propagate = propagate
    for record in held.buffer:
        logger.handle(record)


def _open_tiff(path: Path) -> tiffslide.TiffSlide:
    """tiffslide's handle on ``path``, its metadata parsed and its pages checked.

    tiffslide parses lazily: the pyramid is read here, so that a damaged file fails here, as one
    :class:`MiniKDError`, and not at the first use of a property.
    """
    if not path.exists():
        raise MiniKDError(f"no slide at {path}: check the path")
    if not path.is_file():
        raise MiniKDError(f"{path} is a folder, not a slide file")
    if path.stat().st_size == 0:
        raise MiniKDError(f"{path} is empty (0 bytes); download or copy it again")
    slide = None
    try:
        with _held_back_tifffile_log():
            slide = tiffslide.TiffSlide(path)
            _check_complete(path, slide.ts_tifffile)  # the pages tiffslide parsed anyway
            if any(min(size) < 1 for size in slide.level_dimensions):  # parses the metadata
                raise MiniKDError(f"{path} has a pyramid level without pixels "
                                  f"{slide.level_dimensions}; it is damaged: download it again")
        return slide
    except Exception as error:  # tifffile/tiffslide raise many types for a bad file
        if slide is not None:
            slide.close()
        if isinstance(error, MiniKDError):
            raise
        raise MiniKDError(
            f"cannot read {path} as a slide ({type(error).__name__}: {_first_line(error)}); "
            "is it a complete TIFF/SVS file?"
        ) from error


def _first_line(error: Exception) -> str:
    """The first line of an exception's message (some span several lines)."""
    return str(error).strip().split("\n")[0]


def _number(value, what: str, path: Path) -> float:
    """``float(value)``, or a MiniKDError naming ``what`` was not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MiniKDError(f"{what} for {path} is {value!r}, not a number; pass a number such as "
                          "mpp=0.5 (or --mpp 0.5)") from None


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
    mpp = _number(mpp, "the mpp", path)
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise MiniKDError(
            f"{source} {mpp:g} µm/px for {path}, outside the range of real scans "
            f"({MPP_RANGE[0]}–{MPP_RANGE[1]}); pass the true value as mpp=... (or --mpp)"
        )
    return mpp


def _resolve_magnification(path: Path, properties: dict, magnification: float | None,
                           mpp: float, mpp_overridden: bool) -> float:
    """Level 0's objective power: the override, else the slide's own (unless the user corrected
    the mpp: then the metadata is suspect), else 10 / mpp."""
    reported = properties.get(tiffslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if magnification is not None:
        source, magnification = "the override gives", _number(magnification, "the magnification", path)
    elif reported and not mpp_overridden:
        source, magnification = "the slide reports", _number(reported, "the objective power", path)
    else:
        return 10.0 / mpp  # in MAGNIFICATION_RANGE, since mpp is in MPP_RANGE
    if not MAGNIFICATION_RANGE[0] <= magnification <= MAGNIFICATION_RANGE[1]:
        raise MiniKDError(
            f"{source} {magnification:g}x for level 0 of {path}, outside the range of real scans "
            f"({MAGNIFICATION_RANGE[0]:g}x–{MAGNIFICATION_RANGE[1]:g}x); pass the true value as "
            "magnification=... (or --magnification), e.g. 20 for a 0.5 µm/px scan"
        )
    return magnification


class Slide:
    """A slide opened with tiffslide, with its resolution resolved and checked.

    Attributes: ``path``, ``slide_id`` (file stem), ``mpp`` (µm/px at level 0), ``magnification``
    (objective power of level 0), ``dimensions`` (level-0 width, height), ``level_count``,
    ``level_dimensions``, ``level_downsamples``, and ``pixels_decoded``: the pixels of every
    stored tile decoded so far by this slide's reads, the cost a sparse read saves.
    """

    def __init__(self, path, mpp: float | None = None, magnification: float | None = None):
        self.path = Path(path)
        self.slide_id = self.path.stem
        self._tiff = _open_tiff(self.path)
        properties = self._tiff.properties
        try:
            self.mpp = _resolve_mpp(self.path, properties, mpp)
            self.magnification = _resolve_magnification(self.path, properties, magnification,
                                                        self.mpp, mpp_overridden=mpp is not None)
        except MiniKDError:
            self._tiff.close()  # the caller gets no Slide to close
            raise
        self.dimensions = tuple(self._tiff.dimensions)
        self.level_count = self._tiff.level_count
        self.level_dimensions = tuple(tuple(d) for d in self._tiff.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._tiff.level_downsamples)
        self.pixels_decoded = 0  # pixels of the stored tiles decoded so far (what a read costs)

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
    decode_threads = DECODE_THREADS  # threads decoding stored tiles; set on a slide to change it

    def _stored_grid(self, level: int) -> _StoredGrid:
        """How ``level`` is stored in the file, checked to hold pixels we can give as RGB."""
        series = self._tiff.ts_tifffile.series[self._tiff.properties["tiffslide.series-index"]]
        page = series.levels[level].keyframe  # the page tiffslide reads for this level
        _check_pixels(page, self.path)
        return _StoredGrid(page)

    def _read_level(self, x, y, level: int, width: int, height: int) -> np.ndarray:
        """uint8 (N, height, width, 3): the regions of ``level`` at level-0 corners (x, y), (N,) each.

        A region starts at level pixel (trunc(x / d), trunc(y / d)) for the level's downsample d,
        as tiffslide and openslide map it; outside the slide it is white. Every stored tile that
        some region overlaps is read from the file and decoded once -- on
        :attr:`decode_threads` threads, since the decoder releases the GIL -- and its pixels are
        copied into each region that overlaps it.
        """
        grid = self._stored_grid(level)
        level_ds = self.level_downsamples[level]
        x0 = np.trunc(np.asarray(x, dtype=np.int64) / level_ds).astype(np.int64).tolist()  # (N,)
        y0 = np.trunc(np.asarray(y, dtype=np.int64) / level_ds).astype(np.int64).tolist()  # (N,)
        regions = np.full((len(x0), height, width, 3), BACKGROUND, np.uint8)
        overlaps = grid.overlaps(x0, y0, width, height)  # stored tile -> regions it reaches

        def paste(data: bytes | None, index: int) -> None:
            if data is None:  # a tile the file leaves empty stays white
                return
            members = overlaps[index]
            same = grid.same_as(index, members, x0, y0, width, height)  # a region that is this tile
            if same is None:
                grid.paste(_decode(grid.page, data, index, self.path), index, regions, members, x0, y0)
                return
            _decode(grid.page, data, index, self.path, out=regions[same])  # straight into it
            grid.paste(regions[same], index, regions, [i for i in members if i != same], x0, y0)

        page, file = grid.page, self._tiff.ts_tifffile.filehandle
        segments = file.read_segments([page.dataoffsets[i] for i in overlaps],
                                      [page.databytecounts[i] for i in overlaps],
                                      list(overlaps), lock=file.lock)  # (bytes, index), file order
        _each(paste, segments, self.decode_threads if len(overlaps) > 1 else 1)
        self.pixels_decoded += len(overlaps) * grid.tile_height * grid.tile_width
        return regions

    def _plan(self, size: int, mag: float) -> tuple[int, int]:
        """(level to read, pixels to read there) for a ``size``-px tile at ``mag``."""
        downsample = self.downsample(mag)
        level = self.level_for(downsample)
        side = max(1, int(round(size * downsample / self.level_downsamples[level])))
        return level, side

    def read(self, x: int, y: int, size: int, mag: float) -> np.ndarray:
        """uint8 (size, size, 3): the level-0 square at (x, y) with footprint size·mag_0/mag."""
        level, side = self._plan(size, mag)
        region = self._read_level([int(x)], [int(y)], level, side, side)[0]  # (side, side, 3)
        return region if side == size else _resize(region, (size, size))

    def read_tiles(self, coords: np.ndarray, size: int, mag: float) -> np.ndarray:
        """uint8 (N, size, size, 3) for the level-0 top-left corners ``coords`` (N, 2).

        Equal to ``read`` tile by tile, but each stored (JPEG) tile of the level that the batch
        overlaps is decoded exactly once and cut into every tile that needs it: a dense batch
        decodes each stored tile once (not once per small tile touching it), a sparse one -- the
        few tiles a screen keeps -- only the stored tiles under them.
        """
        level, side = self._plan(size, mag)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        regions = self._read_level(coords[:, 0], coords[:, 1], level, side, side)  # (N, side, side, 3)
        if side == size:
            return regions
        tiles = np.empty((len(coords), size, size, 3), dtype=np.uint8)
        for tile, region in zip(tiles, regions):
            tile[:] = _resize(region, (size, size))
        return tiles

    def thumbnail(self, mag: float) -> np.ndarray:
        """uint8 (H, W, 3): the whole slide at magnification ``mag``."""
        downsample = self.downsample(mag)
        level = self.level_for(downsample)
        width, height = self.level_dimensions[level]
        image = self._read_level([0], [0], level, width, height)[0]  # (height, width, 3)
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


GREY = tifffile.PHOTOMETRIC.MINISBLACK
COLOUR = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)  # tifffile decodes YCbCr to RGB


def _check_pixels(page: tifffile.TiffPage, path: Path) -> None:
    """Raise unless ``page`` stores 8-bit RGB(A) or grey(+alpha) samples."""
    convert = "convert it to 8-bit RGB (e.g. with vips or tifffile) and open the copy"
    if page.dtype != np.uint8:
        raise MiniKDError(f"{path} stores {page.bitspersample}-bit {page.dtype} samples; mini_kd "
                          f"reads 8-bit slides: {convert}")
    samples = page.samplesperpixel
    grey = page.photometric == GREY and samples in (1, 2)
    colour = page.photometric in COLOUR and samples >= 3
    if not (grey or colour):
        raise MiniKDError(f"{path} stores its pixels as {tifffile.PHOTOMETRIC(page.photometric).name} "
                          f"with {samples} sample(s) per pixel; mini_kd reads RGB and greyscale "
                          f"slides: {convert}")


class _StoredGrid:
    """A level as the file stores it: row-major tiles (or full-width strips) of
    ``tile_height x tile_width`` pixels, ``per_row`` per row; stored tile i covers the level
    pixels from (i mod per_row · tile_width, ⌊i / per_row⌋ · tile_height), clipped to the level."""

    def __init__(self, page: tifffile.TiffPage):
        self.page = page
        self.width, self.height = page.imagewidth, page.imagelength  # level pixels
        self.tile_height, self.tile_width = page.chunks[:2]
        self.per_row = page.chunked[1]

    def origin(self, index: int) -> tuple[int, int]:
        """Level (x, y) of the top-left pixel of stored tile ``index``."""
        return (index % self.per_row) * self.tile_width, (index // self.per_row) * self.tile_height

    def overlaps(self, x0: list, y0: list, width: int, height: int) -> dict[int, list[int]]:
        """{stored tile: the regions it overlaps} for regions i covering [x0_i, x0_i + width) x
        [y0_i, y0_i + height) of the level; regions wholly outside the level overlap none."""
        overlaps: dict[int, list[int]] = {}
        for i, (x, y) in enumerate(zip(x0, y0)):
            left, right = max(x, 0), min(x + width, self.width)
            top, bottom = max(y, 0), min(y + height, self.height)
            if left >= right or top >= bottom:
                continue
            for row in range(top // self.tile_height, (bottom - 1) // self.tile_height + 1):
                for column in range(left // self.tile_width, (right - 1) // self.tile_width + 1):
                    overlaps.setdefault(row * self.per_row + column, []).append(i)
        return overlaps

    def same_as(self, index: int, members: list[int], x0: list, y0: list, width: int,
                height: int) -> int | None:
        """The first of ``members`` whose region is exactly stored tile ``index`` (the common case
        at level 0: tiles the size of the stored ones, on their grid), if the tile can be decoded
        straight into it (:func:`_direct`); else None."""
        left, top = self.origin(index)
        fits = (height, width) == (self.tile_height, self.tile_width) and \
            left + width <= self.width and top + height <= self.height  # not a padded edge tile
        if not (fits and _direct(self.page)):
            return None
        return next((i for i in members if (x0[i], y0[i]) == (left, top)), None)

    def paste(self, tile: np.ndarray, index: int, regions: np.ndarray, members: list[int],
              x0: list, y0: list) -> None:
        """Copy decoded stored tile ``index`` (h, w, samples) into each of ``regions[members]``
        (N, height, width, 3) where they overlap inside the level; grey is repeated into R, G, B."""
        left, top = self.origin(index)
        right = min(left + tile.shape[1], self.width)  # edge tiles are stored padded: drop it
        bottom = min(top + tile.shape[0], self.height)
        pixels = tile[..., :3] if tile.shape[-1] >= 3 else tile[..., :1]  # alpha dropped
        height, width = regions.shape[1:3]
        for i in members:
            xa, xb = max(left, x0[i]), min(right, x0[i] + width)
            ya, yb = max(top, y0[i]), min(bottom, y0[i] + height)
            regions[i, ya - y0[i]: yb - y0[i], xa - x0[i]: xb - x0[i]] = \
                pixels[ya - top: yb - top, xa - left: xb - left]  # (h', w', 3 or 1 -> 3)


def _direct(page: tifffile.TiffPage) -> bool:
    """Whether ``page``'s tiles are 8-bit 3-sample JPEGs that :func:`_decode` can decode straight
    into a caller's array (what tifffile's JPEG codec does, less its per-tile copy)."""
    return (page.compression == tifffile.COMPRESSION.JPEG and page.samplesperpixel == 3
            and page.planarconfig == tifffile.PLANARCONFIG.CONTIG and page.photometric in COLOUR)


def _decode(page: tifffile.TiffPage, data: bytes, index: int, path: Path,
            out: np.ndarray | None = None) -> np.ndarray:
    """(h, w, samples): stored tile ``index`` of ``page`` decoded by tifffile's codec (imagecodecs);
    into ``out`` (h, w, 3) when given, for a :func:`_direct` page. An Aperio-style RGB JPEG without
    a JFIF marker is decoded as RGB, not YCbCr, as tifffile does."""
    try:
        if out is not None:
            rgb = page.photometric == tifffile.PHOTOMETRIC.RGB and not page.is_jfif
            return imagecodecs.jpeg_decode(data, tables=page.jpegtables, out=out, bitspersample=8,
                                           colorspace=2 if rgb else None, outcolorspace=2)
        tile = page.decode(data, index, jpegtables=page.jpegtables)[0]  # (1, h, w, samples)
    except Exception as error:  # each codec raises its own type for damaged data
        raise MiniKDError(
            f"cannot decode stored tile {index} of {path} ({type(error).__name__}: {error}); "
            "the file may be corrupt: download it again") from error
    return tile.reshape(tile.shape[-3:])


def _each(function, items, threads: int) -> None:
    """``function(*item)`` for every item, on ``threads`` threads (inline for one); errors propagate."""
    if threads <= 1:
        for item in items:
            function(*item)
        return
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(function, *item) for item in items]:
            done.result()


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample once: box (area) filter when shrinking, bicubic when enlarging."""
    shrinking = size[0] < image.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize(size, resample))


def open_slide(path, mpp: float | None = None, magnification: float | None = None) -> Slide:
    """Open a slide; ``mpp`` / ``magnification`` override wrong or missing metadata."""
    return Slide(path, mpp=mpp, magnification=magnification)

