"""DACS's strong photometric augmentation of mixed (and MIC's masked) images: colour jitter,
then Gaussian blur, on whole batches on the device (section ``method.augment``). Images are RGB
in [0, 1], (B, 3, H, W).

Randomness comes from the global torch RNG of the batch's device, which the trainer
checkpoints, so a resumed run draws the same augmentations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...errors import ConfigError


# --------------------------------------------------------------------------- colour
def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, (B, 1, H, W)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_image(factor)
    return (f * x + (1 - f) * _gray(x)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, argmax = x.max(dim=1)
    minc = x.min(dim=1).values
    delta = maxc - minc
    s = delta / maxc.clamp_min(eps)
    d = delta.clamp_min(eps)
    h = torch.stack([(g - b) / d, 2.0 + (b - r) / d, 4.0 + (r - g) / d], dim=1)
    h = torch.gather(h, 1, argmax.unsqueeze(1)).squeeze(1)
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1 for R, G, B
    k = (n + h * 6.0) % 6.0
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (per image, in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    h = (hsv[:, 0:1] + _per_image(shift)) % 1.0
    return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], dim=1))


APPLY_PER = ("batch", "image")


def _apply_draw(b: int, p: float, per: str, device, generator=None) -> torch.Tensor:
    """(B,) bool: apply or not, drawn once for the whole batch (DACS/DAFormer code) or per image."""
    if per == "batch":
        return (torch.rand(1, device=device, generator=generator) < p).expand(b)
    if per == "image":
        return torch.rand(b, device=device, generator=generator) < p
    raise ValueError(f"apply-per must be one of {APPLY_PER}, got {per!r}")


def brightness_additive(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia 0.5's brightness: x + (factor - 1), clamped."""
    return (x + _per_image(factor - 1)).clamp(0, 1)


def contrast_scale(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia 0.5's contrast: x * factor, clamped (no mean term)."""
    return (x * _per_image(factor)).clamp(0, 1)


def saturation_hsv(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia 0.5's saturation: S * factor in HSV space, clamped."""
    hsv = rgb_to_hsv(x)
    sat = (hsv[:, 1:2] * _per_image(factor)).clamp(0, 1)
    return hsv_to_rgb(torch.cat([hsv[:, 0:1], sat, hsv[:, 2:3]], dim=1))


# The four operations (brightness, contrast, saturation, hue) of each kornia version's ColorJitter:
# 0.5.8 (DAFormer, MIC) and 0.6.7 (CONFETI; torchvision's semantics)
JITTER_OPS = {
    "kornia_0.5": (brightness_additive, contrast_scale, saturation_hsv, adjust_hue),
    "kornia_0.6": (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue),
}
JITTER_ORDERS = ("random", "fixed")


def color_jitter(x: torch.Tensor, strength: float, p: float, generator=None, per: str = "batch",
                 kind: str = "kornia_0.6", order: str = "fixed", shared_order: bool = False) -> torch.Tensor:
    """Brightness, contrast, saturation (factors U[1-s, 1+s]) and hue (shift U[-s, s] turns) with
    probability p, as `kind`'s ColorJitter does them. Factors are drawn per image; whether to
    jitter at all is drawn once per batch (`per='batch'`, as the reference's u ~ U(0, 1) > 1 - p)
    or per image. `order='random'`: kornia's random order of the four operations, one per image
    (one call per image, as ClassMix calls it) or one for the batch (`shared_order`, as MIC calls
    it on the whole batch); 'fixed': brightness, contrast, saturation, hue."""
    if p <= 0 or strength <= 0:
        return x
    b = x.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, device=x.device, dtype=x.dtype, generator=generator)

    apply = _apply_draw(b, p, per, x.device, generator)
    s = strength
    upper = 1 + s if kind == "kornia_0.6" else min(2.0, 1 + s)  # kornia 0.5 bounds brightness by 2
    factors = (u(max(0.0, 1 - s), upper), u(max(0.0, 1 - s), 1 + s), u(max(0.0, 1 - s), 1 + s),
               u(-min(s, 0.5), min(s, 0.5)))
    ops = JITTER_OPS[kind]
    if order == "fixed":
        y = x
        for op, f in zip(ops, factors):
            y = op(y, f)
    else:
        perms = torch.rand(1 if shared_order else b, 4, device=x.device, generator=generator).argsort(dim=1)
        if shared_order:
            y = x
            for k in perms[0].tolist():
                y = ops[k](y, factors[k])
        else:
            rows = []
            for i, perm in enumerate(perms.tolist()):
                yi = x[i:i + 1]
                for k in perm:
                    yi = ops[k](yi, factors[k][i:i + 1])
                rows.append(yi)
            y = torch.cat(rows)
    return torch.where(_per_image(apply), y, x)


# --------------------------------------------------------------------------- blur
def blur_kernel_size(side: int, ratio: float = 0.1) -> int:
    """An odd kernel of about `ratio` of the image side: ceil(ratio*side), minus one if even."""
    k = max(1, math.ceil(ratio * side))
    return k if k % 2 == 1 else k - 1


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) sigmas -> (B, size) normalised 1-D Gaussian kernels."""
    x = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - (size - 1) / 2
    k = torch.exp(-(x.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_hw: tuple[int, int]) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma, reflect padding (one grouped conv per axis)."""
    b, c, h, w = x.shape
    kh, kw = kernel_hw
    y = x.reshape(1, b * c, h, w)
    if kh > 1:
        wy = gaussian_kernels(sigma.to(x.dtype), kh).repeat_interleave(c, 0).view(b * c, 1, kh, 1)
        y = F.conv2d(F.pad(y, (0, 0, kh // 2, kh // 2), mode="reflect"), wy, groups=b * c)
    if kw > 1:
        wx = gaussian_kernels(sigma.to(x.dtype), kw).repeat_interleave(c, 0).view(b * c, 1, 1, kw)
        y = F.conv2d(F.pad(y, (kw // 2, kw // 2, 0, 0), mode="reflect"), wx, groups=b * c)
    return y.view(b, c, h, w)


def random_gaussian_blur(x: torch.Tensor, p: float, sigma_range, kernel_ratio: float = 0.1,
                         generator=None, per: str = "batch", shared_sigma: bool = False) -> torch.Tensor:
    """Blur with probability p (drawn once per batch, as the reference, or per image: `per`),
    sigma ~ U[sigma_range] per image (or one for the batch: `shared_sigma`, as MIC's one call on
    the batch), kernel ~ kernel_ratio of each side."""
    if p <= 0:
        return x
    b, _, h, w = x.shape
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(1 if shared_sigma else b, device=x.device, generator=generator)
    sigma = sigma.expand(b)
    apply = _apply_draw(b, p, per, x.device, generator)
    # reflect padding needs kernel // 2 < side
    kernel = (min(blur_kernel_size(h, kernel_ratio), 2 * h - 1), min(blur_kernel_size(w, kernel_ratio), 2 * w - 1))
    return torch.where(_per_image(apply), gaussian_blur(x, sigma, kernel), x)


# --------------------------------------------------------------------------- the component
@dataclass
class AugmentConfig:
    """DACS's strong augmentation (reference values)."""

    jitter_strength: float = 0.2
    jitter_p: float = 0.8  # probability of jittering (the reference jitters when u ~ U(0,1) > 0.2)
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
    blur_kernel_ratio: float = 0.1  # kernel side ~ 10% of the image side (odd)
    apply_per: str = "batch"  # jitter/blur applied or not once per batch (reference) | image
    # whose ColorJitter: kornia_0.5 (DAFormer, MIC: additive brightness, contrast without a mean
    # term, saturation in HSV) | kornia_0.6 (CONFETI; torchvision's: multiplicative brightness,
    # contrast and saturation around the grey image)
    jitter: str = "kornia_0.5"
    jitter_order: str = "random"  # random: kornia's, per image | fixed: brightness, contrast, saturation, hue

    def __post_init__(self):
        if self.jitter not in JITTER_OPS:
            raise ConfigError(f"method.augment.jitter must be one of {', '.join(JITTER_OPS)}, got {self.jitter!r}")
        if self.jitter_order not in JITTER_ORDERS:
            raise ConfigError(f"method.augment.jitter_order must be one of {', '.join(JITTER_ORDERS)}, got "
                              f"{self.jitter_order!r}")
        if self.apply_per not in APPLY_PER:
            raise ConfigError(f"method.augment.apply_per must be one of {', '.join(APPLY_PER)}, got "
                              f"{self.apply_per!r}")
        if not 0.0 <= self.jitter_p <= 1.0 or not 0.0 <= self.blur_p <= 1.0:
            raise ConfigError("method.augment.jitter_p and method.augment.blur_p are probabilities in [0, 1]")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"method.augment.blur_sigma must be [low, high] with 0 < low <= high, got "
                              f"{self.blur_sigma}")


class StrongAugment:
    """Colour jitter, then Gaussian blur, as configured. `shared=True` is the reference's one call
    on the whole batch (MIC): one order of the jitter operations and one blur sigma for all
    images; otherwise each image gets its own, as ClassMix's per-image calls."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, shared: bool = False) -> torch.Tensor:
        c = self.cfg
        images = color_jitter(images, c.jitter_strength, c.jitter_p, per=c.apply_per, kind=c.jitter,
                              order=c.jitter_order, shared_order=shared)
        return random_gaussian_blur(images, c.blur_p, c.blur_sigma, c.blur_kernel_ratio, per=c.apply_per,
                                    shared_sigma=shared)


__all__ = [
    "APPLY_PER", "JITTER_OPS", "JITTER_ORDERS", "AugmentConfig", "StrongAugment", "color_jitter",
    "brightness_additive", "contrast_scale", "saturation_hsv", "adjust_brightness", "adjust_contrast",
    "adjust_saturation", "adjust_hue", "rgb_to_hsv", "hsv_to_rgb", "blur_kernel_size", "gaussian_kernels",
    "gaussian_blur", "random_gaussian_blur",
]
