"""One benchmark entry point: a method's whole experiment on one preset and cohort, as one JSON file.

    python benchmarks/run.py --method lrmil --preset book [--cohort FOLDER] --out results/lrmil.json

Runs ``mini_kd.experiments.<method>.run_experiment(preset, cohort)`` -- the function the method's
notebook runs -- and writes ``Experiment.to_json()`` (strict JSON: NaN is null) with the wall time
and the machine. The keys of each model's entry are ``mini_kd.experiments.JSON_KEYS``; the
per-method scripts beside this one are thin wrappers that name their method.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path

import torch

from mini_kd.evaluate import plain
from mini_kd.methods import METHODS
from mini_kd.presets import PRESETS, cohort


def main(argv=None, method: str | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    if method is None:
        parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--cohort", type=Path, default=None,
                        help="a cohort folder (slides/ + labels.csv, masks optional); default: "
                             "$MINI_KD_COHORT, else the preset's phantom")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/<method>.json")
    args = parser.parse_args(argv)
    method = method or args.method
    experiments = importlib.import_module(f"mini_kd.experiments.{method}")
    start = time.perf_counter()
    results = experiments.run_experiment(args.preset, cohort(args.preset, args.cohort)).to_json()
    results.update(method=method, wall_seconds=round(time.perf_counter() - start, 1),
                   machine={"platform": platform.platform(), "threads": torch.get_num_threads(),
                            "cuda": torch.cuda.is_available()})
    out = args.out or Path("benchmarks/results") / f"{method}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plain(results), indent=2, allow_nan=False))
    print(json.dumps({k: v for k, v in results.items() if k in ("targets", "wall_seconds")}, indent=2))
    return results


if __name__ == "__main__":
    main()
