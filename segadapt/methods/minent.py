"""MinEnt (ADVENT, Vu et al. 2019): entropy minimisation on the target.

    loss = CE_main + aux_weight * CE_aux                     on the labelled source
         + entropy_weight_main * H(main) + entropy_weight_aux * H(aux)   on the target

H is the Shannon entropy of the softmax over the C classes divided by log C,
averaged over the pixels of the logits upsampled to the input size (bilinear,
align_corners=True, as the reference).

Online AdaIN restyling of the batches (``style:``, CFContra's coarse alignment) and masked image
consistency (``mic:``, with an EMA teacher of MIC's own) are components it composes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from . import register_method
from .base import SegmentationMethodConfig, StepContext, UDAMethod
from .components.style import OnlineRestyler, StyleConfig
from .losses import entropy_loss, segmentation_loss, upsample


# --------------------------------------------------------------------------- MinEnt
@dataclass
class MinEntConfig(SegmentationMethodConfig):
    name: str = "minent"
    entropy_weight_main: float = 0.001  # ADVENT LAMBDA_ENT_MAIN
    entropy_weight_aux: float = 0.0002  # ADVENT LAMBDA_ENT_AUX
    style: StyleConfig = field(default_factory=StyleConfig)


@register_method("minent")
class MinEnt(UDAMethod):
    Config = MinEntConfig

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self.restyler = OnlineRestyler(self.mcfg.style, cfg) if self.mcfg.style.mode == "online" else None

    def restyle(self, batch: dict, it: int, ctx: Optional[StepContext] = None) -> dict:
        return self.restyler(batch, it, ctx) if self.restyler is not None else batch

    def entropy_losses(self, outputs: dict, size) -> dict:
        """Weighted normalised entropy of the target predictions at input size."""
        losses = {"loss_ent_main": self.mcfg.entropy_weight_main * entropy_loss(upsample(outputs["main"], size))}
        if "aux" in outputs and self.mcfg.entropy_weight_aux > 0:
            losses["loss_ent_aux"] = self.mcfg.entropy_weight_aux * entropy_loss(upsample(outputs["aux"], size))
        return losses

    def training_step(self, batch: dict, it: int, ctx: StepContext) -> dict:
        batch = self.restyle(batch, it, ctx)
        src, tgt = batch["source"], batch["target"]
        out = self.model(src["image"])
        ctx.keep_prediction("source/prediction", out["main"], src["image"].shape[-2:])
        losses = ctx.end_stage(segmentation_loss(out, src["label"], self.cfg.model.aux_weight))
        del out
        out = self.model(tgt["image"])
        ctx.keep_prediction("target/prediction", out["main"], tgt["image"].shape[-2:], entropy="target/entropy")
        losses.update(self.entropy_losses(out, tgt["image"].shape[-2:]))
        return losses


__all__ = ["MinEntConfig", "MinEnt"]
