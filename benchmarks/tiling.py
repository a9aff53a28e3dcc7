"""Tiles per second: mini_kd's reader against a plain tiffslide loop and openslide-python.

All three read the same tiles of the same slide, of the size the MIL methods use in the preset into uint8 numpy arrays, at 20x (level 0) and at
5x (the 4x-down pyramid level), from a slide they have already opened; the time to open the slide
(mini_kd also parses the resolution and checks that the file is complete) is reported apart, as
``open_ms``. Each reader is warmed up once, then timed ``repeats`` times; the best run counts (the
least disturbed by other work on a shared machine).

    python benchmarks/tiling.py --preset smoke --out benchmarks/results/tiling.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import openslide
import tiffslide

from mini_kd.presets import GEOMETRY, cohort
from mini_kd.sample import sample_pyramid
from mini_kd.slides import open_slide
from mini_kd.tiling import tile_grid

PRESETS = {
    "smoke": dict(max_tiles=64, repeats=2),
    "book": dict(max_tiles=512, repeats=7),
    "gpu": dict(max_tiles=4096, repeats=7),
}


class MiniKD:
    """mini_kd: ``Slide.read_tiles`` (level planned once per batch, one resample at most)."""

    def __init__(self, path):
        self.slide = open_slide(path)

    def read(self, coords, size, mag, level):
        return self.slide.read_tiles(coords, size, mag)


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


READERS = {"mini_kd": MiniKD, "tiffslide_loop": TiffslideLoop, "openslide": OpenSlide}


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


def benchmark_slide(path, mag, size, max_tiles, repeats):
    """tiles/s of reading the slide's tiles with each reader, the slide already open (as in a
    feature-extraction loop, which opens a slide once), and the time each reader takes to open it."""
    with open_slide(path) as slide:
        grid = tile_grid(slide, mag, size, min_tissue=0.0)  # every whole tile: more to time
        level = slide.level_for(slide.downsample(mag))
    coords = grid.coords[:max_tiles]
    readers = {name: reader(path) for name, reader in READERS.items()}
    reads = best_seconds({name: (lambda r=r: r.read(coords, size, mag, level))
                          for name, r in readers.items()}, repeats)
    opens = best_seconds({name: (lambda R=R: R(path)) for name, R in READERS.items()}, repeats)
    speeds = {name: len(coords) / seconds for name, seconds in reads.items()}
    best_other = max(speeds["tiffslide_loop"], speeds["openslide"])
    return {"tiles": int(len(coords)), "mag": mag, "tile_size": size, "level": level,
            "tiles_per_s": {k: round(v, 1) for k, v in speeds.items()},
            "open_ms": {k: round(1e3 * v, 2) for k, v in opens.items()},
            "mini_kd_vs_best_other": round(speeds["mini_kd"] / best_other, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tiling.json"))
    args = parser.parse_args(argv)
    settings = PRESETS[args.preset]
    phantom = cohort(args.preset)
    slides = {"phantom": phantom.slide_path(phantom.ids()[0]), "sample_pyramid": sample_pyramid()}
    result = {"preset": args.preset, "machine": platform.machine(), "slides": {}}
    for kind, path in slides.items():
        geometry = GEOMETRY[args.preset]  # the tiles the MIL methods read in this preset
        by_mag = {f"{mag:g}x": benchmark_slide(path, mag, size, **settings)
                  for mag, size in ((geometry["hr_mag"], geometry["hr_tile"]),
                                    (geometry["lr_mag"], geometry["lr_tile"]))}
        # the headline numbers are the 20x reads (level 0), where most of the pixels are
        result["slides"][kind] = {"tiles": by_mag["20x"]["tiles"],
                                  "tiles_per_s": by_mag["20x"]["tiles_per_s"], **by_mag}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
