"""Build the real-tissue cohort: SVS-like 20x/5x/1.25x slides of real H&E, label maps, labels.csv.

    python data_scripts/build_real_cohort.py data/real_cohort --slides 48 --seed 0

The same as ``mini-kd real-cohort``; see :mod:`mini_kd.real_tissue` for the sources (the CC0
CMU-1-Small-Region scan, a carcinoma field from the BSD-3-Clause tiatoolbox wheel) and what the
slides contain.
"""

import argparse
import sys

from mini_kd.errors import MiniKDError
from mini_kd.real_tissue import make_real_cohort


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write the cohort to")
    parser.add_argument("--slides", type=int, default=48, help="number of slides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=2560, help="level-0 side of each slide in px")
    parser.add_argument("--tumour-fraction", type=float, nargs=2, metavar=("LO", "HI"),
                        default=(0.03, 0.08), help="each tumour slide's share of carcinoma is "
                        "drawn uniformly from [LO, HI] (the book's cohort: 0.01 0.05)")
    parser.add_argument("--data-dir", help="where the source images are cached")
    args = parser.parse_args(argv)
    try:
        cohort = make_real_cohort(args.out, n_slides=args.slides, seed=args.seed,
                                  slide_size=args.size, tumour_fraction=args.tumour_fraction,
                                  data_dir=args.data_dir)
    except MiniKDError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(cohort.slides)} real-tissue slides in {cohort.root}/slides, labels in "
          f"{cohort.root}/labels.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
