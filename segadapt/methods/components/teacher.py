"""Mean teacher: an exponential moving average of the student's weights, and the pseudo-labels
it gives (section ``method.teacher``).

    theta_T <- alpha_t * theta_T + (1 - alpha_t) * theta_S,   alpha_t = min(1 - 1/(t+1), alpha)

The teacher starts as an exact copy of the student (t = 0, alpha_0 = 0) and is
never trained (requires_grad False, in no optimizer); dropout and drop-path are
always off in it. BatchNorm, `norm_mode`:

* ``"batch"`` (DACS/DAFormer code): the teacher follows the method's train/eval
  mode, so in training its BatchNorm normalises with the statistics of the batch
  it sees and keeps its own running statistics; only parameters are averaged.
* ``"running"``: always eval mode, BatchNorm uses running statistics, which are
  averaged like the weights.

To average several modules at once (a segmenter plus extra
heads), pass an `nn.ModuleDict` and index the teacher's copy: `teacher.ema['cam']`.

Being a submodule of the method, the copy is saved in and restored from the
trainer's checkpoints like any other buffer/parameter.

Pseudo-labels (DACS / DAFormer / MIC): the teacher's argmax on the clean target, weighted by q,
the fraction of the batch's pixels whose top probability reaches ``pseudo_threshold``, and by 0
in the ``ignore_top`` / ``ignore_bottom`` rows (rectification border, ego car).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ...errors import ConfigError
from ..losses import upsample

NORM_MODES = ("batch", "running")
REFERENCE_HEIGHT = 512  # scale_ignored_rows: ignore_top / ignore_bottom are given for 512-pixel-high crops


@dataclass
class TeacherConfig:
    """The EMA teacher and its pseudo-labels. Defaults: MIC's MinEnt/AdvSeg teacher (no rows
    ignored); the self-training methods ignore 15 top and 120 bottom rows (DAFormer)."""

    alpha: float = 0.999  # EMA factor (DACS paper: 0.99; DAFormer, MIC: 0.999)
    norm: str = "batch"  # BatchNorm: batch statistics (reference) | running (eval mode, averaged)
    pseudo_threshold: float = 0.968  # q = share of pixels whose max probability reaches this
    ignore_top: int = 0  # rows without pseudo-label weight: rectification border
    ignore_bottom: int = 0  # ... and the ego car
    # false: literal row counts, as the reference; true: counts given for 512-pixel-high crops,
    # scaled by the crop's height / 512
    scale_ignored_rows: bool = False

    def __post_init__(self):
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"method.teacher.alpha must be in [0, 1), got {self.alpha}")
        if self.norm not in NORM_MODES:
            raise ConfigError(f"method.teacher.norm must be one of {', '.join(NORM_MODES)}, got {self.norm!r}")
        if self.ignore_top < 0 or self.ignore_bottom < 0:
            raise ConfigError("method.teacher.ignore_top / ignore_bottom must be >= 0")


class PseudoLabels(NamedTuple):
    labels: torch.Tensor  # (B, H, W) argmax of the teacher
    weights: torch.Tensor  # (B, H, W) pixel weights: q, 0 in the ignored rows
    confidence: torch.Tensor  # q, the share of confident pixels (scalar)
    # (B, H, W) the teacher's top probability per pixel (the debug images show it)
    max_probability: Optional[torch.Tensor] = None


def confidence_weight(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """q: the fraction of pixels (over the whole batch, as DAFormer) whose max probability is >= threshold."""
    return (probs.max(dim=1).values >= threshold).float().mean()


def pseudo_weight_map(q: torch.Tensor, shape, ignore_top: int, ignore_bottom: int, scaled: bool = False) -> torch.Tensor:
    """(B, H, W) weights: q everywhere but 0 in the top/bottom rows (`scaled`: counts given for a
    512-pixel height, scaled by H / 512; else literal, as the reference)."""
    b, h, w = shape
    top = round(ignore_top * h / REFERENCE_HEIGHT) if scaled else ignore_top
    bottom = round(ignore_bottom * h / REFERENCE_HEIGHT) if scaled else ignore_bottom
    weight = q.expand(b, h, w).clone()
    if top > 0:
        weight[:, :top] = 0
    if bottom > 0:
        weight[:, max(h - bottom, 0):] = 0
    return weight


@torch.no_grad()
def pseudo_labels(segmenter: nn.Module, images: torch.Tensor, cfg: TeacherConfig, align_corners: bool,
                  valid: Optional[torch.Tensor] = None) -> PseudoLabels:
    """The teacher segmenter's pseudo-labels of `images` at their size (logits upsampled as the
    method's losses upsample). A segmenter's `infer` is its full prediction whatever its mode (HRDA:
    the slide inference, as the reference's generate_pseudo_label). `valid` (B, H, W): the
    target's pseudo-label margins (dataset option `pseudo_margins`), multiplied into the weights."""
    logits = upsample(segmenter.infer(images)["main"], images.shape[-2:], align_corners)
    probs = torch.softmax(logits.float(), dim=1)
    labels = probs.argmax(dim=1)
    top = probs.max(dim=1).values
    q = (top >= cfg.pseudo_threshold).float().mean()  # confidence_weight, with `top` kept
    weights = pseudo_weight_map(q, labels.shape, cfg.ignore_top, cfg.ignore_bottom, cfg.scale_ignored_rows)
    if valid is not None:
        weights = weights * valid
    return PseudoLabels(labels, weights, q, top)


def is_stochastic_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "DropPath"


def ema_alpha(t: int, alpha: float) -> float:
    """The averaging factor at update t: a plain running mean early on, capped at `alpha`."""
    return min(1.0 - 1.0 / (t + 1), alpha)


class MeanTeacher(nn.Module):
    def __init__(self, student: nn.Module, alpha: float = 0.999, norm_mode: str = "batch"):
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"EMA alpha must be in [0, 1), got {alpha}")
        if norm_mode not in NORM_MODES:
            raise ValueError(f"teacher norm mode must be one of {NORM_MODES}, got {norm_mode!r}")
        self.alpha = alpha
        self.norm_mode = norm_mode
        # a tuple hides the student from nn.Module: it is owned (and saved) elsewhere
        self._student = (student,)
        self.ema = copy.deepcopy(student)
        self.ema.requires_grad_(False)
        self.train(student.training)

    @property
    def student(self) -> nn.Module:
        return self._student[0]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.norm_mode == "running":
            self.ema.eval()
        else:
            for m in self.ema.modules():
                if is_stochastic_layer(m):
                    m.train(False)
        return self

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.ema(*args, **kwargs)

    @torch.no_grad()
    def update(self, t: int) -> None:
        """EMA step number `t` (t >= 1; t = 0 is the copy made at construction)."""
        a = ema_alpha(t, self.alpha)
        ema_p = list(self.ema.parameters())
        stu_p = list(self.student.parameters())
        if len(ema_p) != len(stu_p):
            raise RuntimeError("teacher and student have different parameter lists")
        torch._foreach_mul_(ema_p, a)
        torch._foreach_add_(ema_p, [p.detach() for p in stu_p], alpha=1.0 - a)
        if self.norm_mode == "batch":
            return  # the teacher's running statistics are its own
        for b_ema, b_stu in zip(self.ema.buffers(), self.student.buffers()):
            if b_ema.is_floating_point():  # BN running mean/var: averaged like the weights
                b_ema.mul_(a).add_(b_stu, alpha=1.0 - a)
            else:  # counters (num_batches_tracked)
                b_ema.copy_(b_stu)
