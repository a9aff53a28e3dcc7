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


# -- a cohort as MIL bags: one grid and one feature matrix per slide ------------------------------
def cohort_grids(cohort, mag: float, tile_size: int, min_tissue: float = 0.5) -> dict:
    """slide_id -> TileGrid for every slide of ``cohort``, cached as HDF5 inside the cohort folder."""
    from mini_kd.progress import progress
    from mini_kd.slides import open_slide
    from mini_kd.tiling import TileGrid, tile_grid

    folder = cohort.root / "grids" / f"{mag:g}x_{tile_size}px_tissue{min_tissue:g}"
    grids = {}
    for slide_id in progress(cohort.ids(), desc=f"grids {mag:g}x"):
        path = folder / f"{slide_id}.h5"
        if path.exists():
            grids[slide_id] = TileGrid.load(path)
            continue
        with open_slide(cohort.slide_path(slide_id)) as slide:
            grids[slide_id] = tile_grid(slide, mag, tile_size, min_tissue=min_tissue)
        grids[slide_id].save(path)
    return grids


def cohort_features(cohort, grids: dict, encoder, batch_size: int = 64, device=None) -> dict:
    """slide_id -> features (N, D) of every tile of ``grids``, cached inside the cohort folder."""
    from mini_kd.encoders import extract_cohort

    slides = [(slide_id, cohort.slide_path(slide_id), grids[slide_id]) for slide_id in grids]
    return extract_cohort(slides, encoder, cohort.root / "features", batch_size=batch_size,
                          device=device)
