"""Online AdaIN restyling of training batches on the device (section ``method.style``):
CFContra's coarse, pixel-level alignment, usable by any method that restyles its batches
(MinEnt, AdvEnt, CFContra). Offline restyled datasets need nothing here: point the dataset root
at the restyled copy (`segadapt stylize`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ...errors import ConfigError, DatasetError

STYLE_MODES = ("none", "online")
DOMAINS = ("source", "target")


def _check_choice(value, allowed, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")


@dataclass
class StyleConfig:
    """Online AdaIN restyling of training batches on the device (offline restyled
    datasets need nothing here: point the dataset root at the restyled copy)."""

    mode: str = "none"  # none | online
    vgg: Optional[str] = None  # vgg_normalised.pth; None = MobileNetV2 or AdaIN's seeded random encoder
    mobilenet: Optional[str] = None  # MobileNetV2 weights (or "installed"); None = what the decoder records
    decoder: Optional[str] = None  # decoder.pth trained for that encoder (required for online)
    style_dir: Optional[str] = None  # any folder of images; None = the target training images
    num_styles: int = 4  # style images blended with equal weights 1/N (reference: 4)
    size: Optional[list[int]] = None  # [W, H] the style images are resized to; None = target.resize
    alpha: float = 1.0  # content/style trade-off (1 = full style)
    prob: float = 1.0  # chance that a training image is restyled
    domains: list[str] = field(default_factory=lambda: ["source"])  # which streams to restyle

    def __post_init__(self):
        _check_choice(self.mode, STYLE_MODES, "method.style.mode")
        for d in self.domains:
            _check_choice(d, DOMAINS, "method.style.domains")
        if self.num_styles < 1:
            raise ConfigError(f"method.style.num_styles must be >= 1, got {self.num_styles}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"method.style.alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"method.style.prob must be in [0, 1], got {self.prob}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise ConfigError(f"method.style.size: expected [W, H] with positive sizes, got {self.size}")
        if self.mode == "online" and not self.decoder:
            raise ConfigError("method.style.decoder: online restyling needs a trained AdaIN decoder "
                              "(decoder.pth, or one trained with `segadapt adain-train`)")


def build_stylizer(scfg: StyleConfig):
    """The frozen AdaIN stylizer; imported here so that the rest works without it."""
    from ...models.adain import AdaINStylizer

    return AdaINStylizer(vgg_path=scfg.vgg, decoder_path=scfg.decoder, mobilenet_path=scfg.mobilenet)


def load_styles(scfg: StyleConfig, cfg) -> torch.Tensor:
    """(N, 3, h, w) style images in [0, 1]: `num_styles` picked (seeded by train.seed)
    from `style_dir`, or by default from the target training images."""
    size = scfg.size or cfg.target.resize
    if scfg.style_dir:
        from ...models.adain import load_style_images

        return load_style_images(scfg.style_dir, size, max_images=scfg.num_styles, seed=cfg.train.seed)
    from ...data.datasets import build_dataset

    ds = build_dataset(dataclasses.replace(cfg.target, resize=size, crop=None, flip=False, labels=False))
    k = min(scfg.num_styles, len(ds))
    idx = sorted(np.random.default_rng(cfg.train.seed).choice(len(ds), size=k, replace=False).tolist())
    images = [ds[i]["image"] for i in idx]
    if len({tuple(im.shape) for im in images}) > 1:
        raise DatasetError(f"style images from {cfg.target.root} differ in size: set method.style.size=[W,H]")
    return torch.stack(images)


class OnlineRestyler:
    """Restyles the images of the configured domains of a batch, on the batch's device.

    Deliberately not an ``nn.Module``: the frozen VGG and decoder stay out of
    the method's state dict (checkpoints) and out of DDP. Built on first use.
    Which images are restyled (``prob < 1``) is a pure function of
    (train.seed, iteration), so resumed runs restyle the same images.
    """

    def __init__(self, scfg: StyleConfig, cfg):
        self.scfg = scfg
        self.cfg = cfg
        self.stylizer = None
        self.styles: Optional[torch.Tensor] = None
        self._stats = None  # blended relu4_1 (mean, std) of the styles, computed once

    def _build(self, device: torch.device) -> None:
        self.stylizer = build_stylizer(self.scfg).to(device).eval()
        self.styles = load_styles(self.scfg, self.cfg)
        self._stats = self.stylizer.style_stats(self.styles.to(device))

    def _chosen(self, n: int, it: int, domain_index: int, device) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + it) * 2 + domain_index)
        return (torch.rand(n, generator=g) < self.scfg.prob).to(device, non_blocking=True)

    @torch.no_grad()
    def __call__(self, batch: dict, it: int, ctx=None) -> dict:
        """`ctx`: the step's `StepContext`, which keeps the restyled images on debug steps."""
        if self.scfg.prob <= 0.0:
            return batch
        out = dict(batch)
        for i, domain in enumerate(DOMAINS):
            if domain not in self.scfg.domains or domain not in batch:
                continue
            images = batch[domain]["image"]
            if self.stylizer is None:
                self._build(images.device)
            restyled = self.stylizer.stylize_with_stats(images, *self._stats, alpha=self.scfg.alpha).to(images.dtype)
            if self.scfg.prob < 1.0:
                chosen = self._chosen(images.shape[0], it, i, images.device)
                restyled = torch.where(chosen.view(-1, 1, 1, 1), restyled, images)
            out[domain] = {**batch[domain], "image": restyled}
            if ctx is not None:
                ctx.keep(f"{domain}/translated", restyled)
        return out


__all__ = ["StyleConfig", "OnlineRestyler", "build_stylizer", "load_styles"]
