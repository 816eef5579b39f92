"""ClassMix and the strong photometric augmentation of DACS, and MIC's block masking,
on whole batches on the device (plain torch; images are RGB in [0, 1], (B, 3, H, W)).

Randomness comes from the global torch RNG of the batch's device, which the
trainer checkpoints, so a resumed run draws the same masks and augmentations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.deeplabv2 import ADVENT_BGR_MEAN, IMAGENET_MEAN


# --------------------------------------------------------------------------- ClassMix
def present_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) train ids -> (B, num_classes) bool: which classes occur in each image (ignore excluded)."""
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    flat = torch.where((flat >= 0) & (flat < num_classes), flat, torch.full_like(flat, num_classes))
    present = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, flat, True)
    return present[:, :num_classes]


def choose_mix_classes(labels: torch.Tensor, num_classes: int, generator=None) -> torch.Tensor:
    """Per image, a uniformly random half (rounded up, as DACS) of the classes in its label.

    Returns (B, num_classes) bool. Vectorised: random scores, present classes
    ranked by score, the first ceil(n/2) of each image kept.
    """
    present = present_classes(labels, num_classes)
    scores = torch.rand(present.shape, device=labels.device, generator=generator)
    scores = scores.masked_fill(~present, 2.0)  # absent classes rank last
    rank = scores.argsort(dim=1).argsort(dim=1)
    n_keep = (present.sum(1, keepdim=True) + 1) // 2
    return present & (rank < n_keep)


def class_mix_mask(labels: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(B, H, W) mask, 1.0 where the source label is one of the image's `chosen` classes."""
    num_classes = chosen.shape[1]
    valid = (labels >= 0) & (labels < num_classes)
    idx = torch.where(valid, labels, torch.zeros_like(labels))
    picked = torch.gather(chosen, 1, idx.reshape(labels.shape[0], -1)).reshape(labels.shape)
    return (picked & valid).float()


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`mask * source + (1 - mask) * target` for images (B, C, H, W) or maps (B, H, W)."""
    m = mask if source.ndim == mask.ndim else mask.unsqueeze(1)
    if source.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        return torch.where(m.bool(), source, target)
    m = m.to(source.dtype)
    return m * source + (1.0 - m) * target


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


def color_jitter(x: torch.Tensor, strength: float, p: float, generator=None, per: str = "batch") -> torch.Tensor:
    """Brightness, contrast, saturation (factors U[1-s, 1+s]) then hue (shift U[-s, s] turns),
    with probability p (fixed order). Factors are drawn per image; whether to jitter at all is
    drawn once per batch (`per='batch'`, as the reference's u ~ U(0, 1) > 1 - p) or per image."""
    if p <= 0 or strength <= 0:
        return x
    b = x.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, device=x.device, dtype=x.dtype, generator=generator)

    apply = _apply_draw(b, p, per, x.device, generator)
    s = strength
    y = adjust_brightness(x, u(max(0.0, 1 - s), 1 + s))
    y = adjust_contrast(y, u(max(0.0, 1 - s), 1 + s))
    y = adjust_saturation(y, u(max(0.0, 1 - s), 1 + s))
    y = adjust_hue(y, u(-min(s, 0.5), min(s, 0.5)))
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
                         generator=None, per: str = "batch") -> torch.Tensor:
    """Blur with probability p (drawn once per batch, as the reference, or per image: `per`),
    sigma ~ U[sigma_range] per image, kernel ~ kernel_ratio of each side."""
    if p <= 0:
        return x
    b, _, h, w = x.shape
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(b, device=x.device, generator=generator)
    apply = _apply_draw(b, p, per, x.device, generator)
    # reflect padding needs kernel // 2 < side
    kernel = (min(blur_kernel_size(h, kernel_ratio), 2 * h - 1), min(blur_kernel_size(w, kernel_ratio), 2 * w - 1))
    return torch.where(_per_image(apply), gaussian_blur(x, sigma, kernel), x)


# --------------------------------------------------------------------------- masking (MIC)
def block_mask(batch: int, height: int, width: int, block_size: int, ratio: float, device=None,
               generator=None) -> torch.Tensor:
    """(B, 1, H, W) float mask of 0/1 blocks, MIC's block mask generator: a grid of
    round(H / block_size) x round(W / block_size) cells (at least 1), each kept (1) when
    u ~ U(0, 1) > ratio, spread over the image as a nearest-neighbour resize (cells are
    block_size pixels when it divides the side, H / rows otherwise)."""
    rows, cols = max(1, round(height / block_size)), max(1, round(width / block_size))
    cells = torch.rand(batch, 1, rows, cols, device=device, generator=generator) > ratio
    # nearest resize: output pixel y reads cell floor(y * rows / H), in integers
    row_of = torch.arange(height, device=cells.device) * rows // height
    col_of = torch.arange(width, device=cells.device) * cols // width
    return cells[:, :, row_of][:, :, :, col_of].float()


def normalization_mean_rgb(kind: str) -> tuple[float, float, float]:
    """The RGB [0, 1] colour that a model's input normalisation maps to zero: masked pixels get it,
    as MIC multiplies the normalised image by the mask."""
    if kind == "advent_bgr":
        return tuple(v / 255.0 for v in reversed(ADVENT_BGR_MEAN))
    if kind == "imagenet_rgb":
        return tuple(IMAGENET_MEAN)
    raise ValueError(f"unknown normalization {kind!r}")


def mask_image(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) where mask (B, 1, H, W) is 1, the colour `fill` (3,) where it is 0."""
    return torch.where(mask.bool(), x, fill.to(x.dtype).view(1, -1, 1, 1))


__all__ = [
    "APPLY_PER", "present_classes", "choose_mix_classes", "class_mix_mask", "mix", "color_jitter",
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "rgb_to_hsv", "hsv_to_rgb",
    "blur_kernel_size", "gaussian_kernels", "gaussian_blur", "random_gaussian_blur",
    "block_mask", "normalization_mean_rgb", "mask_image",
]
