"""ResKD on the phantom: accuracy and FLOPs of the HR teacher, KD and CE students at ÷2..÷16,
and the KD student with more unlabeled slides.

Runs :func:`mini_kd.methods.reskd.run_experiment`, the same function notebook 02 runs, and
writes its results plus the targets, met or not:

- the ÷8 student needs at least 64x fewer FLOPs (measured) and is within 2 accuracy points of
  the teacher;
- at every factor the KD student scores at least as well as the CE student.

Trained networks are checkpointed under $MINI_KD_DATA/reskd, so running this after the notebook
(same preset) reloads them instead of training again.

    python benchmarks/reskd.py --preset book --out benchmarks/results/reskd.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mini_kd.evaluate import plain
from mini_kd.methods import reskd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=reskd.PRESETS, default="smoke")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reskd.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as notebook 02: small networks on a shared CPU run faster on one
    start = time.perf_counter()
    results = reskd.run_experiment(reskd.config_for(args.preset))
    results["targets"] = reskd.check_targets(results)
    results["flop_reduction_by_region_size"] = reskd.flop_reductions()
    results["wall_seconds"] = time.perf_counter() - start
    results["machine"] = {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.is_available()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = plain(results)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=False))
    summary = {key: results[key] for key in ("teacher", "students", "unlabeled", "targets",
                                             "flop_reduction_by_region_size", "wall_seconds")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
