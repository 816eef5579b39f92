"""ClassMix (DACS): half of the classes of each source image pasted onto its target image, with
labels and pseudo-label weights mixed the same way, then the strong augmentation (section
``method.mix``). Images are RGB in [0, 1], (B, 3, H, W); labels (B, H, W) train ids.

Randomness comes from the global torch RNG of the batch's device (checkpointed by the trainer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ...errors import ConfigError
from .augment import StrongAugment
from .teacher import PseudoLabels

MIX_CLASSES = ("batch", "image")


# --------------------------------------------------------------------------- ClassMix
def present_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) train ids -> (B, num_classes) bool: which classes occur in each image (ignore excluded)."""
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    flat = torch.where((flat >= 0) & (flat < num_classes), flat, torch.full_like(flat, num_classes))
    present = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)
    return present[:, :num_classes]


def choose_mix_classes(labels: torch.Tensor, num_classes: int, generator=None) -> torch.Tensor:
    """Per image, a uniformly random half (rounded up, as DACS) of the classes in its label.

    Returns (B, num_classes) bool. Vectorised: random scores, present classes
    ranked by score, the first ceil(n/2) of each image kept.
    """
    present = present_classes(labels, num_classes)
    scores = torch.rand(present.shape, device=labels.device, generator=generator)
    scores = scores.masked_fill(~present, 2.0)  # absent classes rank last
    rank = scores.argsort(dim=1).argsort(dim=1)
    n_keep = (present.sum(1, keepdim=True) + 1) // 2
    return present & (rank < n_keep)


def batch_mix_classes(labels: torch.Tensor, num_classes: int, generator=None) -> torch.Tensor:
    """DAFormer's `get_class_masks`: for every image, a uniformly random half (rounded up) of the
    values present in the *whole batch's* source labels, the ignore label included.

    Returns (B, num_classes + 1) bool; column num_classes stands for every id outside
    [0, num_classes) (255). Drawn per image, as the reference draws per image."""
    b = labels.shape[0]
    flat = labels.reshape(-1)
    flat = torch.where((flat >= 0) & (flat < num_classes), flat, torch.full_like(flat, num_classes))
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(0, flat, True)
    present = present.expand(b, -1)
    scores = torch.rand(present.shape, device=labels.device, generator=generator)
    rank = scores.masked_fill(~present, 2.0).argsort(dim=1).argsort(dim=1)
    n_keep = (present.sum(1, keepdim=True) + 1) // 2
    return present & (rank < n_keep)


def class_mix_mask(labels: torch.Tensor, chosen: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """(B, H, W) mask, 1.0 where the source label is one of the image's `chosen` classes.
    `chosen` (B, C) holds classes only; (B, C + 1) from `batch_mix_classes` also the ignore label
    (column C, every id outside [0, C)), whose pixels are then pasted too."""
    num_classes = chosen.shape[1] if num_classes is None else num_classes
    with_ignore = chosen.shape[1] == num_classes + 1
    valid = (labels >= 0) & (labels < num_classes)
    idx = torch.where(valid, labels, torch.full_like(labels, num_classes if with_ignore else 0))
    picked = torch.gather(chosen, 1, idx.reshape(labels.shape[0], -1)).reshape(labels.shape)
    return (picked if with_ignore else picked & valid).float()


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`mask * source + (1 - mask) * target` for images (B, C, H, W) or maps (B, H, W)."""
    m = mask if source.ndim == mask.ndim else mask.unsqueeze(1)
    if source.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        return torch.where(m.bool(), source, target)
    m = m.to(source.dtype)
    return m * source + (1.0 - m) * target


# --------------------------------------------------------------------------- the component
@dataclass
class MixConfig:
    """ClassMix: which classes of a source image are pasted."""

    # batch (DAFormer's get_class_masks): per image a random half of the values in the whole batch's
    # source labels, 255 included | image: a random half of the classes in that image's own label
    classes: str = "batch"

    def __post_init__(self):
        if self.classes not in MIX_CLASSES:
            raise ConfigError(f"method.mix.classes must be one of {', '.join(MIX_CLASSES)}, got {self.classes!r}")


class MixedBatch(NamedTuple):
    images: torch.Tensor  # mixed and augmented
    labels: torch.Tensor  # source labels where pasted, pseudo-labels elsewhere
    weights: torch.Tensor  # 1 where pasted, the pseudo-label weights elsewhere
    mask: torch.Tensor  # (B, H, W) 1.0 where the source was pasted


class ClassMix:
    def __init__(self, cfg: MixConfig, augment: StrongAugment, num_classes: int):
        self.cfg = cfg
        self.augment = augment
        self.num_classes = num_classes

    @torch.no_grad()
    def __call__(self, source_images: torch.Tensor, source_labels: torch.Tensor, target_images: torch.Tensor,
                 pseudo: PseudoLabels) -> MixedBatch:
        if self.cfg.classes == "batch":
            chosen = batch_mix_classes(source_labels, self.num_classes)
        else:
            chosen = choose_mix_classes(source_labels, self.num_classes)
        mask = class_mix_mask(source_labels, chosen, self.num_classes)
        images = mix(mask, source_images, target_images)
        labels = mix(mask, source_labels, pseudo.labels)
        weights = mix(mask, torch.ones_like(pseudo.weights), pseudo.weights)
        return MixedBatch(self.augment(images), labels, weights, mask)


__all__ = ["MixConfig", "MixedBatch", "ClassMix", "present_classes", "choose_mix_classes", "batch_mix_classes",
           "class_mix_mask", "mix"]
