"""Generate the phantom cohort: SVS-like 20x/5x/1.25x slides, tumour label maps and labels.csv.

    python data_scripts/build_phantom.py data/phantom --slides 24 --seed 0 --difficulty 0.5

The same as ``mini-kd phantom``; see :mod:`mini_kd.phantom` for what the slides contain.
"""

import argparse
import sys

from mini_kd.errors import MiniKDError
from mini_kd.phantom import make_cohort


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write the cohort to")
    parser.add_argument("--slides", type=int, default=24, help="number of slides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=float, default=0.5, help="0 (easy) to 1 (hard)")
    parser.add_argument("--size", type=int, default=3072, help="level-0 side of each slide in px")
    parser.add_argument("--tumour-fraction", type=float, nargs=2, metavar=("LO", "HI"),
                        help="each tumour slide's share of tumour, log-uniform in [LO, HI]")
    args = parser.parse_args(argv)
    try:
        cohort = make_cohort(args.out, n_slides=args.slides, seed=args.seed,
                             difficulty=args.difficulty, slide_size=args.size,
                             tumour_fraction=args.tumour_fraction)
    except MiniKDError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(cohort.slides)} phantom slides in {cohort.root}/slides, labels in "
          f"{cohort.root}/labels.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
