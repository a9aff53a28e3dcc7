"""Download a CAMELYON16 subset (CC0) from the open S3 bucket and write its labels.csv.

    python data_scripts/download_camelyon16.py --first 40 --out data/camelyon16
    python data_scripts/download_camelyon16.py --names tumor_001 normal_001 test_001 --out data/c16

Labels: normal_* = 0, tumor_* = 1, test_* from CAMELYON16/evaluation/reference.csv. ``--first N``
takes training slides alternately from the two classes. Downloads resume and are size-checked.
"""

import argparse
import sys

from mini_kd.download import CAMELYON16_URL, download_camelyon16
from mini_kd.errors import MiniKDError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--names", nargs="+", help="slide names, e.g. tumor_001 normal_002")
    choice.add_argument("--first", type=int, help="how many training slides, both classes")
    parser.add_argument("--out", required=True, help="folder for the slides and labels.csv")
    parser.add_argument("--base-url", default=CAMELYON16_URL, help="the bucket's HTTPS address")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    args = parser.parse_args(argv)
    try:
        paths = download_camelyon16(args.out, names=args.names, first=args.first,
                                    base_url=args.base_url, seed=args.seed)
    except MiniKDError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(paths)} CAMELYON16 slides in {args.out}/slides, labels in {args.out}/labels.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
