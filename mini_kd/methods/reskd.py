r"""ResKD: resolution-based knowledge distillation, label-free (DiPalma et al. 2021).

"Resolution-Based Distillation for Efficient Histology Image Classification", Artificial
Intelligence in Medicine 119:102136 (2021), arXiv 2101.04170.

**The idea.** A convolutional network costs in proportion to its input's pixels; the same
tissue at m / N has N² times fewer. A *teacher* f_t learns on the high-resolution (HR) image x
(S x S px at m) with labels and is frozen; a *student* f_s, the same architecture, learns on the
low-resolution (LR) view x↓N (S/N x S/N px at m / N) to imitate it, never seeing a label.

**The networks.** Teacher and student are :class:`~mini_kd.encoders.TinyResNetGN` (GroupNorm),
    (F_t, z_t) = f_t(x),  F_t ∈ R^{256 x h_t x w_t};    (F_s, z_s) = f_s(x↓N),  F_s ∈ R^{256 x h_s x w_s}.

**The losses** (the paper's "soft loss" and "pixel-wise loss"; their sum, with no
cross-entropy term, is the student's whole objective):

    L_soft = T² · KL( softmax(z_t / T) ‖ softmax(z_s / T) )                      (T = 1)
    L_pix  = ℓ( F_s, g(F_t) ),   ℓ = mean squared error (or L1),
             g(F) = ½ ( AdaptiveMaxPool_{h_s x w_s}(F) + Bicubic_{h_s x w_s}(F) )
    L_KD   = L_soft + L_pix

The baselines use labels y: the teacher minimises L_CE(z_t, y); the *CE student*, the same
network on the same LR views, minimises L_CE(z_s, y) without a teacher.

**The cost.** FLOPs(f_s) = FLOPs(f_t) / N² while every map is larger than 1 x 1 (a map of one
position cannot shrink, so a small input saves less: :mod:`mini_kd.experiments.reskd` measures).

**The regions.** With label maps (the phantom), class-pure squares (normal, mimic, tumour),
corners on a lattice finer than a region, a fixed number per split and class, the slides taking
turns. A slide classifier (:meth:`Trained.predictor`): the student on every tissue region of the
slide at 20x / N, P(slide) = the mean of the ``top_k`` largest region P(tumour).

**Deviations from the authors' code** (which does not run as published; see the paper notes):

1. Inputs are fixed-size regions (a budget, in :class:`Schedule`), not whole images of varying
   size, so the presets train on batches; the paper's one image with 32 gradients accumulated
   (the defaults) gives the same: GroupNorm normalises each image alone, losses are means (tested).
2. g averages max-pooling and bicubic resizing, as meant; the authors' ``elif`` max-pools only.
3. Augmentation (flips and colour jitter, drawn once for the HR image and all its LR views)
   makes ``n_views`` copies of every region up front, the frozen teacher's outputs on them
   computed once (:func:`teacher_targets`); the paper draws fresh ones every epoch.
4. ImageNet normalisation (:func:`mini_kd.data.to_tensor`), not per-dataset statistics.
5. Selection: the teacher and CE students keep the epoch of best validation balanced accuracy,
   the KD student that of lowest validation L_KD (selected without a label too). Not stated.
6. Fewer epochs than the paper's 100 on the CPU presets, fewer still for the costly ÷2 and ÷4
   students (``epochs_by_factor``); the KD and CE students of a factor train equally long.
7. LR views are read from the slide pyramid, as the predictor reads them (the paper does not
   say how it made them; the experiment also scores software-resized views).
8. Ours: weak region labels without label maps (every tissue region takes its slide's label:
   normal or tumour); the slide predictor's top-k pooling; ``min_tumour``: a region that much
   tumour is tumour (one with less, but some, is left out), for foci smaller than a region.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mini_kd import methods
from mini_kd.data import PairedViews, paired_transform, region_views, to_tensor
from mini_kd.encoders import TinyResNetGN
from mini_kd.errors import MiniKDError
from mini_kd.evaluate import classification_metrics
from mini_kd.inference import SlideRun, predict_slide
from mini_kd.kd import feature_map_loss, soft_target_loss
from mini_kd.progress import progress
from mini_kd.runtime import pick_device, seed_everything, torch_threads
from mini_kd.slides import open_slide
from mini_kd.tiling import tile_grid
from mini_kd.train import FitConfig, freeze
from mini_kd.train import fit as fit_loop

CLASSES = ("normal", "mimic", "tumour")  # with label maps: region class c = label-map code c + 1
WEAK_CLASSES = ("normal", "tumour")      # without: the slide's label (0 normal, 1 tumour)
MIN_INPUT_PX = 8  # smallest side a TinyResNetGN input may have, see check_input_size


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class Config:
    """The method. Defaults are the paper's where it states one (marked "paper")."""

    hr_mag: float = 20.0             # the teacher's magnification (the phantom's level 0)
    factor: int = 4                  # the student sees hr_mag / factor (4: 5x)
    purity: float = 0.6              # a labeled region's class covers at least this fraction of it
    min_tumour: float | None = None  # deviation 8: a region this much tumour is tumour (None: off)
    min_tissue: float = 0.5          # tissue fraction of every weakly labeled or predicted region
    # the losses (paper: T = 1, L2, "maxpool+bicubic")
    temperature: float = 1.0
    feature_loss: str = "l2"
    resize: str = "both"
    # the optimiser (paper: Adam, lr 1e-3, weight decay 1e-4)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # augmentation (paper: random flips + ColorJitter(0.5, 0.5, 0.5, 0.2), the same on both views)
    flips: bool = True
    jitter: tuple[float, float, float, float] | None = (0.5, 0.5, 0.5, 0.2)
    # the slide predictor: P(slide) = mean of the top_k region P(tumour). k = 1 (the max): a larger
    # k dilutes a one-region micro-metastasis; the price: one false-positive region flags a slide
    top_k: int = 1

    def __post_init__(self):
        self.jitter = None if self.jitter is None else tuple(self.jitter)
        if self.factor < 1 or self.top_k < 1:
            raise MiniKDError(f"factor={self.factor} and top_k={self.top_k} must be at least 1")


@dataclass
class Schedule:
    """How long and on how much ResKD trains (paper: 100 epochs, 1 image x 32 accumulated)."""

    region_size: int = 256           # HR side in px at hr_mag; the ÷N student sees region_size / N
    region_stride: int = 64          # labeled regions' corners lie on this lattice (px at hr_mag)
    regions_per_class: int = 128     # at most this many labeled regions per split and class
    n_views: int = 4                 # augmented copies of every region (deviation 3)
    epochs: int = 100                # student epochs, over all augmented copies
    teacher_epochs: int = 100
    epochs_by_factor: dict[int, int] = field(default_factory=dict)   # fewer epochs for some ÷N
    batch_size: int = 1
    accumulate: int = 32
    # the experiment's students (mini_kd.experiments.reskd): every factor, and the unlabeled curve
    factors: tuple[int, ...] = (2, 4, 8, 16)   # 10x, 5x, 2.5x, 1.25x
    unlabeled_slides: tuple[int, ...] = (0, 8, 16, 32)   # extra unlabeled slides per student
    unlabeled_factor: int = 16       # the student that gets them (the paper: its lowest magnification)
    unlabeled_regions: int = 32      # regions drawn per unlabeled slide
    bootstrap: int = 10_000          # paper: 10,000 class-balanced resamples
    seed: int = 0
    device: str | None = None
    checkpoint_dir: str | None = None  # per-epoch checkpoints of every network (resumable)

    def __post_init__(self):
        self.factors = tuple(int(f) for f in self.factors)
        self.unlabeled_slides = tuple(int(n) for n in self.unlabeled_slides)
        self.epochs_by_factor = {int(n): int(e) for n, e in self.epochs_by_factor.items()}
        for factor in (*self.factors, self.unlabeled_factor):
            check_input_size(self.region_size, factor)


def check_input_size(region_size: int, factor: int) -> int:
    """The ÷``factor`` view's side in px, or a :class:`MiniKDError` if the student cannot take it.

    TinyResNetGN's stem (7 x 7 conv, stride 2, then a 3 x 3 max-pool, stride 2) needs 8 px to see
    a whole 7 x 7 window of real pixels and hand a 2 x 2 map on; below it every stage sees zero
    padding. 128-px regions at 20x give 8 px at 1.25x (÷16).
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


# -- the data: regions at every magnification ------------------------------------------------------
@dataclass
class Regions:
    """M square regions, their class (or None) and ``views[N]``: uint8 (M, S/N, S/N, 3) at 1/N of
    the HR magnification (``views[1]``: HR). All views of row m cover the same level-0 square."""

    slide_ids: np.ndarray                 # (M,) str
    coords: np.ndarray                    # (M, 2) int64 level-0 top-left corners
    labels: np.ndarray | None             # (M,) int64 class index, or None
    views: dict[int, np.ndarray] = field(repr=False)

    @staticmethod
    def concat(parts: list[Regions]) -> Regions:
        """The rows of every part, in order; labels only if every part has them."""
        labeled = all(p.labels is not None for p in parts)
        return Regions(np.concatenate([p.slide_ids for p in parts]),
                       np.concatenate([p.coords for p in parts]),
                       np.concatenate([p.labels for p in parts]) if labeled else None,
                       {n: np.concatenate([p.views[n] for p in parts]) for n in parts[0].views})


def classes_of(cohort) -> tuple[str, ...]:
    """The region classes a cohort gives: :data:`CLASSES` from label maps, else :data:`WEAK_CLASSES`."""
    return CLASSES if cohort.has_label_maps else WEAK_CLASSES


def labeled_regions(cohort, slide_ids, config: Config, schedule: Schedule, factors,
                    source: str = "pyramid") -> Regions:
    """Labeled regions of ``slide_ids`` at hr_mag and hr_mag / N for N in ``factors`` (``source``:
    pyramid or resized): :func:`class_candidates` (label maps) or :func:`weak_candidates`, drawn by
    :func:`round_robin` so that a class few slides hold -- tumour -- still fills its quota."""
    slide_ids = list(slide_ids)
    candidates = [class_candidates(cohort, s, config, schedule) if cohort.has_label_maps else
                  weak_candidates(cohort, s, y, config, schedule)
                  for s, y in zip(slide_ids, cohort.labels(slide_ids))]
    picks = round_robin(candidates, len(classes_of(cohort)), schedule)  # (M, 4) slide, class, x, y
    if len(picks) == 0:
        raise MiniKDError(f"no labeled region in slides {slide_ids[:3]}... of {cohort.root}; "
                          "lower purity or use smaller regions")
    parts = []
    for index in progress(np.unique(picks[:, 0]), desc="regions"):
        rows = picks[picks[:, 0] == index]
        with open_slide(cohort.slide_path(slide_ids[index])) as slide:
            views = region_views(slide, rows[:, 2:], schedule.region_size, factors,
                                 mag=config.hr_mag, source=source)  # [HR, LR_N ...]
        parts.append(Regions(np.array([slide_ids[index]] * len(rows)), rows[:, 2:], rows[:, 1],
                             dict(zip([1, *factors], views))))
    return Regions.concat(parts)


def class_candidates(cohort, slide_id: str, config: Config, schedule: Schedule):
    """Level-0 corners (n, 2) and classes (n,) of one slide's class-pure squares: corners on the
    ``region_stride`` lattice, label code c + 1 over ``purity`` (or tumour over ``min_tumour``)."""
    with open_slide(cohort.slide_path(slide_id)) as slide:
        footprint = slide.footprint(schedule.region_size, config.hr_mag)
        step = slide.footprint(schedule.region_stride, config.hr_mag)
        width, height = slide.dimensions
    xs, ys = np.arange(0, width - footprint + 1, step), np.arange(0, height - footprint + 1, step)
    corners = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)  # (n, 2)
    fractions = cohort.tile_fractions(slide_id, corners, footprint)  # (n, 4) per label code
    code = 1 + fractions[:, 1:].argmax(axis=1)  # (n,) dominant tissue code
    pure = fractions[np.arange(len(code)), code] >= config.purity
    if config.min_tumour is not None:
        tumour = fractions[:, 3] >= config.min_tumour  # (n,) label code 3: tumour (deviation 8)
        code, pure = np.where(tumour, 3, code), tumour | (pure & (fractions[:, 3] == 0))
    return corners[pure], code[pure] - 1


def weak_candidates(cohort, slide_id: str, label: int, config: Config, schedule: Schedule):
    """Every non-overlapping tissue square of one slide, its class the slide's ``label``."""
    with open_slide(cohort.slide_path(slide_id)) as slide:
        corners = tile_grid(slide, config.hr_mag, schedule.region_size, config.min_tissue).coords
    return corners, np.full(len(corners), int(label))  # (n, 2), (n,)


def round_robin(candidates: list[tuple[np.ndarray, np.ndarray]], n_classes: int,
                schedule: Schedule) -> np.ndarray:
    """int64 (M, 4) rows (slide index, class, x, y): ``regions_per_class`` per class, the slides
    taking turns -- every slide's first pick (each slide's candidates in a random order of its
    own), then every slide's second, and so on -- grouped by slide."""
    table = []
    for index, (corners, classes) in enumerate(candidates):
        turn = np.random.default_rng([schedule.seed, index]).permutation(len(corners))  # (n,)
        table.append(np.column_stack([np.full(len(corners), index), classes, corners, turn]))
    table = np.concatenate(table).astype(np.int64).reshape(-1, 5)  # (n_all, 5)
    table = table[np.lexsort((table[:, 0], table[:, 4]))]  # turn 0 of every slide, then turn 1, ...
    rows = np.concatenate([np.flatnonzero(table[:, 1] == c)[:schedule.regions_per_class]
                           for c in range(n_classes)])
    picked = table[rows]
    return picked[np.lexsort((picked[:, 4], picked[:, 1], picked[:, 0])), :4]


def augment(regions: Regions, config: Config, schedule: Schedule) -> Regions:
    """``n_views`` augmented copies of every region (copy-major rows, labels repeated): copy v of
    region m is one :func:`~mini_kd.data.paired_transform` call on all its views, seeded (seed, v, m)."""
    transform = paired_transform(config.flips, config.jitter)
    factors = sorted(regions.views)
    copies = []
    with torch_threads(1):  # the jitter works on one small image at a time
        for view in range(schedule.n_views):
            seed = int(np.random.SeedSequence([schedule.seed, view]).generate_state(1)[0])
            dataset = PairedViews([regions.views[n] for n in factors], transform=transform, seed=seed)
            batches = list(progress(DataLoader(dataset, batch_size=256, shuffle=False),
                                    desc=f"augment copy {view + 1}", leave=False))
            views = {n: torch.cat([b[i] for b in batches]).numpy() for i, n in enumerate(factors)}
            copies.append(replace(regions, views=views))
    return Regions.concat(copies)


# -- the networks ----------------------------------------------------------------------------------
def build_network(seed: int, n_classes: int = len(CLASSES)) -> TinyResNetGN:
    """Teacher or student: TinyResNetGN with an ``n_classes`` head, initialised from ``seed``."""
    seed_everything(seed)
    return TinyResNetGN(n_classes=n_classes)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device=None, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (M, C) for uint8 regions (M, s, s, 3), in eval mode."""
    device = pick_device(device)
    model.to(device).eval()
    probs = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(torch.as_tensor(images[start:start + batch_size]).to(device))  # (B, 3, s, s)
        probs.append(torch.softmax(model(x)[1].float(), dim=1).cpu())  # (B, C)
    return torch.cat(probs).numpy()


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


def L_KD(student_map, student_logits, teacher_map, teacher_logits, config: Config) -> dict:
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


def kd_step(student: nn.Module, batch, config: Config) -> tuple[torch.Tensor, dict]:
    """One unlabeled batch (LR images (B, s, s, 3), z_t (B, C), F_t (B, 256, h_t, w_t)) -> L_KD."""
    images, teacher_logits, teacher_map = batch
    student_map, student_logits = student(to_tensor(images))  # (B, 256, h_s, w_s), (B, C)
    losses = L_KD(student_map, student_logits, teacher_map, teacher_logits, config)
    return losses["kd"], {"soft": losses["soft"].item(), "pix": losses["pix"].item()}


def epochs_of(schedule: Schedule, factor: int) -> int:
    """Epochs at ÷``factor``: ``teacher_epochs`` for the teacher (1), else ``epochs_by_factor``'s
    or ``epochs`` (the KD and CE students of a factor train equally long)."""
    by_factor = schedule.epochs_by_factor.get(factor, schedule.epochs)
    return schedule.teacher_epochs if factor == 1 else by_factor


def _fit_config(config: Config, schedule: Schedule, factor: int, monitor: str, mode: str,
                name: str) -> FitConfig:
    return FitConfig(epochs_of(schedule, factor), config.lr, config.weight_decay, schedule.accumulate,
                     monitor=monitor, mode=mode, seed=schedule.seed, device=schedule.device,
                     checkpoint_dir=schedule.checkpoint_dir and f"{schedule.checkpoint_dir}/{name}")


def _loader(tensors, schedule: Schedule) -> DataLoader:
    """Shuffled batches of ``batch_size``; the shuffle has its own seeded generator."""
    generator = torch.Generator().manual_seed(schedule.seed)
    return DataLoader(TensorDataset(*tensors), batch_size=schedule.batch_size, shuffle=True,
                      generator=generator)


def train_ce(regions: Regions, factor: int, config: Config, schedule: Schedule,
             val: Regions | None = None, n_classes: int = len(CLASSES), name: str | None = None):
    """``(model, history)``: the teacher (``factor=1``) or a CE student, L_CE on
    ``regions.views[factor]``; the epoch of best validation balanced accuracy (else the last)."""
    check_input_size(schedule.region_size, factor)
    model = build_network(schedule.seed, n_classes)
    monitor, mode, val_step = "train_loss", "min", None
    if val is not None:
        monitor, mode = "val_balanced_accuracy", "max"
        val_step = lambda m: {"balanced_accuracy": classification_metrics(
            val.labels, predict(m, val.views[factor], schedule.device))["balanced_accuracy"]}
    data = _loader((torch.from_numpy(regions.views[factor]), torch.from_numpy(regions.labels).long()),
                   schedule)
    name = name or ("teacher" if factor == 1 else f"ce_x{factor}")
    history = fit_loop(model, ce_step, data, _fit_config(config, schedule, factor, monitor, mode, name),
                       val_step=val_step)
    return model, history


@dataclass
class TeacherTargets:
    """The frozen teacher's outputs on HR views: logits z_t (M, C) and last maps F_t (M, 256, h, w)."""

    logits: torch.Tensor
    maps: torch.Tensor


@torch.no_grad()
def teacher_targets(teacher: nn.Module, hr_images: np.ndarray, device=None,
                    batch_size: int = 128) -> TeacherTargets:
    """f_t on every HR view, once (deviation 3). The teacher is frozen first (no gradients, eval)."""
    freeze(teacher)
    device = pick_device(device)
    teacher.to(device)
    logits, maps = [], []
    for start in progress(range(0, len(hr_images), batch_size), desc="teacher targets", leave=False):
        x = to_tensor(torch.from_numpy(hr_images[start:start + batch_size]).to(device))  # (B, 3, S, S)
        feature_map, z = teacher(x)  # (B, 256, h_t, w_t), (B, C)
        logits.append(z.float().cpu())
        maps.append(feature_map.float().cpu())
    return TeacherTargets(torch.cat(logits), torch.cat(maps))


@torch.no_grad()
def kd_loss(model, images: np.ndarray, targets: TeacherTargets, config: Config, device=None,
            batch_size: int = 256) -> float:
    """Mean L_KD of ``model`` on LR ``images`` (M, s, s, 3) against the teacher's ``targets``."""
    device = pick_device(device)
    total = 0.0
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        student_map, student_logits = model(to_tensor(torch.from_numpy(images[rows]).to(device)))
        losses = L_KD(student_map, student_logits, targets.maps[rows].to(device),
                      targets.logits[rows].to(device), config)
        total += losses["kd"].item() * len(student_logits)
    return total / len(images)


def distill(regions: Regions, targets: TeacherTargets, factor: int, config: Config,
            schedule: Schedule, val: Regions | None = None,
            val_targets: TeacherTargets | None = None, name: str | None = None):
    """The KD student at ÷``factor``: L_KD against the teacher, on ``regions.views[factor]`` only.

    ``regions.labels`` is never read: the student learns from ``targets`` (row m for view m) only,
    and with ``val`` keeps the epoch of lowest validation L_KD. Returns ``(student, history)``."""
    check_input_size(schedule.region_size, factor)
    images = regions.views[factor]
    if len(images) != len(targets.logits):
        raise MiniKDError(f"{len(images)} LR views but {len(targets.logits)} teacher targets; compute "
                          "the targets on the HR views of the same regions (teacher_targets)")
    student = build_network(schedule.seed, targets.logits.shape[1])
    monitor, mode, val_step = "train_loss", "min", None
    if val is not None and val_targets is not None:
        monitor = "val_kd_loss"
        val_step = lambda m: {"kd_loss": kd_loss(m, val.views[factor], val_targets, config,
                                                 schedule.device)}
    data = _loader((torch.from_numpy(images), targets.logits, targets.maps), schedule)
    history = fit_loop(student, lambda model, batch: kd_step(model, batch, config), data,
                       _fit_config(config, schedule, factor, monitor, mode, name or f"kd_x{factor}"),
                       val_step=val_step)
    return student, history


def fit(cohort, split: dict, config: Config | None = None, schedule: Schedule | None = None,
        return_teacher: bool = False):
    """The :class:`Trained` student (``return_teacher``: ``(teacher, student)``, the teacher of
    factor 1): the teacher on ``split["train"]``'s regions at hr_mag (L_CE, selected on
    ``split["val"]``'s), frozen; then the student on their LR views at hr_mag / N (L_KD, no label)."""
    config, schedule = config or Config(), schedule or Schedule()
    check_input_size(schedule.region_size, config.factor)
    classes = classes_of(cohort)
    train, val = (labeled_regions(cohort, split[name], config, schedule, (config.factor,))
                  for name in ("train", "val"))
    bank = augment(train, config, schedule)
    teacher, _ = train_ce(bank, 1, config, schedule, val=val, n_classes=len(classes))
    targets, val_targets = (teacher_targets(teacher, r.views[1], schedule.device) for r in (bank, val))
    student, _ = distill(bank, targets, config.factor, config, schedule, val, val_targets)
    trained = Trained(config, student, schedule.region_size, classes)
    trained_teacher = Trained(replace(config, factor=1), teacher, schedule.region_size, classes)
    return (trained_teacher, trained) if return_teacher else trained


# -- the trained student and its slide predictor ---------------------------------------------------
def top_k_mean(p_tumour: np.ndarray, k: int) -> float:
    """The mean of the ``k`` largest region probabilities (M,) (all of them when M < k)."""
    return float(np.sort(p_tumour)[-k:].mean())


@dataclass
class Trained(methods.Trained):
    """A ResKD network at hr_mag / ``config.factor`` (the student; factor 1: the teacher)."""

    method = "reskd"
    config: Config
    network: TinyResNetGN
    region_size: int                 # HR side in px: the network reads region_size / factor
    classes: tuple[str, ...] = CLASSES

    def state(self) -> dict:
        return {"network": self.network.state_dict(), "region_size": self.region_size,
                "classes": list(self.classes)}

    @classmethod
    def from_state(cls, config: Config, state: dict) -> Trained:
        network = TinyResNetGN(n_classes=len(state["classes"]))
        network.load_state_dict(state["network"])
        return cls(config, network, int(state["region_size"]), tuple(state["classes"]))

    def predictor(self, device=None):
        """``predict(slide_path, mpp=None) -> Prediction``: the tissue regions at hr_mag / factor
        (stages ``grid``, ``read``) classified (``classify``); P(slide) = their top-k mean P(tumour)."""
        model, device = self.network, pick_device(device)  # predict moves it there, in eval mode
        mag = self.config.hr_mag / self.config.factor
        side = check_input_size(self.region_size, self.config.factor)
        tumour = self.classes.index("tumour")

        def classify(run: SlideRun, batch_size: int = 256):
            grid = run.grid(mag, side, self.config.min_tissue)
            probs = []
            for start in range(0, len(grid), batch_size):
                regions = run.read(grid, grid.coords[start:start + batch_size])  # (b, s, s, 3)
                with run.timer.stage("classify"):
                    probs.append(predict(model, regions, device))  # (b, C)
            p_tumour = np.concatenate(probs)[:, tumour]  # (M,)
            return top_k_mean(p_tumour, self.config.top_k), {"grid": grid, "p_tumour": p_tumour}

        return lambda slide_path, mpp=None: predict_slide(slide_path, classify, mpp)
