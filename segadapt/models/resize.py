"""Bilinear resizing as two matrix products.

Bilinear interpolation is separable: ``out = A_h @ x @ A_w.T`` with fixed (out, in)
weight matrices of two non-zeros per row. This equals
``F.interpolate(x, size, mode='bilinear', align_corners=...)`` (no antialias) to float
rounding, but on CPU its backward is a matrix product instead of a scatter
(``upsample_bilinear2d_backward``, about 4 ms for one 4x19x128x256 batch on 2 cores, the
largest single cost of the synthetic benchmark's loss), and its output is a contiguous NCHW
float32 tensor whatever the input's memory format, so the full-resolution losses after it
need no layout or dtype copies.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["interpolation_matrix", "resize_bilinear"]


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool) -> Tensor:
    """(n_out, n_in) float64 weights of 1-d linear interpolation, with PyTorch's source
    coordinates: ``dst * (in - 1) / (out - 1)`` (align_corners) or
    ``max((dst + 0.5) * in / out - 0.5, 0)`` (half-pixel centres)."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    dst = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(dst)
    else:
        src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp_(min=0)
    lo = src.floor().long().clamp_(max=n_in - 1)
    hi = (lo + 1).clamp_(max=n_in - 1)
    frac = src - lo
    rows = torch.arange(n_out)
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights.index_put_((rows, lo), 1 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights


@functools.lru_cache(maxsize=64)
def _matrices(in_hw: tuple, out_hw: tuple, align_corners: bool, device: torch.device):
    rows = interpolation_matrix(in_hw[0], out_hw[0], align_corners).float().to(device)
    cols_t = interpolation_matrix(in_hw[1], out_hw[1], align_corners).t().contiguous().float().to(device)
    return rows, cols_t


def resize_bilinear(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """(..., h, w) -> (..., H, W) float32, bilinear; the identity (cast to float32) at equal size."""
    out_hw = (int(size[0]), int(size[1]))
    x = x.float()
    in_hw = tuple(x.shape[-2:])
    if in_hw == out_hw:
        return x
    rows, cols_t = _matrices(in_hw, out_hw, bool(align_corners), x.device)
    # float32 under autocast too (bf16 weights would round 1/3-like fractions); the
    # narrow product first: (h, w) -> (h, W) -> (H, W)
    with torch.autocast(x.device.type, enabled=False):
        return torch.matmul(rows, torch.matmul(x, cols_t))
