"""Source-only training: supervised cross-entropy on the labelled stream.

With a target-labelled `source` dataset this is the oracle (configs/*/oracle.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import register_method
from .base import SegmentationMethodConfig, StepContext, UDAMethod
from .losses import segmentation_loss


@dataclass
class SourceOnlyConfig(SegmentationMethodConfig):
    name: str = "source_only"


@register_method("source_only")
class SourceOnly(UDAMethod):
    Config = SourceOnlyConfig
    @property
    def uses_target(self) -> bool:  # MIC's masked target is the only use of the target stream here
        return self.mic is not None

    def training_step(self, batch: dict, it: int, ctx: StepContext) -> dict:
        src = batch["source"]
        out = self.model(src["image"])
        ctx.keep_prediction("source/prediction", out["main"], src["image"].shape[-2:])
        return segmentation_loss(out, src["label"], self.cfg.model.aux_weight)
