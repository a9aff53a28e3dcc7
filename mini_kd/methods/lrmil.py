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

- The teacher's stored "attention" is the per-tile attention *logits*; the code unpacks the
  model's outputs in the wrong order and saves the bag vector. Stage 1 weights use the softmax
  of the logits (renormalised over the tile's children); ã pools the logits.
- The encoder is a CNN (EfficientNet-Lite0, ImageNet weights that ship offline) instead of CONCH's
  ViT, so blocks are spatial blocks of a feature map (adaptive average pooling to k x k), and the
  "layers" are the ends of its stages. No positional embedding to slice.
- The LR features are extracted with the distilled encoder (the step the authors' repo lacks).
- L_soft is a KL summed over the bag's instances (:func:`mini_kd.kd.attention_kl_loss`); the
  code's ``batchmean`` on a 1-D tensor divides it by the bag size.
- During stage 1 the LR copy runs in eval mode (BatchNorm keeps its ImageNet statistics, no
  stochastic depth): batches of a few 5x tiles would give poor batch statistics. All of its
  weights train (few epochs on a CPU); the checkpoint is the epoch with the lowest training loss,
  as in the authors' code.
- The authors give no hyperparameters. :func:`run_experiment` chooses λ_bag, λ_soft, T_b and T_a
  by a small sweep per split: fit on that split's train slides, chosen on its validation slides
  (lowest validation cross-entropy, :func:`sweep_stage2`, shown in notebook 03); the winner trains
  that split's stage-2 students, so no split's setting was chosen with its own test slides;
  the defaults below serve when no sweep runs. λ_ce = 1 (and on the CPU presets λ_hard = 0.5
  and topk = 2) are fixed.
- The MIL models keep the epoch with the lowest validation cross-entropy (the authors monitor
  validation AUC, which saturates at 1.0 on the phantom's small validation sets).
- The LR grid is tiled at 5x with the same tissue rule as the HR grid (at least ``min_tissue`` of
  the tile is tissue), so inference needs no HR grid; HR tiles under no kept LR tile give no
  stage-1 target and no ã.

Reading order: configuration, networks, geometry, stage-1 losses, stage-2 losses, training steps,
inference, and the experiment that the notebook and the benchmark both call.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mini_kd.data import to_tensor
from mini_kd.features import cohort_features, cohort_grids, layer_targets
from mini_kd.encoders import Encoder, block_means, build_encoder, copy_encoder, fingerprint
from mini_kd.errors import MiniKDError
from mini_kd.evaluate import classification_metrics, repeated_splits, summarize
from mini_kd.experiments import time_pipelines
from mini_kd import methods
from mini_kd.inference import StageTimer, predict_slide
from mini_kd.kd import attention_kl_loss, soft_target_loss
from mini_kd.mil import ABMIL, InstanceClassifier, masked_softmax, topk_instance_loss
from mini_kd.phantom import TUMOUR
from mini_kd.presets import GEOMETRY, check_preset
from mini_kd.progress import progress
from mini_kd.slides import open_slide
from mini_kd.tiling import MASK_MAG, TileGrid, coarse_grid, tile_grid
from mini_kd.tissue import tissue_mask
from mini_kd.runtime import pick_device, seed_everything
from mini_kd.train import (FitConfig, fit, foreign_checkpoint, freeze, read_checkpoint,
                           write_checkpoint)


# == 1. configuration ===============================================================================
@dataclass
class LRMILConfig:
    """Everything LRMIL needs. Geometry defaults are the paper's (256-px tiles at 20x and 5x)."""

    # geometry: an LR tile covers k x k HR tiles (k = hr_mag / lr_mag when both tiles have one size)
    hr_mag: float = 20.0
    hr_tile: int = 256
    lr_mag: float = 5.0
    lr_tile: int = 256
    k: int = 4
    min_tissue: float = 0.5            # a tile is kept when at least this much of it is tissue
    encoder: str = "efficientnet_lite0"
    # MIL (ABMIL, L = 128 as in the authors' code); Adam, batches of one bag
    hidden: int = 128
    gated: bool = False
    mil_epochs: int = 40
    mil_lr: float = 2e-4
    mil_weight_decay: float = 1e-4
    patience: int = 10
    # stage 1: the block outputs compared (early, middle, last stage) and the weights of the terms
    kd_layers: tuple = ("stage3", "stage5", "head")
    lambda_layer: float = 1.0
    lambda_attn: float = 1.0
    stage1_tiles: int = 512             # LR tiles of the training slides used per stage-1 run
    stage1_epochs: int = 10
    stage1_lr: float = 1e-4
    stage1_batch: int = 32
    # stage 2 (run_experiment replaces the swept ones by each split's sweep_stage2 best)
    lambda_ce: float = 1.0
    lambda_bag: float = 1.0
    lambda_soft: float = 1.0
    lambda_hard: float = 0.5
    T_b: float = 2.0
    T_a: float = 1.0
    topk: int = 2
    teacher_attn_agg: str = "mean"       # "mean" or "max" over an LR tile's children
    n_classes: int = 2
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        if self.n_classes != 2:  # the predictor, the metrics and torchmil's baseline read P(class 1)
            raise MiniKDError(f"LRMIL here classifies two classes (tumour vs normal, LUAD vs LUSC), "
                              f"got n_classes={self.n_classes}; relabel the cohort to 0/1")

    def stage1_key(self) -> dict:
        """The fields a stage-1 run depends on (its cache key)."""
        names = ("hr_mag", "hr_tile", "lr_mag", "lr_tile", "k", "min_tissue", "encoder", "hidden",
                 "gated", "mil_epochs", "mil_lr", "mil_weight_decay", "patience", "kd_layers",
                 "lambda_layer", "lambda_attn", "stage1_tiles", "stage1_epochs", "stage1_lr",
                 "stage1_batch", "seed")
        return {name: getattr(self, name) for name in names}


# Settings of the experiment around the method, per preset (the geometry comes from presets).
EXPERIMENTS = {
    "smoke": dict(n_splits=2, timing_slides=1, sweep=dict(lambda_soft=(0.0, 1.0)),
                  method=dict(mil_epochs=6, patience=4, stage1_tiles=16, stage1_epochs=1,
                              stage1_batch=8)),
    "book": dict(n_splits=3, timing_slides=4,
                 sweep=dict(lambda_bag=(0.0, 1.0), lambda_soft=(0.0, 1.0), T_b=(1.0, 2.0),
                            T_a=(1.0, 4.0)),
                 method=dict(mil_epochs=40, stage1_tiles=512, stage1_epochs=12, stage1_batch=24)),
    "gpu": dict(n_splits=5, timing_slides=10,
                sweep=dict(lambda_bag=(0.0, 0.5, 1.0), lambda_soft=(0.0, 0.5, 1.0),
                           lambda_hard=(0.0, 0.5, 1.0), T_b=(1.0, 2.0, 4.0), T_a=(1.0, 2.0, 4.0)),
                method=dict(mil_epochs=100, patience=20, stage1_tiles=4096, stage1_epochs=10,
                            stage1_batch=64, topk=8)),
}


def config_for(preset: str, **overrides) -> LRMILConfig:
    """The method's configuration for ``preset``: its tile geometry and its budget."""
    geometry = GEOMETRY[check_preset(preset)]
    k = round(geometry["lr_tile"] * geometry["hr_mag"] / (geometry["hr_tile"] * geometry["lr_mag"]))
    return LRMILConfig(hr_mag=geometry["hr_mag"], hr_tile=geometry["hr_tile"],
                       lr_mag=geometry["lr_mag"], lr_tile=geometry["lr_tile"], k=k,
                       **{**EXPERIMENTS[preset]["method"], **overrides})


# == 2. networks ====================================================================================
def lr_encoder_from(hr_encoder: Encoder) -> Encoder:
    """The LR encoder: an independent, trainable copy of the HR encoder (same weights at start)."""
    return copy_encoder(hr_encoder)


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


def child_blocks(feature_map: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, k*k, C): the mean of the LR map over the block of each HR child.

    Child (i, c) -- slot i*k + c, the slot order of ``CoarseMap.children`` -- covers rows
    [i·h/k, (i+1)·h/k) and columns [c·w/k, (c+1)·w/k) of the map, whatever the network's
    stride; when k does not divide h the blocks are those of adaptive average pooling to k x k
    (:func:`mini_kd.encoders.block_means`, neighbouring blocks then share a row).
    """
    return block_means(feature_map, k)  # (B, k*k, C)


def children_weights(attention_logits: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
    """w (M, k*k): the teacher's attention renormalised over each LR tile's children.

    ``attention_logits`` (N_hr,): the teacher's a_n; ``children`` (M, k*k), -1 = absent.
    w_{r,k} = α_k / Σ_{k' in r} α_{k'} = softmax_{k in r}(a_k) -- the slide-wide softmax's
    normaliser cancels -- and 0 for an absent child. A row without children raises.
    """
    present = children >= 0  # (M, k*k)
    _check_children(present)
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
    present = children >= 0  # (N_lr, k*k)
    _check_children(present)
    logits = attention_logits[children.clamp(min=0)]  # (N_lr, k*k)
    if aggregate == "mean":
        return (logits * present).sum(1) / present.sum(1)  # (N_lr,)
    return logits.masked_fill(~present, float("-inf")).amax(1)  # (N_lr,)


def _check_children(present: torch.Tensor) -> None:
    if present.shape[0] == 0:
        raise MiniKDError("no LR tile: the slide has no tissue tile at this min_tissue; lower "
                          "min_tissue or drop the slide")
    if not bool(present.any(dim=1).all()):
        raise MiniKDError("an LR tile has no HR child; keep only LR tiles that hold HR tiles "
                          "(rows of link_grids with a child >= 0)")


# == 4. stage-1 losses: patch-level cross-resolution distillation ==================================
def layer_loss(student_maps: dict, teacher_children: dict, present: torch.Tensor,
               k: int) -> torch.Tensor:
    """L_layer = 1/|L| Σ_l 1/B Σ_r 1/K_r Σ_{k in r} 1/C_l || mean_{block k} S_l - t_{l,k} ||².

    ``student_maps`` {l: (B, C_l, h_l, w_l)}: the LR encoder's maps of B LR tiles;
    ``teacher_children`` {l: (B, k*k, C_l)}: the HR encoder's pooled layer-l output on every
    20x child (anything where absent); ``present`` (B, k*k) bool (K_r = its row sum).
    """
    share = present.float() / present.sum(1, keepdim=True)  # (B, k*k): 1/K_r on present children
    per_layer = []
    for layer, teacher in teacher_children.items():
        student = child_blocks(student_maps[layer], k)  # (B, k*k, C_l)
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


def stage1_loss(student_maps: dict, batch: dict, config: LRMILConfig,
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
    """L_Pre = CE(z, y): the slide label's cross-entropy (the teacher's L_Pre^HR, the student's
    L_Pre^LR). ``logits`` (B, C), ``y`` (B,)."""
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


def stage2_loss(model: StudentABMIL, bag: dict, config: LRMILConfig) -> tuple[torch.Tensor, dict]:
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
        instance_logits = model.instance_classifier(bag["X"][0])  # (N, 2)
        terms["L_hard"] = hard_instance_loss(instance_logits, bag["guide"][0], config.topk)
    weights = {"L_Pre": config.lambda_ce, "L_Bag": config.lambda_bag,
               "L_soft": config.lambda_soft, "L_hard": config.lambda_hard}
    loss = sum(weights[name] * term for name, term in terms.items())
    return loss, {name: term.item() for name, term in terms.items()}


# == 6. training steps ==============================================================================
class Bags:
    """Bags as fit() batches: one dict of tensors per slide (batch size 1, as in the paper),
    in a new seeded order every epoch. ``items`` is a list of such dicts."""

    def __init__(self, items: list[dict], seed: int = 0, shuffle: bool = True):
        self.items, self.shuffle = items, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        order = torch.randperm(len(self.items), generator=self.generator) if self.shuffle \
            else torch.arange(len(self.items))
        return (self.items[i] for i in order.tolist())


def bag_items(features, labels: dict, ids, teacher=None, guides: dict | None = None) -> list[dict]:
    """One dict per slide: ``X`` (1, N, D), ``y`` (1,), and the teacher's ``teacher_logits``
    (1, C) and ``guide`` ã (1, N) when given."""
    items = []
    for slide_id in ids:
        X = torch.as_tensor(features[slide_id]).float()  # (N, D)
        if X.ndim != 2 or len(X) == 0:
            raise MiniKDError(f"{slide_id} has no tile features (shape {tuple(X.shape)}); a slide "
                              "needs at least one tissue tile")
        item = {"X": X.unsqueeze(0), "y": torch.tensor([int(labels[slide_id])]), "id": slide_id}
        if teacher is not None:
            item["teacher_logits"] = teacher[slide_id]["logits"].unsqueeze(0)  # (1, C)
        if guides is not None:
            item["guide"] = guides[slide_id].unsqueeze(0)  # (1, N)
        items.append(item)
    return items


def _tensors(item: dict) -> dict:
    return {key: value for key, value in item.items() if torch.is_tensor(value)}


@torch.no_grad()
def predict_bags(model: nn.Module, items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(labels (S,), P(class 1) (S,)) of ``model`` (an ABMIL) on bag dicts, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    probs = [torch.softmax(model(item["X"].to(device)).logits, -1)[0, 1].item() for item in items]
    return np.array([int(item["y"]) for item in items]), np.array(probs)


def _mil_fit_config(config: LRMILConfig) -> FitConfig:
    return FitConfig(epochs=config.mil_epochs, lr=config.mil_lr,
                     weight_decay=config.mil_weight_decay, patience=config.patience,
                     monitor="val_loss", mode="min", seed=config.seed, device=config.device,
                     progress=False)


def _validation(items: list[dict]):
    """fit()'s whole-set validation: the bags' mean cross-entropy, and their AUC."""

    def val_step(model):
        labels, probs = predict_bags(model, items)
        p = np.clip(np.where(labels == 1, probs, 1 - probs), 1e-7, 1)
        return {"loss": float(-np.log(p).mean()),
                "auc": classification_metrics(labels, probs)["auc"]}

    return val_step


def train_mil(model: nn.Module, train_items: list[dict], val_items: list[dict],
              config: LRMILConfig, step=None):
    """Fit a MIL model on bag dicts; the epoch with the lowest validation CE is kept.

    ``step(model, bag) -> (loss, metrics)`` defaults to plain L_Pre (the teacher, LR ABMIL).

    On a CPU the fit runs on one thread: a bag of tens to hundreds of tiles is too small for
    intra-op parallelism, and on a shared machine a second thread mostly waits on the first
    (the book preset's teacher trained in 10 s on one thread, 86 s on two, on a busy machine).
    """
    if step is None:
        def step(model, bag):
            loss = pre_loss(model(bag["X"]).logits, bag["y"])
            return loss, {"L_Pre": loss.item()}
    with _one_cpu_thread(pick_device(config.device)):
        history = fit(model, lambda m, b: step(m, b), Bags([_tensors(i) for i in train_items],
                                                            config.seed),
                      _mil_fit_config(config), val_step=_validation(val_items))
    model.eval()
    return history


@contextmanager
def _one_cpu_thread(device):
    """torch on one intra-op thread inside the block when ``device`` is the CPU."""
    threads = torch.get_num_threads()
    if str(device).startswith("cpu"):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_teacher(hr_features, labels: dict, split: dict, config: LRMILConfig) -> ABMIL:
    """Step 0: the HR teacher, ABMIL trained with L_Pre^HR on the 20x features."""
    seed_everything(config.seed)
    teacher = ABMIL(_dim(hr_features), config.n_classes, config.hidden, config.gated)
    train_mil(teacher, bag_items(hr_features, labels, split["train"]),
              bag_items(hr_features, labels, split["val"]), config)
    return freeze(teacher.cpu())


@torch.no_grad()
def teacher_outputs(teacher: ABMIL, hr_features, ids) -> dict:
    """slide_id -> {"logits": z^HR (C,), "attention_logits": a (N_hr,)} -- the attention *logits*
    of every HR tile (the authors' code stores the bag vector here by mistake)."""
    teacher.eval()
    out = {}
    for slide_id in ids:
        result = teacher(torch.as_tensor(hr_features[slide_id]).float().unsqueeze(0))
        out[slide_id] = {"logits": result.logits[0], "attention_logits": result.attention_logits[0]}
    return out


def _dim(features) -> int:
    return int(torch.as_tensor(features[next(iter(features))]).shape[1])


# -- stage 1: targets, data and training ------------------------------------------------------------
def stage1_data(cohort, slide_ids, hr_grids, lr_grids, hr_features, teacher: dict,
                hr_encoder: Encoder, config: LRMILConfig, cache_dir) -> list[dict]:
    """The stage-1 training set: ``config.stage1_tiles`` LR tiles drawn (seeded) from the LR
    grids of ``slide_ids``, each with its 5x pixels and its children's targets.

    Items: ``tiles`` uint8 (S, S, 3), ``present`` (k*k,), ``weights`` (k*k,) = w,
    ``final`` (k*k, D) = u_k, ``targets`` {l: (k*k, C_l)} for the intermediate layers.
    """
    unknown = set(config.kd_layers) - set(hr_encoder.layer_names)
    if unknown:
        raise MiniKDError(f"kd_layers {sorted(unknown)} are not layers of {hr_encoder.name}; "
                          f"choose from {', '.join(hr_encoder.layer_names)}")
    candidates = [(s, j) for s in slide_ids
                  for j in np.flatnonzero((link_grids(hr_grids[s], lr_grids[s], config.k) >= 0)
                                          .any(1))]
    if not candidates:
        raise MiniKDError("no LR tile with HR children among the stage-1 slides; check the grids")
    rng = np.random.default_rng(config.seed)
    chosen = rng.choice(len(candidates), min(config.stage1_tiles, len(candidates)), replace=False)
    by_slide: dict[str, list[int]] = {}
    for index in sorted(chosen):
        slide_id, j = candidates[index]
        by_slide.setdefault(slide_id, []).append(int(j))
    final_layer = hr_encoder.layer_names[-1]  # its pooled output is the cached HR feature u_k
    layers = [l for l in config.kd_layers if l != final_layer]
    items = []
    for slide_id, rows in progress(by_slide.items(), desc="stage-1 targets"):
        children = torch.from_numpy(link_grids(hr_grids[slide_id], lr_grids[slide_id],
                                               config.k)[rows])  # (M, k*k)
        present = children >= 0
        flat = children.clamp(min=0).reshape(-1).numpy()  # (M*k*k,) HR rows (0 where absent)
        targets = layer_targets(cohort.slide_path(slide_id), hr_grids[slide_id], flat, hr_encoder,
                                layers, cache_dir) if layers else {}
        final = torch.as_tensor(hr_features[slide_id]).float()[flat]  # (M*k*k, D)
        if final_layer in config.kd_layers:
            targets[final_layer] = final
        weights = children_weights(teacher[slide_id]["attention_logits"], children)  # (M, k*k)
        lr_grid = lr_grids[slide_id]
        with open_slide(cohort.slide_path(slide_id)) as slide:
            tiles = slide.read_tiles(lr_grid.coords[rows], lr_grid.tile_size, lr_grid.mag)
        kk = config.k * config.k
        for m in range(len(rows)):
            block = slice(m * kk, (m + 1) * kk)
            items.append({"tiles": torch.from_numpy(tiles[m]), "present": present[m],
                          "weights": weights[m].float(), "final": final[block],
                          "targets": {l: targets[l][block].float() for l in config.kd_layers}})
    return items


def _collate(items: list[dict]) -> dict:
    out = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "targets"}
    out["targets"] = {l: torch.stack([item["targets"][l] for item in items])
                      for l in items[0]["targets"]}
    return out


class Batches(Bags):
    """Stage-1 items grouped into shuffled batches of ``batch_size`` (seeded, new order per epoch)."""

    def __init__(self, items: list[dict], batch_size: int, seed: int = 0):
        super().__init__(items, seed)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.items), generator=self.generator).tolist()
        for start in range(0, len(order), self.batch_size):
            yield _collate([self.items[i] for i in order[start:start + self.batch_size]])


def train_stage1(hr_encoder: Encoder, items: list[dict], config: LRMILConfig):
    """Stage 1: distil the HR encoder into its LR copy; returns (LR encoder, fit history)."""
    seed_everything(config.seed)
    student = Stage1Student(lr_encoder_from(hr_encoder))
    final_layer = hr_encoder.layer_names[-1]
    layers = list(dict.fromkeys([*config.kd_layers, final_layer]))

    def step(model, batch):
        maps = model(to_tensor(batch["tiles"]), layers)  # {l: (B, C_l, h_l, w_l)}
        return stage1_loss(maps, batch, config, final_layer)

    history = fit(student, step, Batches(items, config.stage1_batch, config.seed),
                  FitConfig(epochs=config.stage1_epochs, lr=config.stage1_lr,
                            monitor="train_loss", mode="min", seed=config.seed,
                            device=config.device, progress=False))
    return student.encoder.cpu().eval(), history


def train_student(features, labels: dict, split: dict, config: LRMILConfig, teacher=None,
                  guides: dict | None = None) -> StudentABMIL:
    """Stage 2: the LR student on LR features. With ``teacher`` and ``guides`` (ã per slide) it
    distils (stage2_loss); without, it is plain LR ABMIL (L_Pre only)."""
    seed_everything(config.seed)
    distil = teacher is not None
    config = config if distil else replace(config, lambda_bag=0.0, lambda_soft=0.0,
                                           lambda_hard=0.0)
    student = StudentABMIL(_dim(features), config.n_classes, config.hidden, config.gated)
    train_items = bag_items(features, labels, split["train"], teacher if distil else None,
                            guides if distil else None)
    train_mil(student, train_items, bag_items(features, labels, split["val"]), config,
              step=lambda model, bag: stage2_loss(model, bag, config))
    return student.cpu()


# == 7. inference: 5x only ==========================================================================
@dataclass
class SlidePredictor:
    """A slide file -> label, P(tumour), attention, and the seconds of each stage.

    Stages: ``tissue`` (thumbnail + mask), ``grid`` (tiles at ``mag``), ``read``, ``encode``,
    ``MIL``. LRMIL reads at 5x with the distilled LR encoder; the same class, given 20x and the
    HR encoder, is the HR ABMIL baseline the speed is compared with.
    """

    encoder: Encoder
    mil: ABMIL
    mag: float
    tile_size: int
    min_tissue: float = 0.5
    batch_size: int = 64
    device: str | None = None
    geometry: dict = field(default_factory=dict)

    def __post_init__(self):
        self.device = pick_device(self.device)
        self.encoder.to(self.device).eval()
        self.mil.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, slide_path, mpp: float | None = None, details: bool = False) -> dict:
        timer = StageTimer()
        with timer.stage("tissue"):
            slide = open_slide(slide_path, mpp=mpp)
            tissue = tissue_mask(slide.thumbnail(min(MASK_MAG, slide.magnification)))
        try:
            with timer.stage("grid"):
                grid = tile_grid(slide, self.mag, self.tile_size, self.min_tissue, tissue=tissue)
            if len(grid) == 0:
                raise MiniKDError(f"{slide.slide_id}: no tile at {self.mag:g}x is {self.min_tissue:.0%} "
                                  "tissue, so there is nothing to classify; check the slide or "
                                  "lower min_tissue")
            features = []
            for start in range(0, len(grid), self.batch_size):
                with timer.stage("read"):
                    tiles = slide.read_tiles(grid.coords[start:start + self.batch_size],
                                             self.tile_size, self.mag)  # (b, S, S, 3)
                with timer.stage("encode"):
                    features.append(self.encoder(to_tensor(tiles).to(self.device)))  # (b, D)
            with timer.stage("MIL"):
                out = self.mil(torch.cat(features).unsqueeze(0))  # logits (1, C)
                probability = torch.softmax(out.logits, -1)[0, 1].item()
        finally:
            slide.close()
        result = {"slide_id": slide.slide_id, "label": int(probability >= 0.5),
                  "probability": probability, "seconds": timer.seconds, "tiles_read": len(grid)}
        if details:
            result["grid"] = grid
            result["attention"] = torch.softmax(out.attention_logits[0], 0).cpu().numpy()
        return result


def abmil_predictor(encoder: Encoder, mil: ABMIL, mag: float, tile_size: int,
                    min_tissue: float = 0.5, device: str | None = None):
    """``predict(slide_path, mpp=None) -> Prediction``: ``encoder`` + ABMIL on the tissue tiles at
    ``mag`` (stages tissue, grid, read, encode, MIL), on :mod:`mini_kd.inference`."""
    device = pick_device(device)
    encoder.to(device).eval()
    mil.to(device).eval()

    def predict(run):
        grid = run.grid(mag, tile_size, min_tissue)
        features = run.encode(grid, encoder, device=device)  # (N, D)
        with run.timer.stage("MIL"):
            out = mil(features.unsqueeze(0))  # logits (1, C)
            probability = torch.softmax(out.logits, -1)[0, 1].item()
        return probability, {"grid": grid,
                             "attention": torch.softmax(out.attention_logits[0], 0).cpu().numpy()}

    return lambda slide_path, mpp=None: predict_slide(slide_path, predict, mpp)


Config = LRMILConfig


class Trained(methods.Trained):
    """LRMIL after both stages: the distilled 5x encoder and the stage-2 student."""

    method = "lrmil"

    def __init__(self, config: LRMILConfig, lr_encoder: Encoder, student: StudentABMIL,
                 encoder_kwargs: dict | None = None):
        self.config, self.lr_encoder, self.student = config, lr_encoder, student
        self.encoder_kwargs = dict(encoder_kwargs or {})

    def state(self) -> dict:
        return {"encoder_kwargs": self.encoder_kwargs, "encoder": self.lr_encoder.state_dict(),
                "student": {"in_dim": self.student.in_dim, "n_classes": self.student.n_classes,
                            "state_dict": self.student.state_dict()}}

    @classmethod
    def from_state(cls, config: LRMILConfig, state: dict) -> "Trained":
        encoder = build_encoder(config.encoder, pretrained=False, **state["encoder_kwargs"])
        encoder.load_state_dict(state["encoder"])
        s = state["student"]
        student = StudentABMIL(s["in_dim"], s["n_classes"], config.hidden, config.gated)
        student.load_state_dict(s["state_dict"])
        return cls(config, encoder, student, state["encoder_kwargs"])

    def predictor(self, device=None):
        """Reads 5x tiles only: the distilled encoder, then the student."""
        c = self.config
        return abmil_predictor(self.lr_encoder, self.student, c.lr_mag, c.lr_tile, c.min_tissue,
                               device)


def save_checkpoint(path, lr_encoder: Encoder, student: StudentABMIL, config: LRMILConfig,
                    encoder_kwargs: dict | None = None) -> Path:
    """One file with everything inference needs (:meth:`Trained.save`)."""
    return Trained(config, lr_encoder, student, encoder_kwargs).save(path)


def load_predictor(checkpoint, device: str | None = None) -> SlidePredictor:
    """The experiment's dict-returning predictor of a checkpoint saved by :func:`save_checkpoint`."""
    trained = methods.load(checkpoint, "lrmil")
    c = trained.config
    return SlidePredictor(trained.lr_encoder, trained.student, c.lr_mag, c.lr_tile, c.min_tissue,
                          device=device)


# == 8. the experiment the notebook and the benchmark run ==========================================
MODELS = {  # name -> what it is, in the order of the comparison table
    "hr_abmil": "HR ABMIL (teacher), 20x features",
    "hr_abmil_torchmil": "torchmil ABMIL, same 20x features (cross-check)",
    "lr_abmil": "LR ABMIL, 5x features of the un-distilled encoder, no KD",
    "stage1_only": "stage 1 only: distilled 5x features, CE only",
    "stage2_only": "stage 2 only: un-distilled 5x features, slide-level KD",
    "lrmil": "LRMIL: distilled 5x features and slide-level KD",
}


# The pipeline each model runs at inference: the same reads, encoder cost and MIL cost.
TIMED_AS = {"hr_abmil": "hr_abmil", "hr_abmil_torchmil": "hr_abmil", "lr_abmil": "lr_abmil",
            "stage2_only": "lr_abmil", "stage1_only": "lrmil", "lrmil": "lrmil"}


@dataclass
class Experiment:
    """What :func:`run_experiment` measured; plain python values (``pandas.DataFrame(rows)``)."""

    preset: str
    config: LRMILConfig
    splits: list[dict]
    runs: list[dict] = field(default_factory=list)      # one row per split and model: test metrics
    stage1: list[dict] = field(default_factory=list)    # one row per split and stage-1 epoch
    sweep: list[dict] = field(default_factory=list)     # one row per split and stage-2 setting (val)
    stage2_setting: list[dict] = field(default_factory=list)  # per split: its students' setting
    timing: list[dict] = field(default_factory=list)    # one row per slide and pipeline: seconds
    heatmap: dict = field(default_factory=dict)         # one test slide's attention maps
    checkpoint: Path | None = None                       # LRMIL of split 0, for mini-kd predict
    seconds: float = 0.0

    def summary(self) -> list[dict]:
        """Mean and std over the splits of AUC, accuracy and weighted F1 for each model."""
        rows = []
        for model, description in MODELS.items():
            runs = [run for run in self.runs if run["model"] == model]
            if runs:
                stats = summarize([{k: run[k] for k in ("auc", "accuracy", "f1")} for run in runs])
                rows.append({"model": model, "description": description, "splits": len(runs),
                             **{f"{k}_{part}": v[i] for k, v in stats.items()
                                for i, part in enumerate(("mean", "std"))}})
        return rows

    def speed(self) -> list[dict]:
        """Mean seconds per slide of each pipeline, and its speed-up over HR ABMIL."""
        rows = []
        for model in dict.fromkeys(row["model"] for row in self.timing):
            timed = [row for row in self.timing if row["model"] == model]
            stages = [k for k in timed[0]
                      if k not in ("model", "slide_id", "position", "tiles_read")]
            rows.append({"model": model, "tiles": float(np.mean([r["tiles_read"] for r in timed])),
                         **{k: float(np.mean([r[k] for r in timed])) for k in stages}})
        if rows and rows[0]["model"] == "hr_abmil":
            for row in rows:
                row["speedup_read_encode_mil"] = rows[0]["read_encode_mil"] / row["read_encode_mil"]
                row["speedup_total"] = rows[0]["total"] / row["total"]
        return rows

    def to_json(self) -> dict:
        """The benchmark's JSON: per model AUC, accuracy, F1 (mean and std) and seconds per slide."""
        out = {"preset": self.preset, "n_splits": len(self.splits),
               "n_test_slides": [len(s["test"]) for s in self.splits],
               "seconds_experiment": round(self.seconds, 1)}
        speed = {row["model"]: row for row in self.speed()}
        for row in self.summary():
            entry = {"auc": row["auc_mean"], "auc_std": row["auc_std"],
                     "accuracy": row["accuracy_mean"], "accuracy_std": row["accuracy_std"],
                     "f1": row["f1_mean"], "f1_std": row["f1_std"]}
            timed = speed.get(TIMED_AS[row["model"]])
            if timed is not None:
                entry.update(seconds_per_slide=timed["total"],
                             seconds_read_encode_mil=timed["read_encode_mil"],
                             seconds_by_stage={k: timed[k] for k in
                                               ("tissue", "grid", "read", "encode", "MIL")},
                             tiles_per_slide=timed["tiles"])
            out[row["model"]] = entry
        if {"hr_abmil", "lr_abmil", "lrmil"} <= out.keys() and "seconds_per_slide" in out["lrmil"]:
            hr, lr, ours = out["hr_abmil"], out["lr_abmil"], out["lrmil"]
            speedup = hr["seconds_read_encode_mil"] / ours["seconds_read_encode_mil"]
            out["targets"] = {
                "speedup_read_encode_mil": speedup, "speedup_at_least_12x": bool(speedup >= 12),
                "speedup_total": hr["seconds_per_slide"] / ours["seconds_per_slide"],
                "auc_ratio_to_hr": ours["auc"] / hr["auc"],
                "auc_at_least_98pct_of_hr_abmil": bool(ours["auc"] >= 0.98 * hr["auc"]),
                "auc_above_lr_abmil": bool(ours["auc"] > lr["auc"]),
            }
        if self.sweep:  # rows are sorted best first within each split
            out["sweep_best"] = [next(row for row in self.sweep if row["split"] == r)
                                 for r in dict.fromkeys(row["split"] for row in self.sweep)]
        out["stage2_setting"] = self.stage2_setting
        return out


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _probabilities(model: nn.Module, items: list[dict]) -> np.ndarray:
    """P(class 1) per bag for our ABMIL (softmax of 2 logits) or torchmil's (sigmoid of 1)."""
    model.eval()
    with torch.no_grad():
        out = [model(item["X"]) for item in items]
    if hasattr(out[0], "logits"):
        return np.array([torch.softmax(o.logits, -1)[0, 1].item() for o in out])
    return np.array([torch.sigmoid(o)[0].item() for o in out])


def train_torchmil_abmil(hr_features, labels: dict, split: dict, config: LRMILConfig) -> nn.Module:
    """torchmil's ABMIL (one logit, BCE) on the same features and split: a cross-check of ours."""
    from torchmil.models import ABMIL as TorchmilABMIL

    seed_everything(config.seed)
    model = TorchmilABMIL(in_shape=(_dim(hr_features),), att_dim=config.hidden, gated=config.gated)
    val_items = bag_items(hr_features, labels, split["val"])

    def step(model, bag):
        loss = F.binary_cross_entropy_with_logits(model(bag["X"]), bag["y"].float())
        return loss, {"bce": loss.item()}

    def val_step(model):
        probs = np.clip(_probabilities(model, val_items), 1e-7, 1 - 1e-7)
        y = np.array([int(i["y"]) for i in val_items])
        return {"loss": float(-np.mean(y * np.log(probs) + (1 - y) * np.log(1 - probs)))}

    with _one_cpu_thread(pick_device(config.device)):
        fit(model, step, Bags([_tensors(i) for i in bag_items(hr_features, labels, split["train"])],
                              config.seed), _mil_fit_config(config), val_step=val_step)
    return model.cpu().eval()


def distil_encoder(cohort, split: dict, hr_grids, lr_grids, hr_features, teacher: dict,
                   hr_encoder: Encoder, config: LRMILConfig):
    """Stage 1 for one split, cached: (LR encoder, history rows). The cache key holds the
    stage-1 settings, the split's training slides and the HR encoder's weights."""
    cache_dir = cohort.root / "lrmil"
    key = _hash([config.stage1_key(), sorted(split["train"]), sorted(split["val"]),
                 fingerprint(hr_encoder)])
    path = cache_dir / f"stage1-{key}.pt"
    lr_encoder = lr_encoder_from(hr_encoder).eval()
    if path.exists():
        saved = read_checkpoint(path, "stage-1 cache", f"delete {path} to train stage 1 again")
        lr_encoder.load_state_dict(saved["state_dict"])
        return lr_encoder, json.loads(saved["history"])
    items = stage1_data(cohort, split["train"], hr_grids, lr_grids, hr_features, teacher,
                        hr_encoder, config, cache_dir / "targets")
    lr_encoder, history = train_stage1(hr_encoder, items, config)
    rows = [{k: v for k, v in row.items()} for row in history.rows]
    write_checkpoint({"state_dict": lr_encoder.state_dict(), "history": json.dumps(rows)}, path)
    return lr_encoder, rows


def sweep_stage2(features, labels: dict, split: dict, teacher: dict, guides: dict,
                 config: LRMILConfig, grid: dict) -> list[dict]:
    """Train the LRMIL student for every combination of ``grid`` ({field: values}) and score it
    on the validation split (cross-entropy, AUC); the lowest cross-entropy is the best."""
    import itertools

    val_items = bag_items(features, labels, split["val"])
    rows = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        student = train_student(features, labels, split, replace(config, **setting), teacher,
                                guides)
        y, probs = predict_bags(student, val_items)
        p = np.clip(np.where(y == 1, probs, 1 - probs), 1e-7, 1)
        rows.append({**setting, "val_ce": float(-np.log(p).mean()),
                     **{f"val_{k}": v for k, v in classification_metrics(y, probs).items()
                        if k in ("auc", "accuracy")}})
    return sorted(rows, key=lambda row: row["val_ce"])


def time_slides(cohort, slide_ids, predictors: dict, seed: int = 0) -> list[dict]:
    """:func:`mini_kd.evaluate.time_pipelines` on these slides (the predictors in a seeded random
    order per slide), each row with ``read_encode_mil``, the stages that LRMIL makes cheaper."""
    rows = time_pipelines({s: cohort.slide_path(s) for s in slide_ids}, predictors, seed)
    return [{**row, "read_encode_mil": row["read"] + row["encode"] + row["MIL"]} for row in rows]


def _evaluate(model_name: str, split_index: int, labels: np.ndarray, probs: np.ndarray) -> dict:
    metrics = classification_metrics(labels, probs)
    return {"split": split_index, "model": model_name,
            **{k: metrics[k] for k in ("auc", "accuracy", "f1")}}


def run_experiment(preset: str = "book", config: LRMILConfig | None = None, sweep: bool = True,
                   timing: bool = True, checkpoint_path=None,
                   timing_slides: int | None = None) -> Experiment:
    """Every model of the comparison on the phantom cohort of ``preset``, over repeated splits.

    Per split (:func:`mini_kd.evaluate.repeated_splits`, stratified train/val/test): the HR
    teacher, torchmil's ABMIL, stage 1 (cached), distilled 5x features, then four LR students --
    LR ABMIL, stage 1 only, stage 2 only, LRMIL -- all scored on the split's test slides.
    Per split also the stage-2 sweep (``sweep``): fit on the split's train slides, chosen on its
    validation slides; its best setting trains that split's stage-2 students (without ``sweep``
    the config's values do). On split 0 also: the per-slide timing of HR
    ABMIL, LR ABMIL and LRMIL from the slide files (``timing``; the three run in a random order
    per slide, seeded by ``config.seed``, so no one of them always pays the cold file cache),
    an attention heatmap, and the LRMIL checkpoint. ``timing_slides`` overrides the preset's
    number of timed test slides.

    The splits are drawn over every slide of the cohort, stratified by label; the ``split``
    column of ``labels.csv`` is not used (repeated splits give the spread the table reports).
    """
    import time

    from mini_kd.presets import cohort as preset_cohort

    start = time.perf_counter()
    setting = EXPERIMENTS[check_preset(preset)]
    config = config or config_for(preset)
    cohort = preset_cohort(preset)
    ids = cohort.ids()
    labels = dict(zip(ids, cohort.labels(ids).tolist()))
    hr_grids = cohort_grids(cohort, config.hr_mag, config.hr_tile, config.min_tissue)
    lr_grids = cohort_grids(cohort, config.lr_mag, config.lr_tile, config.min_tissue)
    children = {s: torch.from_numpy(link_grids(hr_grids[s], lr_grids[s], config.k)) for s in ids}
    hr_encoder = build_encoder(config.encoder).eval()
    hr_features = cohort_features(cohort, hr_grids, hr_encoder)
    lr_plain = cohort_features(cohort, lr_grids, hr_encoder)  # 5x through the un-distilled copy
    splits = repeated_splits(ids, [labels[s] for s in ids], setting["n_splits"], config.seed)
    experiment = Experiment(preset, config, splits)

    for r, split in enumerate(progress(splits, desc="splits")):
        test_y = np.array([labels[s] for s in split["test"]])
        teacher_model = train_teacher(hr_features, labels, split, config)
        teacher = teacher_outputs(teacher_model, hr_features, ids)
        guides = {s: teacher_guided_attention(teacher[s]["attention_logits"], children[s],
                                              config.teacher_attn_agg) for s in ids}
        lr_encoder, history = distil_encoder(cohort, split, hr_grids, lr_grids, hr_features,
                                             teacher, hr_encoder, config)
        experiment.stage1 += [{"split": r, **row} for row in history]
        lr_distilled = cohort_features(cohort, lr_grids, lr_encoder)
        stage2 = config  # the stage-2 students' settings: this split's sweep winner, if it ran
        if sweep:  # on this split's own train (fit) and validation (choice) slides only
            rows = sweep_stage2(lr_distilled, labels, split, teacher, guides, config,
                                setting["sweep"])
            experiment.sweep += [{"split": r, **row} for row in rows]
            stage2 = replace(config, **{k: rows[0][k] for k in setting["sweep"]})
        experiment.stage2_setting.append({"split": r, **{k: getattr(stage2, k)
                                                         for k in setting["sweep"]}})
        models = {
            "hr_abmil": (teacher_model, hr_features),
            "hr_abmil_torchmil": (train_torchmil_abmil(hr_features, labels, split, config),
                                  hr_features),
            "lr_abmil": (train_student(lr_plain, labels, split, config), lr_plain),
            "stage1_only": (train_student(lr_distilled, labels, split, config), lr_distilled),
            "stage2_only": (train_student(lr_plain, labels, split, stage2, teacher, guides),
                            lr_plain),
            "lrmil": (train_student(lr_distilled, labels, split, stage2, teacher, guides),
                      lr_distilled),
        }
        for name, (model, features) in models.items():
            probs = _probabilities(model, bag_items(features, labels, split["test"]))
            experiment.runs.append(_evaluate(name, r, test_y, probs))
        if r == 0:
            lrmil_student, lr_student = models["lrmil"][0], models["lr_abmil"][0]
            experiment.checkpoint = save_checkpoint(
                checkpoint_path or cohort.root / "lrmil" / f"lrmil-{preset}.pt", lr_encoder,
                lrmil_student, stage2)
            predictors = {
                "hr_abmil": SlidePredictor(hr_encoder, teacher_model, config.hr_mag,
                                           config.hr_tile, config.min_tissue, device=config.device),
                "lr_abmil": SlidePredictor(hr_encoder, lr_student, config.lr_mag, config.lr_tile,
                                           config.min_tissue, device=config.device),
                "lrmil": SlidePredictor(lr_encoder, lrmil_student, config.lr_mag, config.lr_tile,
                                        config.min_tissue, device=config.device),
            }
            test_ids = split["test"][:timing_slides or setting["timing_slides"]]
            if timing:
                experiment.timing = time_slides(cohort, test_ids, predictors, config.seed)
            experiment.heatmap = _heatmap(cohort, split["test"], labels, predictors, teacher)
    experiment.seconds = time.perf_counter() - start
    return experiment


def _heatmap(cohort, test_ids, labels: dict, predictors: dict, teacher: dict) -> dict:
    """Attention of HR ABMIL, LR ABMIL and LRMIL on the test tumour slide with the most tumour
    (the first test tumour slide, and ``label_map`` None, for a cohort without label maps)."""
    tumour_ids = [s for s in test_ids if labels[s] == 1] or list(test_ids)
    if cohort.has_label_maps:
        slide_id = max(tumour_ids, key=lambda s: (cohort.label_map(s)[0] == TUMOUR).sum())
    else:
        slide_id = tumour_ids[0]
    path = cohort.slide_path(slide_id)
    maps = {name: predictor(path, details=True) for name, predictor in predictors.items()}
    with open_slide(path) as slide:
        thumbnail = slide.thumbnail(MASK_MAG)
    label_map = cohort.label_map(slide_id)[0] if cohort.has_label_maps else None
    return {"slide_id": slide_id, "thumbnail": thumbnail, "thumb_mag": MASK_MAG,
            "label_map": label_map,
            "maps": {name: {"grid": out["grid"], "attention": out["attention"],
                            "probability": out["probability"]} for name, out in maps.items()}}
