"""Evaluation loop: predictions at label size -> one confusion matrix -> EvalResult.

Protocol (``specs/baselines.md``, Evaluation): the input image is already
resized by the loader (e.g. 1024x512); the prediction is upsampled
bilinearly to the label's original size (e.g. 2048x1024), argmaxed and
accumulated into a single confusion matrix over the whole split, summed over
distributed ranks, then turned into per-class IoU / mIoU.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from segadapt.engine.inference import predict
from segadapt.engine.metrics import (
    SYNTHIA13_IDS,
    SYNTHIA16_IDS,
    ConfusionMatrix,
    EvalResult,
    default_class_names,
)

__all__ = ["evaluate", "inference_options", "subsets_for"]


def inference_options(eval_cfg: Any) -> dict[str, Any]:
    """The test-time protocol of an ``EvalConfig`` (``cfg.eval``) as keyword arguments of
    :func:`segadapt.engine.inference.predict_logits` (the ``infer`` of :func:`evaluate`).
    ``align_corners: true`` reproduces ADVENT's evaluation, which upsamples the prediction
    with ``nn.Upsample(..., mode='bilinear', align_corners=True)``."""
    return {"mode": eval_cfg.mode, "crop": eval_cfg.crop, "stride": eval_cfg.stride,
            "scales": tuple(eval_cfg.scales), "flip": eval_cfg.flip,
            "align_corners": bool(getattr(eval_cfg, "align_corners", False))}


def subsets_for(source_kind: str | None) -> dict[str, list[int]]:
    """Extra class subsets to report for a source dataset.

    ``'synthia'`` (any spelling starting with it) -> ``{'mIoU16': [...], 'mIoU13': [...]}``;
    anything else -> ``{}``.
    """
    if source_kind and str(source_kind).strip().lower().startswith("synthia"):
        return {"mIoU16": list(SYNTHIA16_IDS), "mIoU13": list(SYNTHIA13_IDS)}
    return {}


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode inside; afterwards every submodule gets back its own previous flag
    (so e.g. BatchNorm layers kept in eval inside a training model stay so)."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    num_classes: int = 19,
    device: torch.device | str = "cpu",
    infer: Mapping[str, Any] | None = None,
    subsets: Mapping[str, Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    amp_dtype: torch.dtype | None = None,
    meta: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``loader`` and return an :class:`EvalResult`.

    ``loader`` yields dicts with ``image`` (B, 3, h, w) float RGB in [0, 1]
    (already at the evaluation input size) and ``label`` (B, H, W) int64 train
    ids at the label's original size (255 = ignore). ``infer`` holds keyword
    arguments for :func:`segadapt.engine.inference.predict_logits` (``mode``,
    ``crop``, ``stride``, ``scales``, ``flip``, ``align_corners``, ...; from a
    config: :func:`inference_options`). ``subsets`` maps names to
    class ids for extra mIoUs (see :func:`subsets_for`). ``max_batches`` stops
    early (debug runs). ``amp_dtype`` (e.g. ``torch.bfloat16``) enables
    autocast for the forward passes. ``meta`` is copied into the result, which
    also records the number of images evaluated and the inference options.
    """
    device = torch.device(device)
    names = list(class_names) if class_names is not None else default_class_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    infer = dict(infer or {})
    infer.setdefault("num_classes", num_classes)

    cm = ConfusionMatrix(num_classes, device)
    n_images = torch.zeros((), dtype=torch.int64, device=device)

    iterator: Iterable = loader
    bar = None
    if progress and _rank() == 0:
        from tqdm import tqdm

        total = None
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            pass
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        bar = tqdm(loader, total=total, desc="eval", dynamic_ncols=True, leave=False)
        iterator = bar

    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with _eval_mode(model), torch.no_grad():
            for i, batch in enumerate(iterator):
                if max_batches is not None and i >= max_batches:
                    break
                images = batch["image"].to(device, non_blocking=True)
                label = batch["label"].to(device, non_blocking=True)
                if images.dim() == 3:
                    images = images.unsqueeze(0)
                if label.dim() == 2:
                    label = label.unsqueeze(0)
                if label.shape[0] != images.shape[0]:
                    raise ValueError(
                        f"batch has {images.shape[0]} images but {label.shape[0]} labels"
                    )
                with autocast:
                    pred = predict(model, images, tuple(label.shape[-2:]), **infer)
                cm.update(pred, label)
                n_images += images.shape[0]
    finally:
        if bar is not None:
            bar.close()

    cm.all_reduce()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n_images, op=dist.ReduceOp.SUM)

    info: dict[str, Any] = dict(meta or {})
    info.setdefault("num_images", int(n_images.item()))
    info.setdefault("inference", {k: v for k, v in infer.items() if k != "num_classes"})
    return EvalResult.from_matrix(cm.matrix, class_names=names, subsets=subsets, meta=info)
