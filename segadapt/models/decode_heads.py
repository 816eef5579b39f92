"""Decode heads for multi-level backbones (MiT, DINOv2 ViT), without mmcv.

Both heads take the backbone's list of (B, C_i, H_i, W_i) maps and return
logits (B, num_classes, H_0, W_0) at the size of the first (finest) level,
not upsampled to the image. Their state-dict keys are exactly those that
follow ``decode_head.`` in an mmseg checkpoint, so such weights load with the
prefix stripped and nothing renamed.

``DAFormerHead`` is DAFormer's head (Hoyer et al., CVPR 2022) in its published
configuration ``daformer_sepaspp_mitb5``: per-level linear embedding to 256
channels, resize to the first level, concatenation, then "context-aware
fusion" by an ASPP with depthwise-separable dilated branches (no image
pooling) and a 3x3 bottleneck, dropout 0.1 and a 1x1 classifier.

``LinearHead`` follows DINOv2's linear segmentation evaluation head (mmseg
``BNHead`` with ``input_transform='resize_concat'``): the levels resized to
the first one and concatenated, a BatchNorm, and a 1x1 classifier.

Initialisation follows mmseg/mmcv: every conv followed by BN (mmcv's
``ConvModule``) is Kaiming-normal with fan_out and the ReLU gain, its BN
weight 1 and bias 0; ``conv_seg`` is normal with std 0.01 and bias 0; the
embedding ``nn.Linear`` layers keep PyTorch's default initialisation (mmseg
applies none to them).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segadapt.errors import ConfigError

__all__ = ["ConvBNReLU", "SeparableConvBNReLU", "ASPPFusion", "TokenEmbedding", "DAFormerHead", "LinearHead", "ASPPSumHead"]


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def _channel_list(in_channels, head: str) -> Tuple[int, ...]:
    if isinstance(in_channels, (str, bytes)) or not isinstance(in_channels, Sequence) or len(in_channels) == 0:
        raise ConfigError(f"{head}: in_channels must be a non-empty list of channel counts, got {in_channels!r}")
    return tuple(_positive_int(c, f"{head}: in_channels[{i}]") for i, c in enumerate(in_channels))


def _dropout_ratio(value, head: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{head}: dropout must be in [0, 1), got {value!r}")
    return float(value)


def _init_conv_seg(conv: nn.Conv2d) -> None:
    # mmseg BaseDecodeHead's init_cfg: Normal(std=0.01) on conv_seg, bias 0
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    nn.init.zeros_(conv.bias)


def _check_levels(features, in_channels: Tuple[int, ...], head: str) -> List[Tensor]:
    if not isinstance(features, (list, tuple)) or len(features) != len(in_channels):
        got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
        raise ValueError(f"{head} expects a list of {len(in_channels)} feature maps, got {got}")
    for i, (f, c) in enumerate(zip(features, in_channels)):
        if f.dim() != 4 or f.shape[1] != c:
            raise ValueError(f"{head}: level {i} must be (B, {c}, H, W), got {tuple(f.shape)}")
    return list(features)


class ConvBNReLU(nn.Module):
    """conv (no bias) - BN - ReLU with mmcv ``ConvModule``'s keys (``conv``, ``bn``) and init."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class SeparableConvBNReLU(nn.Module):
    """Depthwise k x k conv-BN-ReLU then pointwise 1x1 conv-BN-ReLU (mmcv ``DepthwiseSeparableConvModule``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        pad = dilation * (kernel_size // 2)
        self.depthwise_conv = ConvBNReLU(in_channels, in_channels, kernel_size, padding=pad, dilation=dilation,
                                         groups=in_channels)
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class _ASPPBranches(nn.ModuleList):
    """One branch per dilation: 1x1 conv for dilation 1, else a dilated 3x3 (depthwise-separable if asked).

    As mmseg's ``DepthwiseSeparableASPPModule``: only the dilation > 1 branches are separable.
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int], separable: bool) -> None:
        super().__init__()
        for d in dilations:
            if d == 1:
                self.append(ConvBNReLU(in_channels, channels, 1))
            elif separable:
                self.append(SeparableConvBNReLU(in_channels, channels, 3, dilation=d))
            else:
                self.append(ConvBNReLU(in_channels, channels, 3, padding=d, dilation=d))

    def forward(self, x: Tensor) -> List[Tensor]:
        return [branch(x) for branch in self]


class ASPPFusion(nn.Module):
    """DAFormer's ``ASPPWrapper``: [image pool,] ASPP branches, concatenated, 3x3 bottleneck conv-BN-ReLU."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = (1, 6, 12, 18),
                 separable: bool = True, pool: bool = False, align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        if pool:
            self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, 1))
        else:
            self.image_pool = None
        self.aspp_modules = _ASPPBranches(in_channels, channels, dilations, separable)
        self.bottleneck = ConvBNReLU((len(dilations) + int(pool)) * channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        if self.image_pool is not None:
            outs.append(F.interpolate(self.image_pool(x), size=x.shape[2:], mode="bilinear",
                                      align_corners=self.align_corners))
        outs.extend(self.aspp_modules(x))
        return self.bottleneck(torch.cat(outs, dim=1))


class TokenEmbedding(nn.Module):
    """SegFormer's ``MLP``: one ``nn.Linear`` (key ``proj``) applied to every pixel's feature vector."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        tokens = self.proj(x.flatten(2).transpose(1, 2))  # (B, HW, E)
        return tokens.transpose(1, 2).reshape(b, -1, h, w)


class DAFormerHead(nn.Module):
    """DAFormer's decode head (``daformer_sepaspp_mitb5``), keys as in a DAFormer checkpoint.

    ``embed_layers.<i>.proj``: per-level linear embedding to ``embed_dims``;
    ``fuse_layer``: ASPP over the concatenated embeddings (``channels`` out);
    ``conv_seg``: 1x1 classifier after ``Dropout2d(dropout)``.

    ``align_corners`` is used by the resizes; DAFormer itself asserts it is
    False (the default). ``separable`` and ``aspp_pool`` are DAFormer's
    ``fusion_cfg`` ``sep`` and ``pool`` (True / False in the published config).
    ``fusion='conv'`` replaces the ASPP by one 1x1 conv-BN-ReLU (``fuse_layer.conv`` /
    ``fuse_layer.bn``), as HRDA's scale-attention head does.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int = 19,
                 embed_dims: Union[int, Sequence[int]] = 256, channels: int = 256,
                 fusion_dilations: Sequence[int] = (1, 6, 12, 18), dropout: float = 0.1,
                 align_corners: bool = False, separable: bool = True, aspp_pool: bool = False,
                 fusion: str = "aspp") -> None:
        super().__init__()
        name = "DAFormerHead"
        self.in_channels = _channel_list(in_channels, name)
        self.num_classes = _positive_int(num_classes, f"{name}: num_classes")
        self.channels = _positive_int(channels, f"{name}: channels")
        if isinstance(embed_dims, int) and not isinstance(embed_dims, bool):
            embed_dims = [embed_dims] * len(self.in_channels)
        if isinstance(embed_dims, (str, bytes)) or not isinstance(embed_dims, Sequence) \
                or len(embed_dims) != len(self.in_channels):
            raise ConfigError(f"{name}: embed_dims must be one integer or one per level "
                              f"({len(self.in_channels)}), got {embed_dims!r}")
        self.embed_dims = tuple(_positive_int(e, f"{name}: embed_dims[{i}]") for i, e in enumerate(embed_dims))
        if isinstance(fusion_dilations, (str, bytes)) or not isinstance(fusion_dilations, Sequence) \
                or len(fusion_dilations) == 0:
            raise ConfigError(f"{name}: fusion_dilations must be a non-empty list, got {fusion_dilations!r}")
        self.fusion_dilations = tuple(_positive_int(d, f"{name}: fusion_dilations[{i}]")
                                      for i, d in enumerate(fusion_dilations))
        self.dropout_ratio = _dropout_ratio(dropout, name)
        self.align_corners = bool(align_corners)

        # a ModuleDict keyed "0".."n-1", as DAFormer's (keys embed_layers.<i>.proj.*)
        self.embed_layers = nn.ModuleDict(
            {str(i): TokenEmbedding(c, e) for i, (c, e) in enumerate(zip(self.in_channels, self.embed_dims))})
        if fusion == "conv":
            self.fuse_layer = ConvBNReLU(sum(self.embed_dims), self.channels, 1)
        else:
            self.fuse_layer = ASPPFusion(sum(self.embed_dims), self.channels, self.fusion_dilations,
                                         separable=bool(separable), pool=bool(aspp_pool),
                                         align_corners=self.align_corners)
        self.dropout = nn.Dropout2d(self.dropout_ratio) if self.dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(self.channels, self.num_classes, 1)
        _init_conv_seg(self.conv_seg)

    def forward_features(self, features: Sequence[Tensor]) -> Tensor:
        """The fused (B, channels, H_0, W_0) map, before dropout and the classifier."""
        features = _check_levels(features, self.in_channels, "DAFormerHead")
        size = features[0].shape[2:]
        embedded = []
        for i, f in enumerate(features):
            e = self.embed_layers[str(i)](f)
            if e.shape[2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=self.align_corners)
            embedded.append(e)
        return self.fuse_layer(torch.cat(embedded, dim=1))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = self.forward_features(features)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"align_corners={self.align_corners}")


class LinearHead(nn.Module):
    """DINOv2's linear segmentation head (its mmseg ``BNHead``): keys ``bn.*``, ``conv_seg.*``.

    The levels are resized (bilinear) to the first level's size and concatenated
    (mmseg's ``resize_concat``); a (B, C) global token such as the class token
    may be given as a level and is broadcast over the map, as DINOv2 does. Then
    BatchNorm over the concatenation (``batch_norm``) and a 1x1 conv. With
    ``resize_to_first=False`` the levels must already share one size.
    DINOv2's configs use no dropout (``dropout=0``).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, resize_to_first: bool = True,
                 batch_norm: bool = True, dropout: float = 0.0, align_corners: bool = False) -> None:
        super().__init__()
        name = "LinearHead"
        self.in_channels = _channel_list(in_channels, name)
        self.num_classes = _positive_int(num_classes, f"{name}: num_classes")
        self.resize_to_first = bool(resize_to_first)
        self.align_corners = bool(align_corners)
        self.dropout_ratio = _dropout_ratio(dropout, name)
        channels = sum(self.in_channels)
        self.bn: Optional[nn.BatchNorm2d] = nn.BatchNorm2d(channels) if batch_norm else None
        self.dropout = nn.Dropout2d(self.dropout_ratio) if self.dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(channels, self.num_classes, 1)
        _init_conv_seg(self.conv_seg)

    def forward_features(self, features: Sequence[Tensor]) -> Tensor:
        """The concatenated, batch-normalised (B, sum(in_channels), H_0, W_0) map."""
        features = [f[:, :, None, None] if f.dim() == 2 else f for f in features] \
            if isinstance(features, (list, tuple)) else features
        features = _check_levels(features, self.in_channels, "LinearHead")
        size = features[0].shape[2:]
        levels = []
        for i, f in enumerate(features):
            if f.shape[2:] != size:
                if not self.resize_to_first:
                    raise ValueError(f"LinearHead (resize_to_first=False): level {i} is {tuple(f.shape[2:])}, "
                                     f"level 0 is {tuple(size)}")
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=self.align_corners)
            levels.append(f)
        x = torch.cat(levels, dim=1)
        return self.bn(x) if self.bn is not None else x

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = self.forward_features(features)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)


class ASPPSumHead(nn.Module):
    """DeepLabV2's classifier as a decode head: parallel dilated 3x3 convs on one level, summed
    (ADVENT's ``ClassifierModule``, keys ``conv2d_list.i``); ``level`` picks the level (-1: the
    last, the main classifier; -2: the auxiliary one, as ADVENT's layer5 on layer3)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int,
                 dilations: Sequence[int] = (6, 12, 18, 24), level: int = -1) -> None:
        super().__init__()
        from .deeplabv2 import ClassifierModule

        if not -len(in_channels) <= level < len(in_channels):
            raise ConfigError(f"ASPP head: level {level} out of range for {len(in_channels)} levels")
        self.level = self.output_level = level
        self.classifier = ClassifierModule(int(in_channels[level]), num_classes, tuple(dilations))

    def forward(self, features: List[Tensor]) -> Tensor:
        return self.classifier(features[self.level])
