"""Torch-facing data: the one image normalisation, and the datasets the methods train on.

Every image enters a network through :func:`to_tensor`: uint8 (B, H, W, 3) -> float32 (B, 3, H, W),
scaled to [0, 1] and normalised with the ImageNet channel statistics (the statistics the pretrained
EfficientNet-Lite0 was trained with; the from-scratch networks use the same ones so that every
encoder sees identical inputs).
"""

import numpy as np
import torch

from mini_kd.errors import MiniKDError

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


# -- slides as bags of tile features (MIL) ---------------------------------------------------------
class BagDataset(torch.utils.data.Dataset):
    """Item i = ``(X, y, slide_id)`` for ``slide_id = ids[i]``: the slide's tile features X
    float32 (N, D), its label y (int) and its id.

    ``features`` maps slide_id -> (N, D) tensor or array; it may be a lazy mapping such as the
    feature cache of :func:`cohort_features`, read only when an item is asked for. ``labels``
    maps slide_id -> class. Batch bags of different sizes with ``collate_fn=pad_bags``.
    """

    def __init__(self, features, labels, ids):
        known = set(features.keys())
        missing = [i for i in ids if i not in known or i not in labels]
        if missing:
            raise MiniKDError(f"{len(missing)} slide(s) have no features or no label, e.g. "
                              f"{missing[:3]}; extract their features and list them in the labels")
        self.features, self.labels, self.ids = features, labels, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        slide_id = self.ids[index]
        X = torch.as_tensor(self.features[slide_id]).float()  # (N, D)
        if X.ndim != 2:
            raise MiniKDError(f"features of {slide_id} have shape {tuple(X.shape)}, expected (N, D)")
        return X, int(self.labels[slide_id]), slide_id


def pad_bags(batch):
    """Collate bags of different sizes: a list of ``(X (N_b, D), y, slide_id)`` ->
    ``(X (B, N_max, D) zero-padded, mask (B, N_max) bool True on real tiles, y (B,) int64, ids)``."""
    bags, labels, ids = zip(*batch)
    dims = {X.shape[-1] for X in bags}
    if len(dims) != 1:
        raise MiniKDError(f"bags of one batch have feature sizes {sorted(dims)}; extract every "
                          "slide with the same encoder")
    lengths = torch.tensor([len(X) for X in bags])  # (B,)
    X = torch.nn.utils.rnn.pad_sequence(bags, batch_first=True)  # (B, N_max, D)
    mask = torch.arange(X.shape[1]) < lengths[:, None]  # (B, N_max)
    return X, mask, torch.tensor(labels, dtype=torch.long), list(ids)
