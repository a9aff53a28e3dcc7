"""Every bad input a user can hand us: one MiniKDError that says what is wrong and how to fix it.

One table per loader (each row: an input and a fragment of the expected message), then the CLI:
exit status 2, one line on stderr, no traceback, no output file, and every input byte-for-byte
as it was.
"""

import hashlib
import pickle
import re
import struct
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import tifffile
import torch

from mini_kd import MiniKDError
from mini_kd.cli import main
from mini_kd.features import load_features
from mini_kd.phantom import load_cohort
from mini_kd.pyramid import write_pyramid
from mini_kd.slides import open_slide
from mini_kd.tiling import TileGrid, tile_grid
from mini_kd.train import read_checkpoint

APERIO = "Aperio Image Library v11.2.1 \n400x600 [0,0 400x600] (240x240) JPEG/RGB Q=70|AppMag = {mag}|MPP = 0.499"


# -- inputs, made by hand --------------------------------------------------------------------------
def tissue(width, height):
    """A pink block of 'tissue' on white glass."""
    image = np.full((height, width, 3), 240, np.uint8)
    image[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = (200, 110, 170)
    return image


def aperio_like(path, mag=20):
    """An SVS laid out as Aperio writes it: pixels first, the page (IFD) after them, at the end.

    tifffile writes the IFD first, so its bytes are copied to the end of the file and the header
    pointed there (the IFD's own offsets still point at the pixel strips, which stay where they are).
    """
    tifffile.imwrite(path, tissue(400, 600), photometric="rgb", rowsperstrip=64,
                     description=APERIO.format(mag=mag))
    data = bytearray(path.read_bytes())
    first = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[first: first + 2])[0]
    ifd = data[first: first + 2 + 12 * entries + 4]  # entry count, entries, next-IFD offset
    data[4:8] = struct.pack("<I", len(data))
    path.write_bytes(bytes(data + ifd))
    return path


def first_half(path, out):
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def phantom_like(path):
    """A 20x pyramid as mini_kd writes it (pages first, then the JPEG tiles)."""
    return write_pyramid(path, tissue(512, 512), mpp=0.5, magnification=20)


def blank_slide(path):
    """A 20x pyramid of white glass: no tissue anywhere."""
    return write_pyramid(path, np.full((512, 512, 3), 245, np.uint8), mpp=0.5, magnification=20)


def digest(path):
    """sha256 of a file, or of every file under a folder (names included)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    sha = hashlib.sha256()
    for file in files:
        sha.update(str(file.relative_to(path.parent)).encode() + file.read_bytes())
    return sha.hexdigest()


def raises_and_leaves_unchanged(path, call, fragment):
    before = digest(path) if path.exists() else None
    with pytest.raises(MiniKDError, match=fragment):
        call()
    assert (digest(path) if path.exists() else None) == before


# -- open_slide ------------------------------------------------------------------------------------
def write_text(path, text):
    path.write_text(text)
    return path


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def a_folder(path):
    path.mkdir()
    return path


def png(path):
    from PIL import Image

    Image.fromarray(tissue(64, 64)).save(path, format="PNG")
    return path


def tiff_without_mpp(path):
    tifffile.imwrite(path, tissue(512, 512), tile=(256, 256), photometric="rgb")
    return path


def tiff_in_inches(path):  # 28.35 px/inch reads as 895.944 µm/px, as some exported TIFFs do
    tifffile.imwrite(path, tissue(512, 512), tile=(256, 256), photometric="rgb",
                     resolution=(28.35, 28.35), resolutionunit="INCH")
    return path


SLIDES = {  # name -> (make(path) -> path, open_slide keyword arguments, message fragment)
    "missing file": (lambda p: p, {}, "no slide at .*check the path"),
    "a folder": (a_folder, {}, "is a folder, not a slide file"),
    "empty file": (lambda p: write_bytes(p, b""), {}, r"is empty \(0 bytes\); download"),
    "text file": (lambda p: write_text(p, "these are not pixels"), {}, "cannot read .* as a slide"),
    "a PNG named .svs": (png, {}, "cannot read .* as a slide"),
    "12-byte TIFF header": (lambda p: write_bytes(p, b"II*\x00garbage!"), {},
                            r"truncated or damaged \(its first page is at byte 1651663207 but the "
                            r"file has 12 bytes\); download it again"),
    "first half of an Aperio-style SVS": (
        lambda p: first_half(aperio_like(p.with_name("whole.svs")), p), {},
        r"truncated or damaged \(its first page is at byte \d+ but the file has \d+ bytes\)"),
    "first half of a mini_kd pyramid": (
        lambda p: first_half(phantom_like(p.with_name("whole.svs")), p), {},
        r"is truncated: its image data ends at byte \d+ but the file has \d+ bytes"),
    "no mpp in the file": (tiff_without_mpp, {}, r"does not record its resolution \(mpp\); pass mpp"),
    "mpp in inches": (tiff_in_inches, {}, "the slide reports 895.944 µm/px .* outside the range"),
    "mpp override not a number": (phantom_like, {"mpp": "half"}, "is 'half', not a number"),
    "mpp override 0": (phantom_like, {"mpp": 0}, "the override gives 0 µm/px .* outside the range"),
    "magnification override 0": (phantom_like, {"magnification": 0},
                                 "the override gives 0x for level 0 .* outside the range"),
    "objective power 2000 in the file": (lambda p: aperio_like(p, mag=2000), {},
                                         "the slide reports 2000x .* pass the true value as magnification"),
}


@pytest.mark.parametrize("name", SLIDES)
def test_open_slide_refuses(tmp_path, name):
    make, kwargs, fragment = SLIDES[name]
    path = make(tmp_path / "slide.svs")
    raises_and_leaves_unchanged(path, lambda: open_slide(path, **kwargs), fragment)


def test_the_aperio_style_file_itself_opens(tmp_path):
    """The table's half-file fails for being half: the whole file is a good 20x slide."""
    with open_slide(aperio_like(tmp_path / "whole.svs")) as slide:
        assert slide.dimensions == (400, 600) and slide.mpp == pytest.approx(0.499)
        assert slide.magnification == 20
        assert slide.read(200, 300, 4, 20)[0, 0].tolist() == [200, 110, 170]


# -- tile_grid -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    return phantom_like(tmp_path_factory.mktemp("slide") / "block.svs")


TILE_ARGUMENTS = {  # name -> (tile_grid keyword arguments, message fragment)
    "tile size 0": (dict(mag=20, tile_size=0), "tile_size=0 must be a whole number of pixels >= 1"),
    "tile size -4": (dict(mag=20, tile_size=-4), "tile_size=-4 must be a whole number"),
    "tile size 2.5": (dict(mag=20, tile_size=2.5), "tile_size=2.5 must be a whole number"),
    "min tissue 2": (dict(mag=20, tile_size=64, min_tissue=2), r"min_tissue=2 .* must lie in \[0, 1\]"),
    "min tissue -0.1": (dict(mag=20, tile_size=64, min_tissue=-0.1), r"must lie in \[0, 1\]"),
    "mag 0": (dict(mag=0, tile_size=64), "mag=0 must be a positive magnification"),
    "mag -5": (dict(mag=-5, tile_size=64), "mag=-5 must be a positive magnification"),
    "mag 80 on a 20x scan": (dict(mag=80, tile_size=64),
                             r"scanned at 20x \(level 0\), so tiles at 80x would be the scan enlarged "
                             r"4 times.*choose mag <= 20, or pass allow_upsampling=True"),
    "under one level-0 pixel": (dict(mag=80, tile_size=1, allow_upsampling=True),
                                "covers less than one level-0 pixel"),
    "larger than the slide": (dict(mag=1.25, tile_size=256), "smaller than one tile"),
}


@pytest.mark.parametrize("name", TILE_ARGUMENTS)
def test_tile_grid_refuses(slide_path, name):
    kwargs, fragment = TILE_ARGUMENTS[name]
    with open_slide(slide_path) as slide:
        raises_and_leaves_unchanged(slide_path, lambda: tile_grid(slide, **kwargs), fragment)


def test_upsampling_is_allowed_when_asked(slide_path):
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, mag=40, tile_size=64, allow_upsampling=True)
    assert grid.footprint == 32 and len(grid) == 64  # the whole 256-px block: (256 / 32)^2 tiles


# -- TileGrid.load ---------------------------------------------------------------------------------
GOOD_ATTRIBUTES = dict(patch_size=64, patch_size_level0=64, target_magnification=20.0,
                       level0_magnification=20.0)


def h5(path, coords=((0, 0), (64, 0)), **attributes):
    """An HDF5 file with a 'coords' dataset (None: no dataset) and these attributes on it."""
    with h5py.File(path, "w") as f:
        if coords is not None:
            f.create_dataset("coords", data=np.asarray(coords)).attrs.update(attributes)
    return path


GRIDS = {  # name -> (make(path) -> path, message fragment)
    "missing file": (lambda p: p, "no tile grid at .*mini-kd tile"),
    "a folder": (a_folder, "no tile grid at"),
    "text file": (lambda p: write_text(p, "x,y\n0,0\n"), "is not a tile grid: not an HDF5 file"),
    "HDF5 without coords": (lambda p: h5(p, None), "is not a tile grid: it has no 'coords' dataset"),
    "coords (N, 3)": (lambda p: h5(p, [(0, 0, 0), (64, 0, 0)], **GOOD_ATTRIBUTES),
                      r"must be \(N, 2\) level-0 \(x, y\) corners, got shape \(2, 3\)"),
    "coords of half pixels": (lambda p: h5(p, [(0.5, 0), (64, 0)], **GOOD_ATTRIBUTES),
                              "must be whole level-0 pixels"),
    "no attributes": (lambda p: h5(p), "lacks the attribute.*patch_size, patch_size_level0"),
    "a text attribute": (lambda p: h5(p, **{**GOOD_ATTRIBUTES, "patch_size": "big"}),
                         "an attribute is not a number"),
    "tile size 0": (lambda p: h5(p, **{**GOOD_ATTRIBUTES, "patch_size": 0}),
                    "all must be positive"),
}


@pytest.mark.parametrize("name", GRIDS)
def test_tile_grid_load_refuses(tmp_path, name):
    make, fragment = GRIDS[name]
    path = make(tmp_path / "grid.h5")
    raises_and_leaves_unchanged(path, lambda: TileGrid.load(path), fragment)


def test_a_hand_made_grid_loads(tmp_path):
    grid = TileGrid.load(h5(tmp_path / "grid.h5", **GOOD_ATTRIBUTES, name="s1"))
    assert grid.coords.tolist() == [[0, 0], [64, 0]] and grid.slide_id == "s1"


def test_saving_a_grid_onto_a_folder_is_refused_and_a_save_leaves_no_partial_file(tmp_path):
    grid = TileGrid(np.array([[0, 0]]), 20.0, 64, 64, 20.0, "s")
    raises_and_leaves_unchanged(tmp_path, lambda: grid.save(tmp_path), "is a folder; give the grid a file name")
    path = grid.save(tmp_path / "new" / "grid.h5")
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.h5"]


# -- load_features ---------------------------------------------------------------------------------
def features_file(path, features=None, coords=None):
    with h5py.File(path, "w") as f:
        if features is not None:
            f.create_dataset("features", data=np.asarray(features, np.float32))
        if coords is not None:
            f.create_dataset("coords", data=np.asarray(coords, np.int64))
    return path


FEATURES = {  # name -> (make(path) -> path, message fragment)
    "missing file": (lambda p: p, "no features at .*mini-kd extract"),
    "text file": (lambda p: write_text(p, "1,2,3"), "is not an HDF5 features file"),
    "no features dataset": (lambda p: features_file(p, coords=[(0, 0)]),
                            r"lacks the 'features' \(N, D\) or 'coords' \(N, 2\) dataset"),
    "no coords dataset": (lambda p: features_file(p, features=[[1.0, 2.0]]), "lacks the 'features'"),
    "3 feature rows for 2 tiles": (lambda p: features_file(p, np.ones((3, 4)), [(0, 0), (64, 0)]),
                                   r"features of shape \(3, 4\) for coords of shape \(2, 2\)"),
    "features of one dimension": (lambda p: features_file(p, np.ones(2), [(0, 0), (64, 0)]),
                                  r"features of shape \(2,\)"),
    "coords (N, 3)": (lambda p: features_file(p, np.ones((2, 4)), np.zeros((2, 3))),
                      r"coords of shape \(2, 3\)"),
}


@pytest.mark.parametrize("name", FEATURES)
def test_load_features_refuses(tmp_path, name):
    make, fragment = FEATURES[name]
    path = make(tmp_path / "features.h5")
    raises_and_leaves_unchanged(path, lambda: load_features(path), fragment)


def test_hand_made_features_load_as_float32_rows_of_their_tiles(tmp_path):
    features, coords = load_features(features_file(tmp_path / "f.h5", [[1, 2], [3, 4]], [(0, 0), (64, 0)]))
    assert features.dtype == torch.float32 and features.tolist() == [[1, 2], [3, 4]]
    assert coords.tolist() == [[0, 0], [64, 0]]


# -- read_checkpoint -------------------------------------------------------------------------------
def half_of_a_checkpoint(path):
    torch.save({"model": {"w": torch.ones(64)}}, path.with_name("whole.pt"))
    return first_half(path.with_name("whole.pt"), path)


def saved(obj, path):
    torch.save(obj, path)
    return path


CHECKPOINTS = {  # name -> (make(path) -> path, message fragment)
    "missing file": (lambda p: p, "no LRMIL checkpoint at .*; train one"),
    "a folder": (a_folder, "is a folder, not a LRMIL checkpoint file"),
    "empty file": (lambda p: write_bytes(p, b""), r"is empty \(0 bytes\), not a LRMIL checkpoint"),
    "text file": (lambda p: write_text(p, "weights: none\n"),
                  "is not a readable LRMIL checkpoint .*not written by torch.save, or damaged"),
    "first half of a checkpoint": (half_of_a_checkpoint, "is not a readable LRMIL checkpoint"),
    "a plain pickle": (lambda p: write_bytes(p, pickle.dumps({"w": 1}, protocol=4)),
                       "is not a readable LRMIL checkpoint"),
    "a list, not a dict": (lambda p: saved([1, 2], p), "holds a list, not a LRMIL checkpoint"),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_read_checkpoint_refuses(tmp_path, name):
    make, fragment = CHECKPOINTS[name]
    path = make(tmp_path / "model.pt")
    raises_and_leaves_unchanged(path, lambda: read_checkpoint(path, "LRMIL", "train one"), fragment)


# -- load_cohort (labels.csv) ----------------------------------------------------------------------
def cohort(root, labels="slide_id,label,split\na,0,train\nb,1,val\n", slides=("a", "b")):
    """A cohort folder: ``labels.csv`` with this text (None: none) and empty ``slides/<id>.svs``
    (slides=None: no slides/ folder)."""
    root.mkdir()
    if labels is not None:
        (root / "labels.csv").write_bytes(labels.encode() if isinstance(labels, str) else labels)
    if slides is not None:
        (root / "slides").mkdir()
        for slide_id in slides:
            (root / "slides" / f"{slide_id}.svs").write_bytes(b"")
    return root


COHORTS = {  # name -> (make(root) -> root, message fragment)
    "no folder": (lambda r: r, r"no cohort folder at .*\(a folder with slides/ and labels.csv\)"),
    "no labels.csv": (lambda r: cohort(r, labels=None), "no labels.csv in .*mini-kd phantom"),
    "empty labels.csv": (lambda r: cohort(r, labels=""),
                         "has no column slide_id, label, split .*header is empty"),
    "a column missing": (lambda r: cohort(r, labels="slide_id,label\na,0\nb,1\n"),
                         "has no column split .*header is slide_id,label.*must be slide_id,label,split"),
    "header only": (lambda r: cohort(r, labels="slide_id,label,split\n"), "lists no slides"),
    "a row cut short": (lambda r: cohort(r, labels="slide_id,label,split\na,0,train\nb,1\n"),
                        "line 3 of .* has no split"),
    "label 'tumour'": (lambda r: cohort(r, labels="slide_id,label,split\na,0,train\nb,tumour,val\n"),
                       "line 3 of .* has label 'tumour'; a label is 0 .* or 1"),
    "label 2": (lambda r: cohort(r, labels="slide_id,label,split\na,0,train\nb,2,val\n"),
                "has label '2'"),
    "split 'training'": (lambda r: cohort(r, labels="slide_id,label,split\na,0,training\nb,1,val\n"),
                         "line 2 of .* has split 'training'; a split is one of train, val, test"),
    "duplicate ids": (lambda r: cohort(r, labels="slide_id,label,split\na,0,train\na,1,val\nb,1,val\n"),
                      "lists 'a' more than once"),
    "one class only": (lambda r: cohort(r, labels="slide_id,label,split\na,1,train\nb,1,val\n"),
                       "every slide of .* has label 1; .*both classes"),
    "an unknown slide id": (lambda r: cohort(r, labels="slide_id,label,split\na,0,train\nc,1,val\n"),
                            "1 slides of .* are missing from .*slides .*e.g. c"),
    "no slides folder": (lambda r: cohort(r, slides=None), "has no slides/ folder"),
    "slides folder empty": (lambda r: cohort(r, slides=()), "2 slides of .* are missing"),
    "not text": (lambda r: cohort(r, labels=b"\xff\xfe\x00\x81binary"), "is not a text CSV file"),
}


@pytest.mark.parametrize("name", COHORTS)
def test_load_cohort_refuses(tmp_path, name):
    make, fragment = COHORTS[name]
    root = make(tmp_path / "cohort")
    raises_and_leaves_unchanged(root, lambda: load_cohort(root), fragment)


def test_a_spreadsheet_labels_csv_with_a_bom_and_blank_lines_loads(tmp_path):
    root = cohort(tmp_path / "cohort", labels="\ufeffslide_id,label,split\r\na, 0 ,train\r\n\r\nb,1,val\r\n")
    loaded = load_cohort(root)
    assert loaded.ids() == ["a", "b"] and loaded.labels(["a", "b"]).tolist() == [0, 1]


# -- the CLI: exit 2, one line, no traceback, nothing written, inputs unchanged --------------------
@pytest.fixture(scope="module")
def lrmil_checkpoint(tmp_path_factory):
    """A tiny but real LRMIL checkpoint (untrained), so that predict gets past loading it."""
    from mini_kd.encoders import build_encoder
    from mini_kd.methods import lrmil

    torch.manual_seed(0)
    tiny = dict(widths=(8, 8, 8, 8), groups=4)
    config = lrmil.Config(hr_tile=32, lr_tile=32, encoder="tiny_resnet_gn", hidden=8)
    trained = lrmil.Trained(config, build_encoder("tiny_resnet_gn", pretrained=False, **tiny),
                            lrmil.StudentABMIL(8, 2, hidden=8), tiny)
    return trained.save(tmp_path_factory.mktemp("lrmil") / "tiny.pt")


@pytest.fixture
def given(tmp_path, slide_path, lrmil_checkpoint):
    """The inputs of the CLI table, made afresh in ``tmp_path``."""
    return SimpleNamespace(
        slide=slide_path, checkpoint=lrmil_checkpoint, tmp=tmp_path,
        half_svs=first_half(aperio_like(tmp_path / "whole.svs"), tmp_path / "half.svs"),
        header=write_bytes(tmp_path / "header.svs", b"II*\x00garbage!"),
        text=write_text(tmp_path / "notes.svs", "not a slide"),
        bare=tiff_without_mpp(tmp_path / "bare.tif"),
        text_checkpoint=write_text(tmp_path / "model.pt", "not weights"),
        folder=a_folder(tmp_path / "existing"),
        user_cohort=cohort(tmp_path / "user_cohort"),
        no_slides=a_folder(tmp_path / "no_slides"),
        blank=blank_slide(tmp_path / "blank.svs"),
        grid=tmp_path / "out" / "g.h5", csv=tmp_path / "out" / "p.csv",
    )


CLI = {  # name -> (given -> (argv, inputs that must stay unchanged, outputs that must not appear), fragment)
    "info: first half of an SVS": (lambda g: (["info", g.half_svs], [g.half_svs], []),
                                   "is truncated or damaged"),
    "info: 12-byte TIFF": (lambda g: (["info", g.header], [g.header], []), "is truncated or damaged"),
    "info: missing file": (lambda g: (["info", g.tmp / "nope.svs"], [], []), "no slide at"),
    "info: --magnification 0": (lambda g: (["info", g.slide, "--magnification", "0"], [g.slide], []),
                                "argument --magnification: 0 is not a magnification"),
    "tile: first half of an SVS": (lambda g: (["tile", g.half_svs, "--out", g.grid], [g.half_svs], [g.grid]),
                                   "is truncated or damaged"),
    "tile: text file": (lambda g: (["tile", g.text, "--out", g.grid], [g.text], [g.grid]), "cannot read"),
    "tile: no mpp": (lambda g: (["tile", g.bare, "--out", g.grid], [g.bare], [g.grid]),
                     "does not record its resolution"),
    "tile: --mpp 500": (lambda g: (["tile", g.slide, "--mpp", "500", "--out", g.grid], [g.slide], [g.grid]),
                        "the override gives 500 µm/px .* outside the range"),
    "tile: --mag 80 on 20x": (lambda g: (["tile", g.slide, "--mag", "80", "--out", g.grid], [g.slide], [g.grid]),
                              "scanned at 20x .*--allow-upsampling"),
    "tile: --tile-size 0": (lambda g: (["tile", g.slide, "--tile-size", "0", "--out", g.grid], [g.slide], [g.grid]),
                            "argument --tile-size: 0 is not a tile size"),
    "tile: --tile-size -4": (lambda g: (["tile", g.slide, "--tile-size", "-4", "--out", g.grid], [g.slide],
                                        [g.grid]), "argument --tile-size: -4 is not a tile size"),
    "tile: --min-tissue 2": (lambda g: (["tile", g.slide, "--min-tissue", "2", "--out", g.grid], [g.slide],
                                        [g.grid]), r"argument --min-tissue: 2 is not a fraction in \[0, 1\]"),
    "tile: --out is the slide": (lambda g: (["tile", g.slide, "--out", g.slide], [g.slide], []),
                                 "is an input .*choose another file name"),
    "tile: --out is a folder": (lambda g: (["tile", g.slide, "--out", g.folder], [g.slide, g.folder], []),
                                "is a folder; give a file name"),
    "phantom: too few slides": (lambda g: (["phantom", g.tmp / "new", "--slides", "2"], [], [g.tmp / "new"]),
                                "n_slides >= 6"),
    "phantom: OUT is a file": (lambda g: (["phantom", g.text], [g.text], []), "is a file; give a folder"),
    "phantom: OUT holds a user's cohort": (lambda g: (["phantom", g.user_cohort], [g.user_cohort], []),
                                           "not a phantom .*would replace its labels"),
    "fetch-sample: --data-dir is a file": (lambda g: (["fetch-sample", "--data-dir", g.text], [g.text], []),
                                           "is a file; give a folder"),
    "predict: text checkpoint": (lambda g: (["predict", "lrmil", g.text_checkpoint, g.slide, "--out", g.csv],
                                            [g.text_checkpoint, g.slide], [g.csv]),
                                 "not a readable lrmil checkpoint"),
    "predict: missing slide": (lambda g: (["predict", "lrmil", g.checkpoint, g.tmp / "nope.svs", "--out", g.csv],
                                          [g.checkpoint], [g.csv]), "no slide or folder at"),
    "predict: folder without slides": (lambda g: (["predict", "lrmil", g.checkpoint, g.no_slides, "--out",
                                                   g.csv], [g.checkpoint], [g.csv]), "no slide files"),
    "predict: --out is the checkpoint": (lambda g: (["predict", "lrmil", g.checkpoint, g.slide, "--out",
                                                     g.checkpoint], [g.checkpoint, g.slide], []), "is an input"),
    "predict: a slide without tissue": (lambda g: (["predict", "lrmil", g.checkpoint, g.blank, "--out", g.csv],
                                                   [g.checkpoint, g.blank], [g.csv]),
                                        "nothing to classify"),  # its grid's warning is not printed
    "predict: first half of an SVS": (lambda g: (["predict", "lrmil", g.checkpoint, g.half_svs, "--out", g.csv],
                                                 [g.checkpoint, g.half_svs], [g.csv]), "is truncated or damaged"),
}


def run_cli(argv, capsys):
    """(exit status, stderr) of ``mini-kd argv``; argparse's own errors exit through SystemExit."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("name", CLI)
def test_cli_refuses_with_one_line_and_exit_2(given, capsys, name):
    make, fragment = CLI[name]
    argv, inputs, outputs = make(given)
    before = {path: digest(path) for path in inputs}
    status, err = run_cli(argv, capsys)
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if "argument --" in fragment:  # argparse: its usage lines, then one error line
        assert lines[0].startswith("usage: mini-kd") and lines[-1].startswith("mini-kd ")
    else:
        assert len(lines) == 1 and lines[0].startswith("mini-kd: error: ")
    assert re.search(fragment, lines[-1])
    assert not any(path.exists() for path in outputs)
    assert {path: digest(path) for path in inputs} == before


def test_cli_tile_creates_the_out_folder_and_upsamples_only_when_allowed(tmp_path, slide_path, capsys):
    out = tmp_path / "new" / "folder" / "g.h5"
    status, _ = run_cli(["tile", slide_path, "--mag", "40", "--tile-size", "64", "--allow-upsampling",
                         "--out", out], capsys)
    assert status == 0 and TileGrid.load(out).footprint == 32


def test_cli_prints_a_warning_on_one_line(tmp_path, capsys):
    status, err = run_cli(["tile", blank_slide(tmp_path / "blank.svs"), "--out", tmp_path / "g.h5"], capsys)
    assert status == 0
    assert err.strip().splitlines() == ["mini-kd: warning: blank: no tile has 50% tissue; the grid is empty"]
