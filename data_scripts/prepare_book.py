"""Build the cohorts a preset's notebooks read and cache the tile features they share.

    python data_scripts/prepare_book.py --preset book

What ``make data`` runs before the book: the phantom and real-tissue cohorts (and ResKD's region
cohorts), then the 20x and 5x EfficientNet-Lite0 features of the two MIL cohorts, which notebooks
03-05 share (:func:`mini_kd.presets.prepare`). Data goes to ``$MINI_KD_DATA``. Everything done
before is skipped, so an interrupted run carries on where it stopped.
"""

import argparse
import sys
import time

from mini_kd.errors import MiniKDError
from mini_kd.presets import PRESETS, prepare


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="book")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        cohorts = prepare(args.preset)
    except MiniKDError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(cohorts)} cohorts of the {args.preset} preset ready, features cached, in "
          f"{time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{name} ({c.root})" for name, c in cohorts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
