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


# -- one region at several magnifications, augmented together (ResKD) -----------------------------

VIEW_SOURCES = ("pyramid", "resize")


def region_views(slide, coords, size: int, factors, mag: float | None = None,
                 source: str = "pyramid") -> list[np.ndarray]:
    """The same regions at ``mag`` and at ``mag / N`` for every N of ``factors``.

    Returns ``[HR (M, size, size, 3)] + [LR_N (M, size/N, size/N, 3) for N in factors]``, uint8,
    row m for the level-0 top-left corner ``coords[m]``; every view covers the same footprint
    ``size · mag_0 / mag``. ``mag`` defaults to the slide's own magnification (level 0).

    ``source="pyramid"`` reads each view from the slide (:meth:`~mini_kd.slides.Slide.read`: the
    coarsest pyramid level at least as fine as ``mag / N``, resampled once); ``"resize"`` reads
    only the HR view and shrinks it in software by averaging N x N pixel blocks (a box filter).
    Where the slide stores a level at ``mag / N`` (a scanner's own downsampling, then its own
    JPEG compression) the two differ; elsewhere both are box filters of finer pixels.
    """
    if source not in VIEW_SOURCES:
        raise MiniKDError(f"unknown view source {source!r}; choose one of {', '.join(VIEW_SOURCES)}")
    for factor in factors:
        if factor < 1 or size % factor:
            raise MiniKDError(f"a {size}-px region cannot be shrunk by {factor}: the factor must be a "
                              f"whole divisor of the region size; use a region size divisible by {factor}")
    mag = slide.magnification if mag is None else mag
    hr = slide.read_tiles(coords, size, mag)  # (M, S, S, 3)
    if source == "pyramid":
        return [hr] + [slide.read_tiles(coords, size // f, mag / f) for f in factors]
    return [hr] + [downsample_views(hr, f) for f in factors]


def downsample_views(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 (M, S, S, 3) -> (M, S/N, S/N, 3): the mean of every N x N block (software resizing)."""
    m, s = images.shape[0], images.shape[1]
    blocks = images.reshape(m, s // factor, factor, s // factor, factor, 3).astype(np.float32)
    return np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)  # (M, S/N, S/N, 3)


def paired_transform(flips: bool = True, jitter=(0.5, 0.5, 0.5, 0.2)):
    """ResKD's augmentation: random horizontal and vertical flips, then colour jitter
    (brightness, contrast, saturation, hue). Called once on several images, it draws one set of
    random parameters and applies it to all of them (torchvision transforms v2)."""
    from torchvision.transforms import v2

    steps = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()] if flips else []
    if jitter is not None:
        brightness, contrast, saturation, hue = jitter
        steps.append(v2.ColorJitter(brightness, contrast, saturation, hue))
    return v2.Compose(steps)


class PairedViews(torch.utils.data.Dataset):
    """Item i = ``(view_0[i], view_1[i], ..., [label[i]])``: one region at several magnifications.

    ``views``: uint8 arrays (M, h_k, w_k, 3), e.g. the output of :func:`region_views`. Each view
    comes back as a uint8 tensor (h_k, w_k, 3), like the tiles of
    :class:`~mini_kd.tiling.TileDataset`; :func:`to_tensor` normalises a batch of them. The
    ``transform`` (default: none) is called **once** on all the views of an item, wrapped as
    ``tv_tensors.Image``, so a flip or a colour change hits the HR image and its LR twin alike.

    ``seed=None`` draws the random parameters from torch's global generator (seeded by the fit
    loop); an integer makes item i's parameters a pure function of (seed, i), whatever the order
    of access. Without ``labels`` an item carries no label at all.
    """

    def __init__(self, views, labels=None, transform=None, seed: int | None = None):
        self.views = [torch.as_tensor(np.asarray(v)) for v in views]
        lengths = {len(v) for v in self.views}
        if not self.views or len(lengths) != 1:
            raise MiniKDError(f"PairedViews needs one or more views of equal length, got lengths "
                              f"{[len(v) for v in self.views]}; pass the views of the same regions")
        if labels is not None and len(labels) != len(self.views[0]):
            raise MiniKDError(f"{len(labels)} labels for {len(self.views[0])} regions; pass one per region")
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.views[0])

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        images = [tv_tensors.Image(v[index].permute(2, 0, 1)) for v in self.views]  # (3, h, w) each
        if self.transform is not None:
            with torch.random.fork_rng(devices=[], enabled=self.seed is not None):
                if self.seed is not None:
                    torch.manual_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
                out = self.transform(*images)  # one call: one draw of flips and jitter for all
            images = list(out) if len(images) > 1 else [out]
        images = [img.as_subclass(torch.Tensor).permute(1, 2, 0) for img in images]  # (h, w, 3)
        if self.labels is None:
            return tuple(images)
        return (*images, self.labels[index])
