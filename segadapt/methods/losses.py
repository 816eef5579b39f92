"""Losses and feature statistics shared by the UDA methods and their components.

Segmentation (every method):
    upsample(logits, size, align_corners)             bilinear to label size, float32
    cross_entropy(logits, labels, mean, align_corners) CE over labelled pixels or all pixels
    segmentation_loss(outputs, labels, aux_weight)    CE of the main (and aux) logits
    weighted_cross_entropy(logits, labels, weights)   pixel-weighted CE (pseudo-labels)

Entropy (MinEnt, AdvEnt):
    self_information(logits)   -p log p / log C per class          (B, C, H, W)
    entropy_map(logits)        -sum_c p_c log p_c / log C           (B, H, W), in [0, 1]
    entropy_loss(logits)       its mean over pixels                 scalar

Prototypes and contrast (CFContra; reusable by self-training methods):
    resize_labels(labels, size)                       nearest-neighbour label maps
    class_mean_sums(features, labels, num_classes)    per-image class means, summed over images
    centroids_from_sums(mean_sums, image_counts)      -> L2-normalised centroids, present mask
    class_centroids(features, labels, num_classes)    both steps at once
    nearest_prototype_labels(features, prototypes, margin)   pseudo-labels with an ambiguity margin
    info_nce(features, labels, prototypes, temperature)      pixel-to-prototype InfoNCE
    momentum_update_(bank, centroids, present, momentum)     in-place prototype EMA

Features are (B, D, ...) with the channel at dim 1 (a feature map (B, D, H, W)
or a list of pixels (N, D)); labels are the matching (B, ...) int maps with
255 = ignore. Everything is computed in float32 and without host syncs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.labels import IGNORE_INDEX
from ..models.resize import resize_bilinear


# --------------------------------------------------------------------------- segmentation
def upsample(logits: Tensor, size, align_corners: bool = True) -> Tensor:
    """Bilinear, in float32 (losses on full-resolution logits are float32 under AMP too);
    align_corners=True is the ADVENT/DeepLab convention for training losses, False the mmseg
    one (DACS/DAFormer/CONFETI). Equal to ``F.interpolate`` to float rounding, and on CPU
    much faster in backward (see `models.resize`)."""
    return resize_bilinear(logits, size, align_corners)


CE_MEANS = ("valid", "all")


def cross_entropy(logits: Tensor, labels: Tensor, mean: str = "valid", align_corners: bool = True) -> Tensor:
    """CE of logits upsampled to label size. `mean='valid'`: over labelled pixels (ADVENT);
    `'all'`: over all pixels, ignored ones counting zero (mmseg 0.x, DACS/DAFormer)."""
    logits = upsample(logits, labels.shape[-2:], align_corners).float()
    if mean == "valid":
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    if mean == "all":
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").mean()
    raise ValueError(f"cross-entropy mean must be one of {CE_MEANS}, got {mean!r}")


def crop_box(x: Tensor, box) -> Tensor:
    """The (y1, y2, x1, x2) crop of the last two dimensions."""
    y1, y2, x1, x2 = box
    return x[..., y1:y2, x1:x2]


def _multi_resolution(outputs: dict, loss_fn, labels: Tensor, weights: Optional[Tensor], scale: float,
                      main_key: str) -> dict:
    """HRDA's losses (`models/hrda.py` outputs): the fused logits against the whole label times
    1 - detail weight - context weight, the detail crop's against the label's crop (and pixel
    weights') times the detail weight, the context's against the whole label times its weight."""
    w_detail, w_context = outputs["detail_weight"], outputs.get("context_weight", 0.0)
    box = outputs["detail_box"]
    losses = {main_key: scale * (1.0 - w_detail - w_context) * loss_fn(outputs["main"], labels, weights)}
    if w_detail > 0:
        cropped = None if weights is None else crop_box(weights, box)
        losses[main_key.replace("_main", "") + "_detail"] = \
            scale * w_detail * loss_fn(outputs["detail"], crop_box(labels, box), cropped)
    if w_context > 0:
        losses[main_key.replace("_main", "") + "_context"] = scale * w_context * loss_fn(outputs["context"], labels,
                                                                                         weights)
    return losses


def segmentation_loss(outputs: dict, labels: Tensor, aux_weight: float, prefix: str = "loss_seg",
                      mean: str = "valid", align_corners: bool = True) -> dict:
    """Cross-entropy on the main (and aux) logits upsampled to label size (see `cross_entropy`);
    HRDA outputs also on the detail crop (`_multi_resolution`)."""
    if "detail" in outputs:
        return _multi_resolution(outputs, lambda x, y, _: cross_entropy(x, y, mean, align_corners), labels, None,
                                 1.0, f"{prefix}_main")
    losses = {f"{prefix}_main": cross_entropy(outputs["main"], labels, mean, align_corners)}
    if "aux" in outputs and aux_weight > 0:
        losses[f"{prefix}_aux"] = aux_weight * cross_entropy(outputs["aux"], labels, mean, align_corners)
    return losses


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor, align_corners: bool = False) -> Tensor:
    """Mean over all pixels of weight * CE (ignored pixels contribute 0), DACS/DAFormer's normalisation;
    logits upsampled as mmseg's decode head does (align_corners=False)."""
    ce = F.cross_entropy(upsample(logits, labels.shape[-2:], align_corners).float(), labels,
                         ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weights).mean()


def pseudo_label_losses(outputs: dict, labels: Tensor, weights: Tensor, aux_weight: float, main_key: str,
                        aux_key: str, scale: float = 1.0, align_corners: bool = False) -> dict:
    """`scale` x the pixel-weighted CE of the main output (and aux_weight x it of the aux one);
    HRDA outputs also on the detail crop (`_multi_resolution`)."""
    if "detail" in outputs:
        return _multi_resolution(outputs, lambda x, y, w: weighted_cross_entropy(x, y, w, align_corners), labels,
                                 weights, scale, main_key)
    losses = {main_key: scale * weighted_cross_entropy(outputs["main"], labels, weights, align_corners)}
    if "aux" in outputs and aux_weight > 0:
        losses[aux_key] = scale * aux_weight * weighted_cross_entropy(outputs["aux"], labels, weights,
                                                                      align_corners)
    return losses


# --------------------------------------------------------------------------- entropy
def self_information(logits: Tensor) -> Tensor:
    """-p log p / log C per class of softmax(logits) over dim 1 (ADVENT's discriminator input)."""
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"entropy needs at least 2 classes, got {num_classes}")
    log_p = F.log_softmax(logits.float(), dim=1)  # stable: no log(0)
    return -(log_p.exp() * log_p) / math.log(num_classes)


def entropy_map(logits: Tensor) -> Tensor:
    """Normalised Shannon entropy per pixel, in [0, 1]: 1 = uniform, 0 = one-hot."""
    return self_information(logits).sum(1)


def entropy_loss(logits: Tensor) -> Tensor:
    """MinEnt's loss: the normalised entropy averaged over all pixels of the batch."""
    return entropy_map(logits).mean()


# --------------------------------------------------------------------------- labels at feature resolution
def resize_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """(B, H, W) int labels -> (B, h, w), nearest neighbour (ignore stays 255)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].long()


def _class_view(mask: Tensor, ndim: int) -> Tensor:
    """A (K,) tensor shaped to broadcast against (B, K, ...) with `ndim` dims."""
    return mask.view((1, -1) + (1,) * (ndim - 2))


# --------------------------------------------------------------------------- class centroids
def class_mean_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-image class means of the features, summed over the images that contain the class.

    Returns ``(mean_sums (K, D), image_counts (K,))``. Sums (not means) so that
    they accumulate over batches, and over DDP ranks with one all-reduce;
    :func:`centroids_from_sums` turns them into centroids. Labels outside
    ``[0, K)`` (255 = ignore) count for no class.
    """
    b, d = features.shape[:2]
    feats = features.float().reshape(b, d, -1)  # (B, D, N)
    y = labels.reshape(b, -1).long()
    y = torch.where((y >= 0) & (y < num_classes), y, num_classes)  # ignored pixels -> extra bin
    onehot = feats.new_zeros(b, num_classes + 1, y.shape[1]).scatter_(1, y[:, None], 1.0)
    sums = torch.bmm(onehot, feats.transpose(1, 2))[:, :num_classes]  # (B, K, D)
    counts = onehot.sum(2)[:, :num_classes]  # (B, K)
    means = sums / counts.clamp(min=1.0)[..., None]  # absent classes: 0
    return means.sum(0), (counts > 0).sum(0).float()


def centroids_from_sums(mean_sums: Tensor, image_counts: Tensor) -> tuple[Tensor, Tensor]:
    """Average over images, L2-normalise. Returns ``(centroids (K, D), present (K,) bool)``;
    the row of an absent class is zero."""
    present = image_counts > 0
    mean = mean_sums / image_counts.clamp(min=1.0)[:, None]
    return F.normalize(mean, dim=1), present


def class_centroids(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Batch class centroids: for each class the masked mean of the (unnormalised)
    features over its pixels per image, averaged over the images containing it,
    then L2-normalised. Returns ``(centroids (K, D), present (K,) bool)``."""
    return centroids_from_sums(*class_mean_sums(features, labels, num_classes))


def momentum_update_(bank: Tensor, centroids: Tensor, present: Tensor, momentum: float) -> Tensor:
    """In place: ``m_k <- normalize(mu * m_k + (1 - mu) * c_k)`` for the present classes;
    absent classes keep their row. A zero row (class not seen yet) becomes ``c_k``."""
    with torch.no_grad():
        updated = F.normalize(momentum * bank + (1.0 - momentum) * centroids.to(bank.dtype), dim=1)
        bank.copy_(torch.where(present[:, None], updated, bank))
    return bank


def valid_prototypes(bank: Tensor) -> Tensor:
    """(K,) bool: rows that hold a prototype (a class never seen keeps a zero row)."""
    return bank.abs().sum(1) > 0


# --------------------------------------------------------------------------- pseudo-labels
def nearest_prototype_labels(features: Tensor, prototypes: Tensor, margin: float,
                             valid: Optional[Tensor] = None, scale_channels: bool = False,
                             ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Label each pixel with its nearest prototype in Euclidean distance
    ``d_k = ||f - m_k||_2``; a pixel whose two smallest distances differ by less
    than ``margin`` is ambiguous and gets ``ignore_index`` (so do exact ties).

    ``valid`` (K,) bool excludes prototypes that are not there yet; with none
    valid every pixel is ignored. ``scale_channels`` divides each feature
    channel by its largest absolute value over the batch first (an option of
    the reference code; off by default).
    """
    f = features.detach().float()
    if scale_channels:
        dims = [0] + list(range(2, f.ndim))
        f = f / f.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12)
    m = prototypes.float()
    num_classes = m.shape[0]
    # ||f - m||^2 = ||f||^2 - 2 f.m + ||m||^2, without a (B, K, D, ...) difference tensor
    sq = (f * f).sum(1, keepdim=True) - 2.0 * torch.einsum("bd...,kd->bk...", f, m) \
        + _class_view((m * m).sum(1), f.ndim)
    dist = sq.clamp_min(0.0).sqrt()
    if valid is not None:
        dist = dist.masked_fill(~_class_view(valid, f.ndim), float("inf"))
    if num_classes == 1:
        labels = torch.zeros_like(dist[:, 0], dtype=torch.long)
        return torch.where(torch.isfinite(dist[:, 0]), labels, ignore_index)
    nearest = dist.topk(2, dim=1, largest=False)  # ascending
    best, second = nearest.values[:, 0], nearest.values[:, 1]
    # inf - inf is nan, and nan < margin is False: a single valid prototype labels everything
    ambiguous = (second - best < margin) | ~torch.isfinite(best)
    return torch.where(ambiguous, ignore_index, nearest.indices[:, 0])


# --------------------------------------------------------------------------- contrast
def info_nce(features: Tensor, labels: Tensor, prototypes: Tensor, temperature: float = 0.07,
             valid: Optional[Tensor] = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel-to-prototype InfoNCE: ``z = normalize(f)``, logits ``s_k = z . m_k / tau``
    over the K prototypes (expected L2-normalised), cross-entropy against the
    pixel's label, averaged over labelled pixels (0 when there are none).

    ``valid`` (K,) bool drops prototypes that are not there yet: they are
    neither negatives nor positives (pixels of such a class are ignored).
    """
    z = F.normalize(features.float(), dim=1)
    logits = torch.einsum("bd...,kd->bk...", z, prototypes.float()) / temperature
    labels = labels.long()
    if valid is not None:
        num_classes = prototypes.shape[0]
        logits = logits.masked_fill(~_class_view(valid, logits.ndim), -1e4)  # finite: no nan if all invalid
        has_proto = valid[labels.clamp(0, num_classes - 1)] & (labels >= 0) & (labels < num_classes)
        labels = torch.where(has_proto, labels, ignore_index)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()
    return total / count.clamp(min=1)


__all__ = [
    "IGNORE_INDEX", "self_information", "entropy_map", "entropy_loss", "resize_labels", "class_mean_sums",
    "centroids_from_sums", "class_centroids", "momentum_update_", "valid_prototypes",
    "nearest_prototype_labels", "info_nce",
]
