r"""The MIL models a user of a CLAM/TRIDENT-style pipeline would pick instead: torchmil's CLAM-SB,
DSMIL and TransMIL, on the same tile features, trained by the same trainer as our ABMIL.

Each model reads a bag X ∈ R^{B x N x D} of tile features and returns one bag logit l; P(tumour)
= σ(l). Every one is torchmil's own network and its own ``compute_loss``, with two additions:
a ``readout(X)`` that gives :func:`mini_kd.mil.read_bags` the bag probability and the attention
over the tiles (so that :func:`~mini_kd.mil.bag_probabilities` and
:func:`~mini_kd.mil.abmil_predictor` serve them as they serve ABMIL), and the weights of the
loss terms, which are the papers'. :func:`train` trains them with
:func:`mini_kd.mil.train_abmil`: standardised features (:class:`~mini_kd.mil.Standardised`, the
training tiles' μ, σ), one bag per step, Adam, the epoch with the lowest validation
cross-entropy.

**CLAM-SB** (Lu et al., "Data-efficient and weakly supervised computational pathology on
whole-slide images", Nat. Biomed. Eng. 2021): each tile is embedded, h_n = ReLU(W_1 x_n), and
pooled by ABMIL's gated attention; on top, *instance clustering*: the k tiles of highest attention
are pseudo-labelled "class Y", the k lowest "not class Y", and an instance classifier c_Y learns
to tell them apart from h_n (torchmil also labels the top k "not class 1 − Y" for c_{1−Y}).
L = 0.7 BCE(l, Y) + 0.3 L_inst (CLAM's ``bag_weight``).

**DSMIL** (Li, Li & Eliceiri, "Dual-stream multiple instance learning network for whole slide
image classification with self-supervised contrastive learning", CVPR 2021): stream one scores
every tile, c(h_n), and keeps the critical tile m = argmax_n c(h_n); stream two attends to all
tiles by their similarity to it, α_n = softmax_n(q_n^T q_m / √L), and classifies z = Σ_n α_n h_n.
L = ½ BCE(l, Y) + ½ BCE(c(h_m), Y); the bag score is the mean of the two streams' logits
(torchmil's ``predict``).

**TransMIL** (Shao et al., "TransMIL: Transformer based correlated multiple instance learning
for whole slide image classification", NeurIPS 2021): the tiles, squared into a √N x √N grid,
and a class token pass two Nyström self-attention layers with a convolutional positional encoding
(PPEG) between them; the class token is classified. L = BCE(l, Y).

What we set, and why:

- CLAM-SB: CLAM's "small" network: W_1 to 512 with dropout 0.25 (torchmil's ``feat_ext``;
  without it the instance loss trains only the instance classifiers, which the bag score never
  reads), gated attention of size 256, k = 8 (CLAM's ``B``; torchmil's default is 10). Its
  instance loss is cross-entropy, CLAM's code default ``inst_loss='ce'``: torchmil 1.0.2's two
  choices fail on the pseudo-labels CLAM-SB hands them, (k, 1) floats -- its own SmoothTop1SVM
  (no ``topk`` package needed) broadcasts them against every tile, and raises once two instance
  logits are more than τ log 1000 apart; BCEWithLogitsLoss wants them (k, 2).
- DSMIL: query size 128 through a two-layer query network, values the features themselves
  (DSMIL's defaults ``nonlinear=1``, ``passing_v=0``; torchmil's query is one linear layer).
- TransMIL: width 128, 4 heads, 64 landmarks (torchmil's width // 2), 6 pseudo-inverse
  iterations, dropout 0.1. The paper's width 512, 8 heads and 256 landmarks cost ~2.4 s per
  training step on one CPU thread whatever the bag (the 256 x 256 pseudo-inverse of every head
  of both layers), an hour per fold of the book's schedule; these cost ~0.08 s for a bag of 200
  tiles of 1280 features. Its attention over the tiles is None: torchmil computes it as the full
  N x N Nyström matrix, a slide's worth of memory at 20x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmil import models as torchmil

from mini_kd.errors import MiniKDError
from mini_kd.mil import BagReadout, Standardised, train_abmil
from mini_kd.runtime import seed_everything
from mini_kd.train import FitConfig

MODELS = {
    "clam_sb": "torchmil CLAM-SB, 20x features",
    "dsmil": "torchmil DSMIL, 20x features",
    "transmil": "torchmil TransMIL, 20x features",
}


# -- CLAM-SB ---------------------------------------------------------------------------------------
class InstanceCE(nn.Module):
    """CLAM's instance loss with ``inst_loss='ce'``: CE of the instance logits (K, 2) against the
    pseudo-labels torchmil's CLAM-SB passes as (K, 1) floats."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets.squeeze(-1).long())


class CLAM_SB(torchmil.CLAM_SB):
    """torchmil's CLAM-SB as CLAM's "small" network: h = ReLU(W_1 x) (512), gated attention (256),
    k = 8, cross-entropy instance loss."""

    def __init__(self, in_dim: int):
        fc = nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU(), nn.Dropout(0.25))  # h = ReLU(W_1 x)
        super().__init__(in_shape=(in_dim,), att_dim=256, k_sample=8, gated=True, feat_ext=fc)
        self.inst_loss_fn = InstanceCE()

    def readout(self, X: torch.Tensor) -> BagReadout:
        """P = σ(l), α = softmax of the attention logits."""
        logit, attention_logits = self(X, return_att=True)  # (B,), (B, N)
        return BagReadout(torch.sigmoid(logit), torch.softmax(attention_logits, -1))


# -- DSMIL -----------------------------------------------------------------------------------------
class DSMIL(torchmil.DSMIL):
    """torchmil's DSMIL with DSMIL's two-layer query network."""

    def __init__(self, in_dim: int):
        super().__init__(in_shape=(in_dim,), att_dim=128, nonlinear_q=True, nonlinear_v=False)

    def readout(self, X: torch.Tensor) -> BagReadout:
        """P = σ(½ (l + max_n c(h_n))), α = the attention to the critical tile."""
        logit, alpha, instance_logits = self(X, return_att=True, return_inst_pred=True)
        score = (logit + instance_logits.max(1).values) / 2  # (B,), torchmil's DSMIL.predict
        return BagReadout(torch.sigmoid(score), alpha.squeeze(-1))  # α (B, N, 1) -> (B, N)


# -- TransMIL --------------------------------------------------------------------------------------
class TransMIL(torchmil.TransMIL):
    """torchmil's TransMIL, narrower than the paper's for a CPU (see the module docstring)."""

    def __init__(self, in_dim: int):
        super().__init__(in_shape=(in_dim,), att_dim=128, n_heads=4, n_landmarks=64,
                         pinv_iterations=6, dropout=0.1)

    def readout(self, X: torch.Tensor) -> BagReadout:
        """P = σ(l) of the class token; no attention over the tiles."""
        return BagReadout(torch.sigmoid(self(X)), None)


# -- training --------------------------------------------------------------------------------------
NETWORKS = {"clam_sb": CLAM_SB, "dsmil": DSMIL, "transmil": TransMIL}
LOSS_WEIGHTS = {  # each term of the model's compute_loss, as its paper weighs it
    "clam_sb": {"BCEWithLogitsLoss": 0.7, "InstLoss": 0.3},
    "dsmil": {"BCEWithLogitsLoss": 0.5, "BCEWithLogitsLoss_max": 0.5},
    "transmil": {"BCEWithLogitsLoss": 1.0},
}


def weighted_loss(weights: dict[str, float]):
    """``loss(model, bag) -> (Σ_t w_t L_t, {t: L_t})`` of the model's own ``compute_loss`` on one
    bag; ``model`` is the :class:`~mini_kd.mil.Standardised` that ``train_abmil`` wraps it in, so
    the terms see the standardised X, as the forward pass does."""

    def loss(model: Standardised, bag: dict) -> tuple[torch.Tensor, dict]:
        _, terms = model.model.compute_loss(bag["y"].float(), model.standardise(bag["X"]))
        total = sum(weights[name] * term for name, term in terms.items())
        return total, {name: term.item() for name, term in terms.items()}

    return loss


def train(name: str, train_bags: list[dict], val_bags: list[dict],
          fit_config: FitConfig) -> nn.Module:
    """The baseline ``name`` (a key of :data:`MODELS`) trained on bags of
    :func:`mini_kd.mil.make_bags`, initialised from ``fit_config.seed``; returns it behind its
    standardisation, in eval mode, on the CPU."""
    if name not in MODELS:
        raise MiniKDError(f"no baseline {name!r}; choose one of {sorted(MODELS)}")
    seed_everything(fit_config.seed)
    network = NETWORKS[name](train_bags[0]["X"].shape[-1])
    model, _ = train_abmil(train_bags, val_bags, fit_config, network, weighted_loss(LOSS_WEIGHTS[name]))
    return model.cpu()
