"""CUT style transfer (Park et al., ECCV 2020) as a component (section ``method.cut``): the
generator G, PatchGAN discriminator D and patch sampler F, trained by CUT's own losses with
their own optimizers, beside whatever the method trains. The stand-alone CUT pre-training and
CONFETI's jointly trained style module both compose it; CONFETI's stage 2 only runs a frozen G
(`frozen_generator`).

D is updated in CUT's order by default (``d_step: first``): its loss on the step's fake is a
backward stage of its own followed by D's optimizer step, so the GAN term computed next sees the
updated D; ``joint`` sums D's loss into the step's last backward instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from ...errors import ConfigError
from ...models.cut import CUT_FILES, CUTModel, ResnetGenerator, load_cut_weights
from ...optim import ScheduledOptimizer

D_STEPS = ("first", "joint")
OPTIMIZERS = ("adam", "adamw")


@dataclass
class CUTConfig:
    """CUT's networks, objectives and optimiser (reference defaults)."""

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
    lr: float = 2.0e-4  # for G, D and F
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    init_gain: float = 0.02  # Xavier-normal gain of the initialisation
    # first: D's backward and step on the detached fake before G's GAN term, which then sees the
    # updated D (CUT's optimize_parameters); joint: D's loss in the step's one backward
    d_step: str = "first"
    # a CUT run folder (latest_net_G.pth, + D, F if there) or a latest_net_G.pth to start from
    # (None: random init); CONFETI stage 2: the stage-1 run folder or its G (required)
    init: Optional[str] = None
    optimizer: str = "adam"  # adam (CUT's) | adamw (CONFETI single stage)
    weight_decay: float = 0.0
    poly: bool = False  # poly-decay the rate with the segmenter's schedule (CUT: constant)

    def __post_init__(self):
        check_cut_config(self)

    def network_kwargs(self) -> dict:
        names = ("ngf", "n_blocks", "ndf", "n_layers_d", "nce_layers", "num_patches", "nce_dim", "nce_temperature",
                 "lambda_gan", "lambda_nce", "nce_idt", "init_gain")
        return {n: getattr(self, n) for n in names}


CUT_KEYS = tuple(f.name for f in fields(CUTConfig))


def check_cut_config(c: CUTConfig, prefix: str = "method.cut.") -> None:
    def bad(key, problem):
        raise ConfigError(f"{prefix}{key}: {problem}")

    for key in ("ngf", "ndf", "n_layers_d", "num_patches", "nce_dim"):
        if getattr(c, key) < 1:
            bad(key, f"must be >= 1, got {getattr(c, key)}")
    if c.n_blocks < 0:
        bad("n_blocks", f"must be >= 0, got {c.n_blocks}")
    if c.nce_temperature <= 0:
        bad("nce_temperature", f"must be > 0, got {c.nce_temperature}")
    if c.lr <= 0:
        bad("lr", f"must be > 0, got {c.lr}")
    if c.weight_decay < 0:
        bad("weight_decay", f"must be >= 0, got {c.weight_decay}")
    if c.d_step not in D_STEPS:
        bad("d_step", f"'{c.d_step}' is not one of {', '.join(D_STEPS)}")
    if c.optimizer not in OPTIMIZERS:
        bad("optimizer", f"'{c.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    if len(c.betas) != 2 or not all(0 <= b < 1 for b in c.betas):
        bad("betas", f"must be two numbers in [0, 1), got {c.betas}")
    n_layers = ResnetGenerator.num_layers(c.n_blocks)
    layers = list(c.nce_layers)
    if c.lambda_nce > 0 and not layers:
        bad("nce_layers", "is empty but lambda_nce > 0")
    if any(b <= a for a, b in zip(layers, layers[1:])) or any(not 0 <= i < n_layers for i in layers):
        bad("nce_layers", f"must be increasing generator layer indices in [0, {n_layers - 1}], got {layers}")


def constant_lr(it: int) -> float:
    return 1.0


class CUTStyleTransfer(CUTModel):
    """CUT's G, D, F built from a `CUTConfig` (and started from `cfg.init` when given)."""

    def __init__(self, cfg: CUTConfig, key: str = "method.cut.init"):
        super().__init__(**cfg.network_kwargs())
        self.cfg = cfg
        if cfg.init:
            load_cut_init(self, Path(cfg.init), key)

    def losses(self, ctx, x_src: torch.Tensor, x_tgt: torch.Tensor):
        """CUT's G, F and D losses of one step: (losses, fake). `d_step='first'` (CUT's order): once
        G has run, D's loss 0.5 * (LSGAN(D(stopgrad(fake)), 0) + LSGAN(D(real), 1)) is a stage of its
        own (in fp32, as CUT has no mixed precision) that the trainer back-propagates and follows with
        D's optimizer step (`ctx.end_stage`), so that the GAN term computed next sees the updated D.
        `'joint'`: D's loss is returned with the others, for the step's last backward."""
        if self.cfg.d_step == "joint":
            g_losses, fake = self.generator_losses(x_src, x_tgt)
            return {**g_losses, **self.discriminator_loss(fake, x_tgt)}, fake

        def update_discriminator(fake: torch.Tensor) -> dict:
            with torch.autocast(fake.device.type, enabled=False):
                d = self.discriminator_loss(fake.float(), x_tgt.float())
            return ctx.end_stage(d, step=("discriminator",))

        return self.generator_losses(x_src, x_tgt, before_gan=update_discriminator)

    def optimizers(self, factor: Callable[[int], float] = constant_lr) -> dict[str, ScheduledOptimizer]:
        """One optimizer each for G, D and F (CUT: Adam, constant rate; `factor` when `cfg.poly`)."""
        c = self.cfg

        def build(net) -> ScheduledOptimizer:
            group = {"params": list(net.parameters()), "lr": c.lr, "initial_lr": c.lr, "weight_decay": c.weight_decay}
            opt_cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
            return ScheduledOptimizer(opt_cls([group], lr=c.lr, betas=tuple(c.betas)), factor if c.poly else constant_lr)

        return {"generator": build(self.G), "discriminator": build(self.D), "patch_sampler": build(self.F)}


def load_cut_folder(cut: CUTModel, folder: Path) -> str:
    """Load latest_net_G.pth and, when present, D and F (published test-time releases hold G
    only) from a CUT checkpoint folder; returns the parts loaded."""
    parts = "G" + "".join(x for x in "DF" if (folder / f"latest_net_{x}.pth").is_file())
    cut.load_weights(folder, parts)
    return parts


def load_cut_init(cut: CUTModel, path: Path, key: str) -> None:
    """`path`: a CUT run folder (G, and D, F if there) or a G file."""
    if path.is_dir():
        if not (path / CUT_FILES["G"]).is_file():
            raise ConfigError(f"{key}: {path} has no {CUT_FILES['G']} (pre-train one with "
                              "`segadapt train -c <benchmark>/cut`)")
        load_cut_folder(cut, path)
    elif path.is_file():
        load_cut_weights(G=cut.G, g_path=path)
    else:
        raise ConfigError(f"{key}: {path} does not exist (a CUT run folder or a latest_net_G.pth)")


def generator_file(init: Optional[str], key: str) -> Path:
    """A trained G: the run folder's latest_net_G.pth, or a G file given directly."""
    if not init:
        raise ConfigError(f"{key}: needs the run folder that trained the generator (or its {CUT_FILES['G']}): "
                          f"{key}=<runs/.../seedN>")
    path = Path(init)
    if path.is_dir():
        g = path / CUT_FILES["G"]
        if not g.is_file():
            raise ConfigError(f"{key}: {path} has no {CUT_FILES['G']}: not a finished CONFETI stage-1 (or CUT) run")
        return g
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist (the run folder or its {CUT_FILES['G']})")
    return path


def frozen_generator(cfg: CUTConfig, key: str = "method.cut.init") -> ResnetGenerator:
    """G of a finished run (`cfg.init`), frozen and in eval mode."""
    g = ResnetGenerator(cfg.ngf, cfg.n_blocks)
    load_cut_weights(G=g, g_path=generator_file(cfg.init, key))
    return g.requires_grad_(False).eval()


__all__ = ["CUTConfig", "CUT_KEYS", "CUTStyleTransfer", "check_cut_config", "load_cut_folder", "load_cut_init",
           "frozen_generator", "generator_file", "constant_lr"]
