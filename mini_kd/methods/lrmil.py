r"""LRMIL: classify a whole slide from its 5x tiles, taught by a 20x teacher.

Shin & Jeong 2026, "LRMIL: Efficient Low-Resolution Multiple Instance Learning via High-Resolution
Knowledge Distillation for Whole Slide Image Classification" (arXiv 2606.06864, MICCAI 2026).

A 20x MIL model reads and encodes every 20x tile of a slide. LRMIL reads the slide at 5x, where one
LR tile covers a k x k = 4 x 4 block of HR tiles: 16 times fewer tiles to read and encode. The
high-resolution knowledge enters during training only, in the order that works (the authors'
README lists stage 1 first, but stage 1 needs the teacher's attention):

0. **HR teacher** -- ABMIL on the 20x features, trained with L_Pre^HR = CE(z^HR, y); it keeps, for
   every slide, its logits z^HR and the attention logit a_n of every HR tile n.
1. **Stage 1, patch-level cross-resolution distillation** -- the LR encoder is a trainable copy of
   the HR encoder that sees 5x tiles. For LR tile r with children k = 1..K_r <= k² (HR tiles
   inside it; fewer at the tissue's edge), layers l in L, the student's map S_l(x^LR_r) and the
   frozen HR encoder's pooled layer-l output t_{l,k} on the 20x child tile:

       L_layer = 1/|L| Σ_l 1/K_r Σ_k 1/C_l || mean_{block k} S_l(x^LR_r) - t_{l,k} ||²
       L_attn  = Σ_k w_k · 1/D || u_k - s_r ||²,      w_k = α_k / Σ_{k' in r} α_{k'}
       L_stage1 = λ_layer L_layer + λ_attn L_attn

   with s_r the student's final embedding of the LR tile, u_k the HR embedding of child k (the
   teacher MIL's input) and α the teacher's attention. The block of child (i, c) in a map of
   h x w positions is rows [i·h/k, (i+1)·h/k), columns [c·w/k, (c+1)·w/k): the geometry decides
   it, not the network's stride.
2. **LR features** of every slide with the distilled encoder.
3. **Stage 2, slide-level distillation** -- an LR ABMIL student with an instance head:

       L = λ_ce CE(z^LR, y) + λ_bag T_b² KL(softmax(z^HR/T_b) || softmax(z^LR/T_b))
           + λ_soft T_a² KL(softmax(ã/T_a) || softmax(a^LR/T_a)) + λ_hard L_hard

   where ã_j = mean (or max) of the teacher's attention logits over the children of LR tile j,
   and L_hard is the cross-entropy of the instance head on the top-k LR tiles by ã (label 1)
   and the bottom-k (label 0).
4. **Inference reads 5x only**: tissue, 5x grid, read, encode with the LR encoder, student MIL.

Deviations from the authors' code (each a fix or a stated choice):

- The teacher stores per-tile attention *logits* (the code unpacks the model's outputs in the
  wrong order and saves the bag vector); w is their softmax over a tile's children, ã pools them.
- The encoder is a CNN (EfficientNet-Lite0, ImageNet weights that ship offline), not CONCH's ViT:
  blocks are spatial blocks of a feature map, the "layers" are the ends of its stages.
- The LR features are extracted with the distilled encoder (the step the authors' repo lacks).
- L_soft is a KL summed over the bag's instances (:func:`mini_kd.kd.attention_kl_loss`); the
  code's ``batchmean`` on a 1-D tensor divides it by the bag size.
- Stage 1 trains every weight of the LR copy in eval mode (BatchNorm keeps its ImageNet
  statistics, no stochastic depth) on ``Schedule.stage1_tiles`` LR tiles drawn (seeded) from the
  training slides, and keeps the epoch with the lowest training loss, as the authors' code does.
- The authors give no hyperparameters: :class:`Config`'s λ's and temperatures are ours
  (:mod:`mini_kd.experiments.lrmil` picks them per split on its validation slides).
- Every MIL model is trained by :func:`mini_kd.mil.train_abmil` and keeps the epoch with the
  lowest validation cross-entropy (the authors monitor validation AUC, which saturates at 1.0).
- The LR grid is tiled at 5x with the HR grid's tissue rule (``min_tissue``), so inference needs
  no HR grid; HR tiles under no kept LR tile give no stage-1 target and no ã.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from mini_kd import methods
from mini_kd.data import to_tensor
from mini_kd.encoders import Encoder, block_means, build_encoder, copy_encoder
from mini_kd.errors import MiniKDError
from mini_kd.features import cohort_features, cohort_grids, layer_targets
from mini_kd.kd import attention_kl_loss, soft_target_loss
from mini_kd.mil import (ABMIL, InstanceClassifier, abmil_predictor, make_bags, masked_softmax,
                         topk_instance_loss, train_abmil)
from mini_kd.progress import progress
from mini_kd.runtime import seed_everything
from mini_kd.slides import open_slide
from mini_kd.tiling import TileGrid, coarse_grid
from mini_kd.train import FitConfig, freeze
from mini_kd.train import fit as fit_network


# == 1. configuration and schedule =================================================================
@dataclass
class Config:
    """The method. Geometry defaults are the paper's (256-px tiles at 20x and 5x)."""

    # geometry: an LR tile covers k x k HR tiles (k = hr_mag / lr_mag when both tiles have one size)
    hr_mag: float = 20.0
    hr_tile: int = 256
    lr_mag: float = 5.0
    lr_tile: int = 256
    k: int = 4
    min_tissue: float = 0.5            # a tile is kept when at least this much of it is tissue
    encoder: str = "efficientnet_lite0"
    # MIL: ABMIL, L = 128 as in the authors' code
    hidden: int = 128
    gated: bool = False
    n_classes: int = 2
    # stage 1: the block outputs compared (early, middle, last stage) and the weights of the terms
    kd_layers: tuple = ("stage3", "stage5", "head")
    lambda_layer: float = 1.0
    lambda_attn: float = 1.0
    # stage 2
    lambda_ce: float = 1.0
    lambda_bag: float = 1.0
    lambda_soft: float = 1.0
    lambda_hard: float = 0.5
    T_b: float = 2.0
    T_a: float = 1.0
    topk: int = 2
    teacher_attn_agg: str = "mean"       # "mean" or "max" over an LR tile's children

    def __post_init__(self):
        if self.n_classes != 2:  # the predictor, the metrics and torchmil's baseline read P(class 1)
            raise MiniKDError(f"LRMIL here classifies two classes (tumour vs normal, LUAD vs LUSC), "
                              f"got n_classes={self.n_classes}; relabel the cohort to 0/1")


@dataclass
class Schedule:
    """How long and on how much LRMIL trains: Adam, batches of one bag for the MIL models."""

    mil_epochs: int = 40
    mil_lr: float = 2e-4
    mil_weight_decay: float = 1e-4
    patience: int | None = 10
    stage1_tiles: int = 512             # LR tiles of the training slides that stage 1 sees
    stage1_epochs: int = 10
    stage1_lr: float = 1e-4
    stage1_batch: int = 32
    seed: int = 0
    device: str | None = None
    checkpoint_dir: str | None = None   # per-epoch checkpoints of every step (resumable)


def fit_config(schedule: Schedule, step: str, **fields) -> FitConfig:
    """One step's :class:`~mini_kd.train.FitConfig`: the MIL schedule unless ``fields`` say
    otherwise; with ``checkpoint_dir`` the step's epochs go to a folder of their own."""
    folder = None if schedule.checkpoint_dir is None else str(Path(schedule.checkpoint_dir) / step)
    fields = {"epochs": schedule.mil_epochs, "lr": schedule.mil_lr, "patience": schedule.patience,
              "weight_decay": schedule.mil_weight_decay, **fields}
    return FitConfig(**fields, seed=schedule.seed, device=schedule.device, progress=False,
                     checkpoint_dir=folder)


# == 2. networks ====================================================================================
class Stage1Student(nn.Module):
    """The LR encoder while stage 1 trains it: every weight learns, but the module stays in
    eval mode (BatchNorm keeps the pretrained statistics, no stochastic depth)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, layers) -> dict:
        return self.encoder.feature_maps(x, layers)  # {l: (B, C_l, h_l, w_l)}


class StudentABMIL(ABMIL):
    """LRMIL's LR student: ABMIL plus CLAM's instance head (``instance_classifier``, D -> 2)."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 128, gated: bool = False):
        super().__init__(in_dim, n_classes, hidden=hidden, gated=gated)
        self.instance_classifier = InstanceClassifier(in_dim)


# == 3. the k x k geometry ==========================================================================
def link_grids(hr: TileGrid, lr: TileGrid, k: int) -> np.ndarray:
    """children (N_lr, k*k) int64: the HR tile at block slot i*k + c of each LR tile, or -1.

    ``lr`` must lie on the coarse lattice of ``hr`` (tiles of k·hr.footprint level-0 pixels,
    anchored at (0, 0)), as :func:`mini_kd.tiling.tile_grid` makes it. Built on
    :func:`mini_kd.tiling.coarse_grid`; LR tiles over which no HR tile was kept get a row of -1.
    """
    if lr.footprint != k * hr.footprint:
        raise MiniKDError(f"an LR tile covers {lr.footprint} level-0 px, not k·{hr.footprint} = "
                          f"{k * hr.footprint}; tile the LR grid at hr_mag/k with the same tile size")
    blocks, coarse = coarse_grid(hr, k, lr.mag)
    row_of = {tuple(xy): row for row, xy in enumerate(blocks.coords.tolist())}
    children = np.full((len(lr), k * k), -1, dtype=np.int64)
    for j, xy in enumerate(lr.coords.tolist()):
        if tuple(xy) in row_of:
            children[j] = coarse.children[row_of[tuple(xy)]]
    return children


def children_weights(attention_logits: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
    """w (M, k*k): the teacher's attention renormalised over each LR tile's children.

    ``attention_logits`` (N_hr,): the teacher's a_n; ``children`` (M, k*k), -1 = absent.
    w_{r,k} = α_k / Σ_{k' in r} α_{k'} = softmax_{k in r}(a_k) -- the slide-wide softmax's
    normaliser cancels -- and 0 for an absent child. A row without children raises.
    """
    present = _check_children(children >= 0)  # (M, k*k)
    logits = attention_logits[children.clamp(min=0)]  # (M, k*k)
    return masked_softmax(logits, present, dim=1)  # (M, k*k), each row sums to 1


def teacher_guided_attention(attention_logits: torch.Tensor, children: torch.Tensor,
                             aggregate: str = "mean") -> torch.Tensor:
    """ã (N_lr,): the teacher's attention logits pooled over each LR tile's children.

    ã_j = mean_{k in j} a_k (``"mean"``) or max_{k in j} a_k (``"max"``) over the children that
    exist (edge tiles have fewer than k*k). ``attention_logits`` (N_hr,), ``children`` (N_lr, k*k).
    """
    if aggregate not in ("mean", "max"):
        raise MiniKDError(f"teacher_attn_agg is {aggregate!r}; use 'mean' or 'max'")
    present = _check_children(children >= 0)  # (N_lr, k*k)
    logits = attention_logits[children.clamp(min=0)]  # (N_lr, k*k)
    if aggregate == "mean":
        return (logits * present).sum(1) / present.sum(1)  # (N_lr,)
    return logits.masked_fill(~present, float("-inf")).amax(1)  # (N_lr,)


def _check_children(present: torch.Tensor) -> torch.Tensor:
    if present.shape[0] == 0:
        raise MiniKDError("no LR tile: the slide has no tissue tile at this min_tissue; lower "
                          "min_tissue or drop the slide")
    if not bool(present.any(dim=1).all()):
        raise MiniKDError("an LR tile has no HR child; keep only LR tiles that hold HR tiles "
                          "(rows of link_grids with a child >= 0)")
    return present


# == 4. stage-1 losses: patch-level cross-resolution distillation ==================================
def layer_loss(student_maps: dict, teacher_children: dict, present: torch.Tensor,
               k: int) -> torch.Tensor:
    """L_layer = 1/|L| Σ_l 1/B Σ_r 1/K_r Σ_{k in r} 1/C_l || mean_{block k} S_l - t_{l,k} ||².

    ``student_maps`` {l: (B, C_l, h_l, w_l)}: the LR encoder's maps of B LR tiles;
    ``teacher_children`` {l: (B, k*k, C_l)}: the HR encoder's pooled layer-l output on every
    20x child (anything where absent); ``present`` (B, k*k) bool (K_r = its row sum). Child
    (i, c), slot i*k + c, is the block of rows [i·h/k, (i+1)·h/k) and columns [c·w/k, (c+1)·w/k)
    of a map, whatever the network's stride (:func:`mini_kd.encoders.block_means`).
    """
    share = present.float() / present.sum(1, keepdim=True)  # (B, k*k): 1/K_r on present children
    per_layer = []
    for layer, teacher in teacher_children.items():
        student = block_means(student_maps[layer], k)  # (B, k*k, C_l): mean over each block
        squared = (student - teacher.detach()).pow(2).mean(dim=2)  # (B, k*k): MSE over channels
        per_layer.append((squared * share).sum(1).mean())  # mean over children, then LR tiles
    return torch.stack(per_layer).mean()


def attention_weighted_loss(student_embedding: torch.Tensor, child_embeddings: torch.Tensor,
                            child_weights: torch.Tensor) -> torch.Tensor:
    """L_attn = 1/B Σ_r Σ_{k in r} w_{r,k} · 1/D || u_k - s_r ||².

    ``student_embedding`` (B, D) = s_r, the pooled final map of the LR tile; ``child_embeddings``
    (B, k*k, D) = u_k, the HR embedding of each child; ``child_weights`` (B, k*k) = w from
    :func:`children_weights` (0 for an absent child, rows sum to 1).
    """
    squared = (child_embeddings.detach() - student_embedding.unsqueeze(1)).pow(2).mean(dim=2)
    return (child_weights * squared).sum(1).mean()  # (B, k*k) -> scalar


def stage1_loss(student_maps: dict, batch: dict, config: Config,
                final_layer: str) -> tuple[torch.Tensor, dict]:
    """L_stage1 = λ_layer L_layer + λ_attn L_attn, with both terms for the log.

    ``student_maps`` {l: (B, C_l, h_l, w_l)} for the layers of ``config.kd_layers`` and the
    encoder's ``final_layer``; ``batch``: ``targets`` {l: (B, k*k, C_l)} for the layers of
    ``config.kd_layers``, ``final`` (B, k*k, D) = u_k, ``present`` (B, k*k), ``weights`` (B, k*k).
    """
    s = student_maps[final_layer].mean(dim=(2, 3))  # (B, D): s_r, the encoder's embedding
    l_layer = layer_loss({l: student_maps[l] for l in batch["targets"]}, batch["targets"],
                         batch["present"], config.k)
    l_attn = attention_weighted_loss(s, batch["final"], batch["weights"])
    loss = config.lambda_layer * l_layer + config.lambda_attn * l_attn
    return loss, {"L_layer": l_layer.item(), "L_attn": l_attn.item()}


# == 5. stage-2 losses: slide-level distillation ==================================================
def pre_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_Pre = CE(z, y), the teacher's L_Pre^HR and the student's L_Pre^LR; ``logits`` (B, C)."""
    return F.cross_entropy(logits, y)


def bag_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                T_b: float) -> torch.Tensor:
    """L_Bag = T_b² KL(softmax(z^HR/T_b) || softmax(z^LR/T_b)) (:func:`mini_kd.kd.soft_target_loss`)."""
    return soft_target_loss(student_logits, teacher_logits, T_b)


def soft_attention_loss(student_attention: torch.Tensor, guide: torch.Tensor,
                        T_a: float) -> torch.Tensor:
    """L_soft = T_a² KL(softmax(ã/T_a) || softmax(a^LR/T_a)), summed over the bag's tiles
    (:func:`mini_kd.kd.attention_kl_loss`). Both (B, N) logits; ã from :func:`teacher_guided_attention`."""
    return attention_kl_loss(student_attention, guide, T_a)


def hard_instance_loss(instance_logits: torch.Tensor, guide: torch.Tensor, topk: int) -> torch.Tensor:
    """L_hard: CE of the instance head on the top-k' tiles by ã (label 1) and the bottom k'
    (label 0), k' = min(topk, ⌊N/2⌋) (:func:`mini_kd.mil.topk_instance_loss`). One bag:
    ``instance_logits`` (N, 2), ``guide`` (N,). A bag of one tile contributes 0."""
    return topk_instance_loss(instance_logits, guide, topk)


def stage2_loss(model: StudentABMIL, bag: dict, config: Config) -> tuple[torch.Tensor, dict]:
    """L = λ_ce L_Pre^LR + λ_bag L_Bag + λ_soft L_soft + λ_hard L_hard for one bag.

    ``bag``: ``X`` (1, N, D) LR features, ``y`` (1,), ``teacher_logits`` (1, C), ``guide`` (1, N) = ã.
    A term whose λ is 0 is not computed (that is how "stage 1 only" and "LR ABMIL" train).
    """
    out = model(bag["X"])  # logits (1, C), attention_logits (1, N)
    terms = {"L_Pre": pre_loss(out.logits, bag["y"])}
    if config.lambda_bag:
        terms["L_Bag"] = bag_kd_loss(out.logits, bag["teacher_logits"], config.T_b)
    if config.lambda_soft:
        terms["L_soft"] = soft_attention_loss(out.attention_logits, bag["guide"], config.T_a)
    if config.lambda_hard:
        instance_logits = model.instance_classifier(model.standardise(bag["X"][0]))  # (N, 2)
        terms["L_hard"] = hard_instance_loss(instance_logits, bag["guide"][0], config.topk)
    weights = {"L_Pre": config.lambda_ce, "L_Bag": config.lambda_bag,
               "L_soft": config.lambda_soft, "L_hard": config.lambda_hard}
    loss = sum(weights[name] * term for name, term in terms.items())
    return loss, {name: term.item() for name, term in terms.items()}


# == 6. training steps ==============================================================================
def train_teacher(hr_features, labels: dict, split: dict, config: Config,
                  schedule: Schedule) -> ABMIL:
    """Step 0: the HR teacher, ABMIL trained with L_Pre^HR on the 20x features."""
    teacher, _ = train_abmil(make_bags(hr_features, labels, split["train"]),
                             make_bags(hr_features, labels, split["val"]),
                             fit_config(schedule, "teacher"), hidden=config.hidden,
                             gated=config.gated, n_classes=config.n_classes)
    return freeze(teacher.cpu())


@torch.no_grad()
def teacher_outputs(teacher: ABMIL, hr_features, ids) -> dict:
    """slide_id -> {"logits": z^HR (C,), "attention_logits": a (N_hr,)} -- the attention *logits*
    of every HR tile (the authors' code stores the bag vector here by mistake)."""
    outputs = {s: teacher.eval()(torch.as_tensor(hr_features[s]).float().unsqueeze(0)) for s in ids}
    return {s: {"logits": out.logits[0], "attention_logits": out.attention_logits[0]}
            for s, out in outputs.items()}


def teacher_guides(teacher: dict, hr_grids: dict, lr_grids: dict, ids, config: Config) -> dict:
    """slide_id -> ã (N_lr,): :func:`teacher_guided_attention` on each slide's LR grid."""
    return {s: teacher_guided_attention(teacher[s]["attention_logits"], torch.from_numpy(
        link_grids(hr_grids[s], lr_grids[s], config.k)), config.teacher_attn_agg) for s in ids}


def stage1_data(cohort, slide_ids, hr_grids, lr_grids, hr_features, teacher: dict,
                hr_encoder: Encoder, config: Config, schedule: Schedule, cache_dir) -> list[dict]:
    """The stage-1 training set: ``schedule.stage1_tiles`` LR tiles drawn (seeded) from the LR
    grids of ``slide_ids``, each with its 5x pixels and its children's targets.

    Items: ``tiles`` uint8 (S, S, 3), ``present`` (k*k,), ``weights`` (k*k,) = w,
    ``final`` (k*k, D) = u_k, ``targets`` {l: (k*k, C_l)} for the intermediate layers.
    """
    unknown = set(config.kd_layers) - set(hr_encoder.layer_names)
    if unknown:
        raise MiniKDError(f"kd_layers {sorted(unknown)} are not layers of {hr_encoder.name}; "
                          f"choose from {', '.join(hr_encoder.layer_names)}")
    children = {s: link_grids(hr_grids[s], lr_grids[s], config.k) for s in slide_ids}
    candidates = [(s, j) for s in slide_ids for j in np.flatnonzero((children[s] >= 0).any(1))]
    if not candidates:
        raise MiniKDError("no LR tile with HR children among the stage-1 slides; check the grids")
    rng = np.random.default_rng(schedule.seed)
    chosen = rng.choice(len(candidates), min(schedule.stage1_tiles, len(candidates)), replace=False)
    by_slide: dict[str, list[int]] = {}
    for index in sorted(chosen):
        slide_id, j = candidates[index]
        by_slide.setdefault(slide_id, []).append(int(j))
    final_layer = hr_encoder.layer_names[-1]  # its pooled output is the cached HR feature u_k
    layers = [l for l in config.kd_layers if l != final_layer]
    kk, items = config.k * config.k, []
    for slide_id, rows in progress(by_slide.items(), desc="stage-1 targets"):
        linked = torch.from_numpy(children[slide_id][rows])  # (M, k*k)
        flat = linked.clamp(min=0).reshape(-1).numpy()  # (M*k*k,) HR rows (0 where absent)
        targets = layer_targets(cohort.slide_path(slide_id), hr_grids[slide_id], flat, hr_encoder,
                                layers, cache_dir) if layers else {}
        final = torch.as_tensor(hr_features[slide_id]).float()[flat]  # (M*k*k, D)
        if final_layer in config.kd_layers:
            targets[final_layer] = final
        weights = children_weights(teacher[slide_id]["attention_logits"], linked)  # (M, k*k)
        lr_grid = lr_grids[slide_id]
        with open_slide(cohort.slide_path(slide_id)) as slide:
            tiles = slide.read_tiles(lr_grid.coords[rows], lr_grid.tile_size, lr_grid.mag)
        for m in range(len(rows)):
            block = slice(m * kk, (m + 1) * kk)
            items.append({"tiles": torch.from_numpy(tiles[m]), "present": linked[m] >= 0,
                          "weights": weights[m].float(), "final": final[block],
                          "targets": {l: targets[l][block].float() for l in config.kd_layers}})
    return items


class Batches:
    """Stage-1 items in shuffled batches of ``batch_size`` (seeded, a new order every epoch)."""

    def __init__(self, items: list[dict], batch_size: int, seed: int = 0):
        self.items, self.batch_size = items, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.items), generator=self.generator).tolist()
        for start in range(0, len(order), self.batch_size):  # each tensor stacked, (B, ...)
            yield default_collate([self.items[i] for i in order[start:start + self.batch_size]])


def train_stage1(hr_encoder: Encoder, items: list[dict], config: Config, schedule: Schedule):
    """Stage 1: distil the HR encoder into its LR copy; returns (LR encoder, fit history)."""
    seed_everything(schedule.seed)
    student = Stage1Student(copy_encoder(hr_encoder))  # the LR encoder starts as the HR one
    final_layer = hr_encoder.layer_names[-1]
    layers = list(dict.fromkeys([*config.kd_layers, final_layer]))

    def step(model, batch):
        maps = model(to_tensor(batch["tiles"]), layers)  # {l: (B, C_l, h_l, w_l)}
        return stage1_loss(maps, batch, config, final_layer)

    history = fit_network(student, step, Batches(items, schedule.stage1_batch, schedule.seed),
                          fit_config(schedule, "stage1", epochs=schedule.stage1_epochs,
                                     lr=schedule.stage1_lr, weight_decay=0.0, patience=None,
                                     monitor="train_loss"))
    return student.encoder.cpu().eval(), history


def train_student(features, labels: dict, split: dict, config: Config, schedule: Schedule,
                  teacher: dict | None = None, guides: dict | None = None) -> StudentABMIL:
    """Stage 2: the LR student on LR features. With ``teacher`` and ``guides`` (ã per slide) it
    distils (stage2_loss); without, it is plain LR ABMIL (L_Pre only)."""
    seed_everything(schedule.seed)
    distil = teacher is not None
    config = config if distil else replace(config, lambda_bag=0.0, lambda_soft=0.0,
                                           lambda_hard=0.0)
    in_dim = torch.as_tensor(features[split["train"][0]]).shape[1]
    student = StudentABMIL(in_dim, config.n_classes, config.hidden, config.gated)
    kd = dict(teacher_logits={s: teacher[s]["logits"] for s in split["train"]},
              guide=guides) if distil else {}
    train_abmil(make_bags(features, labels, split["train"], **kd),
                make_bags(features, labels, split["val"]), fit_config(schedule, "student"),
                student, lambda model, bag: stage2_loss(model, bag, config))
    return student.cpu()


# == 7. fit: the teacher, stage 1 and stage 2 on a cohort's train slides, selected on val =========
def fit(cohort, split: dict, config: Config, schedule: Schedule) -> "Trained":
    """Steps 0-3 on ``split["train"]``; the MIL models keep their best epoch on ``split["val"]``."""
    ids = [*split["train"], *split["val"]]
    labels = dict(zip(ids, cohort.labels(ids).tolist()))
    hr_grids = cohort_grids(cohort, config.hr_mag, config.hr_tile, config.min_tissue)
    lr_grids = cohort_grids(cohort, config.lr_mag, config.lr_tile, config.min_tissue)
    hr_encoder = build_encoder(config.encoder).eval()
    hr_features = cohort_features(cohort, {s: hr_grids[s] for s in ids}, hr_encoder,
                                  device=schedule.device)
    teacher = teacher_outputs(train_teacher(hr_features, labels, split, config, schedule),
                              hr_features, split["train"])
    items = stage1_data(cohort, split["train"], hr_grids, lr_grids, hr_features, teacher,
                        hr_encoder, config, schedule, cohort.root / "lrmil" / "targets")
    lr_encoder, _ = train_stage1(hr_encoder, items, config, schedule)
    lr_features = cohort_features(cohort, {s: lr_grids[s] for s in ids}, lr_encoder,
                                  device=schedule.device)
    student = train_student(lr_features, labels, split, config, schedule, teacher,
                            teacher_guides(teacher, hr_grids, lr_grids, split["train"], config))
    return Trained(config, lr_encoder, student)


# == 8. the trained method: inference reads 5x only ================================================
@dataclass
class Trained(methods.Trained):
    """LRMIL after both stages: the distilled 5x encoder and the stage-2 student."""

    method = "lrmil"
    config: Config
    lr_encoder: Encoder
    student: StudentABMIL
    encoder_kwargs: dict = field(default_factory=dict)   # build_encoder(config.encoder, **these)

    def state(self) -> dict:
        return {"encoder_kwargs": self.encoder_kwargs, "encoder": self.lr_encoder.state_dict(),
                "student": {"in_dim": self.student.in_dim, "n_classes": self.student.n_classes,
                            "state_dict": self.student.state_dict()}}

    @classmethod
    def from_state(cls, config: Config, state: dict) -> "Trained":
        encoder = build_encoder(config.encoder, pretrained=False, **state["encoder_kwargs"])
        encoder.load_state_dict(state["encoder"])
        s = state["student"]
        student = StudentABMIL(s["in_dim"], s["n_classes"], config.hidden, config.gated)
        student.load_state_dict(s["state_dict"])
        return cls(config, encoder, student, dict(state["encoder_kwargs"]))

    def predictor(self, device=None):
        """Reads 5x tiles only: the distilled encoder, then the student (:func:`abmil_predictor`)."""
        c = self.config
        return abmil_predictor(self.lr_encoder, self.student, c.lr_mag, c.lr_tile, c.min_tissue, device)
