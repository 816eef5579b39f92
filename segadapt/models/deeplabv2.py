"""DeepLabV2 segmenter in the ADVENT variant (ResNet trunk + ASPP-sum classifiers).

The trunk is ADVENT's Caffe ResNet (``resnet_style='caffe'``) or mmseg's
ResNetV1c (``'v1c'``, DAFormer / CONFETI); see ``resnet.py``. mmseg's
``DLV2Head`` is the same sum of dilated 3x3 convs as ``layer6``
(``checkpoints.py`` maps its keys).

The state-dict layout is exactly ADVENT's ``ResNetMulti``: the trunk modules
sit at the top level (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), ``layer5``
is the auxiliary classifier on layer3 and ``layer6`` the main classifier on
layer4, each a ``ClassifierModule`` with ``conv2d_list.0..3``.

The model takes RGB images in [0, 1] and normalises them itself
(``normalization='advent_bgr'`` or ``'imagenet_rgb'``). Logits come out at
output stride 8 and are NOT upsampled.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .resnet import ResNet

__all__ = [
    "ADVENT_BGR_MEAN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "BACKBONES",
    "InputNormalization",
    "normalize_input",
    "ClassifierModule",
    "DeepLabV2",
    "build_deeplabv2",
]

# Caffe/ADVENT mean in BGR order, on the 0..255 scale.
ADVENT_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("advent_bgr", "imagenet_rgb")
BACKBONES = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def _norm_constants(kind: str) -> Tuple[bool, float, Tuple[float, ...], Tuple[float, ...]]:
    """(flip RGB->BGR, input scale, mean, std) for a normalisation name."""
    if kind == "advent_bgr":
        return True, 255.0, ADVENT_BGR_MEAN, (1.0, 1.0, 1.0)
    if kind == "imagenet_rgb":
        return False, 1.0, IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"unknown normalization {kind!r}; choose one of {NORMALIZATIONS}")


def normalize_input(x: Tensor, kind: str) -> Tensor:
    """Functional form: RGB in [0, 1], shape (B, 3, H, W) -> normalised network input.

    ``advent_bgr``: ``x * 255``, RGB -> BGR, minus ``ADVENT_BGR_MEAN`` (no std).
    ``imagenet_rgb``: ``(x - IMAGENET_MEAN) / IMAGENET_STD``.
    """
    flip, scale, mean, std = _norm_constants(kind)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    if flip:
        x = x.flip(1)
    return (x * scale - m) / s


class InputNormalization(nn.Module):
    """Module form of ``normalize_input``; constants are non-persistent buffers
    (they follow ``.to(device)`` but stay out of the state dict)."""

    def __init__(self, kind: str = "advent_bgr") -> None:
        super().__init__()
        flip, scale, mean, std = _norm_constants(kind)
        self.kind = kind
        self.flip = flip
        self.scale = scale
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.flip:
            x = x.flip(1)
        return (x * self.scale - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class ClassifierModule(nn.Module):
    """ADVENT's "ASPP": parallel 3x3 convs with dilation = padding = d, outputs summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, stride=1, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            # ADVENT leaves the bias at PyTorch's default; zero is the
            # deterministic, unbiased-logit choice and is overwritten by any
            # checkpoint anyway.
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            # training only, where backward makes the padding costly; evaluation and traced or
            # exported graphs (which must serve every input size) use every tap
            if self.training and not (torch.jit.is_tracing() or _exporting()):
                return self._forward_skipping_padding_taps(x)
        out = self.conv2d_list[0](x)
        for i, conv in enumerate(self.conv2d_list):
            if i > 0:
                out = out + conv(x)
        return out

    @torch.jit.unused
    def _forward_skipping_padding_taps(self, x: Tensor) -> Tensor:
        out = _dilated_branch(self.conv2d_list[0], x)
        for conv in self.conv2d_list[1:]:
            out = out + _dilated_branch(conv, x)
        return out


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.4
    return bool(is_exporting()) if is_exporting is not None else False


def _dilated_branch(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a 3x3 conv with padding = dilation = d. Where d >= the map's height
    (width), the kernel's outer rows (columns) only ever see zero padding: they are left out,
    the same sum without the zeros, and their weights get the zero gradient they would get.
    Small maps only (the synthetic benchmark's 17x33 at d = 18, 24: 3x less work in those
    branches); at GTA5/Cityscapes sizes every tap is used and this is ``conv(x)``."""
    (dh, dw), (h, w) = conv.dilation, x.shape[-2:]
    skip_rows, skip_cols = dh >= h, dw >= w
    if not (skip_rows or skip_cols) or conv.kernel_size != (3, 3) or conv.padding != conv.dilation \
            or conv.stride != (1, 1):
        return conv(x)
    centre, every = slice(1, 2), slice(None)
    weight = conv.weight[:, :, centre if skip_rows else every, centre if skip_cols else every]
    padding = (0 if skip_rows else dh, 0 if skip_cols else dw)
    return F.conv2d(x, weight, conv.bias, stride=1, padding=padding, dilation=conv.dilation)


class DeepLabV2(ResNet):
    """DeepLabV2 (ADVENT ``ResNetMulti`` layout) on a dilated ResNet.

    ``forward(x, return_features=False)`` with ``x`` RGB in [0, 1], (B, 3, H, W),
    returns ``{'main': (B, C, h, w), 'aux': (B, C, h, w)}`` (``aux`` only if
    ``aux=True``) and ``'features'`` (layer4 output) if ``return_features``,
    where ``h = ceil(H / 8)``, ``w = ceil(W / 8)`` for the v1c style; the caffe
    style's ceil-mode max-pool can add one cell (ADVENT: 512x1024 -> 65x129).
    """

    HEAD_PREFIXES: Tuple[str, ...] = ("layer5.", "layer6.")

    def __init__(
        self,
        num_classes: int = 19,
        depth: int = 101,
        base_width: int = 64,
        stem: Optional[str] = None,
        aux: bool = True,
        normalization: str = "advent_bgr",
        bn_mode: str = "train",
        stride_in_1x1: Optional[bool] = None,
        aspp_dilations: Sequence[int] = (6, 12, 18, 24),
        resnet_style: str = "caffe",
    ) -> None:
        super().__init__(
            depth=depth,
            base_width=base_width,
            stem=stem,
            bn_mode=bn_mode,
            stride_in_1x1=stride_in_1x1,
            resnet_style=resnet_style,
        )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.aux = aux
        self.aspp_dilations: Tuple[int, ...] = tuple(aspp_dilations)
        self.normalization = normalization
        self.normalize = InputNormalization(normalization)
        self.layer5 = ClassifierModule(self.stage_channels[2], num_classes, aspp_dilations) if aux else None
        self.layer6 = ClassifierModule(self.stage_channels[3], num_classes, aspp_dilations)

    def forward(self, x: Tensor, return_features: bool = False) -> Dict[str, Tensor]:  # type: ignore[override]
        feats = self.extract_features(x)
        c3, c4 = feats[2], feats[3]
        out: Dict[str, Tensor] = {"main": self.layer6(c4)}
        if self.layer5 is not None:
            out["aux"] = self.layer5(c3)
        if return_features:
            out["features"] = c4
        return out

    @torch.jit.unused
    def infer(self, x: Tensor, return_features: bool = False) -> Dict[str, Tensor]:
        """The full prediction whatever the mode (a teacher's pseudo-labels)."""
        return self.forward(x, return_features)

    def extract_features(self, x: Tensor) -> List[Tensor]:
        """layer1 .. layer4 outputs (the feature levels, finest first)."""
        c1 = self.layer1(self.forward_stem(self.normalize(x)))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return [c1, c2, c3, self.layer4(c3)]  # unrolled: forward stays TorchScript-compilable

    def drop_heads(self) -> None:
        """Keep only what ``extract_features`` needs (frozen feature-distance copies)."""
        self.layer5 = self.layer6 = None

    def drop_aux(self) -> None:
        """Remove the auxiliary classifier (a training aid) from the graph."""
        self.layer5, self.aux = None, False

    def adapt_checkpoint(self, sd: Dict[str, Tensor], fmt: str) -> Tuple[Dict[str, Tensor], str]:
        """mmseg segmentor keys (``backbone.*``, ``decode_head.aspp_modules.*``) -> ours."""
        if fmt == "mmseg":
            from .checkpoints import mmseg_to_deeplabv2

            return mmseg_to_deeplabv2(sd), fmt
        return sd, fmt

    def head_parameters(self) -> List[nn.Parameter]:
        mods = [m for m in (self.layer5, self.layer6) if m is not None]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def backbone_parameters(self) -> List[nn.Parameter]:
        head = {id(p) for m in (self.layer5, self.layer6) if m is not None for p in m.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in head]

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``{'backbone': [...], 'head': [...]}`` (trainable parameters only); the
        ADVENT recipe gives the head (layer5 + layer6) 10x the learning rate."""
        return {"backbone": self.backbone_parameters(), "head": self.head_parameters()}


def build_deeplabv2(m) -> DeepLabV2:
    """The DeepLabV2 segmenter of a resolved ``ModelConfig`` (``segmenter.build_segmenter``
    resolves and checks it); ``model.pretrained`` is loaded by path."""
    model = DeepLabV2(
        num_classes=m.num_classes,
        depth=BACKBONES[m.backbone],
        base_width=m.base_width,
        stem=m.stem,
        aux=m.aux,
        normalization=m.normalization,
        bn_mode=m.bn_mode,
        stride_in_1x1=m.stride_in_1x1,
        aspp_dilations=tuple(m.aspp_dilations),
        resnet_style=m.resnet_style,
    )
    if m.pretrained:
        from .checkpoints import load_pretrained

        load_pretrained(model, m.pretrained)
    return model
