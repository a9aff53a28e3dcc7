"""mini_kd: resolution-based knowledge distillation for whole-slide images.

Modules, in the order the course meets them: ``slides`` (open a slide), ``tissue`` (find tissue),
``tiling`` (grids at any magnification and their HR<->LR correspondences), ``phantom`` (the embedded
cohort), ``encoders`` (HR/LR networks, cached features), ``kd`` (distillation losses), ``mil``
(attention MIL), ``kan`` (Chebyshev KAN), ``methods`` (ResKD, LRMIL, AHDMIL), ``train``, ``evaluate``,
``viz``.
"""

from mini_kd.errors import MiniKDError

__all__ = ["MiniKDError"]
__version__ = "0.1.0"
