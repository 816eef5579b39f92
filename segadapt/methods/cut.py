"""CUT pre-training: the style module of CONFETI trained on its own, source -> target.

Learns G: source style -> target style with CUT's objectives (LSGAN + PatchNCE
with the identity term on target images). The segmenter is not used and not
changed; the trainer skips segmentation evaluation (`trains_segmenter = False`).
The discriminator terms see detached fakes and the generator's GAN term sees D
with detached parameters, so each loss only reaches its own networks. D is
updated in CUT's order (`d_step: first`, see `cut_losses`): its
loss on this iteration's fake is a stage of the step that the trainer
back-propagates and follows with D's Adam step before G's GAN term is computed,
so G trains against the updated D; `d_step: joint` sums D's loss into the
trainer's one backward instead (G's term then sees D before its step). At the
end of training the run folder gets
``latest_net_G.pth`` / ``latest_net_D.pth`` / ``latest_net_F.pth`` in CUT's
own format (``on_train_end``), the starting point of CONFETI's stage 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..optim import ScheduledOptimizer
from ..errors import ConfigError
from ..models.cut import CUTModel, ResnetGenerator, to_cut_range
from . import register_method
from .base import MethodConfig, UDAMethod


D_STEPS = ("first", "joint")


def constant_lr(it: int) -> float:
    return 1.0


@dataclass
class CUTSettings:
    """CUT's networks, objectives and optimiser (reference defaults); shared by the
    standalone pre-training and by CONFETI's jointly trained style module."""

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
    # first: D's backward and step on the detached fake before G's GAN term, which then sees the
    # updated D (CUT's optimize_parameters); joint: D's loss in the trainer's one backward, G's
    # GAN term sees D before its step
    d_step: str = "first"


def cut_losses(method: UDAMethod, cut: CUTModel, x_src: torch.Tensor, x_tgt: torch.Tensor, d_step: str):
    """CUT's G, F and D losses of one step: (losses, fake). `d_step='first'` (CUT's order): once
    G has run, D's loss 0.5 * (LSGAN(D(stopgrad(fake)), 0) + LSGAN(D(real), 1)) is a stage of its
    own (in fp32, as CUT has no mixed precision) that the trainer back-propagates and follows with
    D's optimizer step, so that the GAN term computed next sees the updated D. `'joint'`: D's loss
    is returned with the others, for the step's last backward."""
    if d_step == "joint":
        g_losses, fake = cut.generator_losses(x_src, x_tgt)
        return {**g_losses, **cut.discriminator_loss(fake, x_tgt)}, fake

    def update_discriminator(fake: torch.Tensor) -> dict:
        with torch.autocast(fake.device.type, enabled=False):
            d = cut.discriminator_loss(fake.float(), x_tgt.float())
        return method.end_stage(d, step=("discriminator",))

    return cut.generator_losses(x_src, x_tgt, before_gan=update_discriminator)


def build_cut_model(s: CUTSettings) -> CUTModel:
    return CUTModel(ngf=s.ngf, n_blocks=s.n_blocks, ndf=s.ndf, n_layers_d=s.n_layers_d, nce_layers=s.nce_layers,
                    num_patches=s.num_patches, nce_dim=s.nce_dim, nce_temperature=s.nce_temperature,
                    lambda_gan=s.lambda_gan, lambda_nce=s.lambda_nce, nce_idt=s.nce_idt, init_gain=s.init_gain)


def load_cut_folder(cut: CUTModel, folder: Path) -> str:
    """Load latest_net_G.pth and, when present, D and F (published test-time releases hold G
    only) from a CUT checkpoint folder; returns the parts loaded."""
    parts = "G" + "".join(x for x in "DF" if (folder / f"latest_net_{x}.pth").is_file())
    cut.load_weights(folder, parts)
    return parts


@register_method("cut")
class CUTPretraining(UDAMethod):
    uses_target = True
    trains_segmenter = False

    @dataclass
    class Config(CUTSettings, MethodConfig):
        name: str = "cut"
        init_from: Optional[str] = None  # folder with latest_net_G.pth (and D, F if there) to start from

    def __init__(self, model, cfg, mcfg):
        super().__init__(model, cfg, mcfg)
        check_cut_settings(mcfg)
        # the segmenter is carried along untouched (no gradients, so DDP does not wait for any)
        self.model.requires_grad_(False)
        self.cut = build_cut_model(mcfg)
        # d_step first: D gets no gradient from the step's last backward
        self.find_unused_parameters = mcfg.d_step == "first"
        if mcfg.init_from:
            folder = Path(mcfg.init_from)
            if not folder.is_dir():
                raise ConfigError(f"method.init_from: {folder} is not a folder with CUT's latest_net_*.pth files")
            load_cut_folder(self.cut, folder)

    def training_step(self, batch: dict, it: int) -> dict:
        x_src = to_cut_range(batch["source"]["image"])
        x_tgt = to_cut_range(batch["target"]["image"])
        return cut_losses(self, self.cut, x_src, x_tgt, self.mcfg.d_step)[0]

    def build_optimizers(self) -> dict[str, ScheduledOptimizer]:
        return cut_optimizers(self.cut, self.mcfg)

    def export_weights(self, out_dir) -> dict:
        """Write latest_net_G/D/F.pth (CUT's format) into `out_dir`; returns {part: path}."""
        return self.cut.save_weights(out_dir)

    def on_train_end(self, out_dir) -> None:
        """End-of-training hook (main process): the run folder gets CUT's weight files."""
        self.export_weights(out_dir)


def cut_optimizers(cut: CUTModel, s: CUTSettings, kind: str = "adam", weight_decay: float = 0.0,
                   factor=constant_lr) -> dict[str, ScheduledOptimizer]:
    """One optimizer each for G, D and F (CUT: Adam, constant rate)."""

    def build(net) -> ScheduledOptimizer:
        group = {"params": list(net.parameters()), "lr": s.lr, "initial_lr": s.lr, "weight_decay": weight_decay}
        opt_cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        return ScheduledOptimizer(opt_cls([group], lr=s.lr, betas=tuple(s.betas)), factor)

    return {"generator": build(cut.G), "discriminator": build(cut.D), "patch_sampler": build(cut.F)}


def check_cut_settings(m: CUTSettings, prefix: str = "method.") -> None:
    def bad(key, problem):
        raise ConfigError(f"{prefix}{key}: {problem}")

    for key in ("ngf", "ndf", "n_layers_d", "num_patches", "nce_dim"):
        if getattr(m, key) < 1:
            bad(key, f"must be >= 1, got {getattr(m, key)}")
    if m.n_blocks < 0:
        bad("n_blocks", f"must be >= 0, got {m.n_blocks}")
    if m.nce_temperature <= 0:
        bad("nce_temperature", f"must be > 0, got {m.nce_temperature}")
    if m.lr <= 0:
        bad("lr", f"must be > 0, got {m.lr}")
    if m.d_step not in D_STEPS:
        bad("d_step", f"'{m.d_step}' is not one of {', '.join(D_STEPS)}")
    if len(m.betas) != 2 or not all(0 <= b < 1 for b in m.betas):
        bad("betas", f"must be two numbers in [0, 1), got {m.betas}")
    n_layers = len(ResnetGenerator(ngf=1, n_blocks=m.n_blocks).model)
    layers = list(m.nce_layers)
    if m.lambda_nce > 0 and not layers:
        bad("nce_layers", "is empty but lambda_nce > 0")
    if any(b <= a for a, b in zip(layers, layers[1:])) or any(not 0 <= i < n_layers for i in layers):
        bad("nce_layers", f"must be increasing generator layer indices in [0, {n_layers - 1}], got {layers}")
