"""Mean teacher: an exponential moving average of the student's weights.

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
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


NORM_MODES = ("batch", "running")


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
