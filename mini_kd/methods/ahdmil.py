r"""AHDMIL: read at 20x only the tiles that a 1.25x screen says matter (Dong et al. 2025,
"Asymmetric Hierarchical Distillation Multi-Instance Learning for Fast and Accurate Whole-Slide
Image Classification", arXiv 2508.05114; journal version of HDMIL, CVPR 2025).

Step 1 trains **DMIN** on 20x features (self-distillation); step 2 trains **DB-LIPN** on 1.25x
crops, one per 20x tile, to predict DMIN's mask (asymmetric distillation) and fine-tunes DMIN on
the tiles it keeps; at inference only those are read at 20x.

**DMIN** (features X ∈ R^{N x D} of one slide, C classes; Φ_c a CKA layer per class)::

    H = Dropout(ReLU(X W_p + b_p))                          projection, (N, 512)
    s_{n,c} = w_c^T [tanh(V h_n) ⊙ sigm(U h_n)] + b_c       gated attention logits S, (N, C)
    teacher: α_{:,c} = softmax_n(s_{:,c}),   z^T_c = Σ_n α_{n,c} h_n,   ŷ^T_c = Φ_c(z^T_c)
    mask:    m_{n,c} = GumbelSigmoid(s_{n,c}; τ) (straight-through; at eval 1[s_{n,c} > 0])
    student: β_{n,c} = m_{n,c} exp(s_{n,c}) / Σ_{n'} m_{n',c} exp(s_{n',c}),
             z^S_c = Σ_n β_{n,c} h_n,   ŷ^S_c = Φ_c(z^S_c);   keep rate ρ = (1/N) Σ_n 1[Σ_c m_{n,c} > 0]
    L_SD = 0.7 CE(ŷ^T, y) + 0.3 L_inst + 0.5 KL(softmax ŷ^T ‖ softmax ŷ^S)
           + 0.5 MSE(Z^S, Z^T) + 2 (ρ − mask_ratio)²

**DB-LIPN**: B = 2 tiny MobileNetV4 branches give per-tile, per-class logits p^b (N, C) from
the crops; P = (1/B) Σ_b p^b, kept tiles M_LR = 1[P > 0]. With DMIN's S and M = 1[S > 0]::

    q^b = STE(1[p^b > 0]),   ρ^b, ρ_T = keep rates of q^b and M
    hard mode:  L^b = mean |q^b − M| + (ρ^b − ρ_T)²
    soft mode:  L^b = mean |p^b − S| + (ρ^b − ρ_T)²        (with probability attn_ratio)
    L_AD = (1/B) Σ_b L^b;  then one DMIN update with CE on the tiles M_LR keeps;
    after each epoch cross-EMA: θ_b ← (1 − λ) θ_b + λ mean_{b' ≠ b} θ_{b'}

**Deviations from the authors' code** (numbered as in the paper notes): (1) one class name;
(2) a fixed keep-rate gate ``keep_bounds``; when no epoch passes it, step 2 restarts from the
step-1 DMIN with a new DB-LIPN at most ``step2_restarts`` times, then keeps the last weights and
warns; (3) both steps here, L_inst is CLAM's instance loss with CE, not the smooth top-1 SVM;
(4) β is normalised per class in training as at inference (theirs: over all tiles and classes);
(5) β from softmaxes, finite for logits of 1e4; (6) DMIN makes DB-LIPN's targets in eval mode;
(7) the keep mask is the union over all C classes; (8) GroupNorm in DB-LIPN, cross-EMA after
epochs only; (10) the predictor reads and encodes only the kept tiles (theirs selects among every
tile's features); (11) ``pse_weight`` and KAN attention are left out.

**Our own choices**: GroupNorm (one group) in DB-LIPN (``norm="batch"``: the paper's); 8-px
crops of 128-px 20x tiles and CKA degree 3 or 6 (12 needs more epochs) on the CPU presets; the HR
encoder EfficientNet-Lite0; a class whose mask keeps nothing keeps its ``min_keep`` best tiles.

**Beyond the paper (ours, off by default): the screen's operating threshold.** When DMIN's mask
is sparse (keep rate ≲ 0.1), most of DB-LIPN's targets say "drop": a screen that cannot yet tell
the few kept tiles apart minimises L_AD by dropping all, and 1[P > 0] falls back to one tile per
class. With ``screen_recall`` = r the screen keeps 1[P_{n,c} > t_c], t_c set after each step-2
epoch so that r of the validation tiles DMIN's own mask keeps pass, capped at 0: only the
*ranking* of P must be right.

:class:`Config`, :class:`Schedule`: the paper's values; :mod:`mini_kd.presets` gives a preset's.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mini_kd import methods
from mini_kd.encoders import DBLIPN, build_encoder
from mini_kd.errors import MiniKDError
from mini_kd.inference import SlideRun, predict_slide
from mini_kd.kan import head as kan_head
from mini_kd.methods.ahdmil_data import (Bag, build_bags, evaluating, fit_config, read_crops,
                                         slide_loader)
from mini_kd.mil import AttentionPool, masked_softmax, topk_instance_loss
from mini_kd.runtime import pick_device, seed_everything
from mini_kd.train import fit as fit_network


# == 1. configuration and schedule =================================================================
@dataclass
class Config:
    """The method. Defaults are the paper's Camelyon16 settings."""

    encoder: str = "efficientnet_lite0"   # the HR encoder (paper: ResNet50-trunc, 1024-d)
    hr_mag: float = 20.0                  # DMIN's tiles: 256 px at 20x (paper)
    hr_tile: int = 256
    screen_mag: float = 1.25              # DB-LIPN's crops: the same footprint at 1.25x (16 px)
    n_classes: int = 2
    hidden: int = 512                     # DMIN: 1024 -> 512, gated attention 256, dropout 0.25
    attention_hidden: int = 256
    dropout: float = 0.25
    head: str = "cka"                     # "cka" (paper) or "linear" (ablation)
    degree: int = 12                      # CKA degree
    tau: float = 0.7                      # Gumbel-sigmoid temperature
    mask_ratio: float = 0.6               # target keep rate of the mask
    k_sample: int = 32                    # CLAM instance loss: top-k / bottom-k
    w_ce: float = 0.7                     # the weights of L_SD
    w_inst: float = 0.3
    w_kl: float = 0.5
    w_feat: float = 0.5
    w_rate: float = 2.0
    num_branches: int = 2                 # DB-LIPN: 2 branches, cross-EMA 0.2
    lipn_ema: float = 0.2
    attn_ratio: float = 0.4               # probability of the soft mode of L_AD
    norm: str = "group"                   # "group" (ours) or "batch" (paper)
    keep_bounds: tuple[float, float] = (0.3, 1.0)  # step 2 keeps an epoch whose val keep rate is in
    min_keep: int = 1                     # tiles a class keeps when its mask keeps none
    screen_recall: float | None = None    # ours: None = the paper's 1[P > 0]; r = recall_threshold


@dataclass
class Schedule:
    """How long and how fast the two steps train (paper: 200 epochs each, Adam)."""

    lr: float = 3e-4                      # step 1: Adam 3e-4, weight decay 1e-5
    weight_decay: float = 1e-5
    epochs: int = 200
    min_epochs: int = 50                  # select after 50 epochs, patience 20
    patience: int | None = 20
    lipn_lr: float = 1e-5                 # step 2: Adam 1e-5 for both networks, patience 5
    dmin_lr: float = 1e-5
    step2_epochs: int = 200
    step2_patience: int | None = 5
    step2_restarts: int = 2               # fresh DB-LIPNs tried when no epoch passes the gate
    seed: int = 0
    device: str | None = None
    checkpoint_dir: str | None = None     # per-epoch checkpoints of every step (resumable)


# == 2. DMIN, part 1: the mask =====================================================================
def gumbel_sigmoid(S: torch.Tensor, tau: float = 0.7, training: bool = True,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    r"""The keep mask m ∈ {0, 1} of the attention logits S, with a straight-through gradient.
    Training: y_soft = sigm((S + g_1 − g_2) / τ) with g_i ~ Gumbel(0, 1) (their difference,
    ``noise``, ~ Logistic(0, 1)), y_hard = 1[y_soft > 0.5], m = y_hard + y_soft − stopgrad(y_soft):
    exactly 0 or 1 forward, ∂m/∂S = y_soft (1 − y_soft) / τ, kept with probability sigm(S) for
    any τ. Eval: m = 1[S > 0], no noise and no gradient."""
    if not training:
        return (S > 0).to(S.dtype)
    if noise is None:
        u = torch.rand_like(S).clamp_(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)  # g_1 − g_2 ~ Logistic(0, 1)
    y_soft = torch.sigmoid((S + noise) / tau)  # (N, C)
    y_hard = (y_soft > 0.5).to(S.dtype)  # (N, C)
    return y_hard + (y_soft - y_soft.detach())


def keep_rate(mask: torch.Tensor) -> torch.Tensor:
    r"""ρ = (1/N) Σ_n 1[Σ_c m_{n,c} > 0] for m (N, C): the union over all C classes forward, the
    gradient through Σ_c m_{n,c} (straight through), so the rate loss reaches the mask."""
    votes = mask.sum(dim=-1)  # (N,)
    union = (votes.detach() > 0).to(mask.dtype) + (votes - votes.detach())  # (N,)
    return union.mean()


def keep_mask(scores: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """bool (N, C): 1[score > 0]; a class keeping no tile keeps its ``min_keep`` best (S or P)."""
    mask = scores > 0  # (N, C)
    empty = ~mask.any(dim=0)  # (C,)
    if empty.any() and min_keep > 0 and len(scores):
        best = scores.topk(min(min_keep, len(scores)), dim=0).indices  # (k, C)
        fallback = torch.zeros_like(mask).scatter_(0, best, True)  # (N, C)
        mask = mask | (fallback & empty)
    return mask


def student_weights(S: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    r"""β_{n,c} = m_{n,c} exp(s_{n,c}) / Σ_{n'} m_{n',c} exp(s_{n',c}) per class, as β = m α / Σ_n m α
    with α = softmax_n(S): no overflow, a gradient to m where m = 0; β = 0 for an empty class."""
    alpha = torch.softmax(S, dim=0)  # (N, C)
    weighted = m * alpha  # (N, C)
    total = weighted.sum(dim=0, keepdim=True)  # (1, C)
    ratio = weighted / torch.where(total > 0, total, torch.ones_like(total))  # (N, C)
    return torch.where(total > 0, ratio, masked_softmax(S, m.detach() > 0.5, dim=0))


# == 3. DMIN, part 2: the network ==================================================================
class DMINOutput(NamedTuple):  # DMIN's training path on one slide: N tiles, C classes, H hidden
    teacher_logits: torch.Tensor  # (C,) ŷ^T, pooled over all tiles
    student_logits: torch.Tensor  # (C,) ŷ^S, pooled over the masked tiles
    S: torch.Tensor               # (N, C) attention logits
    mask: torch.Tensor            # (N, C) m, 0/1 with a straight-through gradient
    keep_rate: torch.Tensor       # () ρ
    Z_teacher: torch.Tensor       # (C, H) z^T
    Z_student: torch.Tensor       # (C, H) z^S
    H: torch.Tensor               # (N, H) projected tiles


class DMIN(nn.Module):
    """DMIN on one slide's HR features X (N, D): ``forward(X)``, the training path; ``classify(X,
    keep)``, the eval / fine-tune / inference path, on the kept (or only the read) tiles."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 512,
                 attention_hidden: int = 256, dropout: float = 0.25, head: str = "cka",
                 degree: int = 12, tau: float = 0.7):
        super().__init__()
        self.args = dict(in_dim=in_dim, n_classes=n_classes, hidden=hidden,
                         attention_hidden=attention_hidden, dropout=dropout, head=head,
                         degree=degree, tau=tau)
        self.tau = tau
        self.projection = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = AttentionPool(hidden, attention_hidden, gated=True, dropout=dropout,
                                       n_branches=n_classes, bias=True)
        self.classifiers = nn.ModuleList(kan_head(hidden, 1, head, degree) for _ in range(n_classes))
        self.instance_classifiers = nn.ModuleList(kan_head(hidden, 2, head, degree)
                                                  for _ in range(n_classes))
        for layer in self.modules():  # Xavier-normal weights, zero biases (as the authors)
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def Phi(self, Z: torch.Tensor) -> torch.Tensor:
        """ŷ_c = Φ_c(z_c): Z (C, H) -> logits (C,)."""
        return torch.cat([Phi_c(z_c) for Phi_c, z_c in zip(self.classifiers, Z)])

    def embed(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """H = projection(X) (N, hidden) and S = attention logits (N, C)."""
        if X.ndim != 2 or X.shape[-1] != self.args["in_dim"]:
            raise MiniKDError(f"DMIN takes one slide's features (N, {self.args['in_dim']}), got "
                              f"{tuple(X.shape)}; build DMIN with the encoder's feature size")
        H = self.projection(X)  # (N, hidden)
        return H, self.attention.score(H.unsqueeze(0))[0]  # S: (N, C)

    def forward(self, X: torch.Tensor) -> DMINOutput:
        H, S = self.embed(X)  # (N, hidden), (N, C)
        alpha = torch.softmax(S, dim=0)  # (N, C) teacher: every tile
        Z_teacher = alpha.T @ H  # (C, hidden)
        mask = gumbel_sigmoid(S, self.tau, training=self.training)  # (N, C)
        beta = student_weights(S, mask)  # (N, C) student: the kept tiles, per class
        Z_student = beta.T @ H  # (C, hidden)
        return DMINOutput(self.Phi(Z_teacher), self.Phi(Z_student), S, mask,
                          keep_rate(mask), Z_teacher, Z_student, H)

    def classify(self, X: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (C,), class c pooled over the tiles ``keep[:, c]`` (bool (N, C); None = all)."""
        H, S = self.embed(X)  # (N, hidden), (N, C)
        alpha = masked_softmax(S, keep, dim=0)  # (N, C); a class keeping nothing pools to 0
        return self.Phi(alpha.T @ H)  # (C,)

    def own_mask(self, X: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
        return keep_mask(self.embed(X)[1], min_keep)  # bool (N, C): its eval mask 1[S > 0]


# == 4. DB-LIPN: the 1.25x screen (its network: mini_kd.encoders.DBLIPN) =========================
@torch.no_grad()
def cross_ema(branches, lam: float) -> None:
    r"""θ_b ← (1 − λ) θ_b + λ · mean_{b' ≠ b} θ_{b'} for every branch, from pre-update copies
    (parameters only; λ = 0 or a single branch changes nothing)."""
    branches = list(branches)
    if lam == 0 or len(branches) < 2:
        return
    before = [[p.detach().clone() for p in branch.parameters()] for branch in branches]
    for b, branch in enumerate(branches):
        for i, p in enumerate(branch.parameters()):
            others = torch.stack([before[o][i] for o in range(len(branches)) if o != b]).mean(0)
            p.mul_(1 - lam).add_(others, alpha=lam)


class AHDMIL(nn.Module):
    """DMIN and DB-LIPN together: what step 2 trains and the predictor runs. ``threshold`` t (C,)
    is 0 (the paper's rule) unless :func:`recall_threshold` set it."""

    def __init__(self, dmin: DMIN, lipn: DBLIPN, min_keep: int = 1):
        super().__init__()
        self.dmin, self.lipn, self.min_keep = dmin, lipn, min_keep
        self.register_buffer("threshold", torch.zeros(dmin.args["n_classes"]))

    def screen(self, crops: torch.Tensor) -> torch.Tensor:
        """bool (N, C): 1[P > t], the tiles DB-LIPN keeps per class (read: kept by any class)."""
        return keep_mask(self.lipn.fused(crops) - self.threshold, self.min_keep)

    def forward(self, features: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (C,), keep (N, C)) from the features of every tile (training, validation)."""
        keep = self.screen(crops)
        return self.dmin.classify(features, keep), keep


def recall_threshold(P: torch.Tensor, M: torch.Tensor, recall: float) -> torch.Tensor:
    """Ours: t (C,), per class the highest t_c ≤ 0 at which 1[P_{:,c} > t_c] keeps ``recall`` of
    the tiles that M (bool (N, C), DMIN's own mask) keeps; 0 where M keeps none."""
    t = torch.zeros(P.shape[1])
    for c in range(P.shape[1]):
        kept = P[M[:, c], c]
        if len(kept):
            kth = kept.topk(math.ceil(recall * len(kept))).values[-1]  # the lowest P to keep
            t[c] = min(torch.nextafter(kth, torch.tensor(-math.inf)).item(), 0.0)
    return t


# == 5. the losses =================================================================================
def L_SD(out: DMINOutput, label: torch.Tensor, L_inst: torch.Tensor, config: Config
         ) -> tuple[torch.Tensor, dict]:
    r"""L_SD = w_ce CE(ŷ^T, y) + w_inst L_inst + w_kl KL(softmax ŷ^T ‖ softmax ŷ^S)
    + w_feat MSE(Z^S, Z^T) + w_rate (ρ − mask_ratio)², and its terms; nothing is detached."""
    ce = F.cross_entropy(out.teacher_logits.unsqueeze(0), label.reshape(1))
    log_p_t = F.log_softmax(out.teacher_logits, dim=-1)  # (C,)
    log_p_s = F.log_softmax(out.student_logits, dim=-1)  # (C,)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    feat = F.mse_loss(out.Z_student, out.Z_teacher)
    rate = (out.keep_rate - config.mask_ratio) ** 2
    loss = (config.w_ce * ce + config.w_inst * L_inst + config.w_kl * kl + config.w_feat * feat
            + config.w_rate * rate)
    terms = dict(ce=ce, inst=L_inst, kl=kl, feat=feat, rate=rate, keep_rate=out.keep_rate)
    return loss, {name: float(value.detach()) for name, value in terms.items()}


def binarize(p: torch.Tensor) -> torch.Tensor:
    """q = 1[p > 0] forward, with the gradient of sigm(p) (straight through)."""
    soft = torch.sigmoid(p)
    return (p > 0).to(p.dtype) + (soft - soft.detach())


def L_AD_hard(p: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Hard mode for one branch: mean |q − M| + (ρ(q) − ρ(M))², p (N, C) logits, M (N, C) 0/1."""
    q, M = binarize(p), M.to(p.dtype)
    return (q - M).abs().mean() + (keep_rate(q) - keep_rate(M)) ** 2


def L_AD_soft(p: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Soft mode for one branch: mean |p − S| + (ρ(q) − ρ(1[S > 0]))², regressing DMIN's logits."""
    M = (S > 0).to(p.dtype)
    return (p - S).abs().mean() + (keep_rate(binarize(p)) - keep_rate(M)) ** 2


def L_AD(branch_logits: torch.Tensor, S: torch.Tensor, soft: bool) -> torch.Tensor:
    """Mean over branches of the hard-mode (M = 1[S > 0]) or soft-mode loss; p (B, N, C)."""
    S = S.detach()
    losses = [L_AD_soft(p, S) if soft else L_AD_hard(p, S > 0) for p in branch_logits]
    return torch.stack(losses).mean()


# == 6. step 1: DMIN with self-distillation ========================================================
def new_dmin(in_dim: int, config: Config, seed: int) -> DMIN:
    """DMIN as step 1 starts it: initialised from ``seed``."""
    seed_everything(seed)
    return DMIN(in_dim, config.n_classes, config.hidden, config.attention_hidden, config.dropout,
                config.head, config.degree, config.tau)


def sd_step(dmin: DMIN, batch: dict, config: Config):
    """L_SD with L_inst, CLAM's instance loss for the true class y: its top-k tiles by attention
    are positives, its bottom-k negatives, for its instance classifier."""
    out, y = dmin(batch["features"]), int(batch["label"])
    L_inst = topk_instance_loss(dmin.instance_classifiers[y](out.H), out.S[:, y], config.k_sample)
    return L_SD(out, batch["label"], L_inst, config)


def scored(logits: torch.Tensor, keep: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """CE(logits (C,), y) and the keep rate (1/N) Σ_n 1[any_c keep_{n,c}] of keep (N, C)."""
    ce = F.cross_entropy(logits.unsqueeze(0), label.reshape(1))
    return ce, {"loss": float(ce.detach()), "keep_rate": float(keep.any(dim=1).float().mean())}


def dmin_val_step(dmin: DMIN, batch: dict, min_keep: int = 1) -> dict:
    """CE and keep rate of DMIN's eval path (its own mask 1[S > 0]), as the authors validate."""
    keep = dmin.own_mask(batch["features"], min_keep)
    return scored(dmin.classify(batch["features"], keep), keep, batch["label"])[1]


def train_step1(train: list[Bag], val: list[Bag], config: Config, schedule: Schedule):
    """(DMIN, history): L_SD, the epoch of lowest validation CE from ``min_epochs`` on kept."""
    dmin = new_dmin(train[0].features.shape[1], config, schedule.seed)
    step1 = fit_config(schedule, "step1", epochs=schedule.epochs, lr=schedule.lr,
                       weight_decay=schedule.weight_decay, min_epochs=schedule.min_epochs,
                       patience=schedule.patience, seed=schedule.seed)
    history = fit_network(dmin, lambda m, b: sd_step(m, b, config),
                          slide_loader(train, schedule.seed), step1,
                          val_step=lambda m, b: dmin_val_step(m, b, config.min_keep),
                          val_data=[bag.item() for bag in val])
    return dmin.cpu().eval(), history


# == 7. step 2: DB-LIPN by asymmetric distillation, DMIN fine-tuned on what it keeps ==============
def lipn_step(model: AHDMIL, batch: dict, config: Config):
    """One DB-LIPN update: targets from DMIN in eval mode (item 6), soft mode with probability
    ``attn_ratio``. A slide whose L_AD is not finite is skipped, as the authors do."""
    with torch.no_grad(), evaluating(model.dmin):
        S = model.dmin.embed(batch["features"])[1]  # (N, C)
    soft = bool(torch.rand(()) < config.attn_ratio)
    loss = L_AD(model.lipn(batch["crops"]), S, soft)
    return (loss, {"soft": float(soft)}) if torch.isfinite(loss) else None


def finetune_step(model: AHDMIL, batch: dict):
    """One DMIN update: CE on the tiles DB-LIPN (eval mode, no gradient) keeps."""
    with torch.no_grad(), evaluating(model.lipn):
        keep = model.screen(batch["crops"])  # (N, C)
    loss, metrics = scored(model.dmin.classify(batch["features"], keep), keep, batch["label"])
    return loss, {"keep_rate": metrics["keep_rate"]}


def ahdmil_val_step(model: AHDMIL, batch: dict) -> dict:
    return scored(*model(batch["features"], batch["crops"]), batch["label"])[1]


def train_step2(dmin: DMIN, train: list[Bag], val: list[Bag], config: Config, schedule: Schedule):
    """Step 2 on a copy of ``dmin``: per slide one DB-LIPN update, then one DMIN update. An epoch
    is kept only if the val loss improves *and* the val keep rate is in ``keep_bounds``; if none
    is, at most ``step2_restarts`` new DB-LIPNs (seed + 1, ...) try. -> (model, history, tries)"""
    for tries in range(1, schedule.step2_restarts + 2):
        model, history = _step2_try(dmin, train, val, config, schedule, tries)
        if history.best_epoch is not None:
            return model, history, tries
    warnings.warn(f"no step-2 epoch of {tries} tries had a validation keep rate in "
                  f"{list(config.keep_bounds)}; the last weights are kept", stacklevel=2)
    return model, history, tries


def _step2_try(dmin: DMIN, train: list[Bag], val: list[Bag], config: Config, schedule: Schedule,
               attempt: int = 1):
    """Try number ``attempt`` of step 2 from ``dmin``, with a DB-LIPN drawn from seed + attempt − 1."""
    seed = schedule.seed + attempt - 1
    seed_everything(seed)
    lipn = DBLIPN(config.n_classes, train[0].crops.shape[-1], config.num_branches, config.norm)
    model, (low, high) = AHDMIL(copy.deepcopy(dmin), lipn, config.min_keep), config.keep_bounds

    def optimizers(m):  # Adam for each network
        return {name: torch.optim.Adam(getattr(m, name).parameters(), lr,
                                       weight_decay=schedule.weight_decay)
                for name, lr in (("lipn", schedule.lipn_lr), ("dmin", schedule.dmin_lr))}

    def epoch_end(m: AHDMIL, epoch: int):
        cross_ema(m.lipn.branches, config.lipn_ema)
        if config.screen_recall is not None:  # ours: the operating threshold, on the val slides
            calibrate(m, val, config.screen_recall)

    step2 = fit_config(schedule, f"step2_try{attempt}", epochs=schedule.step2_epochs,
                       patience=schedule.step2_patience, seed=seed)
    history = fit_network(model, {"lipn": lambda m, b: lipn_step(m, b, config), "dmin": finetune_step},
                          slide_loader(train, seed + 1), step2, optimizer=optimizers,
                          val_step=ahdmil_val_step, val_data=[bag.item() for bag in val],
                          accept=lambda v: low <= v["val_keep_rate"] <= high, on_epoch_end=epoch_end)
    return model.cpu().eval(), history


@torch.no_grad()
def calibrate(model: AHDMIL, bags: list[Bag], recall: float) -> None:
    """Ours: ``model.threshold`` ← :func:`recall_threshold` of P and 1[S > 0] on ``bags``."""
    with evaluating(model):  # on the model's device, one slide at a time
        P = torch.cat([model.lipn.fused(bag.crops.to(model.threshold)).cpu() for bag in bags])
        S = torch.cat([model.dmin.embed(bag.features.to(model.threshold))[1].cpu() for bag in bags])
    model.threshold.copy_(recall_threshold(P, S > 0, recall))


# == 8. fit: both steps on a cohort's train slides, selected on its val slides; the predictor ====
def fit(cohort, split: dict, config: Config, schedule: Schedule) -> "Trained":
    """Step 1 then step 2 on ``split["train"]``, each selected on ``split["val"]``."""
    encoder = build_encoder(config.encoder).eval()
    bags = build_bags(cohort, [*split["train"], *split["val"]], config, encoder, schedule.device)
    train, val = [bags[s] for s in split["train"]], [bags[s] for s in split["val"]]
    dmin, step1 = train_step1(train, val, config, schedule)
    model, step2, tries = train_step2(dmin, train, val, config, schedule)
    return Trained(config, model, encoder, history={"step1": step1, "step2": step2, "tries": tries})


@dataclass
class Trained(methods.Trained):
    """DMIN, DB-LIPN (and its threshold), the HR encoder; ``history``, from :func:`fit`, is not saved."""

    method = "ahdmil"
    config: Config
    model: AHDMIL
    encoder: nn.Module
    encoder_kwargs: dict = field(default_factory=dict)   # build_encoder(config.encoder, **these)
    history: dict = field(default_factory=dict, repr=False)

    def state(self) -> dict:
        return {"dmin_args": self.model.dmin.args, "lipn_args": self.model.lipn.args,
                "model": self.model.state_dict(), "encoder_kwargs": self.encoder_kwargs,
                "encoder": self.encoder.state_dict()}

    @classmethod
    def from_state(cls, config: Config, state: dict) -> "Trained":
        model = AHDMIL(DMIN(**state["dmin_args"]), DBLIPN(**state["lipn_args"]), config.min_keep)
        model.load_state_dict(state["model"])
        encoder = build_encoder(config.encoder, pretrained=False, **state["encoder_kwargs"])
        encoder.load_state_dict(state["encoder"])
        return cls(config, model.eval(), encoder.eval(), dict(state["encoder_kwargs"]))

    def predictor(self, device=None, screen: bool = True, batch_size: int = 64):
        """``predict(slide_path, mpp=None) -> Prediction``: stages ``grid`` (20x), ``read_lr``,
        ``screen`` (DB-LIPN), ``read`` and ``encode`` (the kept 20x tiles), ``dmin``; ``screen=False``
        reads every tissue tile (the baseline). ``details``: ``grid``, ``keep`` (N, C), ``keep_rate``."""
        device, c = pick_device(device), self.config
        model, encoder = self.model.to(device).eval(), self.encoder.to(device).eval()

        def classify(run: SlideRun):
            grid = run.grid(c.hr_mag, c.hr_tile)
            keep = torch.ones(len(grid), model.dmin.args["n_classes"], dtype=torch.bool)  # (N, C)
            if screen:
                crops = read_crops(run, grid, c.screen_mag)  # (N, 3, t, t), stage read_lr
                with run.timer.stage("screen"):
                    keep = model.screen(crops.to(device)).cpu()  # (N, C)
            rows = np.flatnonzero(keep.any(dim=1).numpy())  # the tiles to read at 20x
            features = run.encode(grid, encoder, grid.coords[rows], batch_size, device)  # (n, D)
            with run.timer.stage("dmin"):
                logits = model.dmin.classify(features, keep[rows].to(device))  # (C,)
            probability = float(torch.softmax(logits.float(), -1)[-1])
            return probability, {"grid": grid, "keep": keep.numpy(), "keep_rate": len(rows) / len(grid)}

        return lambda slide_path, mpp=None: predict_slide(slide_path, classify, mpp)
