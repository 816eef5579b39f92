"""Source-only training: supervised cross-entropy on the labelled stream.

With a target-labelled `source` dataset this is the oracle (configs/*/oracle.yaml).
"""
from __future__ import annotations

from . import register_method
from .base import UDAMethod, segmentation_loss


@register_method("source_only")
class SourceOnly(UDAMethod):
    uses_target = False

    def training_step(self, batch: dict, it: int) -> dict:
        src = batch["source"]
        out = self.model(src["image"])
        return segmentation_loss(out, src["label"], self.cfg.model.aux_weight)
