"""The method interface and the losses every method shares."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..optim import ScheduledOptimizer, advent_repeated_backbone, build_optimizer, layer_decay_groups
from ..models.resize import resize_bilinear

IGNORE_INDEX = 255


@dataclass
class MethodConfig:
    name: str = "source_only"


def upsample(logits: torch.Tensor, size, align_corners: bool = True) -> torch.Tensor:
    """Bilinear, in float32 (losses on full-resolution logits are float32 under AMP too);
    align_corners=True is the ADVENT/DeepLab convention for training losses, False the mmseg
    one (DACS/DAFormer/CONFETI). Equal to ``F.interpolate`` to float rounding, and on CPU
    much faster in backward (see `models.resize`)."""
    return resize_bilinear(logits, size, align_corners)


CE_MEANS = ("valid", "all")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mean: str = "valid",
                  align_corners: bool = True) -> torch.Tensor:
    """CE of logits upsampled to label size. `mean='valid'`: over labelled pixels (ADVENT);
    `'all'`: over all pixels, ignored ones counting zero (mmseg 0.x, DACS/DAFormer)."""
    logits = upsample(logits, labels.shape[-2:], align_corners).float()
    if mean == "valid":
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    if mean == "all":
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").mean()
    raise ValueError(f"cross-entropy mean must be one of {CE_MEANS}, got {mean!r}")


def segmentation_loss(outputs: dict, labels: torch.Tensor, aux_weight: float, prefix: str = "loss_seg",
                      mean: str = "valid", align_corners: bool = True) -> dict:
    """Cross-entropy on the main (and aux) logits upsampled to label size (see `cross_entropy`)."""
    losses = {f"{prefix}_main": cross_entropy(outputs["main"], labels, mean, align_corners)}
    if "aux" in outputs and aux_weight > 0:
        losses[f"{prefix}_aux"] = aux_weight * cross_entropy(outputs["aux"], labels, mean, align_corners)
    return losses


class UDAMethod(nn.Module):
    """Base class. `self.model` is the plain segmenter that evaluation and export see.

    Subclasses implement `training_step(batch, it) -> dict`: entries named
    `loss*` are summed into the objective; other entries are detached tensors
    that are only logged. A step may hand its losses over in stages with
    `end_stage` (e.g. source, then target): the trainer runs backward on each
    stage at once, so that stage's activations are freed before the next
    forward; what is returned at the end is the last stage.
    """

    Config = MethodConfig
    method_name = "base"
    uses_target = True  # does the trainer need to feed the unlabelled target stream?
    trains_segmenter = True  # False for pure style-transfer pre-training (no segmentation eval)
    find_unused_parameters = False  # for DDP

    def __init__(self, model: nn.Module, cfg, mcfg):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.mcfg = mcfg

    # set by the trainer: runs backward on a stage's losses (and steps the optimizers it names)
    stage_runner = None

    def forward(self, batch: dict, it: int) -> dict:  # DDP calls forward
        return self.training_step(batch, it)

    def end_stage(self, losses: dict, step: tuple = ()) -> dict:
        """Hand the trainer this stage's losses: with staged backward on, it back-propagates
        their sum now and returns them detached (for logging); then it steps the optimizers
        named in `step` (e.g. a discriminator that the next stage must see updated). Without a
        trainer (direct calls), or with staging off and nothing to step, `losses` come back
        unchanged and the step's one backward covers them."""
        if self.stage_runner is None:
            if step:
                raise RuntimeError(f"{type(self).__name__}: stepping {step} mid-iteration needs the trainer")
            return losses
        return self.stage_runner(losses, tuple(step))

    def training_step(self, batch: dict, it: int) -> dict:
        raise NotImplementedError

    # ----------------------------------------------------------- optimisation
    def segmenter_param_groups(self) -> list[dict]:
        head_ids = {id(p) for p in self.model.param_groups()["head"]}
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        backbone = [(n, p) for n, p in named if id(p) not in head_ids]
        if self.cfg.optim.param_list == "advent_repeated":
            backbone = advent_repeated_backbone(self.model, backbone)
        head = {"params": [(n, p) for n, p in named if id(p) in head_ids], "lr_mult": self.cfg.optim.head_lr_mult}
        if self.cfg.optim.layer_decay is not None:
            return layer_decay_groups(self.model, backbone, self.cfg.optim.layer_decay) + [head]
        return [{"params": backbone, "lr_mult": 1.0}, head]

    def build_optimizers(self) -> dict[str, ScheduledOptimizer]:
        """Name -> optimizer with schedule. Subclasses add their own (discriminators, style nets)."""
        return {"segmenter": build_optimizer(self.cfg.optim, self.segmenter_param_groups(), self.cfg.train.iters)}

    # ----------------------------------------------------------- hooks
    def stream_sampler(self, domain: str, dataset):
        """(sampler_cls, kwargs) for the 'source'/'target' stream, or None for the default
        uniform `StreamSampler` (rare class sampling plugs in here)."""
        return None

    def before_train(self, trainer) -> None:
        """Called once after the optimizers are built and any checkpoint is restored."""

    @torch.no_grad()
    def after_step(self, it: int) -> None:
        """Called after the optimizers stepped (EMA teachers, memory banks)."""

    def on_train_end(self, out_dir) -> None:
        """Called on the main process after the final checkpoint (e.g. export style-net weights)."""

    def eval_model(self) -> nn.Module:
        """The segmenter to evaluate (a teacher for methods that prefer it)."""
        return self.model

    def extra_state_dict(self) -> dict:
        """Method state beyond nn.Module parameters/buffers (counters etc.)."""
        return {}

    def load_extra_state_dict(self, state: dict) -> None:
        pass
