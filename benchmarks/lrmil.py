"""LRMIL on the phantom: AUC, accuracy and seconds per slide of HR ABMIL, LR ABMIL and LRMIL.

Runs :func:`mini_kd.methods.lrmil.run_experiment`, the function notebook 03 runs, so every model
is trained, scored and timed in one run on the same splits and the same slides, and writes:

- per model: test AUC, accuracy and weighted F1 (mean and std over the repeated splits) and, for
  the pipelines timed from the slide file, seconds per slide (total, and read + encode + MIL)
  with the seconds of each stage;
- the targets, met or not: LRMIL's read + encode + MIL at least 12x faster per slide than
  HR ABMIL's, its AUC at least 98 % of HR ABMIL's, and above LR ABMIL's (no distillation).

Stage-1 encoders and features are cached under $MINI_KD_DATA/phantom/<preset>, so a run after
the notebook (same preset) reuses them; the MIL models are trained again (seconds).

    python benchmarks/lrmil.py --preset book --out benchmarks/results/lrmil.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mini_kd.evaluate import plain
from mini_kd.methods import lrmil
from mini_kd.presets import PRESETS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lrmil.json"))
    parser.add_argument("--timing-slides", type=int, default=None,
                        help="test slides timed per pipeline (default: the preset's)")
    parser.add_argument("--sweep", action="store_true", help="also run the stage-2 sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2) if not torch.cuda.is_available()
                          else torch.get_num_threads())
    start = time.perf_counter()
    experiment = lrmil.run_experiment(args.preset, sweep=args.sweep,
                                      timing_slides=args.timing_slides)
    results = experiment.to_json()
    results["timed_slides"] = sorted({row["slide_id"] for row in experiment.timing})
    if experiment.sweep:
        results["sweep"] = experiment.sweep
    results["wall_seconds"] = time.perf_counter() - start
    results["machine"] = {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.is_available()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = plain(results)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=False))
    summary = {key: results[key] for key in ("hr_abmil", "lr_abmil", "lrmil", "targets")
               if key in results}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
