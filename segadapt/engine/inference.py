"""Method-agnostic test-time inference: whole image, sliding window, multi-scale, flip.

The model is any segmenter called as ``model(x)`` with ``x`` an RGB float
batch in ``[0, 1]`` of shape (B, 3, H, W) (the model normalises itself); it
returns a dict whose ``'main'`` entry holds logits at (possibly) reduced
resolution. A bare tensor is accepted too.

Size conventions: ``out_size`` is ``(H, W)`` like torch; ``crop`` and
``stride`` are ``(W, H)`` like the configs ("1024x512" = width x height); an
int means a square.

All resizing (input rescaling, window logits, upsampling to the label size)
is bilinear. Default ``align_corners=False`` (PyTorch's default, the
mmseg/DAFormer-family choice: pixel centres aligned). Note that ADVENT's
released evaluation upsamples with ``nn.Upsample(..., mode='bilinear',
align_corners=True)``; pass ``align_corners=True`` to match it exactly (the
difference is a sub-pixel shift of the upsampled scores: small, not zero).

The functions do not change the model's train/eval mode; the caller
(``segadapt.engine.evaluator.evaluate``) puts it in eval mode.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["predict_logits", "predict", "view_logits", "upsample_rows", "strip_scores"]


def _pair(v: int | Sequence[int] | None, what: str) -> tuple[int, int] | None:
    """Return (W, H) from an int or a (W, H) pair."""
    if v is None:
        return None
    if isinstance(v, int):
        w = h = v
    else:
        w, h = (int(a) for a in v)
    if w <= 0 or h <= 0:
        raise ValueError(f"{what} must be positive, got {v}")
    return w, h


def _main_logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, dict):
        if "main" not in out:
            raise KeyError(f"model output has no 'main' entry (keys: {sorted(out)})")
        out = out["main"]
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise TypeError("model must return a (B, C, h, w) tensor or a dict with one under 'main'")
    # AMP may return half precision: average and upsample in float32.
    return out.float()


def _resize(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _starts(length: int, win: int, step: int) -> list[int]:
    """Window starts covering [0, length); the last window is flush with the end."""
    if length <= win:
        return [0]
    n = math.ceil((length - win) / step) + 1
    return [min(i * step, length - win) for i in range(n)]


def _slide_logits(
    model,
    x: torch.Tensor,
    crop: tuple[int, int],
    stride: tuple[int, int],
    window_batch: int,
    align_corners: bool,
) -> torch.Tensor:
    """Logits at the resolution of ``x``, averaged over overlapping windows."""
    cw, ch = crop
    sw, sh = stride
    b, _, h, w = x.shape
    # Pad (zeros, right/bottom) when the image is smaller than the crop.
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    hp, wp = x.shape[-2:]
    wins = [(y, xx) for y in _starts(hp, ch, sh) for xx in _starts(wp, cw, sw)]
    # All windows of all images, processed in chunks of `window_batch`.
    crops = torch.cat([x[:, :, y:y + ch, xx:xx + cw] for y, xx in wins], dim=0)
    outs = []
    for i in range(0, crops.shape[0], window_batch):
        win_logits = _main_logits(model, crops[i:i + window_batch])
        outs.append(_resize(win_logits, (ch, cw), align_corners))
    logits = torch.cat(outs, dim=0)
    c = logits.shape[1]
    acc = x.new_zeros((b, c, hp, wp), dtype=torch.float32)
    count = x.new_zeros((1, 1, hp, wp), dtype=torch.float32)
    for k, (y, xx) in enumerate(wins):
        acc[:, :, y:y + ch, xx:xx + cw] += logits[k * b:(k + 1) * b]
        count[:, :, y:y + ch, xx:xx + cw] += 1
    return (acc / count)[:, :, :h, :w]


@torch.no_grad()
def predict_logits(
    model,
    images: torch.Tensor,
    out_size: Sequence[int],
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    num_classes: int | None = None,
    probs: bool = False,
    window_batch: int = 8,
    align_corners: bool = False,
) -> torch.Tensor:
    """Class scores (B, C, H_out, W_out) for ``images`` (B, 3, H, W), RGB in [0, 1].

    * ``mode='whole'``: one forward pass per view on the full (rescaled) image.
    * ``mode='slide'``: windows of ``crop`` (W, H) every ``stride`` (W, H;
      default half the crop) over the rescaled image, zero-padded when smaller
      than the crop; each window's logits are upsampled to the window size and
      overlapping windows are averaged. Windows are run ``window_batch`` at a time.
    * ``scales``: the input is resized by each factor; ``flip``: the horizontally
      flipped input is added as a view, its prediction flipped back.

    With a single view (one scale, no flip) the result is the logits upsampled
    to ``out_size``; with several views it is the mean of the views' softmax
    probabilities (each upsampled to ``out_size`` first). ``probs=True`` always
    returns probabilities. ``num_classes``, when given, is checked against the
    model output. ``align_corners`` applies to every bilinear resize (see the
    module docstring for why the default is False).
    """
    views = view_logits(model, images, mode=mode, crop=crop, stride=stride, scales=scales, flip=flip,
                        num_classes=num_classes, window_batch=window_batch, align_corners=align_corners)
    out_size = (int(out_size[0]), int(out_size[1]))
    return _merge_views(views, lambda logits: _resize(logits, out_size, align_corners), probs)


def _merge_views(views: list[tuple[torch.Tensor, bool]], resize, probs: bool) -> torch.Tensor:
    """Each view's logits through `resize` (and un-flipped): the logits of a single view
    (``probs=False``), else the mean of the views' softmax."""
    total = None
    for logits, flipped in views:
        logits = resize(logits)
        if flipped:
            logits = logits.flip(-1)
        if len(views) == 1 and not probs:
            return logits
        p = logits.softmax(dim=1)
        total = p if total is None else total + p
    return total / len(views)


@torch.no_grad()
def view_logits(
    model,
    images: torch.Tensor,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    num_classes: int | None = None,
    window_batch: int = 8,
    align_corners: bool = False,
) -> list[tuple[torch.Tensor, bool]]:
    """Each test-time view's logits at the resolution the model (or the window
    average) gives them, before any upsampling, with whether the view is flipped
    (its logits are still mirrored). Options as in ``predict_logits``; these low-resolution
    maps are all :func:`strip_scores` needs to produce full-size scores a band of rows at a time.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {scales}")
    crop_wh = _pair(crop, "crop")
    if mode == "slide":
        if crop_wh is None:
            raise ValueError("mode='slide' needs crop=(W, H)")
        stride_wh = _pair(stride, "stride") or (max(crop_wh[0] // 2, 1), max(crop_wh[1] // 2, 1))
    if window_batch <= 0:
        raise ValueError("window_batch must be positive")

    images = images.float()
    _, _, h, w = images.shape
    views = []
    for s in scales:
        size = (max(int(round(h * s)), 1), max(int(round(w * s)), 1))
        x_s = _resize(images, size, align_corners)
        for fl in ((False, True) if flip else (False,)):
            x = x_s.flip(-1) if fl else x_s
            if mode == "whole":
                logits = _main_logits(model, x)
            else:
                logits = _slide_logits(model, x, crop_wh, stride_wh, window_batch, align_corners)
            if num_classes is not None and logits.shape[1] != num_classes:
                raise ValueError(
                    f"model returned {logits.shape[1]} classes, expected {num_classes}"
                )
            views.append((logits, fl))
    return views


def upsample_rows(x: torch.Tensor, out_size: Sequence[int], y0: int, y1: int,
                  align_corners: bool = False) -> torch.Tensor:
    """Rows ``y0:y1`` of the bilinear resize of ``x`` (B, C, h, w) to ``out_size`` (H, W),
    computed from the two source rows each output row needs (equal to
    ``F.interpolate(x, out_size, mode='bilinear')[:, :, y0:y1]`` up to float rounding)."""
    out_h, out_w = int(out_size[0]), int(out_size[1])
    in_h = x.shape[-2]
    if in_h == out_h:
        band = x[:, :, y0:y1]
    else:
        dst = torch.arange(y0, y1, dtype=torch.float64)
        if align_corners:
            src = dst * ((in_h - 1) / (out_h - 1) if out_h > 1 else 0.0)
        else:
            src = ((dst + 0.5) * (in_h / out_h) - 0.5).clamp_min(0.0)
        i0 = src.floor().long().clamp_max(in_h - 1)
        i1 = (i0 + 1).clamp_max(in_h - 1)
        w1 = (src - i0).to(x.dtype).to(x.device)[:, None]
        i0, i1 = i0.to(x.device), i1.to(x.device)
        band = x[:, :, i0] * (1 - w1) + x[:, :, i1] * w1
    # rows are already at the output height: this resizes the width only
    return _resize(band, (y1 - y0, out_w), align_corners)


def strip_scores(views: list[tuple[torch.Tensor, bool]], out_size: Sequence[int], y0: int, y1: int,
                 probs: bool = False, align_corners: bool = False) -> torch.Tensor:
    """Rows ``y0:y1`` of what ``predict_logits`` returns, from ``view_logits``' output:
    logits for a single view (``probs=False``), else the mean of the views' softmax."""
    return _merge_views(views, lambda logits: upsample_rows(logits, out_size, y0, y1, align_corners), probs)


@torch.no_grad()
def predict(model, images: torch.Tensor, out_size: Sequence[int], **kwargs) -> torch.Tensor:
    """Predicted train ids (B, H_out, W_out), int64; same options as ``predict_logits``."""
    return predict_logits(model, images, out_size, **kwargs).argmax(dim=1)
