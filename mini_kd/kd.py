r"""Distillation losses shared by the methods: a student s imitates a frozen teacher t.

**Soft targets** (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).
With class logits z ∈ R^C and a temperature T, p = softmax(z / T) and

    L_soft = T² · KL( p_t ‖ p_s ) = T² · Σ_c p_{t,c} (log p_{t,c} − log p_{s,c}),

averaged over the batch. T² keeps the gradient's size independent of T. ResKD (DiPalma et al.
2021) calls it the soft loss (T = 1), LRMIL (Shin & Jeong 2026) the bag loss L_Bag (T = T_b).

**Feature maps** (ResKD's pixel-wise loss). The teacher sees the image at N times the student's
magnification, so its last map F_t ∈ R^{C x h_t x w_t} is larger than the student's
F_s ∈ R^{C x h_s x w_s}. A resizing g brings it to the student's size, then

    L_pix = ℓ( F_s, g(F_t) ),   ℓ = mean squared error ("l2") or mean absolute error ("l1"),
    g(F) = AdaptiveMaxPool_{h_s x w_s}(F)  ("maxpool"),  Bicubic_{h_s x w_s}(F)  ("bicubic"),
           or ½ (AdaptiveMaxPool(F) + Bicubic(F))  ("both", the paper's default).

**Attention** (LRMIL's soft attention loss L_soft). With attention logits a_s, ã ∈ R^N over the
N instances of a bag (the student's, and the teacher-guided target) and a temperature T_a,

    L_att = T_a² · KL( softmax(ã / T_a) ‖ softmax(a_s / T_a) ),

a sum over the bag's real instances, averaged over the bags of the batch.

In every loss the teacher's tensor is detached: the teacher is frozen, only the student learns.
Each function checks its inputs: a shape mismatch or a NaN/inf raises
:class:`~mini_kd.errors.MiniKDError`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mini_kd.errors import MiniKDError
from mini_kd.mil import masked_log_softmax

RESIZE_MODES = ("maxpool", "bicubic", "both")
FEATURE_NORMS = ("l2", "l1")


def _check_finite(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise MiniKDError(f"{name} contains NaN or inf: the network that made it diverged or its "
                              "input holds NaN/inf; check the inputs, lower the learning rate or "
                              "set grad_clip")


def _check_same_shape(name_s: str, s: torch.Tensor, name_t: str, t: torch.Tensor) -> None:
    if s.shape != t.shape:
        raise MiniKDError(f"{name_s} {tuple(s.shape)} and {name_t} {tuple(t.shape)} must have the "
                          "same shape; student and teacher must score the same items and classes")


def _check_temperature(T: float) -> None:
    if not T > 0:
        raise MiniKDError(f"temperature T = {T}; it must be positive (T = 1 is plain softmax)")


# -- soft targets ----------------------------------------------------------------------------------
def soft_target_loss(z_s: torch.Tensor, z_t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), mean over the batch. z_s, z_t (B, C) logits.

    z_t is detached (no gradient reaches the teacher). A single sample is (1, C), not (C,): the
    batch mean divides by the first dimension.
    """
    if z_s.ndim != 2:
        raise MiniKDError(f"logits must be (B, C), got {tuple(z_s.shape)}; for one sample pass "
                          "z.unsqueeze(0)")
    _check_same_shape("student logits", z_s, "teacher logits", z_t)
    _check_temperature(T)
    _check_finite(student_logits=z_s, teacher_logits=z_t)
    log_p_s = F.log_softmax(z_s / T, dim=-1)  # (B, C)
    log_p_t = F.log_softmax(z_t.detach() / T, dim=-1)  # (B, C)
    return T**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


# -- feature maps ----------------------------------------------------------------------------------
def resize_feature_map(F_t: torch.Tensor, size: tuple[int, int], mode: str = "both") -> torch.Tensor:
    """g(F_t): (B, C, h_t, w_t) -> (B, C, h, w) by adaptive max-pooling, bicubic interpolation, or
    the average of the two ("both").

    "both" is what ResKD's "maxpool+bicubic" default was written to do; the published code's
    ``elif`` takes the max-pool branch only and then halves it, i.e. g(F) = ½ MaxPool(F). Here
    both resizings are computed and averaged.
    """
    if mode not in RESIZE_MODES:
        raise MiniKDError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    size = tuple(size)
    if mode == "maxpool":
        return F.adaptive_max_pool2d(F_t, size)  # (B, C, h, w)
    bicubic = F.interpolate(F_t, size=size, mode="bicubic", align_corners=False)  # (B, C, h, w)
    if mode == "bicubic":
        return bicubic
    return 0.5 * (F.adaptive_max_pool2d(F_t, size) + bicubic)  # (B, C, h, w)


def feature_map_loss(F_s: torch.Tensor, F_t: torch.Tensor, mode: str = "both",
                     norm: str = "l2") -> torch.Tensor:
    """ℓ(F_s, g(F_t)): the student's last map (B, C, h_s, w_s) against the teacher's
    (B, C, h_t, w_t) resized to (h_s, w_s) by :func:`resize_feature_map`; ℓ is the mean squared
    ("l2") or absolute ("l1") difference over all elements. F_t is detached."""
    if norm not in FEATURE_NORMS:
        raise MiniKDError(f"unknown feature loss {norm!r}; choose one of {', '.join(FEATURE_NORMS)}")
    if F_s.ndim != 4 or F_t.ndim != 4:
        raise MiniKDError(f"feature maps must be (B, C, h, w), got student {tuple(F_s.shape)} and "
                          f"teacher {tuple(F_t.shape)}")
    if F_s.shape[:2] != F_t.shape[:2]:
        raise MiniKDError(f"student map {tuple(F_s.shape)} and teacher map {tuple(F_t.shape)} differ "
                          "in batch size or channels; compare the same images at the same stage of "
                          "networks with equal widths (or add a 1x1 convolution to the student)")
    _check_finite(student_map=F_s, teacher_map=F_t)
    target = resize_feature_map(F_t.detach(), F_s.shape[-2:], mode)  # (B, C, h_s, w_s)
    if norm == "l2":
        return F.mse_loss(F_s, target)
    return F.l1_loss(F_s, target)


# -- attention -------------------------------------------------------------------------------------
def attention_kl_loss(a_s: torch.Tensor, a_t: torch.Tensor, T: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""T² · KL(softmax(a_t/T) ‖ softmax(a_s/T)) over the real instances of each bag, mean over bags.

    ``a_s``, ``a_t`` (B, N) attention logits (student, target; a_t is detached), ``mask`` (B, N)
    bool, True = real instance (None: all real). Padding gets probability 0 in both and adds
    nothing. Per bag the KL is a *sum* over its instances; the batch mean divides by B only.
    (LRMIL's code applies ``kl_div(reduction="batchmean")`` to one bag as a 1-D tensor (N,),
    which divides the bag's KL by N and so weakens the loss on large bags; not done here.)
    """
    if a_s.ndim != 2:
        raise MiniKDError(f"attention logits must be (B, N), got {tuple(a_s.shape)}; for one bag "
                          "pass a.unsqueeze(0)")
    _check_same_shape("student attention", a_s, "teacher attention", a_t)
    _check_temperature(T)
    if mask is None:
        mask = torch.ones_like(a_s, dtype=torch.bool)
    _check_same_shape("attention", a_s, "mask", mask)
    mask = mask.bool()
    if a_s.shape[1] == 0 or not mask.any(dim=1).all():
        raise MiniKDError("bag has no tiles (N = 0 or its mask is all False); the attention "
                          "distillation needs at least one tile per bag")
    _check_finite(student_attention=a_s[mask], teacher_attention=a_t[mask])
    log_p_s = masked_log_softmax(a_s / T, mask).masked_fill(~mask, 0.0)  # (B, N), 0 on padding
    log_p_t = masked_log_softmax(a_t.detach() / T, mask).masked_fill(~mask, 0.0)  # (B, N)
    # padding: exp(0) · (0 − 0) = 0, so the sum runs over the real instances only
    return T**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
