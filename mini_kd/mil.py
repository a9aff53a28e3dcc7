r"""Attention-based multiple-instance learning (MIL) on bags of tile features.

A slide is a *bag* of N tiles; a tile's feature vector h_n ∈ R^D is an *instance*. Only the bag
has a label. Bags of one batch differ in size, so they travel padded to the largest one,
X ∈ R^{B x N x D}, with a boolean mask M ∈ {0, 1}^{B x N} (True = a real tile, False = padding);
every function here gives padding exactly zero weight.

**Attention pooling** (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
Learning", ICML 2018, eqs. 8 and 9). Each instance gets a score, the attention logit

    a_n = w^T tanh(V h_n)                                    (eq. 8)
    a_n = w^T [ tanh(V h_n) ⊙ sigm(U h_n) ]                   (eq. 9, gated)

with V, U ∈ R^{L x D} and w ∈ R^{L}; the scores become weights by a softmax over the bag's
instances and the bag is their weighted mean,

    α_n = exp(a_n) / Σ_{n'} exp(a_{n'}),        z = Σ_n α_n h_n ∈ R^D.

**ABMIL** classifies the bag with one linear layer, ŷ = softmax(W z + b) ∈ R^C. Its input is
each feature standardised with the training tiles' mean and standard deviation,
h_n ← (h_n − μ) / σ (μ, σ ∈ R^D, buffers that :func:`train_abmil` sets and the checkpoint keeps;
ours, not the papers'): across the 1280 dimensions of EfficientNet-Lite0's features on the
real-tissue cohort the standard deviations range from 0.03 to 1.8 and the means from 0.002 to 4.3,
and without it an ABMIL on real tissue, whose tumour is a few tiles of a slide, mostly stays near
chance (ours and torchmil's alike). LRMIL (Shin &
Jeong 2026) uses it for both its HR teacher and its LR student (L = 128, no projection before
the attention). AHDMIL's DMIN (Dong et al. 2025) scores every instance once per class,
a_{n,c} = w_c^T[...] + b_c (``n_branches = C``, ``bias=True``), and pools once per class
(CLAM-MB).

**CLAM-style instance loss** (Lu et al., "Data-efficient and weakly supervised computational
pathology on whole-slide images", Nat. Biomed. Eng. 2021): the k instances with the highest
scores are pseudo-labelled 1, the k lowest 0, and an instance classifier learns to tell them
apart (LRMIL's hard instance loss L_hard, with scores from the teacher's attention).

The interface follows torchmil: batch-first tensors, an explicit mask, and ``forward(X, mask)``,
``predict(X, mask)``.

**One way to train it** (:func:`train_abmil`): bags of one slide each (batch size 1, as in the
papers), Adam, the whole validation set's cross-entropy every epoch, the epoch with the lowest one
kept -- for every teacher, student and baseline ABMIL of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mini_kd.errors import MiniKDError
from mini_kd.evaluate import classification_metrics
from mini_kd.inference import predict_slide
from mini_kd.runtime import pick_device, seed_everything, torch_threads
from mini_kd.train import FitConfig, History, fit


# -- softmax over the real instances of a bag ------------------------------------------------------
def _fill_masked(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``logits`` with −∞ at masked entries, except in rows with no kept entry, which become 0
    (finite, so that a softmax over them is defined; the caller zeroes them afterwards)."""
    mask = mask.bool().expand_as(logits)
    keep_any = mask.any(dim=dim, keepdim=True)
    return logits.masked_fill(~mask, float("-inf")).masked_fill(~keep_any, 0.0)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None = None,
                   dim: int = -1) -> torch.Tensor:
    r"""α_n = M_n exp(a_n) / Σ_{n'} M_{n'} exp(a_{n'}) along ``dim``.

    ``mask`` (bool, broadcastable to ``logits``; True = keep) gives masked entries exactly 0. A row
    with no kept entry returns all zeros (an empty set of instances has no weights): it is
    softmaxed over finite placeholders and zeroed, so no NaN appears even in intermediate steps
    (a plain −∞ fill would make that row's softmax NaN and its backward pass NaN).
    The softmax itself is torch's, which subtracts the row maximum, so logits of 1e4 do not
    overflow; masked entries enter it as −∞, so their gradient is exactly 0 and every gradient
    is finite.
    """
    if mask is None:
        return torch.softmax(logits, dim=dim)
    alpha = torch.softmax(_fill_masked(logits, mask, dim), dim=dim)
    return alpha.masked_fill(~mask.bool().expand_as(logits), 0.0)


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor | None = None,
                       dim: int = -1) -> torch.Tensor:
    """log α of :func:`masked_softmax`: −∞ at masked entries (log 0), finite elsewhere, no NaN."""
    if mask is None:
        return torch.log_softmax(logits, dim=dim)
    log_alpha = torch.log_softmax(_fill_masked(logits, mask, dim), dim=dim)
    return log_alpha.masked_fill(~mask.bool().expand_as(logits), float("-inf"))


def attention_pool(X: torch.Tensor, attention_logits: torch.Tensor,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""z = Σ_n α_n h_n with α = masked softmax of the attention logits over the instances.

    ``X`` (B, N, D). ``attention_logits`` (B, N): one map, returns z (B, D) and α (B, N); or
    (B, N, K): K maps (one per class), returns z (B, K, D) with z_k = Σ_n α_{n,k} h_n and
    α (B, N, K). ``mask`` (B, N), or (B, N, K) to let each map keep its own subset (AHDMIL: class
    k pools only over the instances its mask selects). A map that keeps no instance pools to 0.
    """
    if attention_logits.ndim == 3 and mask is not None and mask.ndim == 2:
        mask = mask.unsqueeze(-1)  # (B, N, 1): the same instances for every map
    alpha = masked_softmax(attention_logits, mask, dim=1)  # (B, N) or (B, N, K)
    if alpha.ndim == 2:
        return torch.einsum("bn,bnd->bd", alpha, X), alpha  # (B, D)
    return torch.einsum("bnk,bnd->bkd", alpha, X), alpha  # (B, K, D)


# -- attention pooling -----------------------------------------------------------------------------
class AttentionPool(nn.Module):
    r"""Attention scores and pooling (Ilse et al. 2018, eqs. 8-9).

        a_n = w^T tanh(V h_n)  [+ b]                         (gated=False)
        a_n = w^T [tanh(V h_n) ⊙ sigm(U h_n)]  [+ b]         (gated=True)

    V, U: ``in_dim`` -> ``hidden`` (= L), with biases; w: ``hidden`` -> K. ``dropout`` acts on
    tanh(V h) and on sigm(U h), as in CLAM's gated attention network.

    ``n_branches=None`` (default): one attention map, a ∈ R^{B x N}. ``n_branches=K``: K maps,
    a ∈ R^{B x N x K}, one per class (CLAM-MB, AHDMIL's DMIN with K = C). The shape depends only
    on whether branches were asked for, never on the value of K.

    ``bias``: whether w has a bias b. A constant shift of every logit does not change the softmax,
    so ABMIL has none (as in eq. 8); a threshold on the logits (AHDMIL's keep mask 1[a > 0]) does
    see it.

    ``forward(X, mask)`` returns the bag z and the attention logits a (before the softmax); the
    logits of padding entries are computed but meaningless, read them through the mask.
    """

    def __init__(self, in_dim: int, hidden: int = 128, gated: bool = False, dropout: float = 0.0,
                 n_branches: int | None = None, bias: bool = False):
        super().__init__()
        self.gated, self.n_branches = gated, n_branches
        self.V = nn.Linear(in_dim, hidden)
        self.U = nn.Linear(in_dim, hidden) if gated else None
        self.w = nn.Linear(hidden, 1 if n_branches is None else n_branches, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def score(self, X: torch.Tensor) -> torch.Tensor:
        """Attention logits a: X (B, N, D) -> (B, N), or (B, N, K) with branches."""
        hidden = self.dropout(torch.tanh(self.V(X)))  # (B, N, L)
        if self.gated:
            hidden = hidden * self.dropout(torch.sigmoid(self.U(X)))  # (B, N, L)
        a = self.w(hidden)  # (B, N, K)
        return a.squeeze(-1) if self.n_branches is None else a

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """X (B, N, D), mask (B, N) -> z (B, D) or (B, K, D), a (B, N) or (B, N, K)."""
        a = self.score(X)
        z, _ = attention_pool(X, a, mask)
        return z, a


def check_bags(X: torch.Tensor, mask: torch.Tensor | None, in_dim: int) -> torch.Tensor:
    """Validate a padded batch of bags; return the mask (all True when None), bool (B, N)."""
    if X.ndim != 3:
        raise MiniKDError(f"bags must be a tensor (B, N, D), got shape {tuple(X.shape)}; for one "
                          "bag of features (N, D) pass X.unsqueeze(0)")
    if X.shape[-1] != in_dim:
        raise MiniKDError(f"tile features have D = {X.shape[-1]} but the model was built for "
                          f"in_dim = {in_dim}; build it with in_dim={X.shape[-1]} or use the "
                          "encoder it was trained on")
    if mask is None:
        mask = torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)
    if mask.shape != X.shape[:2]:
        raise MiniKDError(f"mask has shape {tuple(mask.shape)} but the bags are {tuple(X.shape[:2])} "
                          "(B, N); pass one mask entry per instance of X")
    mask = mask.bool()
    if X.shape[1] == 0 or not mask.any(dim=1).all():
        raise MiniKDError("bag has no tiles (N = 0 or its mask is all False): a slide needs at least "
                          "one tissue tile; lower min_tissue when tiling or drop the slide")
    return mask


# -- ABMIL -----------------------------------------------------------------------------------------
class MILOutput(NamedTuple):
    """What a MIL model returns for a batch of B bags of N (padded) instances of dimension D."""

    logits: torch.Tensor            # (B, C) bag class logits
    attention_logits: torch.Tensor  # (B, N) a_n before the softmax
    bag: torch.Tensor               # (B, D) bag representation z


class BinaryLinear(nn.Module):
    r"""Two class logits from one linear score: z -> (-l/2, +l/2), l = w^T z + b.

    softmax of them is (1 - σ(l), σ(l)) and their cross-entropy is exactly the BCE of l, so an ABMIL
    with this head *is* torchmil's ABMIL (one logit, BCEWithLogitsLoss), weight for weight and
    Adam step for Adam step. ``nn.Linear(D, 2)`` is the same function class in another
    parametrisation, l = (w_1 - w_0)^T z + (b_1 - b_0), and under Adam a different model: every
    row moves by ~lr per step in opposite directions, so l's weights start √2 larger and move
    2x faster (with half the weight decay) than the attention's -- the classifier fits the
    near-uniform mean of the bag before the attention has found its few relevant tiles.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, 2
        self.linear = nn.Linear(in_features, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        half = self.linear(z) / 2  # (..., 1)
        return torch.cat([-half, half], dim=-1)  # (..., 2)


class ABMIL(nn.Module):
    r"""Attention-based MIL classifier (Ilse et al. 2018).

        a = AttentionPool(X),   α = softmax_{n: M_n}(a),   z = Σ_n α_n h_n,   logits = W z + b

    X ∈ R^{B x N x D}, mask M ∈ {0, 1}^{B x N}; logits ∈ R^{B x C}. Trained with cross-entropy
    on the bag labels. With two classes the logits are (-l/2, +l/2) of one score l = w^T z + b
    (:class:`BinaryLinear`): the model, its initialisation and its Adam trajectory are then
    torchmil's ABMIL's. A bag of one tile gets α = 1 and z = h_1; a bag with no tile raises
    :class:`~mini_kd.errors.MiniKDError`.
    """

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 128, gated: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.n_classes = in_dim, n_classes
        self.register_buffer("mu", torch.zeros(in_dim))    # (D,) feature means of the training tiles
        self.register_buffer("sigma", torch.ones(in_dim))  # (D,) their standard deviations
        self.attention = AttentionPool(in_dim, hidden, gated=gated, dropout=dropout)
        self.classifier = (BinaryLinear(in_dim) if n_classes == 2
                           else nn.Linear(in_dim, n_classes))

    def standardise(self, X: torch.Tensor) -> torch.Tensor:
        """(X − μ) / σ, feature by feature (the identity until :func:`train_abmil` sets μ, σ)."""
        return (X - self.mu) / self.sigma

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = check_bags(X, mask, self.in_dim)  # (B, N)
        z, a = self.attention(self.standardise(X), mask)  # (B, D), (B, N)
        return MILOutput(logits=self.classifier(z), attention_logits=a, bag=z)  # logits (B, C)

    @torch.no_grad()
    def predict(self, X: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (B, C) and attention weights α (B, N) (0 on padding, rows sum to 1)."""
        mask = check_bags(X, mask, self.in_dim)  # (B, N)
        out = self(X, mask)
        return torch.softmax(out.logits, dim=-1), masked_softmax(out.attention_logits, mask)


# -- CLAM-style instance loss ----------------------------------------------------------------------
class InstanceClassifier(nn.Linear):
    """One linear layer h_n -> 2 logits (not-relevant, relevant): CLAM's instance head, LRMIL's
    ``inst_classifier``. (..., D) -> (..., 2)."""

    def __init__(self, in_dim: int):
        super().__init__(in_dim, 2)


def topk_instance_loss(instance_logits: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    r"""CE of pseudo-labelled instances: the top k' by score are labelled 1, the bottom k' are 0.

        k' = min(k, ⌊N/2⌋),   L = (1 / 2k') Σ_{n ∈ top ∪ bottom} CE(instance_logits_n, label_n)

    ``instance_logits`` (N, 2) for one bag, ``scores`` (N,) (e.g. the teacher's attention; only
    their order matters, no gradient flows through them). k' ≤ N/2 keeps the two sets disjoint.
    With fewer than 2 instances there is no pair of a top and a bottom instance to contrast, so
    the loss is 0 (a constant, the bag contributes nothing).
    """
    n = instance_logits.shape[0]
    if instance_logits.shape != (n, 2) or scores.shape != (n,):
        raise MiniKDError(f"topk_instance_loss needs instance_logits (N, 2) and scores (N,) of one "
                          f"bag, got {tuple(instance_logits.shape)} and {tuple(scores.shape)}")
    k = min(k, n // 2)
    if k == 0:
        return instance_logits.new_zeros(())
    order = torch.argsort(scores.detach(), descending=True, stable=True)  # (N,)
    chosen = torch.cat([order[:k], order[-k:]])  # (2k,) top then bottom
    labels = torch.tensor([1] * k + [0] * k, device=instance_logits.device)  # (2k,)
    return F.cross_entropy(instance_logits[chosen], labels)


# -- training: one way for every ABMIL -------------------------------------------------------------
def make_bags(features, labels: dict, ids, **per_slide: dict) -> list[dict]:
    """One bag per slide of ``ids``: ``X`` (1, N, D) float32, ``y`` (1,), ``id``, and for every
    keyword ``name={slide_id: tensor}`` the slide's tensor as ``name`` with a batch axis of 1
    (e.g. a teacher's logits (1, C) or a guide (1, N)). ``features``: slide_id -> (N, D)."""
    bags = []
    for slide_id in ids:
        X = torch.as_tensor(features[slide_id]).float()  # (N, D)
        if X.ndim != 2 or len(X) == 0:
            raise MiniKDError(f"{slide_id} has no tile features (shape {tuple(X.shape)}); a slide "
                              "needs at least one tissue tile")
        bags.append({"X": X.unsqueeze(0), "y": torch.tensor([int(labels[slide_id])]), "id": slide_id,
                     **{name: values[slide_id].unsqueeze(0) for name, values in per_slide.items()}})
    return bags


class Bags:
    """Bags as :func:`mini_kd.train.fit` batches: the tensors of one bag per batch, in a new
    seeded order every epoch (the same seed gives the same orders)."""

    def __init__(self, bags: list[dict], seed: int = 0):
        self.bags = [{k: v for k, v in bag.items() if torch.is_tensor(v)} for bag in bags]
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.bags)

    def __iter__(self):
        order = torch.randperm(len(self.bags), generator=self.generator)
        return (self.bags[i] for i in order.tolist())


class BagReadout(NamedTuple):
    """What any bag model of the package says about a batch of B bags of N tiles."""

    probability: torch.Tensor       # (B,) P(class 1)
    attention: torch.Tensor | None  # (B, N) α over the tiles, None when the model has none


@torch.no_grad()
def read_bags(model: nn.Module, X: torch.Tensor) -> BagReadout:
    """P(class 1) and attention α of ``model`` on the bags X (B, N, D), for every bag model here:

    - a model with its own ``readout(X)``: the baselines of :mod:`mini_kd.baselines`, and
      :class:`Standardised`, which standardises X and asks the model inside;
    - a model whose output has ``logits`` (B, 2) and ``attention_logits`` (B, N) (ABMIL and its
      kin): the softmax of each;
    - any other: one logit l per bag (torchmil's ABMIL), P = σ(l), no attention.
    """
    if hasattr(model, "readout"):
        return model.readout(X)
    out = model(X)
    if hasattr(out, "logits"):
        return BagReadout(torch.softmax(out.logits, -1)[:, 1], torch.softmax(out.attention_logits, 1))
    return BagReadout(torch.sigmoid(out).reshape(len(X)), None)


def bag_probabilities(model: nn.Module, bags: list[dict]) -> np.ndarray:
    """P(class 1) (S,) of each bag, in eval mode (:func:`read_bags`)."""
    model.eval()
    device = next(model.parameters()).device
    return np.array([read_bags(model, bag["X"].to(device)).probability[0].item() for bag in bags])


def bag_validation(bags: list[dict]) -> Callable[[nn.Module], dict]:
    """``val_step(model)`` for :func:`mini_kd.train.fit`: the bags' mean cross-entropy
    (``loss``, P(true class) clipped at 1e-7) and their AUC, over the whole set at once."""
    y = np.array([int(bag["y"]) for bag in bags])

    def val_step(model: nn.Module) -> dict:
        probs = bag_probabilities(model, bags)
        p_true = np.clip(np.where(y == 1, probs, 1 - probs), 1e-7, 1)
        return {"loss": float(-np.log(p_true).mean()),
                "auc": classification_metrics(y, probs)["auc"]}

    return val_step


def bag_ce_loss(model: ABMIL, bag: dict) -> tuple[torch.Tensor, dict]:
    """CE(z, y) of one bag: ABMIL's training loss."""
    loss = F.cross_entropy(model(bag["X"]).logits, bag["y"])
    return loss, {"ce": loss.item()}


def feature_scale(bags: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ), each (D,): the mean and standard deviation of every feature over all tiles of
    ``bags`` (σ floored at 1e-6, so that a constant feature stays finite)."""
    X = torch.cat([bag["X"][0] for bag in bags])  # (Σ N, D)
    return X.mean(0), X.std(0).clamp_min(1e-6)


class Standardised(nn.Module):
    """A model without ABMIL's own μ, σ (torchmil's) behind the same (X − μ) / σ, so that it
    sees what ours sees."""

    def __init__(self, model: nn.Module, mu: torch.Tensor, sigma: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mu", mu)        # (D,)
        self.register_buffer("sigma", sigma)  # (D,)

    def standardise(self, X: torch.Tensor) -> torch.Tensor:
        """(X − μ) / σ, feature by feature: what the model inside sees, in training and after."""
        return (X - self.mu) / self.sigma

    def forward(self, X: torch.Tensor, *args, **kwargs):
        return self.model(self.standardise(X), *args, **kwargs)

    def readout(self, X: torch.Tensor) -> BagReadout:
        """:func:`read_bags` of the model inside on the standardised bags."""
        return read_bags(self.model, self.standardise(X))


def train_abmil(train_bags: list[dict], val_bags: list[dict], fit_config: FitConfig,
                model: nn.Module | None = None, loss: Callable | None = None, *,
                hidden: int = 128, gated: bool = False, dropout: float = 0.0,
                n_classes: int = 2) -> tuple[nn.Module, History]:
    """Train an ABMIL on bags (:func:`make_bags`); returns (the model in eval mode, its history).

    ``model`` defaults to ``ABMIL(D, n_classes, hidden, gated, dropout)`` initialised from
    ``fit_config.seed``; ``loss(model, bag) -> (loss, metrics)`` to :func:`bag_ce_loss`. Every
    epoch the whole validation set is scored (:func:`bag_validation`); the epoch with the lowest
    validation cross-entropy is kept (``fit_config.monitor``, ``patience``, ``checkpoint_dir``:
    see :class:`~mini_kd.train.FitConfig`). An :class:`ABMIL` gets μ, σ of the training tiles
    (:func:`feature_scale`); another model is wrapped in :class:`Standardised` with them. On a CPU
    it runs on one torch thread: a bag of tens to hundreds of tiles is too small for intra-op
    parallelism.
    """
    if model is None:
        seed_everything(fit_config.seed)
        model = ABMIL(train_bags[0]["X"].shape[-1], n_classes, hidden, gated, dropout)
    mu, sigma = feature_scale(train_bags)
    if isinstance(model, ABMIL):
        model.mu, model.sigma = mu, sigma
    else:
        model = Standardised(model, mu, sigma)
    with torch_threads(1, fit_config.device):
        history = fit(model, loss or bag_ce_loss, Bags(train_bags, fit_config.seed), fit_config,
                      val_step=bag_validation(val_bags))
    return model.eval(), history


# -- inference: an encoder and a bag model on one slide file ---------------------------------------
def abmil_predictor(encoder: nn.Module, mil: nn.Module, mag: float, tile_size: int,
                    min_tissue: float = 0.5, device: str | None = None):
    """``predict(slide_path, mpp=None) -> Prediction``: ``encoder`` + a bag model (an ABMIL, or any
    model :func:`read_bags` reads: the baselines, torchmil's ABMIL) on the tissue tiles at ``mag``
    (stages tissue, grid, read, encode, MIL), on :mod:`mini_kd.inference`; ``details``: the
    ``grid`` and the model's ``attention`` α (N,), or None when it has none. LRMIL's 5x predictor,
    its HR and LR ABMIL, and the baselines at 20x."""
    device = pick_device(device)
    encoder.to(device).eval()
    mil.to(device).eval()

    def predict(run):
        grid = run.grid(mag, tile_size, min_tissue)
        features = run.encode(grid, encoder, device=device)  # (N, D)
        with run.timer.stage("MIL"):
            readout = read_bags(mil, features.unsqueeze(0))  # P (1,), α (1, N) or None
            probability = readout.probability[0].item()
        attention = None if readout.attention is None else readout.attention[0].cpu().numpy()  # (N,)
        return probability, {"grid": grid, "attention": attention}

    return lambda slide_path, mpp=None: predict_slide(slide_path, predict, mpp)
