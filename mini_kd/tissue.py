"""Find tissue on a thumbnail, and how much of each tile is tissue.

H&E-stained tissue is coloured (pink eosin, purple haematoxylin) while glass is white or grey, so
colour saturation separates them well. On a low-magnification thumbnail we

1. smooth the HSV saturation with a median filter (removes JPEG and dust speckle),
2. threshold it with Otsu's method, but never below ``min_saturation`` (a slide without tissue has
   no bimodal histogram, and Otsu would split its noise in two),
3. close small gaps, fill holes, and drop specks smaller than ``min_area`` of the image.

:func:`tissue_fraction` then measures, with a summed-area table, the fraction of every tile's
footprint that the mask marks as tissue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu


def tissue_mask(thumbnail: np.ndarray, min_saturation: float = 0.07,
                min_area: float = 1e-4) -> np.ndarray:
    """bool (H, W): True where the uint8 RGB ``thumbnail`` (H, W, 3) shows tissue."""
    saturation = rgb2hsv(thumbnail)[..., 1]  # (H, W) in [0, 1]
    saturation = ndimage.median_filter(saturation, size=3)
    spread = saturation.max() - saturation.min()
    threshold = threshold_otsu(saturation) if spread > 1e-6 else 1.0
    mask = saturation > max(threshold, min_saturation)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(areas >= min_area * mask.size) + 1
        mask = np.isin(labels, keep)
    return mask


def tissue_fraction(mask: np.ndarray, coords: np.ndarray, footprint: int,
                    mask_downsample: float) -> np.ndarray:
    """float (N,): the fraction of each tile that is tissue.

    ``coords`` (N, 2) are level-0 top-left corners, ``footprint`` the tile side in level-0 pixels,
    and ``mask_downsample`` the level-0 pixels per mask pixel. Parts of a tile that fall outside
    the mask count as background.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    height, width = mask.shape
    table = np.zeros((height + 1, width + 1))
    table[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)  # summed-area table
    x0 = np.clip(np.round(coords[:, 0] / mask_downsample), 0, width).astype(int)
    y0 = np.clip(np.round(coords[:, 1] / mask_downsample), 0, height).astype(int)
    x1 = np.clip(np.round((coords[:, 0] + footprint) / mask_downsample), 0, width).astype(int)
    y1 = np.clip(np.round((coords[:, 1] + footprint) / mask_downsample), 0, height).astype(int)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = max(footprint / mask_downsample, 1.0) ** 2
    return np.clip(inside / area, 0.0, 1.0)
