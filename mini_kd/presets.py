"""The three sizes every notebook and benchmark comes in, and the cohorts each one uses.

- ``smoke``: what the tests run, at most about two minutes per notebook on two CPU cores;
- ``book``: the notebooks' defaults, what the book shows, at most about ten minutes per notebook
  on two CPU cores, large enough that the result tables mean something on the phantom;
- ``gpu``: a large phantom (or a public cohort, see the README) on one GPU.

A preset is a budget, not a cohort: every preset runs on any cohort folder (``slides/`` +
``labels.csv``, tumour masks optional). By default the notebooks of one preset share one phantom
cohort, generated once and cached under ``$MINI_KD_DATA/phantom/<preset>``; with
``MINI_KD_COHORT=FOLDER`` (or ``--cohort FOLDER`` on the command line) every preset runs on that
folder instead -- the real-tissue cohort, a public cohort, or a user's own slides (figures of
ground-truth tumour are then left out where there is none). :func:`real_cohort` gives the
real-tissue cohort of a preset (same layout, label maps included) beside the phantom.

Everything a preset sets lives here: the cohorts, the tile geometry of the MIL methods, and
each method's training schedule (:data:`SCHEDULES`, :func:`schedule`) and its values of what the
paper sets per dataset (:data:`CONFIGS`, :func:`config`); the methods' own configs keep the
papers' values.
"""

from __future__ import annotations

import os

from mini_kd.errors import MiniKDError
from mini_kd.paths import data_dir

PRESETS = ("smoke", "book", "gpu")

# The phantom of each preset, for the MIL methods and the side-by-side benchmark. The book's is
# calibrated so that the benchmark is not saturated: micro-metastases (tumour 0.15-2.5 % of the
# tissue, log-uniform; most tumour slides have no 128-px tile that is half tumour), mimics as
# close to tumour at low power as the phantom makes them (difficulty 1), and 80 slides, so that
# HR ABMIL's out-of-fold AUC lies near 0.9 with a 95 % interval narrower than ± 0.07 and LR ABMIL
# falls well below it (64 slides, 4 folds: 0.2-3 % gave 0.971, 0.1-2 % gave 0.865 ± 0.083, and
# LR ABMIL 0.455). `mini-kd phantom OUT --difficulty 0.5` gives back the easy phantom.
COHORTS = {
    "smoke": dict(n_slides=8, slide_size=1536, seed=0, difficulty=0.5),
    "book": dict(n_slides=80, slide_size=2048, seed=0, difficulty=1.0,
                 tumour_fraction=(0.0015, 0.025)),
    "gpu": dict(n_slides=200, slide_size=8192, seed=0, difficulty=0.5),
}
# ResKD's phantom: it learns from class-pure regions cut from the label maps, so its tumour foci
# are large enough (1-15 % of the tissue) for >= 100 labelled regions per class.
REGION_COHORTS = {**COHORTS, "book": dict(n_slides=48, slide_size=2560, seed=0, difficulty=0.5)}

# The real-tissue cohort (mini_kd.real_tissue) of each preset: slides of real scanned H&E. The
# book's is calibrated like the phantom: 80 slides of 2048 px, carcinoma 1-5 % of a tumour slide's
# tissue, so that HR ABMIL is not saturated (4 folds: AUC 0.890 [0.81, 0.96], LR ABMIL 0.464;
# 0.5-2.5 % gave 0.516, chance, and 3-8 % on 48 slides of 2560 px gave 1.000).
REAL_COHORTS = {
    "smoke": dict(n_slides=8, slide_size=2048, seed=0),
    "book": dict(n_slides=80, slide_size=2048, seed=0, tumour_fraction=(0.01, 0.05)),
    "gpu": dict(n_slides=200, slide_size=8192, seed=0),
}
# ResKD's real-tissue cohort: islands of 10-20 % of the tissue, so that 256-px regions that are
# mostly carcinoma exist (on the calibrated cohort's 2048-px slides, 1-5 % of the tissue is
# 0.25-1.3 regions of 256 px; at 3-8 % on 48 slides of 2560 px the book run found 30 tumour test
# regions, at 10-20 % every split holds 128 per class, the cap).
REAL_REGION_COHORTS = {**REAL_COHORTS, "book": dict(n_slides=48, slide_size=2560, seed=0,
                                                      tumour_fraction=(0.10, 0.20))}

# Tile geometry shared by the MIL notebooks, so that they share cached grids and features.
# The papers use 256-px tiles at 20x, 256-px tiles at 5x (each covering 4x4 HR tiles) and 16-px
# crops at 1.25x (each covering one HR tile). On a CPU the number of *pixels* encoded is the cost,
# so the CPU presets halve every side: the ratios, and so every correspondence, stay the same.
GEOMETRY = {
    "smoke": dict(hr_mag=20.0, hr_tile=128, lr_mag=5.0, lr_tile=128, screen_mag=1.25, screen_tile=8),
    "book": dict(hr_mag=20.0, hr_tile=128, lr_mag=5.0, lr_tile=128, screen_mag=1.25, screen_tile=8),
    "gpu": dict(hr_mag=20.0, hr_tile=256, lr_mag=5.0, lr_tile=256, screen_mag=1.25, screen_tile=16),
}


def check_preset(preset: str) -> str:
    """``preset`` if it is one of :data:`PRESETS`, else a clear error."""
    if preset not in PRESETS:
        raise MiniKDError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return preset


def phantom_cohort(preset: str, regions: bool = False):
    """The phantom cohort of ``preset`` (:data:`COHORTS`; with ``regions``, ResKD's
    :data:`REGION_COHORTS`), generated on first use, then loaded from the cache."""
    from mini_kd.phantom import ensure_cohort

    folder, settings = _cached_cohort(COHORTS, REGION_COHORTS, preset, regions)
    return ensure_cohort(data_dir() / "phantom" / folder, **settings)


def real_cohort(preset: str, regions: bool = False):
    """The real-tissue cohort of ``preset`` (:mod:`mini_kd.real_tissue`; with ``regions``,
    ResKD's :data:`REAL_REGION_COHORTS`), built on first use under
    ``$MINI_KD_DATA/real_cohort/<preset>[-regions]``, then loaded from the cache."""
    from mini_kd.real_tissue import ensure_real_cohort

    folder, settings = _cached_cohort(REAL_COHORTS, REAL_REGION_COHORTS, preset, regions)
    return ensure_real_cohort(data_dir() / "real_cohort" / folder, **settings)


def _cached_cohort(cohorts: dict, region_cohorts: dict, preset: str, regions: bool):
    """(folder name, settings) of ``preset``'s cohort: ``<preset>``, or ``<preset>-regions`` where
    ResKD's region cohort differs from the MIL methods' one."""
    settings = (region_cohorts if regions else cohorts)[check_preset(preset)]
    return (preset if settings == cohorts[preset] else f"{preset}-regions"), settings


def cohort(preset: str, folder=None, regions: bool = False):
    """The cohort a preset runs on: ``folder`` when given, else ``$MINI_KD_COHORT`` when set (a
    cohort folder: ``slides/`` + ``labels.csv``, as ``data_scripts/`` download them), else the
    preset's :func:`phantom_cohort` (``regions``: ResKD's)."""
    from mini_kd.phantom import load_cohort

    folder = folder or os.environ.get("MINI_KD_COHORT")
    if folder:
        check_preset(preset)
        return load_cohort(folder)
    return phantom_cohort(preset, regions)


def prepare(preset: str) -> dict:
    """Build every cohort the notebooks of ``preset`` read and cache the tile features they share:
    the 20x and 5x features (:data:`GEOMETRY`, EfficientNet-Lite0) of the MIL cohorts, which
    LRMIL, AHDMIL and the side-by-side benchmark all start from. What ``make data`` runs
    (``data_scripts/prepare_book.py``), so that each notebook starts from warm caches; a notebook
    run alone computes what is missing on first use. Returns {name: cohort}."""
    from mini_kd.encoders import build_encoder
    from mini_kd.features import cohort_features, cohort_grids

    cohorts = {"phantom": cohort(preset), "real tissue": real_cohort(preset),
               "phantom regions": cohort(preset, regions=True),
               "real-tissue regions": real_cohort(preset, regions=True)}
    lrmil = config("lrmil", preset)
    encoder = build_encoder(lrmil.encoder).eval()
    for name in ("phantom", "real tissue"):
        for mag, tile in ((lrmil.hr_mag, lrmil.hr_tile), (lrmil.lr_mag, lrmil.lr_tile)):
            cohort_features(cohorts[name], cohort_grids(cohorts[name], mag, tile, lrmil.min_tissue),
                            encoder)
    return cohorts


# Each method's schedule per preset: the fields of its ``Schedule`` dataclass that the preset
# changes (epochs, batches, tiles per stage, splits); the rest keep the Schedule's defaults.
SCHEDULES: dict[str, dict[str, dict]] = {
    "reskd": {
        # tests: one pass over a handful of 128-px regions, ≤ 2 minutes with the notebook around it
        "smoke": dict(region_size=128, region_stride=32, regions_per_class=24, epochs=2,
                      teacher_epochs=3, batch_size=32, accumulate=1, n_views=1,
                      unlabeled_slides=(0, 2), unlabeled_regions=16, bootstrap=1000),
        # the book: 256-px regions keep every student's maps above 1 x 1 down to ÷8 (64x fewer
        # FLOPs); a ÷N epoch costs about 1/N² of a teacher epoch, so the costly ÷2 and ÷4
        # students train fewer epochs
        "book": dict(region_size=256, region_stride=64, regions_per_class=128, epochs=8,
                     teacher_epochs=3, epochs_by_factor={2: 2, 4: 4}, batch_size=32, accumulate=1,
                     n_views=1, unlabeled_slides=(0, 12, 24), unlabeled_regions=16),
        # one GPU: a larger phantom, more regions and copies, the paper's schedule but shorter
        "gpu": dict(region_size=256, region_stride=64, regions_per_class=1024, epochs=30,
                    teacher_epochs=30, batch_size=32, accumulate=1, n_views=8,
                    unlabeled_slides=(0, 25, 50, 100), unlabeled_regions=64),
    },
    "lrmil": {
        # tests: a few MIL epochs and one stage-1 epoch on 16 5x tiles
        "smoke": dict(mil_epochs=6, patience=4, stage1_tiles=16, stage1_epochs=1, stage1_batch=8),
        # the book: stage 1 on 192 5x tiles of the training slides (3,072 20x children), 4 epochs
        "book": dict(mil_epochs=40, stage1_tiles=192, stage1_epochs=4, stage1_batch=24),
        "gpu": dict(mil_epochs=100, patience=20, stage1_tiles=4096, stage1_epochs=10,
                    stage1_batch=64),
    },
    "ahdmil": {
        # the paper: 200 epochs per step at lr 1e-5 on ~400 slides; on a few dozen phantom slides
        # the schedules are shorter and DB-LIPN's learning rate higher: it first falls to the
        # one-tile fallback (its targets S are mostly negative) and must climb out; at 3e-3 it
        # stayed there for all 8 book epochs on one of three seeds, at 1e-3 it left after one;
        # step 2 (one update per slide, per try) is most of the time: the book tries once (with
        # the operating threshold every fold passed the gate on its first try; the paper's rule
        # failed on both of two tries in 7 of 8 folds).
        # Step 1 in the book: 10 epochs with degree-3 CKA heads (CONFIGS below); at degree 12
        # DMIN on every tile scored AUC 0.575 after 6 epochs on the calibrated phantom and needed
        # ~18 epochs to learn (test AUC 1.00 / 0.98 on folds 0 / 1, 20 epochs)
        "smoke": dict(epochs=4, min_epochs=2, patience=None, step2_epochs=3, step2_patience=None,
                      dmin_lr=1e-4, lipn_lr=1e-3),
        "book": dict(epochs=10, min_epochs=5, patience=3, step2_epochs=4, step2_patience=None,
                     step2_restarts=0, dmin_lr=3e-5, lipn_lr=1e-3),
        "gpu": dict(epochs=100, min_epochs=20, patience=10, step2_epochs=50, step2_patience=10,
                    dmin_lr=1e-5, lipn_lr=1e-3),
    },
}

# Each method's values per preset of the Config fields a paper sets per dataset, on top of its
# defaults (the paper's): the same for every cohort a preset runs on, for the notebooks and for
# ``mini-kd train``. A method not named here runs on its paper's values.
CONFIGS: dict[str, dict[str, dict]] = {
    # the tiles that matter are a few per cent of a slide's tissue tiles (phantom ~14 %, real
    # tissue ~1 %), not Camelyon16's share, and a slide has tens to hundreds of tiles, not
    # thousands: mask_ratio 0.45 (at 0.6 DMIN fills the quota with near-zero logits no 1.25x
    # screen can predict), soft mode only (the hard mode's L1 between binarised outputs gave no
    # margin: the screen fell to the fallback in every run), a gate at 0.1 (the paper's 0.3 is
    # above the share that matters), k_sample 8, and the screen's operating threshold for 95 %
    # of DMIN's own mask (ours: mini_kd.methods.ahdmil's docstring); smoke: CKA heads of degree
    # 6, book: of degree 3 -- the paper's 12 needs many more epochs than the book's budget
    # (SCHEDULES above; the gpu preset keeps 12)
    "ahdmil": {
        "smoke": dict(mask_ratio=0.45, attn_ratio=1.0, keep_bounds=(0.1, 1.0), k_sample=8,
                      screen_recall=0.95, degree=6),
        "book": dict(mask_ratio=0.45, attn_ratio=1.0, keep_bounds=(0.1, 1.0), k_sample=8,
                     screen_recall=0.95, degree=3),
        "gpu": dict(mask_ratio=0.45, attn_ratio=1.0, keep_bounds=(0.1, 1.0), k_sample=8,
                    screen_recall=0.95),
    },
    # the gpu preset's 256-px tiles on large slides give bags of hundreds of 5x tiles: more tiles
    # per pseudo-label of L_hard
    "lrmil": {"gpu": dict(topk=8)},
}


def schedule(method: str, preset: str):
    """``method``'s ``Schedule`` for ``preset``."""
    from mini_kd.methods import method_module

    return method_module(method).Schedule(**SCHEDULES[method][check_preset(preset)])


def config(method: str, preset: str, **overrides):
    """``method``'s ``Config``: the paper's defaults, the preset's tile geometry (:data:`GEOMETRY`;
    the fields of the Config named like a GEOMETRY key), its :data:`CONFIGS`, then ``overrides``."""
    from dataclasses import fields

    from mini_kd.methods import method_module

    Config = method_module(method).Config
    names = {f.name for f in fields(Config)}
    geometry = {k: v for k, v in GEOMETRY[check_preset(preset)].items() if k in names}
    return Config(**{**geometry, **CONFIGS.get(method, {}).get(preset, {}), **overrides})
