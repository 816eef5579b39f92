"""CUT pre-training: the style module of CONFETI trained on its own, source -> target.

Learns G: source style -> target style with CUT's objectives (LSGAN + PatchNCE with the
identity term on target images), the `components.cut` component and its optimizers. The
segmenter is not used and not changed; the trainer skips segmentation evaluation
(`trains_segmenter = False`). At the end of training the run folder gets
``latest_net_G.pth`` / ``latest_net_D.pth`` / ``latest_net_F.pth`` in CUT's own format
(``on_train_end``), the starting point of CONFETI's stage 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import MethodConfig
from ..models.cut import from_cut_range, to_cut_range
from ..optim import ScheduledOptimizer
from . import register_method
from .base import StepContext, UDAMethod
from .components.cut import CUT_KEYS, CUTConfig, CUTStyleTransfer


@dataclass
class CUTPretrainingConfig(MethodConfig):
    RENAMED: ClassVar[dict] = {**{k: f"cut.{k}" for k in CUT_KEYS if k != "init"}, "init_from": "cut.init"}

    name: str = "cut"
    cut: CUTConfig = field(default_factory=CUTConfig)


@register_method("cut")
class CUTPretraining(UDAMethod):
    Config = CUTPretrainingConfig
    uses_target = True
    trains_segmenter = False

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        # the segmenter is carried along untouched (no gradients, so DDP does not wait for any)
        self.model.requires_grad_(False)
        self.cut = CUTStyleTransfer(self.mcfg.cut)
        # d_step first: D gets no gradient from the step's last backward
        self.find_unused_parameters = self.mcfg.cut.d_step == "first"

    def training_step(self, batch: dict, it: int, ctx: StepContext) -> dict:
        x_src = to_cut_range(batch["source"]["image"])
        x_tgt = to_cut_range(batch["target"]["image"])
        losses, fake = self.cut.losses(ctx, x_src, x_tgt)
        if ctx.want_debug:
            ctx.keep("source/translated", from_cut_range(fake.detach()))
        return losses

    def build_optimizers(self) -> dict[str, ScheduledOptimizer]:
        return self.cut.optimizers(self.poly_factor())

    def export_weights(self, out_dir) -> dict:
        """Write latest_net_G/D/F.pth (CUT's format) into `out_dir`; returns {part: path}."""
        return self.cut.save_weights(out_dir)

    def on_train_end(self, out_dir) -> None:
        """End-of-training hook (main process): the run folder gets CUT's weight files."""
        self.export_weights(out_dir)
