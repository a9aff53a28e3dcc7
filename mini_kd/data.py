"""Torch-facing data: the one image normalisation, and the datasets the methods train on.

Every image enters a network through :func:`to_tensor`: uint8 (B, H, W, 3) -> float32 (B, 3, H, W),
scaled to [0, 1] and normalised with the ImageNet channel statistics (the statistics the pretrained
EfficientNet-Lite0 was trained with; the from-scratch networks use the same ones so that every
encoder sees identical inputs).
"""

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(images) -> torch.Tensor:
    """uint8 images (B, H, W, 3) or (H, W, 3), numpy or torch -> normalised float32 (B, 3, H, W)."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.ndim == 3:
        x = x.unsqueeze(0)  # (1, H, W, 3)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
