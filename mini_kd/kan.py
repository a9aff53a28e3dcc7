r"""Chebyshev Kolmogorov-Arnold layer: AHDMIL's CKA classifier (Dong et al. 2025).

"AHDMIL: Asymmetric Hierarchical Distillation Multi-Instance Learning for Fast and Accurate
Whole-Slide Image Classification", arXiv 2508.05114 (and HDMIL, CVPR 2025, arXiv 2502.21130).
DMIN's bag classifiers Φ_c and its instance classifiers are CKA layers instead of linear ones.

A linear layer puts a learned weight on each edge i -> o and a fixed nonlinearity on the nodes. A
Kolmogorov-Arnold layer puts a learned *function* φ_{i,o} on each edge and only sums at the nodes:

    y_o = Σ_{i=1}^{d_in} φ_{i,o}(x_i),      φ_{i,o}(x) = Σ_{k=0}^{K} c_{i,o,k} T_k(tanh x).

tanh squashes every input into (−1, 1), the domain of the Chebyshev polynomials of the first kind,

    T_0(x) = 1,   T_1(x) = x,   T_k(x) = 2x T_{k−1}(x) − T_{k−2}(x)   (k ≥ 2),

so each φ_{i,o} is a degree-K polynomial of tanh x with coefficients c ∈ R^{d_in x d_out x (K+1)},
the layer's only parameter (no bias, no base branch, no normalisation). AHDMIL uses K = 12
(Camelyon16, BRCA, RCC) or 16 (NSCLC).

Initialisation of c: "xavier" is ``xavier_normal_`` on the 3-D tensor. PyTorch reads its fans as
fan_in = d_out (K+1) and fan_out = d_in (K+1), so std = sqrt(2 / ((d_in + d_out)(K+1)));
"normal" is N(0, (1 / (d_in (K+1)))²). (The authors' option is spelled ``xaiver``.)
"""

from __future__ import annotations

import torch
from torch import nn

from mini_kd.errors import MiniKDError

INITS = ("xavier", "normal")


def chebyshev_basis(x: torch.Tensor, degree: int) -> torch.Tensor:
    """[T_0(x), ..., T_K(x)] by the recurrence: (...) -> (..., K+1). Meant for x in [−1, 1]."""
    T = [torch.ones_like(x), x]
    for _ in range(2, degree + 1):
        T.append(2 * x * T[-1] - T[-2])
    return torch.stack(T[: degree + 1], dim=-1)  # (..., K+1)


class ChebyKAN(nn.Module):
    r"""y_o = Σ_i Σ_k c[i, o, k] · T_k(tanh x_i): (..., d_in) -> (..., d_out), e.g. [B, d_in] or
    [B, N, d_in]. ``coefficients`` is c, shape [d_in, d_out, K+1]."""

    def __init__(self, in_dim: int, out_dim: int, degree: int, init: str = "xavier"):
        super().__init__()
        if degree < 0:
            raise MiniKDError(f"Chebyshev degree {degree} must be 0 or more (AHDMIL uses 12 or 16)")
        if init not in INITS:
            raise MiniKDError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        self.in_dim, self.out_dim, self.degree = in_dim, out_dim, degree
        self.coefficients = nn.Parameter(torch.empty(in_dim, out_dim, degree + 1))
        if init == "xavier":
            nn.init.xavier_normal_(self.coefficients)
        else:
            nn.init.normal_(self.coefficients, std=1.0 / (in_dim * (degree + 1)))

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """T_k(tanh x_i) for every input and degree: (..., d_in) -> (..., d_in, K+1)."""
        return chebyshev_basis(torch.tanh(x), self.degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise MiniKDError(f"ChebyKAN expects inputs (..., {self.in_dim}), got {tuple(x.shape)}")
        return torch.einsum("...ik,iok->...o", self.basis(x), self.coefficients)  # (..., d_out)

    def edge_function(self, x: torch.Tensor, i: int, o: int) -> torch.Tensor:
        """The learned activation φ_{i,o}(x) = Σ_k c[i, o, k] T_k(tanh x) at points x (M,) -> (M,)."""
        return chebyshev_basis(torch.tanh(x), self.degree) @ self.coefficients[i, o]  # (M,)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, degree={self.degree}"


HEADS = ("cka", "linear")


def head(in_dim: int, out_dim: int, kind: str = "cka", degree: int = 12) -> nn.Module:
    """A classifier layer ``in_dim`` -> ``out_dim``: ``"cka"`` a :class:`ChebyKAN` of ``degree``
    (AHDMIL's CKA classifier), ``"linear"`` an ``nn.Linear`` (the ablation)."""
    if kind not in HEADS:
        raise MiniKDError(f"unknown head {kind!r}; choose 'cka' (the paper's) or 'linear'")
    return ChebyKAN(in_dim, out_dim, degree) if kind == "cka" else nn.Linear(in_dim, out_dim)
