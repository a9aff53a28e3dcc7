"""Tiles per second: mini_kd's reader against a plain tiffslide loop and openslide-python.

All three read the same tissue tiles of the same slide into uint8 numpy arrays, at 20x (level 0)
and at 5x (the 4x-down pyramid level). Each reader is warmed up once, then timed ``repeats`` times;
the best run counts (the least disturbed by other work on a shared machine).

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

from mini_kd.presets import cohort
from mini_kd.sample import sample_pyramid
from mini_kd.slides import open_slide
from mini_kd.tiling import tile_grid

PRESETS = {
    "smoke": dict(max_tiles=64, repeats=2),
    "book": dict(max_tiles=512, repeats=3),
    "gpu": dict(max_tiles=4096, repeats=3),
}


def read_with_mini_kd(path, coords, size, mag):
    with open_slide(path) as slide:
        return slide.read_tiles(coords, size, mag)


def read_with_tiffslide_loop(path, coords, size, level):
    with tiffslide.TiffSlide(path) as slide:
        return np.stack([slide.read_region((int(x), int(y)), level, (size, size), as_array=True)
                         for x, y in coords])


def read_with_openslide(path, coords, size, level):
    slide = openslide.OpenSlide(str(path))
    try:
        return np.stack([np.asarray(slide.read_region((int(x), int(y)), level, (size, size)))[..., :3]
                         for x, y in coords])
    finally:
        slide.close()


def tiles_per_second(read, n_tiles, repeats):
    read()  # warm-up: file handles, caches, lazy imports
    best = min(_timed(read) for _ in range(repeats))
    return n_tiles / best


def _timed(read):
    start = time.perf_counter()
    read()
    return time.perf_counter() - start


def benchmark_slide(path, mag, size, max_tiles, repeats):
    with open_slide(path) as slide:
        grid = tile_grid(slide, mag, size, min_tissue=0.25)
        level = slide.level_for(slide.downsample(mag))
    coords = grid.coords[:max_tiles]
    speeds = {
        "mini_kd": tiles_per_second(lambda: read_with_mini_kd(path, coords, size, mag), len(coords), repeats),
        "tiffslide_loop": tiles_per_second(
            lambda: read_with_tiffslide_loop(path, coords, size, level), len(coords), repeats),
        "openslide": tiles_per_second(
            lambda: read_with_openslide(path, coords, size, level), len(coords), repeats),
    }
    best_other = max(speeds["tiffslide_loop"], speeds["openslide"])
    return {"tiles": int(len(coords)), "mag": mag, "tile_size": size, "level": level,
            "tiles_per_s": {k: round(v, 1) for k, v in speeds.items()},
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
        result["slides"][kind] = {f"{mag:g}x": benchmark_slide(path, mag, 256, **settings)
                                  for mag in (20.0, 5.0)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
