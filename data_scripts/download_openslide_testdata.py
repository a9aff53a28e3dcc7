"""Download OpenSlide test slides by their path in the test-data folder, SHA-256-checked.

    python data_scripts/download_openslide_testdata.py Aperio/CMU-1.svs --out data/openslide

Paths and checksums come from the folder's index.json; each file lands at OUT/PATH.
"""

import argparse
import sys

from mini_kd.download import OPENSLIDE_TESTDATA_URL, download_openslide_testdata
from mini_kd.errors import MiniKDError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="e.g. Aperio/CMU-1.svs")
    parser.add_argument("--out", required=True, help="folder to download into")
    parser.add_argument("--base-url", default=OPENSLIDE_TESTDATA_URL,
                        help="the test-data folder's address")
    args = parser.parse_args(argv)
    try:
        paths = download_openslide_testdata(args.paths, args.out, base_url=args.base_url)
    except MiniKDError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(paths)} OpenSlide test slides: " + ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
