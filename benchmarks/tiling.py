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
    "book": dict(max_tiles=512, repeats=7),
    "gpu": dict(max_tiles=4096, repeats=7),
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


def tiles_per_second(readers: dict, n_tiles: int, repeats: int) -> dict:
    """Best-of-``repeats`` tiles/s of each reader, the readers interleaved within every repeat so
    that drift in the machine's load hits them all alike."""
    for read in readers.values():
        read()  # warm-up: file handles, caches, lazy imports
    best = {name: float("inf") for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            read()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: n_tiles / seconds for name, seconds in best.items()}


def benchmark_slide(path, mag, size, max_tiles, repeats):
    with open_slide(path) as slide:
        grid = tile_grid(slide, mag, size, min_tissue=0.0)  # every whole tile: more to time
        level = slide.level_for(slide.downsample(mag))
    coords = grid.coords[:max_tiles]
    speeds = tiles_per_second({
        "mini_kd": lambda: read_with_mini_kd(path, coords, size, mag),
        "tiffslide_loop": lambda: read_with_tiffslide_loop(path, coords, size, level),
        "openslide": lambda: read_with_openslide(path, coords, size, level),
    }, len(coords), repeats)
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
        by_mag = {f"{mag:g}x": benchmark_slide(path, mag, 256, **settings) for mag in (20.0, 5.0)}
        # the headline numbers are the 20x reads (level 0), where most of the pixels are
        result["slides"][kind] = {"tiles": by_mag["20x"]["tiles"],
                                  "tiles_per_s": by_mag["20x"]["tiles_per_s"], **by_mag}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
