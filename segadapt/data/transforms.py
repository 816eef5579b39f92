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


# bicubic: Pillow's (ADVENT's resize); bilinear: mmcv's imresize, i.e. OpenCV's INTER_LINEAR
# (no antialiasing; labels INTER_NEAREST); pil_bilinear: Pillow's antialiased bilinear
INTERPOLATIONS = ("bicubic", "bilinear", "pil_bilinear")
_PIL_FILTERS = {"bicubic": Image.BICUBIC, "pil_bilinear": Image.BILINEAR}
_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: fixed-point weights scaled by 2048


def _cv2_linear_taps(src: int, dst: int, columns: bool) -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR source indices and fixed-point weight pair per output pixel along one
    axis: half-pixel centres, weights rounded to 1/2048. Beyond the border, columns take the edge
    pixel's weight whole; rows keep their weights on the edge row twice (OpenCV does both)."""
    f = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    f = f - i.astype(np.float32)
    if columns:
        f[(i < 0) | (i >= src - 1)] = 0.0
        i = np.clip(i, 0, src - 1)
    w1 = np.rint(f * (1 << _COEF_BITS)).astype(np.int64)
    w0 = np.rint((np.float32(1.0) - f) * (1 << _COEF_BITS)).astype(np.int64)
    return np.stack([np.clip(i, 0, src - 1), np.clip(i + 1, 0, src - 1)]), np.stack([w0, w1])


def resize_cv2_linear(image: np.ndarray, w: int, h: int) -> np.ndarray:
    """cv2.resize(image, (w, h), interpolation=INTER_LINEAR) for uint8 images, in its integer
    arithmetic: rows then columns in fixed point, and the vectorised rounding
    ((a >> 4) * b >> 16, summed, + 2 >> 2). An exact halving in both sides is INTER_AREA's 2 x 2
    mean, as OpenCV switches to it."""
    h_in, w_in = image.shape[:2]
    img = image.astype(np.int64)
    if w_in == 2 * w and h_in == 2 * h:
        s = img[0::2, 0::2] + img[0::2, 1::2] + img[1::2, 0::2] + img[1::2, 1::2]
        return ((s + 2) >> 2).astype(np.uint8)
    (x0, x1), (a0, a1) = _cv2_linear_taps(w_in, w, columns=True)
    (y0, y1), (b0, b1) = _cv2_linear_taps(h_in, h, columns=False)
    shape = (1, -1) + (1,) * (img.ndim - 2)
    horizontal = img[:, x0] * a0.reshape(shape) + img[:, x1] * a1.reshape(shape)  # values * 2048
    top, bottom = horizontal[y0] >> 4, horizontal[y1] >> 4
    col = (-1,) + (1,) * (img.ndim - 1)
    out = ((top * b0.reshape(col)) >> 16) + ((bottom * b1.reshape(col)) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, size: Sequence[int], interpolation: str = "bicubic") -> np.ndarray:
    """Resize of an (H, W, 3) uint8 image to ``size`` = (W, H): Pillow's bicubic (default, ADVENT),
    OpenCV's bilinear as mmcv runs it (``bilinear``), or Pillow's antialiased bilinear."""
    w, h = _wh(size)
    if image.shape[1] == w and image.shape[0] == h:
        return image
    if interpolation == "bilinear":
        return resize_cv2_linear(image, w, h)
    return np.asarray(Image.fromarray(image).resize((w, h), _PIL_FILTERS[interpolation]))


def resize_label_cv2_nearest(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """cv2.resize(label, size, interpolation=INTER_NEAREST), as mmcv resizes label maps: output
    pixel x takes source pixel floor(x * W_in / W_out) (no half-pixel centre)."""
    w, h = _wh(size)
    h_in, w_in = label.shape[:2]
    if w_in == w and h_in == h:
        return label
    ys = np.minimum(np.floor(np.arange(h) * (h_in / h)).astype(np.int64), h_in - 1)
    xs = np.minimum(np.floor(np.arange(w) * (w_in / w)).astype(np.int64), w_in - 1)
    return label[ys[:, None], xs[None, :]]


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
