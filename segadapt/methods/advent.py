"""AdvEnt (ADVENT, Vu et al. 2019): adversarial alignment of entropy maps.

Two fully convolutional discriminators, one per output (main, aux), look at
the self-information maps ``-p log p / log C`` at full input resolution and
tell source (label 0) from target (label 1). The segmenter is trained to make
its target maps look like source ones:

    segmenter:      CE_source + adv_weight * BCE(D(I_target), SOURCE_LABEL)
    discriminator:  (BCE(D(I_source.detach()), SOURCE_LABEL) + BCE(D(I_target.detach()), TARGET_LABEL)) / 2

ADVENT runs this as two phases (segmenter with D frozen, then D on detached
maps). Here it is one backward: the adversarial term sees D's parameters as
constants (``torch.func.functional_call`` with detached weights, so
gradients reach the segmenter only) and D's own terms see detached maps
(gradients reach D only). Each network therefore gets exactly the gradient of
its phase in the reference; D has its own Adam optimizer ('discriminator'),
poly-decayed with the segmenter's schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.checkpoints import describe_mismatch, read_checkpoint
from ..models.discriminator import FCDiscriminator
from ..optim import ScheduledOptimizer
from . import register_method
from .base import SegmentationMethodConfig, StepContext, UDAMethod
from .components.style import OnlineRestyler, StyleConfig
from .losses import segmentation_loss, self_information, upsample

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


def constant_weights_call(module: nn.Module, *args):
    """``module(*args)`` with its parameters treated as constants: gradients reach the inputs only."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args)


def bce_to(logits: torch.Tensor, label: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), label))


# ADVENT's discriminator is one nn.Sequential (conv, LeakyReLU, ...): its files name the convs
# by their position in it
ADVENT_DISCRIMINATOR_KEYS = {"0": "conv1", "2": "conv2", "4": "conv3", "6": "conv4", "8": "classifier"}


def load_advent_discriminator(disc: FCDiscriminator, path: str, key: str) -> None:
    """Load ADVENT's published discriminator state (``model_<iter>_D_main.pth`` /
    ``_D_aux.pth``: keys ``0.weight``, ``0.bias``, ``2.weight``, ... ``8.bias``) into
    ``disc``; any other content is one ConfigError line naming ``key``."""
    state = read_checkpoint(path)
    if isinstance(state, dict) and all(isinstance(k, str) for k in state):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    else:
        raise ConfigError(f"{key}: {path} is not an ADVENT discriminator state dict (found {type(state).__name__})")
    ours = disc.state_dict()
    expected = {f"{i}.{p}": ours[f"{name}.{p}"] for i, name in ADVENT_DISCRIMINATOR_KEYS.items()
                for p in ("weight", "bias")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__} in the "
              f"file, {tuple(v.shape)} expected" for k, v in expected.items()
              if k in state and not (torch.is_tensor(state[k]) and state[k].shape == v.shape)]
    if missing or unexpected or shapes:
        in_channels, width = ours["conv1.weight"].shape[1], ours["conv1.weight"].shape[0]
        raise ConfigError(f"{key}: {path} is not an ADVENT discriminator for {in_channels} classes with "
                          f"disc_width {width} (keys 0, 2, 4, 6, 8 .weight/.bias of one nn.Sequential): "
                          f"{describe_mismatch(missing, unexpected, shapes)}")
    disc.load_state_dict({f"{name}.{p}": state[f"{i}.{p}"] for i, name in ADVENT_DISCRIMINATOR_KEYS.items()
                          for p in ("weight", "bias")})


@dataclass
class AdvEntConfig(SegmentationMethodConfig):
    name: str = "advent"
    adv_weight_main: float = 0.001  # ADVENT LAMBDA_ADV_MAIN
    adv_weight_aux: float = 0.0002  # ADVENT LAMBDA_ADV_AUX
    disc_width: int = 64  # channels of the first discriminator conv (64-128-256-512-1)
    disc_lr: float = 1e-4  # Adam, poly-decayed like the segmenter
    disc_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    # start the discriminators from ADVENT's published files (model_<iter>_D_main.pth / _D_aux.pth)
    discriminator_main: Optional[str] = None
    discriminator_aux: Optional[str] = None
    style: StyleConfig = field(default_factory=StyleConfig)

    def __post_init__(self):
        if self.disc_width < 1:
            raise ConfigError(f"method.disc_width must be positive, got {self.disc_width}")
        if self.disc_lr <= 0:
            raise ConfigError(f"method.disc_lr must be positive, got {self.disc_lr}")
        if len(self.disc_betas) != 2:
            raise ConfigError(f"method.disc_betas: expected [beta1, beta2], got {self.disc_betas}")

    def check(self, cfg) -> None:
        if self.discriminator_aux and not cfg.model.aux:
            raise ConfigError("method.discriminator_aux is set but the model has no aux output (model.aux: false)")


@register_method("advent")
class AdvEnt(UDAMethod):
    Config = AdvEntConfig

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        mcfg = self.mcfg
        num_classes = cfg.model.num_classes
        self.disc_main = FCDiscriminator(num_classes, mcfg.disc_width)
        self.disc_aux = FCDiscriminator(num_classes, mcfg.disc_width) if cfg.model.aux else None
        self.restyler = OnlineRestyler(mcfg.style, cfg) if mcfg.style.mode == "online" else None
        # a resumed run then overwrites them with its checkpoint's discriminators
        for key, path, disc in (("method.discriminator_main", mcfg.discriminator_main, self.disc_main),
                                ("method.discriminator_aux", mcfg.discriminator_aux, self.disc_aux)):
            if path:
                load_advent_discriminator(disc, path, key)

    def discriminators(self) -> dict[str, nn.Module]:
        return {k: d for k, d in (("main", self.disc_main), ("aux", self.disc_aux)) if d is not None}

    def build_optimizers(self) -> dict[str, ScheduledOptimizer]:
        optimizers = super().build_optimizers()
        params = [p for d in self.discriminators().values() for p in d.parameters()]
        lr = self.mcfg.disc_lr
        adam = torch.optim.Adam([{"params": params, "initial_lr": lr, "lr": lr}], lr=lr,
                                betas=tuple(self.mcfg.disc_betas))
        # the same poly factor as the segmenter (ADVENT's adjust_learning_rate_discriminator)
        optimizers["discriminator"] = ScheduledOptimizer(adam, optimizers["segmenter"].factor)
        return optimizers

    def training_step(self, batch: dict, it: int, ctx: StepContext) -> dict:
        if self.restyler is not None:
            batch = self.restyler(batch, it, ctx)
        src, tgt = batch["source"], batch["target"]
        out_s = self.model(src["image"])
        size_s, size_t = src["image"].shape[-2:], tgt["image"].shape[-2:]
        ctx.keep_prediction("source/prediction", out_s["main"], size_s)
        # D only sees detached source maps: the source stage's graph can go before the target forward
        maps_s = {level: self_information(upsample(out_s[level].detach(), size_s)) for level in self.discriminators()}
        losses = ctx.end_stage(segmentation_loss(out_s, src["label"], self.cfg.model.aux_weight))
        del out_s
        out_t = self.model(tgt["image"])
        ctx.keep_prediction("target/prediction", out_t["main"], size_t, entropy="target/entropy")
        weights = {"main": self.mcfg.adv_weight_main, "aux": self.mcfg.adv_weight_aux}
        logs = {}
        for level, disc in self.discriminators().items():
            map_s = maps_s[level]
            map_t = self_information(upsample(out_t[level], size_t))
            # segmenter: fool D with target maps (target -> source label); D's weights constant
            losses[f"loss_adv_{level}"] = weights[level] * bce_to(constant_weights_call(disc, map_t), SOURCE_LABEL)
            # discriminator: its own terms on detached maps, each halved
            d_s, d_t = disc(map_s.detach()), disc(map_t.detach())
            losses[f"loss_disc_{level}"] = 0.5 * (bce_to(d_s, SOURCE_LABEL) + bce_to(d_t, TARGET_LABEL))
            # how target-like D finds each domain (0.5 = cannot tell them apart)
            logs[f"disc_{level}_p_target_on_source"] = torch.sigmoid(d_s.detach().float()).mean()
            logs[f"disc_{level}_p_target_on_target"] = torch.sigmoid(d_t.detach().float()).mean()
        return {**losses, **logs}


__all__ = ["SOURCE_LABEL", "TARGET_LABEL", "AdvEntConfig", "AdvEnt", "constant_weights_call", "bce_to",
           "ADVENT_DISCRIMINATOR_KEYS", "load_advent_discriminator"]
