"""Download TCGA-NSCLC diagnostic slides (LUSC = 0, LUAD = 1) through the GDC API, with labels.csv.

    python data_scripts/download_tcga_nsclc.py --n-per-class 50 --out data/tcga_nsclc --seed 0

Open-access SVS diagnostic slides, one per patient, drawn with the seed; MD5 and size are checked;
labels.csv holds a seeded train/val/test split stratified by class. The label map is AHDMIL's.
"""

import argparse
import sys

from mini_kd.download import GDC_API_URL, download_tcga_nsclc
from mini_kd.errors import MiniKDError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-per-class", type=int, default=10, help="patients per class")
    parser.add_argument("--out", required=True, help="folder for the slides and labels.csv")
    parser.add_argument("--api-url", default=GDC_API_URL, help="the GDC API's address")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice and the split")
    args = parser.parse_args(argv)
    try:
        paths = download_tcga_nsclc(args.out, n_per_class=args.n_per_class, seed=args.seed,
                                    api_url=args.api_url)
    except MiniKDError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(paths)} TCGA-NSCLC slides in {args.out}/slides, labels in {args.out}/labels.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
