"""ImageNet feature distance (DAFormer), section ``method.fd``: keep the student's last-stage
features of thing classes close to those of the backbone it started from.

The frozen copy is taken when the method is built, i.e. from the segmenter
right after `model.pretrained` (and `train.init_from`) were loaded: with the
ImageNet initialisation that is the ImageNet backbone. It is part of the
method's state, so a resumed run compares against the same features even if the
initialisation file has changed since.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.labels import IGNORE_INDEX, THING_CLASSES
from ...errors import ConfigError


class FrozenBackbone(nn.Module):
    """A frozen, always-eval copy of a segmenter's backbone (heads dropped); returns the last
    level's features (ResNet layer4, MiT stage 4, the ViT's last block: DAFormer's choice)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        trunk = copy.deepcopy(model)
        trunk.drop_heads()  # not needed: keep memory and checkpoints smaller
        trunk.requires_grad_(False)
        self.trunk = trunk.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.trunk.eval()  # ImageNet running statistics, never batch statistics
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.extract_features(x)[-1]


def downscale_label_ratio(labels: torch.Tensor, size: tuple[int, int], min_ratio: float,
                          num_classes: int, stride: Optional[int] = None) -> torch.Tensor:
    """Majority label of each feature cell, or IGNORE where the majority covers < min_ratio of it.

    Ignored pixels count as a class of their own, so a cell that is mostly
    unlabelled never passes. Cells are `stride` pixels wide (default: the label
    size over the feature size, rounded up); the label is padded with ignore to
    a whole number of cells, as features come at ceil(H / stride).
    """
    b, h, w = labels.shape
    fh, fw = size
    sh, sw = -(-h // fh), -(-w // fw)
    if stride is not None and fh * stride >= h and fw * stride >= w:
        sh = sw = stride
    lab = torch.where((labels >= 0) & (labels < num_classes), labels, torch.full_like(labels, num_classes))
    lab = F.pad(lab, (0, fw * sw - w, 0, fh * sh - h), value=num_classes)
    onehot = F.one_hot(lab, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, label = F.avg_pool2d(onehot, (sh, sw)).max(dim=1)
    label = torch.where((ratio >= min_ratio) & (label < num_classes), label, torch.full_like(label, IGNORE_INDEX))
    return label


def class_lookup(classes: Sequence[int], device=None) -> torch.Tensor:
    """(256,) bool table, True at `classes`: `table[label_map]` tests membership."""
    table = torch.zeros(IGNORE_INDEX + 1, dtype=torch.bool)
    table[list(classes)] = True
    return table.to(device)


def feature_distance_mask(labels: torch.Tensor, size: tuple[int, int], classes, min_ratio: float,
                          num_classes: int, stride: Optional[int] = None) -> torch.Tensor:
    """(B, h, w) bool: feature cells whose downscaled label is one of `classes`
    (a sequence of ids, or a `class_lookup` table already on the device)."""
    cell = downscale_label_ratio(labels, size, min_ratio, num_classes, stride)
    table = classes if torch.is_tensor(classes) else class_lookup(classes, labels.device)
    return table[cell]


def masked_feature_distance(feat: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked cells of the L2 distance between feature vectors (0 when none is masked)."""
    dist = torch.linalg.vector_norm(feat.float() - ref.float(), dim=1)
    m = mask.to(dist.dtype)
    return (dist * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- the component
@dataclass
class FDConfig:
    enabled: bool = False
    weight: float = 0.005  # DAFormer's imnet_feature_dist_lambda
    classes: list[int] = field(default_factory=lambda: list(THING_CLASSES))
    min_ratio: float = 0.75  # a feature cell counts if one class covers >= this fraction of it

    def __post_init__(self):
        if self.weight < 0:
            raise ConfigError(f"method.fd.weight must be >= 0, got {self.weight}")

    def check_classes(self, num_classes: int) -> None:
        bad = [c for c in self.classes if not 0 <= c < num_classes]
        if bad:
            raise ConfigError(f"method.fd.classes: {bad} are not class ids 0..{num_classes - 1}")


class FeatureDistance(nn.Module):
    """`loss(features, images, labels)`: weight x the masked L2 distance between the student's last
    features of `images` and the frozen copy's. The copy is taken at construction, i.e. of the
    segmenter right after `model.pretrained` / `train.init_from`."""

    def __init__(self, cfg: FDConfig, model: nn.Module, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.imagenet = FrozenBackbone(model)
        self.register_buffer("class_table", class_lookup(cfg.classes), persistent=False)

    def loss(self, features: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
             feature_stride: Optional[int]) -> torch.Tensor:
        with torch.no_grad():
            ref = self.imagenet(images)
            mask = feature_distance_mask(labels, features.shape[-2:], self.class_table, self.cfg.min_ratio,
                                         self.num_classes, feature_stride)
        return self.cfg.weight * masked_feature_distance(features, ref, mask)
