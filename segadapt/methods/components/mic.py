"""Masked image consistency (MIC, Hoyer et al., CVPR 2023), on every method (section ``method.mic``).

The student sees the target image with its own colour jitter / blur draw (``augment``; MIC's
'separatetrgaug', 'separatetrg' without) and with random blocks masked (masked pixels take the
colour that the input normalisation maps to zero, as MIC multiplies the normalised image by the
mask); it is trained with the pixel-weighted CE against the pseudo-labels of the unmasked image:

* a self-training method shares its teacher's pseudo-labels of this step (MIC's 'same' settings);
* any other method (source-only, MinEnt, AdvEnt, CFContra) gets an EMA teacher of MIC's own,
  made with the method's ``teacher`` section, as MIC's MaskingConsistencyModule does for MinEnt
  and AdvSeg. Its weights update after every optimizer step.

The loss is a backward stage of its own, after the method's step (``UDAMethod.forward``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ...errors import ConfigError
from ...models.deeplabv2 import ADVENT_BGR_MEAN, IMAGENET_MEAN
from ..losses import pseudo_label_losses
from .augment import StrongAugment
from .teacher import MeanTeacher, PseudoLabels, TeacherConfig, pseudo_labels


# --------------------------------------------------------------------------- masking (MIC)
def block_mask(batch: int, height: int, width: int, block_size: int, ratio: float, device=None,
               generator=None) -> torch.Tensor:
    """(B, 1, H, W) float mask of 0/1 blocks, MIC's block mask generator: a grid of
    round(H / block_size) x round(W / block_size) cells (at least 1), each kept (1) when
    u ~ U(0, 1) > ratio, spread over the image as a nearest-neighbour resize (cells are
    block_size pixels when it divides the side, H / rows otherwise)."""
    rows, cols = max(1, round(height / block_size)), max(1, round(width / block_size))
    cells = torch.rand(batch, 1, rows, cols, device=device, generator=generator) > ratio
    # nearest resize: output pixel y reads cell floor(y * rows / H), in integers
    row_of = torch.arange(height, device=cells.device) * rows // height
    col_of = torch.arange(width, device=cells.device) * cols // width
    return cells[:, :, row_of][:, :, :, col_of].float()


def normalization_mean_rgb(kind: str) -> tuple[float, float, float]:
    """The RGB [0, 1] colour that a model's input normalisation maps to zero: masked pixels get it,
    as MIC multiplies the normalised image by the mask."""
    if kind == "advent_bgr":
        return tuple(v / 255.0 for v in reversed(ADVENT_BGR_MEAN))
    if kind == "imagenet_rgb":
        return tuple(IMAGENET_MEAN)
    raise ValueError(f"unknown normalization {kind!r}")


def mask_image(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) where mask (B, 1, H, W) is 1, the colour `fill` (3,) where it is 0."""
    return torch.where(mask.bool(), x, fill.to(x.dtype).view(1, -1, 1, 1))


# --------------------------------------------------------------------------- the component
@dataclass
class MICConfig:
    """MIC's settings for 512/1024-pixel crops (its GTA5 -> Cityscapes configs)."""

    enabled: bool = False
    weight: float = 1.0  # MIC's mask_lambda
    mask_ratio: float = 0.7  # a block is masked with this probability
    block_size: int = 64  # block side in input pixels (MIC: 64 on 512/1024 crops)
    augment: bool = True  # jitter + blur, own draw, before masking (MIC 'separatetrgaug'; false: 'separatetrg')

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"method.mic.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.block_size < 1:
            raise ConfigError(f"method.mic.block_size must be >= 1 (pixels), got {self.block_size}")
        if self.weight < 0:
            raise ConfigError(f"method.mic.weight must be >= 0, got {self.weight}")


class MaskedImageConsistency(nn.Module):
    """`losses(model, target_images, pseudo)`: the masked-target loss. `teacher` (a TeacherConfig)
    gives MIC a teacher of its own, copied from `student` now; without it, the caller passes the
    pseudo-labels of its own teacher."""

    def __init__(self, cfg: MICConfig, augment: StrongAugment, normalization: str, aux_weight: float,
                 align_corners: bool, student: Optional[nn.Module] = None, teacher: Optional[TeacherConfig] = None):
        super().__init__()
        self.cfg = cfg
        self.augment = augment
        self.aux_weight = aux_weight
        self.align_corners = align_corners
        # the masked colour: a buffer, so that it is on the device without a copy per step
        self.register_buffer("fill", torch.tensor(normalization_mean_rgb(normalization)), persistent=False)
        self.teacher_cfg = teacher
        self.teacher = MeanTeacher(student, teacher.alpha, norm_mode=teacher.norm) if teacher is not None else None

    @torch.no_grad()
    def images(self, target_images: torch.Tensor) -> torch.Tensor:
        """MIC's input: the clean target, jittered and blurred with its own draw, block-masked."""
        # one call on the batch, as MIC's strong_transform: one jitter order and blur sigma for all
        x = self.augment(target_images, shared=True) if self.cfg.augment else target_images
        b, _, h, w = x.shape
        mask = block_mask(b, h, w, self.cfg.block_size, self.cfg.mask_ratio, x.device)
        return mask_image(x, mask, self.fill)

    def own_pseudo_labels(self, target_images: torch.Tensor, valid: Optional[torch.Tensor] = None) -> PseudoLabels:
        return pseudo_labels(self.teacher.ema, target_images, self.teacher_cfg, self.align_corners, valid)

    def losses(self, model: nn.Module, target_images: torch.Tensor, pseudo: Optional[PseudoLabels] = None,
               valid: Optional[torch.Tensor] = None, ctx=None) -> dict:
        """The student on the masked target against the teacher's labels of the unmasked one,
        weighted as the mix loss (q, zero in the ignored rows and outside `valid`). `ctx`: the
        step's `StepContext`, which keeps the masked images (and MIC's own pseudo-labels) on
        debug steps."""
        logs = {}
        if pseudo is None:
            if self.teacher is None:
                raise RuntimeError("MIC without a teacher of its own needs the method's pseudo-labels")
            pseudo = self.own_pseudo_labels(target_images, valid)
            logs["mic_pseudo_weight"] = pseudo.confidence.detach()
            if ctx is not None:
                ctx.keep_pseudo_labels(pseudo)
        masked = self.images(target_images)
        out = model(masked)
        if ctx is not None:
            ctx.keep("mic/masked_image", masked)
            ctx.keep_prediction("mic/prediction", out["main"], masked.shape[-2:])
        losses = pseudo_label_losses(out, pseudo.labels, pseudo.weights, self.aux_weight, "loss_mic", "loss_mic_aux",
                                     self.cfg.weight, self.align_corners)
        return {**losses, **logs}

    @torch.no_grad()
    def after_step(self, it: int) -> None:
        if self.teacher is not None:
            self.teacher.update(it + 1)  # the teacher for iteration it + 1


__all__ = ["MICConfig", "MaskedImageConsistency", "block_mask", "normalization_mean_rgb", "mask_image"]
