"""ResKD: accuracy and FLOPs of the HR teacher, KD and CE students at ÷2..÷16, the KD student with
more unlabeled slides, and every network as a slide classifier with its seconds per slide.

Runs :func:`mini_kd.experiments.reskd.run_experiment`, the same function notebook 02 runs, and
writes its JSON, with the targets, met or not:

- the ÷8 student needs at least 64x fewer FLOPs (measured) and is within 2 accuracy points of
  the teacher;
- at every factor the KD student scores at least as well as the CE student.

Trained networks are checkpointed under $MINI_KD_DATA/reskd, so running this after the notebook
(same preset) reloads them instead of training again.

    python benchmarks/reskd.py --preset book --out benchmarks/results/reskd.json [--cohort FOLDER]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mini_kd.experiments.reskd import run_experiment
from mini_kd.presets import PRESETS, cohort


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="smoke")
    parser.add_argument("--cohort", type=Path, default=None,
                        help="a cohort folder (slides/ + labels.csv); default: the preset's phantom")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reskd.json"))
    args = parser.parse_args(argv)
    results = run_experiment(args.preset, cohort(args.preset, args.cohort)).to_json()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=False))
    print(json.dumps({key: results[key] for key in ("teacher", "region_scores", "unlabeled",
                                                    "targets", "seconds_experiment")}, indent=2))


if __name__ == "__main__":
    main()
