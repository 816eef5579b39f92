"""Image / label transforms (numpy + Pillow, run in DataLoader workers) and the
input normalisations (pure torch, run by the model on any device).

Sizes are always given as (W, H).  Random transforms take an explicit
``np.random.Generator``; nothing here touches a global random state.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from segadapt.data.labels import IGNORE_INDEX

ADVENT_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("advent", "imagenet")


def _wh(size: Sequence[int]) -> Tuple[int, int]:
    if size is None or len(size) != 2:
        raise ValueError(f"size must be (W, H), got {size!r}")
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return w, h


# --------------------------------------------------------------------------- geometry


INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize_image(image: np.ndarray, size: Sequence[int], interpolation: str = "bicubic") -> np.ndarray:
    """Resize of an (H, W, 3) uint8 image to ``size`` = (W, H), bicubic (default) or bilinear."""
    w, h = _wh(size)
    if image.shape[1] == w and image.shape[0] == h:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), INTERPOLATIONS[interpolation]))


def keep_ratio_size(image_wh: Sequence[int], scale: Sequence[int]) -> Tuple[int, int]:
    """mmcv's ``imrescale``: the image scaled by one factor so that its long side fits the
    scale's long side and its short side the short one; (W, H), rounded half up."""
    w, h = _wh(image_wh)
    sw, sh = _wh(scale)
    factor = min(max(sw, sh) / max(w, h), min(sw, sh) / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize_label(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map to ``size`` = (W, H).

    Output pixel (y, x) takes source pixel (floor((y + 0.5) * H_in / H_out), ...),
    i.e. the source pixel containing the output pixel's centre.  Any dtype.
    """
    w, h = _wh(size)
    h_in, w_in = label.shape[:2]
    if w_in == w and h_in == h:
        return label
    ys = np.minimum(((np.arange(h) + 0.5) * h_in / h).astype(np.int64), h_in - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * w_in / w).astype(np.int64), w_in - 1)
    return label[ys[:, None], xs[None, :]]


def pad_to(image: np.ndarray, label: Optional[np.ndarray], size: Sequence[int]):
    """Pad bottom/right to at least ``size`` = (W, H): image with 0, label with 255."""
    w, h = _wh(size)
    ih, iw = image.shape[:2]
    ph, pw = max(h - ih, 0), max(w - iw, 0)
    if ph == 0 and pw == 0:
        return image, label
    pad = ((0, ph), (0, pw)) + ((0, 0),) * (image.ndim - 2)
    image = np.pad(image, pad, mode="constant", constant_values=0)
    if label is not None:
        label = np.pad(label, ((0, ph), (0, pw)), mode="constant", constant_values=IGNORE_INDEX)
    return image, label


def random_crop(image: np.ndarray, label: Optional[np.ndarray], size: Sequence[int],
                rng: np.random.Generator):
    """Crop a random (W, H) window (padding first if the input is smaller).

    Always draws two integers (top, then left) from ``rng``.
    """
    w, h = _wh(size)
    if label is not None and label.shape[:2] != image.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} sizes differ")
    image, label = pad_to(image, label, (w, h))
    ih, iw = image.shape[:2]
    top = int(rng.integers(0, ih - h + 1))
    left = int(rng.integers(0, iw - w + 1))
    image = image[top:top + h, left:left + w]
    if label is not None:
        label = label[top:top + h, left:left + w]
    return image, label


def hflip(image: np.ndarray, label: Optional[np.ndarray] = None):
    image = image[:, ::-1]
    if label is not None:
        label = label[:, ::-1]
    return image, label


def random_hflip(image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator,
                 p: float = 0.5):
    """Flip horizontally with probability ``p`` (always draws one float from ``rng``)."""
    if rng.random() < p:
        return hflip(image, label)
    return image, label


# --------------------------------------------------------------------------- tensors


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> float32 tensor (3, H, W) in [0, 1]."""
    arr = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
    return torch.from_numpy(arr).to(torch.float32).div_(255.0)


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """(H, W) label map -> int64 tensor (H, W)."""
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


# --------------------------------------------------------------------------- normalisation


def _chan(values, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device).view(3, 1, 1)


def normalize_advent(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], (..., 3, H, W) -> BGR in [0, 255] minus the ADVENT/Caffe mean."""
    return torch.flip(x * 255.0, dims=(-3,)) - _chan(ADVENT_MEAN_BGR, x)


def denormalize_advent(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_advent` (BGR mean-subtracted -> RGB in [0, 1])."""
    return torch.flip(y + _chan(ADVENT_MEAN_BGR, y), dims=(-3,)) / 255.0


def normalize_imagenet(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], (..., 3, H, W) -> (x - mean) / std with the ImageNet statistics."""
    return (x - _chan(IMAGENET_MEAN, x)) / _chan(IMAGENET_STD, x)


def denormalize_imagenet(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_imagenet`."""
    return y * _chan(IMAGENET_STD, y) + _chan(IMAGENET_MEAN, y)


def normalize(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Dispatch on ``mode`` in ('advent', 'imagenet')."""
    if mode == "advent":
        return normalize_advent(x)
    if mode == "imagenet":
        return normalize_imagenet(x)
    raise ValueError(f"unknown normalisation {mode!r}; valid: {', '.join(NORMALIZATIONS)}")


def denormalize(y: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "advent":
        return denormalize_advent(y)
    if mode == "imagenet":
        return denormalize_imagenet(y)
    raise ValueError(f"unknown normalisation {mode!r}; valid: {', '.join(NORMALIZATIONS)}")
