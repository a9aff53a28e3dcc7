"""Megapixels per second: mini_kd's reader against a plain tiffslide loop, openslide-python and
the JPEG decode limit.

The **limit** is ``imagecodecs`` alone decoding every stored JPEG tile of the level read (the
compressed bytes already in memory, one thread): no reader that decodes the stored tiles can beat
it. The readers read tiles of the size the MIL methods use in the preset into uint8 numpy arrays,
at 20x (level 0) and at 5x (the 4x-down level), from a slide they have already opened:

- **dense**: every whole tile of the slide (the area of the limit's decode);
- **sparse**: 10 % of them at random (seeded), as AHDMIL's screen keeps them. The fewest pixels
  a reader can decode here are the stored tiles under the chosen tiles, so its *ideal* rate is
  the limit times (pixels asked / pixels of the stored tiles under them).

mini_kd runs with one decoding thread (``decode_threads = 1``, the fair comparison with the
single-threaded readers) and with its default pool (``mini_kd_pool``). The time to open the slide
is reported apart, as ``open_ms``. Each call is warmed up once, then timed ``repeats`` times,
interleaved, and the best run counts (the least disturbed by other work on a shared machine).

    python benchmarks/tiling.py --preset book --out benchmarks/results/tiling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile
import tiffslide

from mini_kd.presets import GEOMETRY, cohort
from mini_kd.sample import sample_pyramid
from mini_kd.slides import DECODE_THREADS, open_slide
from mini_kd.tiling import tile_grid

PRESETS = {
    "smoke": dict(repeats=2),
    "book": dict(repeats=7),
    "gpu": dict(repeats=7),
}
SPARSE_SHARE = 0.10  # the share of tiles the sparse case reads
SEED = 0


class MiniKD:
    """mini_kd: ``Slide.read_tiles`` (stored tiles decoded directly, each once per batch)."""

    threads = 1

    def __init__(self, path):
        self.slide = open_slide(path)
        self.slide.decode_threads = self.threads

    def read(self, coords, size, mag, level):
        return self.slide.read_tiles(coords, size, mag)


class MiniKDPool(MiniKD):
    """mini_kd with its default decoding pool (:data:`mini_kd.slides.DECODE_THREADS` threads)."""

    threads = DECODE_THREADS


class TiffslideLoop:
    """A plain loop of tiffslide ``read_region`` calls at the matching level."""

    def __init__(self, path):
        self.slide = tiffslide.TiffSlide(path)

    def read(self, coords, size, mag, level):
        return np.stack([self.slide.read_region((int(x), int(y)), level, (size, size), as_array=True)
                         for x, y in coords])


class OpenSlide:
    """openslide-python (the openslide-bin wheel): RGBA regions, alpha dropped."""

    def __init__(self, path):
        self.slide = openslide.OpenSlide(str(path))

    def read(self, coords, size, mag, level):
        return np.stack([np.asarray(self.slide.read_region((int(x), int(y)), level, (size, size)))[..., :3]
                         for x, y in coords])


READERS = {"mini_kd": MiniKD, "mini_kd_pool": MiniKDPool, "tiffslide_loop": TiffslideLoop,
           "openslide": OpenSlide}


def best_seconds(calls: dict, repeats: int) -> dict:
    """Best-of-``repeats`` wall time of each call, the calls interleaved within every repeat so
    that drift in the machine's load hits them all alike (after one warm-up call each)."""
    for call in calls.values():
        call()  # warm-up: file handles, caches, lazy imports
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def level_page(path, level: int) -> tifffile.TiffPage:
    """The TIFF page of pyramid ``level`` (series 0, as tiffslide reads SVS files)."""
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].keyframe


def stored_jpeg_tiles(path, level: int) -> tuple[list[bytes], bytes | None, tuple[int, int]]:
    """(compressed bytes of every stored tile of ``level``, the JPEG tables, stored tile (h, w))."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        tiles = [data for data, _ in tif.filehandle.read_segments(page.dataoffsets, page.databytecounts)]
        return tiles, page.jpegtables, page.chunks[:2]


def stored_tiles_under(coords, side: int, downsample: float, stored: tuple[int, int]) -> int:
    """How many distinct stored tiles the ``side``-px level squares at level-0 ``coords`` overlap."""
    corners = np.trunc(coords / downsample).astype(np.int64)  # (N, 2) level (x, y)
    under = set()
    for x, y in corners:
        for row in range(y // stored[0], (y + side - 1) // stored[0] + 1):
            for column in range(x // stored[1], (x + side - 1) // stored[1] + 1):
                under.add((row, column))
    return len(under)


def rates(seconds: dict, pixels: int) -> dict:
    return {name: round(pixels / s / 1e6, 1) for name, s in seconds.items()}


def benchmark_level(path, mag, size, repeats):
    """The limit, the dense and the sparse case at ``mag`` on one slide, and the open times."""
    with open_slide(path) as slide:
        grid = tile_grid(slide, mag, size, min_tissue=0.0)  # every whole tile
        level = slide.level_for(slide.downsample(mag))
        downsample = slide.level_downsamples[level]
    rng = np.random.default_rng(SEED)
    dense = grid.coords
    sparse = np.sort(rng.choice(len(dense), max(1, round(SPARSE_SHARE * len(dense))), replace=False))
    sparse = dense[sparse]  # (M, 2), in grid order as a predictor reads them
    tiles, tables, stored = stored_jpeg_tiles(path, level)
    readers = {name: reader(path) for name, reader in READERS.items()}
    calls = {"limit": lambda: [imagecodecs.jpeg8_decode(data, tables=tables) for data in tiles]}
    for case, coords in (("dense", dense), ("sparse", sparse)):
        calls.update({f"{case}/{name}": (lambda r=r, c=coords: r.read(c, size, mag, level))
                      for name, r in readers.items()})
    seconds = best_seconds(calls, repeats)
    limit = len(tiles) * stored[0] * stored[1] / seconds.pop("limit") / 1e6  # Mpx/s decoded
    result = {"tile_size": size, "level": level,
              "limit": {"stored_tiles": len(tiles), "stored_tile": list(stored),
                        "Mpx_per_s": round(limit, 1)}}
    for case, coords in (("dense", dense), ("sparse", sparse)):
        timed = {name: seconds[f"{case}/{name}"] for name in READERS}
        speed = rates(timed, len(coords) * size * size)  # Mpx/s of tiles delivered
        side = int(round(size * slide.downsample(mag) / downsample))
        under = stored_tiles_under(coords, side, downsample, stored)
        ideal = limit * len(coords) * side * side / (under * stored[0] * stored[1])
        result[case] = {"tiles": int(len(coords)), "stored_tiles_under_them": under,
                        "Mpx_per_s": speed,
                        "tiles_per_s": {k: round(len(coords) / s, 1) for k, s in timed.items()},
                        "ratio_to_limit": {k: round(v / limit, 3) for k, v in speed.items()},
                        "ideal_Mpx_per_s": round(ideal, 1),
                        "ratio_to_ideal": {k: round(v / ideal, 3) for k, v in speed.items()}}
    opens = best_seconds({name: (lambda R=R: R(path)) for name, R in READERS.items()}, repeats)
    result["open_ms"] = {k: round(1e3 * v, 2) for k, v in opens.items()}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tiling.json"))
    args = parser.parse_args(argv)
    phantom = cohort(args.preset)
    slides = {"phantom": phantom.slide_path(phantom.ids()[0]), "sample_pyramid": sample_pyramid()}
    geometry = GEOMETRY[args.preset]  # the tiles the MIL methods read in this preset
    result = {"preset": args.preset, "machine": platform.machine(), "cpus": os.cpu_count(),
              "decode_threads_of_mini_kd_pool": DECODE_THREADS, "slides": {}}
    for kind, path in slides.items():
        result["slides"][kind] = {f"{mag:g}x": benchmark_level(path, mag, size, PRESETS[args.preset]["repeats"])
                                  for mag, size in ((geometry["hr_mag"], geometry["hr_tile"]),
                                                    (geometry["lr_mag"], geometry["lr_tile"]))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
