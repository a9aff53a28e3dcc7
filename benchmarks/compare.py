"""Side by side: every method and baseline on the same folds, as one JSON file per cohort.

    python benchmarks/compare.py --preset book                  # both embedded cohorts
    python benchmarks/compare.py --preset book --cohort FOLDER --out results/mine.json

Runs ``mini_kd.experiments.compare.run_comparison`` -- the function notebook 05 runs -- and writes
``{"rows": [{"method", "magnifications", "auc", "auc_ci", "accuracy", "f1", "seconds_per_slide",
"seconds_by_stage", "tiles_read", "pixels_decoded", "speedup_vs_hr_abmil", ...}], "folds",
"slides", "preset", "cohort", "targets", "pareto_front"}`` with the wall time and the machine.
Without ``--cohort`` it runs on the preset's phantom and on its real-tissue cohort, writing
``<out>-phantom.json`` and ``<out>-real.json``; ``--cohort FOLDER`` runs on a folder of your
slides (``slides/`` + ``labels.csv``; without tumour masks the where-it-looks figure has no mask).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mini_kd import presets
from mini_kd.evaluate import plain
from mini_kd.experiments.compare import pareto_front, run_comparison, to_rows


def compare(preset: str, cohort, out: Path) -> dict:
    start = time.perf_counter()
    results = to_rows(run_comparison(preset, cohort).to_json())
    results.update(pareto_front=pareto_front(results["rows"]),
                   wall_seconds=round(time.perf_counter() - start, 1),
                   machine={"platform": platform.platform(), "threads": torch.get_num_threads(),
                            "cuda": torch.cuda.is_available()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plain(results), indent=2, allow_nan=False))
    print(out, json.dumps({k: results[k] for k in ("targets", "pareto_front", "wall_seconds")}))
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=presets.PRESETS, default="smoke")
    parser.add_argument("--cohort", type=Path, default=None,
                        help="a cohort folder (slides/ + labels.csv, masks optional); default: "
                             "the preset's phantom and real-tissue cohorts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare.json"))
    args = parser.parse_args(argv)
    if args.cohort is not None:
        return {"cohort": compare(args.preset, presets.cohort(args.preset, args.cohort), args.out)}
    stem = args.out.with_suffix("")
    return {name: compare(args.preset, make(args.preset), Path(f"{stem}-{name}.json"))
            for name, make in (("phantom", presets.phantom_cohort),
                               ("real", presets.real_cohort))}


if __name__ == "__main__":
    main()
