"""AHDMIL on the phantom: AUC, accuracy and seconds per slide of DMIN on every tile and of AHDMIL,
measured in one run on the same slides, with the keep rate and the tumour recall of the screen.

Runs :func:`mini_kd.methods.ahdmil.run_experiment`, the same function notebook 04 runs, and writes
its JSON (:meth:`~mini_kd.methods.ahdmil.Experiment.to_json`): every model's test metrics (mean and
standard deviation over the repeated splits), the seconds per slide and stage of the two pipelines
timed from the slide files on split 0's test slides, and the targets, met or not:

- AHDMIL's inference from the slide file is at least 2x faster than DMIN on every tile;
- AHDMIL's AUC is at least DMIN's (on every tile);
- at least 95 % of the ground-truth tumour tiles are among the tiles AHDMIL keeps.

    python benchmarks/ahdmil.py --preset book --out benchmarks/results/ahdmil.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mini_kd.evaluate import plain
from mini_kd.methods import ahdmil
from mini_kd.presets import PRESETS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ahdmil.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    experiment = ahdmil.run_experiment(args.preset)
    results = experiment.to_json()
    results["runs"] = experiment.runs  # every split and model: the test metrics behind the means
    results["timing_by_slide"] = experiment.timing
    results["wall_seconds"] = time.perf_counter() - start
    results["machine"] = {"platform": platform.platform(), "cuda": torch.cuda.is_available(),
                          "threads_while_running": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = plain(results)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=False))
    print(json.dumps({key: results[key] for key in ("dmin_all", "ahdmil", "targets", "wall_seconds")
                      if key in results}, indent=2))


if __name__ == "__main__":
    main()
