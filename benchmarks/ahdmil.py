"""AHDMIL: AUC, accuracy and seconds per slide of DMIN on every tile and of AHDMIL, measured in one
run on the same slides, with the keep rate and the tumour recall of the screen.

Runs :func:`mini_kd.experiments.ahdmil.run_experiment`, the same function notebook 04 runs, and
writes its JSON, with the targets, met or not: AHDMIL at least 2x faster than DMIN on every tile,
an AUC at least DMIN's, at least 95 % of the tumour tiles kept (cohorts with label maps).

    python benchmarks/ahdmil.py --preset book --out benchmarks/results/ahdmil.json [--cohort FOLDER]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mini_kd.experiments.ahdmil import run_experiment
from mini_kd.presets import PRESETS, cohort


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--cohort", type=Path, default=None,
                        help="a cohort folder (slides/ + labels.csv); default: the preset's phantom")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ahdmil.json"))
    args = parser.parse_args(argv)
    results = run_experiment(args.preset, cohort(args.preset, args.cohort)).to_json()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=False))
    print(json.dumps({key: results[key] for key in ("dmin_all", "ahdmil", "targets",
                                                    "seconds_experiment") if key in results}, indent=2))


if __name__ == "__main__":
    main()
