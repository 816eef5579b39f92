"""Self-contained dilated ResNet backbones, output stride 8, in two styles.

``resnet_style='caffe'`` (default): the ADVENT / Caffe DeepLab variant.
Differences from the classic ImageNet ResNet:

* Bottleneck blocks put the stride in the FIRST 1x1 conv (Caffe style);
  ``stride_in_1x1=False`` moves it to the 3x3 conv (torchvision/mmseg style).
* The max-pool uses ``ceil_mode=True``.
* layer3 / layer4 keep stride 1 and use dilation 2 / 4: output stride 8.
* The first block of a layer gets a 1x1 conv + BN projection
  (``downsample.0`` / ``downsample.1``) whenever the stride, the channel count
  or the dilation changes -- so the dilated layers always have one, as in
  ADVENT. (For Bottleneck this means every first block has one.)
* BatchNorm affine parameters are always frozen (``requires_grad=False``).
  ``bn_mode='train'`` (the reference behaviour, default) normalises with batch
  statistics in ``model.train()``; ``bn_mode='eval'`` keeps BN in eval mode
  (frozen running statistics) even inside ``model.train()``.
* ``base_width`` scales every channel count (64 = standard).
* ``stem='caffe'``: one 7x7 stride-2 conv (``conv1``/``bn1``);
  ``stem='v1c'``: three 3x3 convs 3 -> w/2 -> w/2 -> w with BN+ReLU, the first
  with stride 2, stored as ``stem.0 .. stem.8`` (mmseg ``ResNetV1c`` naming).

``resnet_style='v1c'``: mmseg's ``ResNetV1c`` as DAFormer / CONFETI build it
for DeepLabV2 (``style='pytorch'``, ``contract_dilation=True``, trained BN):

* the three-conv stem above (``stem.0 .. stem.8``), always;
* max-pool 3x3 / 2 / padding 1 WITHOUT ``ceil_mode``;
* Bottleneck stride on the 3x3 conv; BasicBlock dilates only its first conv;
* contracted dilation: the first block of a dilated layer uses half the
  layer's dilation (layer3: 1 then 2, layer4: 2 then 4);
* a ``downsample`` projection only where the stride or the channel count
  changes (not for a dilation change alone);
* BatchNorm affine parameters trained (``requires_grad=True``).

Both styles give the same keys for Bottleneck depths; the state-dict keys follow
the ResNet convention: ``conv1.weight`` / ``stem.0.weight``, ``bn1.running_mean``,
``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``, ...
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Type, Union

from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "RESNET_BLOCKS",
    "BN_MODES",
    "STEMS",
    "RESNET_STYLES",
    "resnet",
    "freeze_bn_affine",
]

# depth -> (block type name, blocks per layer)
RESNET_BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
BN_MODES = ("train", "eval")
STEMS = ("caffe", "v1c")
RESNET_STYLES = ("caffe", "v1c")


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, affine=True)
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    return bn


def freeze_bn_affine(module: nn.Module) -> None:
    """Set ``requires_grad=False`` on the affine parameters of every BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                m.weight.requires_grad_(False)
            if m.bias is not None:
                m.bias.requires_grad_(False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; stride on the first, dilation on both (mmseg: first only)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: Optional[nn.Module] = None,
        stride_in_1x1: bool = True,  # unused; kept for a uniform signature
        dilate_conv2: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = _bn(planes)
        d2 = dilation if dilate_conv2 else 1
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=d2, dilation=d2, bias=False)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (dilated) -> 1x1 with expansion 4; Caffe style stride in the 1x1."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: Optional[nn.Module] = None,
        stride_in_1x1: bool = True,
        dilate_conv2: bool = True,  # unused; kept for a uniform signature
    ) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _bn(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """Dilated ResNet trunk with output stride 8 (no classifier).

    ``forward(x)`` returns the layer4 features; ``forward_stages(x)`` returns
    the outputs of layer1..layer4. The input is expected to be normalised
    already (``DeepLabV2`` does that itself).

    ``stem`` / ``stride_in_1x1`` default (None) to the style's own: caffe ->
    ``'caffe'`` / True; v1c -> ``'v1c'`` / False (the only values v1c allows).
    """

    def __init__(
        self,
        depth: int = 101,
        base_width: int = 64,
        stem: Optional[str] = None,
        bn_mode: str = "train",
        stride_in_1x1: Optional[bool] = None,
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] = (1, 1, 2, 4),
        in_channels: int = 3,
        resnet_style: str = "caffe",
    ) -> None:
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(RESNET_BLOCKS)}")
        if resnet_style not in RESNET_STYLES:
            raise ValueError(f"unknown resnet_style {resnet_style!r}; choose one of {RESNET_STYLES}")
        v1c = resnet_style == "v1c"
        if stem is None:
            stem = "v1c" if v1c else "caffe"
        if stride_in_1x1 is None:
            stride_in_1x1 = not v1c
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
        if v1c and stem != "v1c":
            raise ValueError(f"resnet_style 'v1c' always has the three-conv stem, got stem={stem!r}")
        if v1c and stride_in_1x1:
            raise ValueError("resnet_style 'v1c' strides in the 3x3 conv; stride_in_1x1=True is the caffe style")
        if bn_mode not in BN_MODES:
            raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of {BN_MODES}")
        if base_width < 2 or base_width % 2:
            raise ValueError(f"base_width must be an even number >= 2, got {base_width}")
        kind, blocks = RESNET_BLOCKS[depth]
        block: Block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.base_width = base_width
        self.resnet_style = resnet_style
        self.stem_type = stem
        self.bn_mode = bn_mode
        self.stride_in_1x1 = stride_in_1x1
        self.blocks: Tuple[int, ...] = tuple(blocks)
        # mmseg ResNetV1c (contract_dilation=True) vs ADVENT's Caffe trunk
        self._contract_dilation = v1c
        self._downsample_on_dilation = not v1c
        self._dilate_basic_conv2 = not v1c

        w = base_width
        self.relu = nn.ReLU(inplace=True)
        # Unused stem attributes are None (not in the state dict; TorchScript
        # prunes the ``is not None`` branches).
        self.conv1: Optional[nn.Conv2d] = None
        self.bn1: Optional[nn.BatchNorm2d] = None
        self.stem: Optional[nn.Sequential] = None
        if stem == "caffe":
            self.conv1 = nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False)
            self.bn1 = _bn(w)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w // 2, 3, stride=2, padding=1, bias=False),
                _bn(w // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(w // 2, w // 2, 3, stride=1, padding=1, bias=False),
                _bn(w // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(w // 2, w, 3, stride=1, padding=1, bias=False),
                _bn(w),
                nn.ReLU(inplace=True),
            )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=not v1c)

        self._inplanes = w
        self.layer1 = self._make_layer(block, w, blocks[0], strides[0], dilations[0])
        self.layer2 = self._make_layer(block, w * 2, blocks[1], strides[1], dilations[1])
        self.layer3 = self._make_layer(block, w * 4, blocks[2], strides[2], dilations[2])
        self.layer4 = self._make_layer(block, w * 8, blocks[3], strides[3], dilations[3])
        e = block.expansion
        self.stage_channels: Tuple[int, int, int, int] = (w * e, 2 * w * e, 4 * w * e, 8 * w * e)
        self.feature_channels = self.stage_channels[3]
        self.output_stride = 4 * math.prod(strides)
        self.feature_stride = self.output_stride  # stride of `features` (layer4), as every segmenter has
        self._init_weights()
        if v1c:
            # mmseg norm_cfg requires_grad=True: BN scale and shift are trained
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight.requires_grad_(True)
                    m.bias.requires_grad_(True)

    def _make_layer(self, block: Block, planes: int, n: int, stride: int, dilation: int) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample: Optional[nn.Module] = None
        if stride != 1 or self._inplanes != out_ch or (self._downsample_on_dilation and dilation > 1):
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out_ch, 1, stride=stride, bias=False),
                _bn(out_ch),
            )
        first_dilation = dilation // 2 if self._contract_dilation and dilation > 1 else dilation
        opts = dict(stride_in_1x1=self.stride_in_1x1, dilate_conv2=self._dilate_basic_conv2)
        layers: List[nn.Module] = [block(self._inplanes, planes, stride, first_dilation, downsample, **opts)]
        self._inplanes = out_ch
        for _ in range(1, n):
            layers.append(block(out_ch, planes, 1, dilation, None, **opts))
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He init for the trunk: published weights overwrite it; it keeps
        # from-scratch training (CPU experiments) well behaved.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- BN handling -----------------------------------------------------
    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)
        if mode and self.bn_mode == "eval":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- forward -----------------------------------------------------------
    def forward_stem(self, x: Tensor) -> Tensor:
        if self.stem is not None:
            x = self.stem(x)
        else:
            assert self.conv1 is not None and self.bn1 is not None
            x = self.relu(self.bn1(self.conv1(x)))
        return self.maxpool(x)

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        x = self.forward_stem(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[3]


def resnet(depth: int = 101, **kwargs) -> ResNet:
    """Build a dilated (output stride 8) ResNet trunk; see ``ResNet``."""
    return ResNet(depth=depth, **kwargs)
