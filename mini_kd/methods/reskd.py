r"""ResKD: resolution-based knowledge distillation, label-free (DiPalma et al. 2021).

"Resolution-Based Distillation for Efficient Histology Image Classification", Artificial
Intelligence in Medicine 119:102136 (2021), arXiv 2101.04170.

**The idea.** A network that sees an image at magnification m is expensive: a fully
convolutional network costs in proportion to its input's pixels. The same tissue at m / N has
N² times fewer pixels. ResKD trains a *teacher* f_t on the high-resolution (HR) image x (S x S
px at m) with labels, freezes it, and then trains a *student* f_s -- the same architecture -- on
the low-resolution (LR) view of the same image x↓N (S/N x S/N px at m / N) to imitate the
teacher. The student never sees a label, so any unlabeled image can train it.

**The networks.** Teacher and student are :class:`~mini_kd.encoders.TinyResNetGN` (one GroupNorm
BasicBlock per stage, widths 32/64/128/256); each returns its last feature map and its logits,

    (F_t, z_t) = f_t(x),    F_t ∈ R^{256 x h_t x w_t},      (F_s, z_s) = f_s(x↓N),    F_s ∈ R^{256 x h_s x w_s}.

**The losses** (the paper's "soft loss" and "pixel-wise loss"; their sum, with no
cross-entropy term, is the student's whole objective):

    L_soft = T² · KL( softmax(z_t / T) ‖ softmax(z_s / T) )                      (T = 1)
    L_pix  = ℓ( F_s, g(F_t) ),   ℓ = mean squared error (or L1),
             g(F) = ½ ( AdaptiveMaxPool_{h_s x w_s}(F) + Bicubic_{h_s x w_s}(F) )
    L_KD   = L_soft + L_pix

The baselines use labels y: the teacher minimises L_CE(z_t, y); the *CE student*, the same
network on the same LR views, minimises L_CE(z_s, y) without a teacher.

**The cost.** With every map larger than 1 x 1, each layer of the student does 1/N² of the
teacher's work: FLOPs(f_s) = FLOPs(f_t) / N². Once a stage's map shrinks to a single position it
cannot shrink further, so a small input saves less (:func:`measure_flops` measures it).

**The task on the phantom.** Class-pure square regions (normal tissue, mimic, tumour) are drawn
from the phantom's label maps, their corners on a lattice finer than a region (so neighbours may
overlap), a fixed number per split and class with the slides taking turns; the teacher sees them
at 20x, students at 10x, 5x, 2.5x and 1.25x (N = 2, 4, 8, 16). Labeled regions come from the
training slides, validation and test regions from the validation and test slides; the unlabeled
pool comes from a second phantom cohort whose label maps are never opened.

**Deviations from the authors' code** (which does not run as published; see the paper notes):

1. Inputs are fixed-size regions, not whole tissue images of varying size, so the presets
   train on batches of regions. The paper's path -- batches of one image with the gradients of
   32 accumulated (``batch_size=1, accumulate=32``, the defaults of :class:`ResKDConfig`) -- is
   kept; GroupNorm normalises each image alone and both losses are batch means, so the two give
   the same gradients (tested).
2. g averages max-pooling and bicubic resizing, as the authors meant; their code's ``elif``
   uses max-pooling only (fixed in :func:`mini_kd.kd.feature_map_loss`).
3. Augmentation (random flips and colour jitter, drawn once and applied to the HR image and all
   its LR views alike) makes ``n_views`` copies of every region up front. The teacher is frozen,
   so its outputs on a copy never change: they are computed once (:func:`teacher_targets`), not
   once per epoch. The paper draws fresh augmentations every epoch.
4. Images are normalised with the ImageNet statistics (:func:`mini_kd.data.to_tensor`, the one
   place that normalises), not with per-dataset statistics.
5. Model selection: the teacher and the CE students keep the epoch with the best validation
   balanced accuracy; the KD students keep the epoch with the lowest validation L_KD, so a
   student is trained *and* selected without a label. The paper scores every epoch on the
   validation set; how it selected is not stated.
6. Fewer epochs than the paper's 100 on the CPU presets, and fewer still for the costly ÷2 and
   ÷4 students (``epochs_by_factor``); the KD and CE students of a factor train equally long.
7. LR views are read from the slide pyramid (the phantom stores 20x, 5x, 1.25x; 10x and 2.5x
   come from the next finer level, box-filtered). How the paper made its LR images is not
   stated; software resizing of the HR view (``view_source="resize"``) is the alternative, and
   the experiment scores every student on both.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mini_kd.data import PairedViews, paired_transform, region_views, to_tensor
from mini_kd.encoders import TinyResNetGN
from mini_kd.errors import MiniKDError
from mini_kd.evaluate import bootstrap_ci, classification_metrics, count_flops, plain
from mini_kd.inference import StageTimer
from mini_kd.kd import feature_map_loss, soft_target_loss
from mini_kd.paths import data_dir
from mini_kd.progress import progress
from mini_kd.slides import open_slide
from mini_kd.tiling import tile_grid
from mini_kd.runtime import pick_device, seed_everything, write_atomically
from mini_kd.train import (FitConfig, fit, foreign_checkpoint, freeze, load_checkpoint,
                           read_checkpoint, write_checkpoint)

CLASSES = ("normal", "mimic", "tumour")  # region class c = phantom label-map code c + 1
MIN_INPUT_PX = 8  # smallest side a TinyResNetGN input may have, see check_input_size


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class ResKDConfig:
    """One ResKD experiment. Defaults are the paper's where it states one (marked "paper")."""

    # the task: class-pure regions of the phantom cohort of ``preset``
    preset: str = "book"
    region_size: int = 256           # HR side in px at hr_mag; the ÷N student sees region_size / N
    hr_mag: float = 20.0             # the teacher's magnification (the phantom's level 0)
    factors: tuple[int, ...] = (2, 4, 8, 16)   # students at 10x, 5x, 2.5x, 1.25x
    region_stride: int = 64          # labeled regions' corners lie on this lattice (px at hr_mag)
    purity: float = 0.6              # a labeled region's class covers at least this fraction of it
    min_tissue: float = 0.5          # tissue fraction of every unlabeled region and predicted one
    regions_per_class: int = 128     # at most this many labeled regions per split and class
    view_source: str = "pyramid"     # LR views read from the pyramid ("pyramid") or "resize"d
    # the losses (paper: T = 1, L2, "maxpool+bicubic")
    temperature: float = 1.0
    feature_loss: str = "l2"
    resize: str = "both"
    # the schedule (paper: Adam, lr 1e-3, weight decay 1e-4, 100 epochs, 1 image x 32 accumulated)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 100                # student epochs, over all augmented copies
    teacher_epochs: int = 100
    epochs_by_factor: dict[int, int] = field(default_factory=dict)   # fewer epochs for some ÷N
    batch_size: int = 1
    accumulate: int = 32
    # augmentation (paper: random flips + ColorJitter(0.5, 0.5, 0.5, 0.2), the same on both views)
    flips: bool = True
    jitter: tuple[float, float, float, float] | None = (0.5, 0.5, 0.5, 0.2)
    n_views: int = 4                 # augmented copies of every region (deviation 3)
    # the unlabeled-scaling experiment
    unlabeled_slides: tuple[int, ...] = (0, 8, 16, 32)   # extra unlabeled slides per student
    unlabeled_factor: int = 16       # the student that gets them (the paper: its lowest magnification)
    unlabeled_regions: int = 32      # regions drawn per unlabeled slide
    unlabeled_seed: int = 1          # seed of the second phantom cohort
    # evaluation and bookkeeping
    bootstrap: int = 10_000          # paper: 10,000 class-balanced resamples
    seed: int = 0
    device: str | None = None
    checkpoint_dir: str | None = None   # None: $MINI_KD_DATA/reskd/<preset>-<config hash>

    def __post_init__(self):
        self.factors = tuple(int(f) for f in self.factors)
        self.unlabeled_slides = tuple(int(n) for n in self.unlabeled_slides)
        self.epochs_by_factor = {int(n): int(e) for n, e in self.epochs_by_factor.items()}
        self.jitter = None if self.jitter is None else tuple(self.jitter)
        for factor in (*self.factors, self.unlabeled_factor):
            check_input_size(self.region_size, factor)


PRESETS = {
    # tests: one pass over a handful of regions, ≤ 2 minutes with the notebook around it
    "smoke": dict(region_size=128, region_stride=32, regions_per_class=24, epochs=2,
                  teacher_epochs=3, batch_size=32, accumulate=1, n_views=1,
                  unlabeled_slides=(0, 2), unlabeled_regions=16, bootstrap=1000),
    # the book: ≤ 10 minutes on two CPU cores. 256-px regions keep every student's maps above
    # 1 x 1 down to ÷8 (64x fewer FLOPs); a ÷N epoch costs about 1/N² of a teacher epoch, so the
    # costly ÷2 and ÷4 students train fewer epochs (the chapter's Results give the runs)
    "book": dict(region_size=256, region_stride=64, regions_per_class=128, epochs=30,
                 teacher_epochs=4, epochs_by_factor={2: 8, 4: 15}, batch_size=32, accumulate=1,
                 n_views=2, unlabeled_slides=(0, 6, 12, 24), unlabeled_regions=16,
                 bootstrap=10_000),
    # one GPU: a larger phantom, more regions and copies, the paper's schedule but shorter
    "gpu": dict(region_size=256, region_stride=64, regions_per_class=1024, epochs=30,
                teacher_epochs=30, batch_size=32, accumulate=1, n_views=8,
                unlabeled_slides=(0, 25, 50, 100), unlabeled_regions=64, bootstrap=10_000),
}


def config_for(preset: str, **overrides) -> ResKDConfig:
    """The :class:`ResKDConfig` of ``preset`` ("smoke", "book", "gpu"), with ``overrides``."""
    from mini_kd.presets import check_preset

    return ResKDConfig(preset=check_preset(preset), **{**PRESETS[preset], **overrides})


def check_input_size(region_size: int, factor: int) -> int:
    """The ÷``factor`` view's side in px, or a :class:`MiniKDError` if the student cannot take it.

    TinyResNetGN starts with a 7 x 7 convolution of stride 2 and a 3 x 3 max-pool of stride 2. An
    input of at least 8 px is the smallest for which that stem sees a whole 7 x 7 window of real
    pixels and still hands a 2 x 2 map to the residual stages; below it every stage sees one
    position made mostly of zero padding. 128-px regions at 20x give 8 px at 1.25x (÷16).
    """
    if factor < 1 or region_size % factor:
        raise MiniKDError(f"a {region_size}-px region cannot be viewed at 1/{factor} of its "
                          f"magnification: choose a region size divisible by {factor}")
    side = region_size // factor
    if side < MIN_INPUT_PX:
        raise MiniKDError(
            f"a {region_size}-px region at 1/{factor} of its magnification is {side} px, smaller "
            f"than the student's minimum input of {MIN_INPUT_PX} px (its 7x7 stride-2 stem); use "
            f"regions of at least {MIN_INPUT_PX * factor} px or a smaller factor")
    return side


# -- the task: regions at every magnification ------------------------------------------------------
@dataclass
class Regions:
    """M square regions: where they are, their class (or None: unlabeled), and their views.

    ``views[N]`` holds the regions at 1/N of the HR magnification, uint8 (M, S/N, S/N, 3);
    ``views[1]`` is the HR view. All views of row m cover the same level-0 square.
    """

    slide_ids: np.ndarray                 # (M,) str
    coords: np.ndarray                    # (M, 2) int64 level-0 top-left corners
    labels: np.ndarray | None             # (M,) int64 index into CLASSES, or None
    views: dict[int, np.ndarray] = field(repr=False)

    def __len__(self) -> int:
        return len(self.coords)

    def take(self, rows) -> "Regions":
        """The regions at ``rows`` (indices or a boolean mask)."""
        labels = None if self.labels is None else self.labels[rows]
        return Regions(self.slide_ids[rows], self.coords[rows], labels,
                       {n: v[rows] for n, v in self.views.items()})

    @staticmethod
    def concat(parts: list["Regions"]) -> "Regions":
        """The rows of every part, in order; labels only if every part has them."""
        labeled = all(p.labels is not None for p in parts)
        return Regions(np.concatenate([p.slide_ids for p in parts]),
                       np.concatenate([p.coords for p in parts]),
                       np.concatenate([p.labels for p in parts]) if labeled else None,
                       {n: np.concatenate([p.views[n] for p in parts]) for n in parts[0].views})


def _all_factors(config: ResKDConfig) -> list[int]:
    return sorted(set(config.factors) | {config.unlabeled_factor})


def _read_views(slide, coords, config: ResKDConfig, source: str) -> dict[int, np.ndarray]:
    """{1: HR (M, S, S, 3), N: LR (M, S/N, S/N, 3) for every factor N of the experiment}."""
    factors = _all_factors(config)
    views = region_views(slide, coords, config.region_size, factors, mag=config.hr_mag, source=source)
    return dict(zip([1, *factors], views))


def _cache_key(*parts) -> str:
    """A short hash of ``parts`` and of the phantom generator's version (cached regions and
    checkpoints of an older phantom are never reused)."""
    from mini_kd.phantom import GENERATOR_VERSION

    return hashlib.sha256(json.dumps([GENERATOR_VERSION, *parts], sort_keys=True,
                                     default=str).encode()).hexdigest()[:12]


def _cached_regions(key: str, build) -> Regions:
    """``build()``, saved under $MINI_KD_DATA/reskd/regions/<key>.npz and loaded from there next time."""
    path = data_dir() / "reskd" / "regions" / f"{key}.npz"
    if path.exists():
        with np.load(path) as f:
            labels = f["labels"] if f["labeled"] else None
            views = {int(k[5:]): f[k] for k in f.files if k.startswith("view_")}
            return Regions(f["slide_ids"], f["coords"], labels, views)
    regions = build()

    def write(partial: Path) -> None:
        with open(partial, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, slide_ids=regions.slide_ids, coords=regions.coords,
                     labeled=regions.labels is not None,
                     labels=regions.labels if regions.labels is not None else np.zeros(0, np.int64),
                     **{f"view_{n}": v for n, v in regions.views.items()})

    write_atomically(path, write)
    return regions


def labeled_regions(cohort, split: str, config: ResKDConfig, source: str | None = None) -> Regions:
    """Class-pure regions of the ``split`` slides of ``cohort``, drawn from their label maps, at
    every magnification.

    The candidates of a slide are the ``region_size`` squares at ``hr_mag`` whose corners lie on
    a lattice of ``region_stride`` px (:func:`class_candidates`; neighbours overlap when the
    stride is smaller than the region). Per class, ``regions_per_class`` of the split's
    candidates are drawn with the slides taking turns: every slide's first pick (each slide's
    candidates in a random order of its own), then every slide's second, and so on. A class
    that few slides hold -- tumour -- so still fills its quota, from the slides that have it.
    Cached on disk.
    """
    if not cohort.has_label_maps:
        raise MiniKDError(f"{cohort.root} has slide labels only; ResKD's regions need tile-level "
                          "labels (normal, mimic, tumour): use a phantom cohort (presets.phantom_cohort)")
    source = source or config.view_source
    key = _cache_key("labeled", str(cohort.root), cohort.ids(split), split, source,
                     {k: getattr(config, k) for k in ("region_size", "region_stride", "hr_mag",
                                                      "factors", "purity", "regions_per_class",
                                                      "unlabeled_factor", "seed")})

    def build() -> Regions:
        slide_ids = cohort.ids(split)
        picks = _round_robin([class_candidates(cohort, slide_id, config) for slide_id in slide_ids],
                             config)  # (M, 4) rows (slide index, class, x, y)
        if len(picks) == 0:
            raise MiniKDError(f"no class-pure region in the {split!r} slides of {cohort.root}; "
                              "lower purity or use smaller regions")
        parts = []
        for index in progress(np.unique(picks[:, 0]), desc=f"regions {split}"):
            rows = picks[picks[:, 0] == index]
            with open_slide(cohort.slide_path(slide_ids[index])) as slide:
                parts.append(Regions(np.array([slide_ids[index]] * len(rows)), rows[:, 2:], rows[:, 1],
                                     _read_views(slide, rows[:, 2:], config, source)))
        return Regions.concat(parts)

    return _cached_regions(key, build)


def class_candidates(cohort, slide_id: str, config: ResKDConfig) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 corners (n, 2) and classes (n,) of the class-pure squares of one slide.

    A square of ``region_size`` px at ``hr_mag``, its corner on the ``region_stride`` lattice, is
    a candidate of class c when label code c + 1 (normal 1, mimic 2, tumour 3) covers at least
    ``purity`` of it in the slide's label map. Purity above ``min_tissue`` makes it tissue too.
    """
    with open_slide(cohort.slide_path(slide_id)) as slide:
        footprint = slide.footprint(config.region_size, config.hr_mag)
        step = slide.footprint(config.region_stride, config.hr_mag)
        width, height = slide.dimensions
    xs, ys = np.arange(0, width - footprint + 1, step), np.arange(0, height - footprint + 1, step)
    corners = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)  # (n, 2)
    fractions = cohort.tile_fractions(slide_id, corners, footprint)  # (n, 4) per label code
    code = 1 + fractions[:, 1:].argmax(axis=1)  # (n,) dominant tissue code
    pure = fractions[np.arange(len(code)), code] >= config.purity
    return corners[pure], code[pure] - 1


def _round_robin(candidates: list[tuple[np.ndarray, np.ndarray]], config: ResKDConfig) -> np.ndarray:
    """int64 (M, 4) rows (slide index, class, x, y): ``regions_per_class`` per class, the slides
    taking turns (:func:`labeled_regions`), grouped by slide."""
    table = []
    for index, (corners, classes) in enumerate(candidates):
        turn = np.random.default_rng([config.seed, index]).permutation(len(corners))  # (n,)
        table.append(np.column_stack([np.full(len(corners), index), classes, corners, turn]))
    table = np.concatenate(table).astype(np.int64)  # (n_all, 5)
    table = table[np.lexsort((table[:, 0], table[:, 4]))]  # turn 0 of every slide, then turn 1, ...
    rows = np.concatenate([np.flatnonzero(table[:, 1] == c)[:config.regions_per_class]
                           for c in range(len(CLASSES))])
    picked = table[rows]
    return picked[np.lexsort((picked[:, 4], picked[:, 1], picked[:, 0])), :4]


def unlabeled_cohort(config: ResKDConfig):
    """A second phantom cohort (another seed, same size and difficulty) for the unlabeled pool."""
    from mini_kd.phantom import ensure_cohort
    from mini_kd.presets import COHORTS

    n_slides = max(config.unlabeled_slides)
    # the phantom needs at least 6 slides (its stratified split); only the first n_slides are used
    settings = {**COHORTS[config.preset], "n_slides": max(n_slides, 6), "seed": config.unlabeled_seed}
    root = data_dir() / "phantom" / f"{config.preset}-unlabeled-seed{config.unlabeled_seed}-{n_slides}"
    return ensure_cohort(root, **settings)


def unlabeled_regions(cohort, slide_ids, config: ResKDConfig) -> Regions:
    """``unlabeled_regions`` tissue squares drawn at random from each slide; no label is read."""
    key = _cache_key("unlabeled", str(cohort.root), list(slide_ids), config.view_source,
                     {k: getattr(config, k) for k in ("region_size", "hr_mag", "factors", "min_tissue",
                                                      "unlabeled_regions", "unlabeled_factor", "seed")})

    def build() -> Regions:
        parts = []
        for index, slide_id in enumerate(progress(slide_ids, desc="regions unlabeled")):
            with open_slide(cohort.slide_path(slide_id)) as slide:
                grid = tile_grid(slide, config.hr_mag, config.region_size, config.min_tissue)
                rng = np.random.default_rng([config.seed, 10_000 + index])
                coords = grid.coords[rng.permutation(len(grid))[:config.unlabeled_regions]]
                parts.append(Regions(np.array([slide_id] * len(coords)), coords, None,
                                     _read_views(slide, coords, config, config.view_source)))
        return Regions.concat(parts)

    return _cached_regions(key, build)


def augment(regions: Regions, config: ResKDConfig) -> Regions:
    """``n_views`` augmented copies of every region (rows ordered copy-major), labels repeated.

    Copy v of region m is :func:`mini_kd.data.paired_transform` called once on the HR view and
    all LR views together, with random parameters drawn from the seed (config.seed, v, m): the
    flips and the colour change are the same at every magnification.
    """
    transform = paired_transform(config.flips, config.jitter)
    factors = sorted(regions.views)
    copies = []
    with _one_thread():
        for view in range(config.n_views):
            copies.append(_augmented_copy(regions, factors, transform, view, config))
    return Regions.concat(copies)


@contextmanager
def _one_thread():
    """Torch on one thread for a while: the jitter works on one small image at a time, where
    waking a second thread costs far more than it saves (100x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _augmented_copy(regions: Regions, factors, transform, view: int, config: ResKDConfig) -> Regions:
    """Copy ``view`` of every region (:func:`augment`)."""
    seed = int(np.random.SeedSequence([config.seed, view]).generate_state(1)[0])
    dataset = PairedViews([regions.views[n] for n in factors], transform=transform, seed=seed)
    loader = DataLoader(dataset, batch_size=256, shuffle=False)
    batches = [b for b in progress(loader, desc=f"augment copy {view + 1}", leave=False)]
    views = {n: torch.cat([b[i] for b in batches]).numpy() for i, n in enumerate(factors)}
    return replace(regions, views=views)


# -- the networks ----------------------------------------------------------------------------------
def build_network(seed: int) -> TinyResNetGN:
    """Teacher or student: TinyResNetGN with a 3-class head, initialised from ``seed``."""
    seed_everything(seed)
    return TinyResNetGN(n_classes=len(CLASSES))


# -- the losses, named as in the paper -------------------------------------------------------------
def L_CE(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the labels: the teacher's and the CE student's objective."""
    return F.cross_entropy(logits, labels)


def L_soft(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
           temperature: float = 1.0) -> torch.Tensor:
    """The soft loss T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch."""
    return soft_target_loss(student_logits, teacher_logits, temperature)


def L_pix(student_map: torch.Tensor, teacher_map: torch.Tensor, resize: str = "both",
          loss: str = "l2") -> torch.Tensor:
    """The pixel-wise loss ℓ(F_s, g(F_t)) between the last maps; g resizes F_t to F_s's size."""
    return feature_map_loss(student_map, teacher_map, mode=resize, norm=loss)


def L_KD(student_map, student_logits, teacher_map, teacher_logits, config: ResKDConfig) -> dict:
    """{"kd": L_soft + L_pix, "soft": L_soft, "pix": L_pix}: the student's whole objective."""
    soft = L_soft(student_logits, teacher_logits, config.temperature)
    pix = L_pix(student_map, teacher_map, config.resize, config.feature_loss)
    return {"kd": soft + pix, "soft": soft, "pix": pix}


# -- training --------------------------------------------------------------------------------------
def ce_step(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """One labeled batch (images uint8 (B, s, s, 3), labels (B,)) -> L_CE (teacher, CE student)."""
    images, labels = batch
    _, logits = model(to_tensor(images))  # (B, C)
    loss = L_CE(logits, labels)
    return loss, {"accuracy": (logits.argmax(1) == labels).float().mean().item()}


def kd_step(student: nn.Module, batch, config: ResKDConfig) -> tuple[torch.Tensor, dict]:
    """One unlabeled batch (LR images (B, s, s, 3), z_t (B, C), F_t (B, 256, h_t, w_t)) -> L_KD."""
    images, teacher_logits, teacher_map = batch
    student_map, student_logits = student(to_tensor(images))  # (B, 256, h_s, w_s), (B, C)
    losses = L_KD(student_map, student_logits, teacher_map, teacher_logits, config)
    return losses["kd"], {"soft": losses["soft"].item(), "pix": losses["pix"].item()}


def epochs_of(config: ResKDConfig, factor: int) -> int:
    """Epochs of the network at ÷``factor``: ``teacher_epochs`` for the teacher (1), else
    ``epochs_by_factor[factor]`` where given, else ``epochs``. The KD and CE students of a factor
    train equally long."""
    if factor == 1:
        return config.teacher_epochs
    return config.epochs_by_factor.get(factor, config.epochs)


def _fit_config(config: ResKDConfig, epochs: int, monitor: str, mode: str, name: str) -> FitConfig:
    return FitConfig(epochs=epochs, lr=config.lr, weight_decay=config.weight_decay,
                     accumulate=config.accumulate, monitor=monitor, mode=mode, seed=config.seed,
                     device=config.device, checkpoint_dir=_checkpoint_dir(config, name))


def _loader(tensors, config: ResKDConfig) -> DataLoader:
    """Shuffled batches of ``config.batch_size``; the shuffle has its own seeded generator."""
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(TensorDataset(*tensors), batch_size=config.batch_size, shuffle=True,
                      generator=generator)


def _labeled_tensors(regions: Regions, factor: int):
    return torch.from_numpy(regions.views[factor]), torch.from_numpy(regions.labels).long()


def train_ce(regions: Regions, factor: int, config: ResKDConfig, val: Regions | None = None,
             name: str | None = None):
    """The teacher (``factor=1``) or a CE student (÷``factor``): L_CE on ``regions.views[factor]``.

    Keeps the epoch with the best validation balanced accuracy (the last epoch without ``val``).
    Returns ``(model, history)``.
    """
    check_input_size(config.region_size, factor)
    model = build_network(config.seed)
    monitor, mode, val_step = "train_loss", "min", None
    if val is not None:
        monitor, mode = "val_balanced_accuracy", "max"
        val_step = lambda m: _val_accuracy(m, val.views[factor], val.labels, config)  # noqa: E731
    name = name or ("teacher" if factor == 1 else f"ce_x{factor}")
    history = fit(model, ce_step, _loader(_labeled_tensors(regions, factor), config),
                  _fit_config(config, epochs_of(config, factor), monitor, mode, name),
                  val_step=val_step)
    return model, history


@dataclass
class TeacherTargets:
    """The frozen teacher's outputs on HR views: logits z_t (M, C) and last maps F_t (M, 256, h, w)."""

    logits: torch.Tensor
    maps: torch.Tensor

    def take(self, rows) -> "TeacherTargets":
        return TeacherTargets(self.logits[rows], self.maps[rows])

    @staticmethod
    def concat(parts: list["TeacherTargets"]) -> "TeacherTargets":
        return TeacherTargets(torch.cat([p.logits for p in parts]), torch.cat([p.maps for p in parts]))


@torch.no_grad()
def teacher_targets(teacher: nn.Module, hr_images: np.ndarray, config: ResKDConfig,
                    batch_size: int = 128) -> TeacherTargets:
    """f_t on every HR view, once (deviation 3). The teacher is frozen first (no gradients, eval)."""
    freeze(teacher)
    device = pick_device(config.device)
    teacher.to(device)
    logits, maps = [], []
    for start in progress(range(0, len(hr_images), batch_size), desc="teacher targets", leave=False):
        x = to_tensor(torch.from_numpy(hr_images[start:start + batch_size]).to(device))  # (B, 3, S, S)
        feature_map, z = teacher(x)  # (B, 256, h_t, w_t), (B, C)
        logits.append(z.float().cpu())
        maps.append(feature_map.float().cpu())
    return TeacherTargets(torch.cat(logits), torch.cat(maps))


def distill(regions: Regions, targets: TeacherTargets, factor: int, config: ResKDConfig,
            val: Regions | None = None, val_targets: TeacherTargets | None = None,
            name: str | None = None):
    """The KD student at ÷``factor``: L_KD against the teacher, on ``regions.views[factor]`` only.

    ``regions.labels`` is never read: the student learns from the teacher's outputs ``targets``
    (row m for view m) and nothing else. With ``val`` and ``val_targets`` it keeps the epoch with
    the lowest validation L_KD -- still no label. Returns ``(student, history)``.
    """
    check_input_size(config.region_size, factor)
    images = regions.views[factor]
    if len(images) != len(targets.logits):
        raise MiniKDError(f"{len(images)} LR views but {len(targets.logits)} teacher targets; compute "
                          "the targets on the HR views of the same regions (teacher_targets)")
    student = build_network(config.seed)
    monitor, mode, val_step = "train_loss", "min", None
    if val is not None and val_targets is not None:
        monitor = "val_kd_loss"
        val_step = lambda m: {"kd_loss": _kd_loss(m, val.views[factor], val_targets, config)}  # noqa: E731
    data = _loader((torch.from_numpy(images), targets.logits, targets.maps), config)
    history = fit(student, lambda model, batch: kd_step(model, batch, config), data,
                  _fit_config(config, epochs_of(config, factor), monitor, mode, name or f"kd_x{factor}"),
                  val_step=val_step)
    return student, history


def _checkpoint_dir(config: ResKDConfig, name: str) -> Path:
    if config.checkpoint_dir is not None:
        return Path(config.checkpoint_dir) / name
    settings = {k: v for k, v in asdict(config).items() if k not in ("device", "checkpoint_dir")}
    return data_dir() / "reskd" / f"{config.preset}-{_cache_key(settings)}" / name


# -- inference and scoring -------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, config: ResKDConfig | None = None,
            batch_size: int = 256) -> np.ndarray:
    """Class probabilities (M, C) for uint8 regions (M, s, s, 3), in eval mode."""
    device = pick_device(config.device if config else None)
    was_training = model.training
    model.to(device).eval()
    probs = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(torch.as_tensor(images[start:start + batch_size]).to(device))  # (B, 3, s, s)
        probs.append(torch.softmax(model(x)[1].float(), dim=1).cpu())  # (B, C)
    model.train(was_training)
    return torch.cat(probs).numpy()


def _val_accuracy(model, images, labels, config) -> dict:
    metrics = classification_metrics(labels, predict(model, images, config))
    return {"balanced_accuracy": metrics["balanced_accuracy"], "accuracy": metrics["accuracy"]}


@torch.no_grad()
def _kd_loss(model, images, targets: TeacherTargets, config, batch_size: int = 256) -> float:
    """Mean L_KD of ``model`` on LR ``images`` against the teacher's ``targets``."""
    device = pick_device(config.device)
    total = 0.0
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        x = to_tensor(torch.from_numpy(images[rows]).to(device))
        student_map, student_logits = model(x)
        losses = L_KD(student_map, student_logits, targets.maps[rows].to(device),
                      targets.logits[rows].to(device), config)
        total += losses["kd"].item() * len(x)
    return total / len(images)


def score(labels: np.ndarray, probs: np.ndarray, config: ResKDConfig) -> dict:
    """The paper's accuracy: per-class one-vs-rest accuracy averaged over the classes, on
    class-balanced bootstrap resamples, with its 95 % interval; plus plain balanced accuracy."""
    predictions = probs.argmax(axis=1)
    point, low, high = bootstrap_ci(labels, predictions, "accuracy", n=config.bootstrap,
                                    seed=config.seed)
    return {"accuracy": point, "accuracy_ci": [low, high],
            "balanced_accuracy": classification_metrics(labels, probs)["balanced_accuracy"]}


def measure_flops(model: nn.Module, side: int) -> float:
    """GFLOPs of one forward pass on one ``side`` x ``side`` region (torch.utils.flop_counter)."""
    return count_flops(model.cpu(), torch.zeros(1, 3, side, side)) / 1e9


def flop_reductions(region_sizes=(128, 256), factors=(2, 4, 8, 16)) -> list[dict]:
    """Teacher FLOPs / student FLOPs for each region size and factor (measured; N² until the
    student's last map is 1 x 1). Factors whose view is below :data:`MIN_INPUT_PX` are skipped."""
    model = build_network(0)
    rows = []
    for size in region_sizes:
        teacher = measure_flops(model, size)
        rows += [{"region_px": size, "factor": n, "student_px": size // n,
                  "flop_reduction": teacher / measure_flops(model, size // n)}
                 for n in factors if size % n == 0 and size // n >= MIN_INPUT_PX]
    return rows


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 image stacks."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


# -- the experiment --------------------------------------------------------------------------------
def run_experiment(config: ResKDConfig | str = "book") -> dict:
    """Everything the chapter and the benchmark report, as one JSON-ready dict.

    1. class-pure regions of the train / val / test slides at 20x and every 20x/N;
    2. ``n_views`` augmented copies of the training regions;
    3. the HR teacher (L_CE), frozen, and its outputs on every copy;
    4. for every N: the KD student (L_KD, no labels) and the CE student (L_CE), both on the same
       LR copies, scored on the test regions (bootstrap CI) read from the pyramid and resized;
    5. FLOPs per region of each network;
    6. the KD student at ÷``unlabeled_factor`` with 0, 8, ... extra unlabeled slides.

    Trained networks are checkpointed (:func:`mini_kd.train.fit`); a second call with the same
    config resumes or reloads them instead of training again.
    """
    from mini_kd.presets import phantom_cohort

    config = config_for(config) if isinstance(config, str) else config
    timer = StageTimer()
    with timer.stage("regions"):
        cohort = phantom_cohort(config.preset)  # region labels: the phantom, whatever MINI_KD_COHORT says
        train, val, test = (labeled_regions(cohort, split, config) for split in ("train", "val", "test"))
        other = "resize" if config.view_source == "pyramid" else "pyramid"
        test_other = labeled_regions(cohort, "test", config, source=other)
    with timer.stage("augment"):
        bank = augment(train, config)

    with timer.stage("teacher"):
        teacher, teacher_history = train_ce(bank, 1, config, val=val)
        targets = teacher_targets(teacher, bank.views[1], config)
        val_targets = teacher_targets(teacher, val.views[1], config)
    teacher_gflops = measure_flops(teacher, config.region_size)
    results = {
        "preset": config.preset, "config": asdict(config), "classes": list(CLASSES),
        "regions": {"train": len(train), "train_copies": len(bank), "val": len(val), "test": len(test),
                    "test_per_class": np.bincount(test.labels, minlength=len(CLASSES)).tolist()},
        "teacher": {"magnification": config.hr_mag, "input_px": config.region_size,
                    **score(test.labels, predict(teacher, test.views[1], config), config),
                    "gflops": teacher_gflops, "best_epoch": teacher_history.best_epoch,
                    "train_seconds": teacher_history.seconds},
        "students": [], "unlabeled": [], "view_sources": [],
    }

    students = {}
    for factor in config.factors:
        side = config.region_size // factor
        with timer.stage(f"kd_x{factor}"):
            kd, kd_history = distill(bank, targets, factor, config, val, val_targets)
        with timer.stage(f"ce_x{factor}"):
            ce, ce_history = train_ce(bank, factor, config, val=val)
        students[factor] = kd
        kd_score = score(test.labels, predict(kd, test.views[factor], config), config)
        ce_score = score(test.labels, predict(ce, test.views[factor], config), config)
        gflops = measure_flops(kd, side)
        results["students"].append({
            "factor": factor, "magnification": config.hr_mag / factor, "input_px": side,
            "kd_accuracy": kd_score["accuracy"], "kd_accuracy_ci": kd_score["accuracy_ci"],
            "kd_balanced_accuracy": kd_score["balanced_accuracy"],
            "ce_accuracy": ce_score["accuracy"], "ce_accuracy_ci": ce_score["accuracy_ci"],
            "ce_balanced_accuracy": ce_score["balanced_accuracy"],
            "gflops": gflops, "ce_gflops": measure_flops(ce, side),
            "flop_reduction": teacher_gflops / gflops,
            f"kd_accuracy_{other}": score(test_other.labels, predict(kd, test_other.views[factor],
                                                                     config), config)["accuracy"],
            "kd_train_seconds": kd_history.seconds, "ce_train_seconds": ce_history.seconds,
        })
        results["view_sources"].append({
            "factor": factor, "magnification": config.hr_mag / factor,
            "psnr_db": psnr(test.views[factor], test_other.views[factor])})
        save_predictor(_checkpoint_dir(config, f"kd_x{factor}") / "predictor.pt", kd, factor, config)

    with timer.stage("unlabeled"):
        results["unlabeled"] = _unlabeled_scaling(config, bank, targets, val, val_targets, test,
                                                  students)
    results["seconds"] = timer.seconds
    return plain(results)


def check_targets(results: dict) -> dict:
    """The chapter's two targets, evaluated on :func:`run_experiment`'s ``results``.

    - the ÷8 student needs at least 64x fewer FLOPs (measured, to 1 %: the linear head's cost does
      not shrink) than the teacher and scores within 2 accuracy points of it;
    - at every factor the KD student scores at least as well as the CE student.
    """
    teacher = results["teacher"]["accuracy"]
    x8 = next((row for row in results["students"] if row["factor"] == 8), None)
    return {
        "x8_flop_reduction": x8 and x8["flop_reduction"],
        "x8_at_least_64x_fewer_flops": bool(x8 and x8["flop_reduction"] >= 0.99 * 64),
        "x8_gap_to_teacher": x8 and teacher - x8["kd_accuracy"],
        "x8_within_2_points_of_teacher": bool(x8 and teacher - x8["kd_accuracy"] <= 0.02),
        "kd_at_or_above_ce": {row["factor"]: row["kd_accuracy"] >= row["ce_accuracy"]
                              for row in results["students"]},
    }


def _unlabeled_scaling(config, bank, targets, val, val_targets, test, students) -> list[dict]:
    """KD students at ÷unlabeled_factor on the training copies plus n extra unlabeled slides."""
    factor = config.unlabeled_factor
    extra = [n for n in config.unlabeled_slides if n > 0]
    if extra:
        pool_cohort = unlabeled_cohort(config)
        pool_ids = pool_cohort.ids()[:max(extra)]
        pool = augment(unlabeled_regions(pool_cohort, pool_ids, config), config)
        pool_targets = teacher_targets(_teacher_of(config), pool.views[1], config)
    rows = []
    for n in config.unlabeled_slides:
        if n == 0:
            student = students.get(factor) or distill(bank, targets, factor, config, val, val_targets)[0]
            n_regions = 0
        else:
            keep = np.isin(pool.slide_ids, pool_ids[:n])
            mixed = Regions.concat([replace(bank, labels=None), pool.take(keep)])
            student, _ = distill(mixed, TeacherTargets.concat([targets, pool_targets.take(keep)]),
                                 factor, config, val, val_targets, name=f"kd_x{factor}_unlabeled{n}")
            n_regions = int(keep.sum()) // config.n_views
        result = score(test.labels, predict(student, test.views[factor], config), config)
        rows.append({"n_slides": n, "n_regions": n_regions, "factor": factor,
                     "kd_accuracy": result["accuracy"], "kd_accuracy_ci": result["accuracy_ci"],
                     "kd_balanced_accuracy": result["balanced_accuracy"]})
    return rows


def _teacher_of(config: ResKDConfig) -> TinyResNetGN:
    """The experiment's trained teacher, reloaded from its best checkpoint."""
    teacher = build_network(config.seed)
    load_checkpoint(_checkpoint_dir(config, "teacher") / "best.pt", teacher)
    return freeze(teacher)


# -- a slide-level predictor for `mini-kd predict reskd` --------------------------------------------
def save_predictor(path, model: nn.Module, factor: int, config: ResKDConfig) -> Path:
    """A self-contained checkpoint: the weights and the geometry the predictor needs."""
    return write_checkpoint({"model": model.state_dict(), "factor": factor,
                             "region_size": config.region_size, "hr_mag": config.hr_mag,
                             "min_tissue": config.min_tissue, "classes": list(CLASSES)}, path)


def load_predictor(checkpoint):
    """``predictor(slide_path, mpp=None) -> dict`` from a checkpoint of :func:`save_predictor`.

    ResKD classifies regions. The predictor cuts the slide's tissue into regions at the
    student's magnification, classifies each, and calls the slide tumour (label 1) when its most
    tumour-like region has P(tumour) >= 0.5; ``probability`` is that largest P(tumour).
    """
    path = Path(checkpoint)
    saved = read_checkpoint(path, "ResKD", "run reskd.run_experiment first (it writes predictor.pt "
                                           "next to each student's checkpoints)")
    with foreign_checkpoint(path, "a ResKD predictor",
                            "pass a predictor.pt written by mini_kd.methods.reskd.save_predictor"):
        model = TinyResNetGN(n_classes=len(saved["classes"]))
        model.load_state_dict(saved["model"])
        mag, side = saved["hr_mag"] / saved["factor"], saved["region_size"] // saved["factor"]
        tumour, min_tissue = saved["classes"].index("tumour"), saved["min_tissue"]
    model.eval()

    def predictor(slide_path, mpp: float | None = None) -> dict:
        timer = StageTimer()
        with open_slide(slide_path, mpp=mpp) as slide:
            with timer.stage("grid"):
                grid = tile_grid(slide, mag, side, min_tissue)
            with timer.stage("read"):
                regions = slide.read_tiles(grid.coords, side, mag)  # (M, s, s, 3)
            with timer.stage("classify"):
                probs = predict(model, regions) if len(regions) else np.zeros((0, len(saved["classes"])))
        p_tumour = float(probs[:, tumour].max()) if len(probs) else 0.0
        return {"slide_id": Path(slide_path).stem, "label": int(p_tumour >= 0.5),
                "probability": p_tumour, "seconds": timer.seconds, "regions": len(grid),
                "tumour_regions": int((probs.argmax(1) == tumour).sum()) if len(probs) else 0,
                "magnification": mag}

    return predictor
