"""CUT pre-training: the style module of CONFETI trained on its own, source -> target.

Learns G: source style -> target style with CUT's objectives (LSGAN + PatchNCE
with the identity term on target images). The segmenter is not used and not
changed; the trainer skips segmentation evaluation (`trains_segmenter = False`).
One backward per step: the discriminator terms see detached fakes, and the
generator's GAN term sees D with detached parameters, so each loss only
reaches its own networks. At the end of training the run folder gets
``latest_net_G.pth`` / ``latest_net_D.pth`` / ``latest_net_F.pth`` in CUT's
own format (``on_train_end``), the starting point of CONFETI's stage 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..engine.optim import ScheduledOptimizer
from ..errors import ConfigError
from ..models.cut import CUTModel, ResnetGenerator, to_cut_range
from . import register_method
from .base import MethodConfig, UDAMethod


def constant_lr(it: int) -> float:
    return 1.0


@register_method("cut")
class CUTPretraining(UDAMethod):
    uses_target = True
    trains_segmenter = False

    @dataclass
    class Config(MethodConfig):
        name: str = "cut"
        ngf: int = 64  # generator base width
        n_blocks: int = 9  # residual blocks of the generator
        ndf: int = 64  # discriminator base width
        n_layers_d: int = 3  # PatchGAN depth (3: 70x70 receptive field)
        nce_layers: list[int] = field(default_factory=lambda: [0, 4, 8, 12, 16])  # generator layers for PatchNCE
        num_patches: int = 256  # sampled locations per layer and image
        nce_dim: int = 256  # output width of the patch-sampler MLPs
        nce_temperature: float = 0.07
        lambda_gan: float = 1.0
        lambda_nce: float = 1.0
        nce_idt: bool = True  # identity PatchNCE on target images
        lr: float = 2.0e-4  # Adam for G, D and F, constant
        betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
        init_gain: float = 0.02  # Xavier-normal gain of the initialisation
        init_from: Optional[str] = None  # folder with latest_net_G.pth (and D, F if there) to start from

    def __init__(self, model, cfg, mcfg):
        super().__init__(model, cfg, mcfg)
        _check(mcfg)
        # the segmenter is carried along untouched (no gradients, so DDP does not wait for any)
        self.model.requires_grad_(False)
        self.cut = CUTModel(ngf=mcfg.ngf, n_blocks=mcfg.n_blocks, ndf=mcfg.ndf, n_layers_d=mcfg.n_layers_d,
                            nce_layers=mcfg.nce_layers, num_patches=mcfg.num_patches, nce_dim=mcfg.nce_dim,
                            nce_temperature=mcfg.nce_temperature, lambda_gan=mcfg.lambda_gan,
                            lambda_nce=mcfg.lambda_nce, nce_idt=mcfg.nce_idt, init_gain=mcfg.init_gain)
        if mcfg.init_from:
            folder = Path(mcfg.init_from)
            if not folder.is_dir():
                raise ConfigError(f"method.init_from: {folder} is not a folder with CUT's latest_net_*.pth files")
            # published test-time releases hold G only; D and F are taken when present
            parts = "G" + "".join(x for x in "DF" if (folder / f"latest_net_{x}.pth").is_file())
            self.cut.load_weights(folder, parts)

    def training_step(self, batch: dict, it: int) -> dict:
        x_src = to_cut_range(batch["source"]["image"])
        x_tgt = to_cut_range(batch["target"]["image"])
        g_losses, fake = self.cut.generator_losses(x_src, x_tgt)
        return {**g_losses, **self.cut.discriminator_loss(fake, x_tgt)}

    def build_optimizers(self) -> dict[str, ScheduledOptimizer]:
        m = self.mcfg

        def adam(net) -> ScheduledOptimizer:
            group = {"params": list(net.parameters()), "lr": m.lr, "initial_lr": m.lr}
            return ScheduledOptimizer(torch.optim.Adam([group], lr=m.lr, betas=tuple(m.betas)), constant_lr)

        return {"generator": adam(self.cut.G), "discriminator": adam(self.cut.D), "patch_sampler": adam(self.cut.F)}

    def export_weights(self, out_dir) -> dict:
        """Write latest_net_G/D/F.pth (CUT's format) into `out_dir`; returns {part: path}."""
        return self.cut.save_weights(out_dir)

    def on_train_end(self, out_dir) -> None:
        """End-of-training hook (main process): the run folder gets CUT's weight files."""
        self.export_weights(out_dir)


def _check(m) -> None:
    def bad(key, problem):
        raise ConfigError(f"method.{key}: {problem}")

    for key in ("ngf", "ndf", "n_layers_d", "num_patches", "nce_dim"):
        if getattr(m, key) < 1:
            bad(key, f"must be >= 1, got {getattr(m, key)}")
    if m.n_blocks < 0:
        bad("n_blocks", f"must be >= 0, got {m.n_blocks}")
    if m.nce_temperature <= 0:
        bad("nce_temperature", f"must be > 0, got {m.nce_temperature}")
    if m.lr <= 0:
        bad("lr", f"must be > 0, got {m.lr}")
    if len(m.betas) != 2 or not all(0 <= b < 1 for b in m.betas):
        bad("betas", f"must be two numbers in [0, 1), got {m.betas}")
    n_layers = len(ResnetGenerator(ngf=1, n_blocks=m.n_blocks).model)
    layers = list(m.nce_layers)
    if m.lambda_nce > 0 and not layers:
        bad("nce_layers", "is empty but lambda_nce > 0")
    if any(b <= a for a, b in zip(layers, layers[1:])) or any(not 0 <= i < n_layers for i in layers):
        bad("nce_layers", f"must be increasing generator layer indices in [0, {n_layers - 1}], got {layers}")
