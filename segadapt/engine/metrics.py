"""Segmentation metrics: confusion matrix, per-class IoU, mIoU and result reports.

Conventions (see ``specs/baselines.md``, section Evaluation):

* labels are Cityscapes *train ids* ``0..C-1``; ``255`` (and any other value
  outside ``[0, C)``) in the ground truth is ignored;
* one confusion matrix is accumulated over the whole evaluation set (rows =
  ground truth, columns = prediction), never averaged per image;
* ``IoU_c = TP / (TP + FP + FN)``; a class with neither ground truth nor
  prediction has IoU NaN and is left out of every mean (NaN-aware mean).

Scores are stored as fractions in ``[0, 1]``; the human-readable reports
(terminal table, Markdown, CSV) show percentages with two decimals.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..utils.files import write_texts_atomic

IGNORE_INDEX = 255

# The single place where default class names live (Cityscapes train-id order).
CITYSCAPES_CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

# SYNTHIA has no terrain (9), truck (14) or train (16); the 13-class protocol
# further drops wall (3), fence (4) and pole (5).
SYNTHIA16_IDS: tuple[int, ...] = tuple(i for i in range(19) if i not in (9, 14, 16))
SYNTHIA13_IDS: tuple[int, ...] = tuple(i for i in SYNTHIA16_IDS if i not in (3, 4, 5))


def default_class_names(num_classes: int) -> list[str]:
    """Cityscapes names for 19 classes, ``class_<i>`` otherwise."""
    if num_classes == len(CITYSCAPES_CLASS_NAMES):
        return list(CITYSCAPES_CLASS_NAMES)
    return [f"class_{i}" for i in range(num_classes)]


# --------------------------------------------------------------------------- #
# Confusion matrix
# --------------------------------------------------------------------------- #
class ConfusionMatrix:
    """A ``num_classes x num_classes`` int64 confusion matrix kept on ``device``.

    ``update`` never copies to the host: pixels are encoded as
    ``target * C + pred`` and counted with ``torch.bincount`` on the device.
    Ground-truth values outside ``[0, C)`` (the ignore index 255 included) are
    skipped. Predictions must lie in ``[0, C)``; a prediction outside that
    range on a counted pixel is a caller bug, tallied on the device and
    reported as a ``ValueError`` when ``matrix`` is read (so ``update`` stays
    free of host synchronisation for this check).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self._mat = torch.zeros(
            (self.num_classes, self.num_classes), dtype=torch.int64, device=self.device
        )
        self._bad_pred = torch.zeros((), dtype=torch.int64, device=self.device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer tensors (class ids)")
        n = self.num_classes
        pred = pred.reshape(-1).to(device=self.device, dtype=torch.int64)
        target = target.reshape(-1).to(device=self.device, dtype=torch.int64)
        valid = (target >= 0) & (target < n)
        pred_ok = (pred >= 0) & (pred < n)
        self._bad_pred += (valid & ~pred_ok).sum()
        keep = valid & pred_ok
        # Skipped pixels go to an extra bin (n*n) instead of being removed by
        # boolean indexing, which would force a device->host sync.
        idx = torch.where(keep, target * n + pred, torch.full_like(target, n * n))
        counts = torch.bincount(idx, minlength=n * n + 1)
        self._mat += counts[: n * n].reshape(n, n)

    def all_reduce(self) -> None:
        """Sum the matrix over all ``torch.distributed`` ranks (no-op if not initialised)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._mat, op=dist.ReduceOp.SUM)
            dist.all_reduce(self._bad_pred, op=dist.ReduceOp.SUM)

    def reset(self) -> None:
        self._mat.zero_()
        self._bad_pred.zero_()

    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated matrix (int64, rows = ground truth, columns = prediction)."""
        bad = int(self._bad_pred.item())
        if bad:
            raise ValueError(
                f"{bad} predicted pixels had a class id outside [0, {self.num_classes}) "
                "on non-ignored ground truth"
            )
        return self._mat

    def compute_iou(self) -> np.ndarray:
        return compute_iou(self.matrix)


# --------------------------------------------------------------------------- #
# Scores from a matrix
# --------------------------------------------------------------------------- #
def _as_numpy_matrix(matrix: Any) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    return m


def compute_iou(matrix: Any) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN where the denominator is 0."""
    m = _as_numpy_matrix(matrix)
    tp = np.diag(m)
    fp = m.sum(axis=0) - tp
    fn = m.sum(axis=1) - tp
    denom = tp + fp + fn
    iou = np.full(tp.shape, np.nan, dtype=np.float64)
    np.divide(tp, denom, out=iou, where=denom > 0)
    return iou


def nanmean(values: Any) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def mean_iou(iou: Any, class_ids: Sequence[int] | None = None) -> float:
    """NaN-aware mean of ``iou`` (optionally over ``class_ids`` only)."""
    iou = np.asarray(iou, dtype=np.float64)
    if class_ids is not None:
        ids = list(class_ids)
        if any(i < 0 or i >= iou.size for i in ids):
            raise ValueError(f"class ids {ids} out of range for {iou.size} classes")
        iou = iou[ids]
    return nanmean(iou)


def pixel_accuracy(matrix: Any) -> float:
    m = _as_numpy_matrix(matrix)
    total = m.sum()
    return float(np.trace(m) / total) if total > 0 else float("nan")


# --------------------------------------------------------------------------- #
# Result object and reports
# --------------------------------------------------------------------------- #
def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100.0 * x:.2f}"


def nonfinite_to_none(x: Any) -> Any:
    """NaN and infinities (undefined values) as None, tuples as lists: JSON-safe numbers."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: nonfinite_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nonfinite_to_none(v) for v in x]
    return x


def _none_to_nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _jsonable(x: Any) -> Any:
    """Best-effort conversion of metadata values to JSON types."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


@dataclass
class EvalResult:
    """Outcome of one evaluation; scores are fractions in [0, 1] (NaN = undefined).

    ``subset_mious`` holds named subset means (``{'mIoU16': .., 'mIoU13': ..}``)
    computed over ``subsets`` (name -> class ids). ``meta`` carries free-form
    metadata (checkpoint, dataset, notes such as "val split restyled").
    ``confusion`` optionally keeps the raw matrix (saved in the JSON only).
    """

    per_class_iou: list[float]
    class_names: list[str]
    pixel_accuracy: float
    miou: float
    subset_mious: dict[str, float] = field(default_factory=dict)
    subsets: dict[str, list[int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    confusion: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self.per_class_iou = [float(v) for v in self.per_class_iou]
        self.class_names = [str(n) for n in self.class_names]
        if len(self.per_class_iou) != len(self.class_names):
            raise ValueError(
                f"{len(self.per_class_iou)} IoU values but {len(self.class_names)} class names"
            )

    # -- construction ------------------------------------------------------ #
    @classmethod
    def from_matrix(
        cls,
        matrix: Any,
        class_names: Sequence[str] | None = None,
        subsets: Mapping[str, Sequence[int]] | None = None,
        meta: Mapping[str, Any] | None = None,
        keep_matrix: bool = True,
    ) -> "EvalResult":
        m = _as_numpy_matrix(matrix)
        n = m.shape[0]
        names = list(class_names) if class_names is not None else default_class_names(n)
        if len(names) != n:
            raise ValueError(f"{len(names)} class names for a {n}-class matrix")
        iou = compute_iou(m)
        subsets = {str(k): [int(i) for i in v] for k, v in (subsets or {}).items()}
        subset_mious = {k: mean_iou(iou, ids) for k, ids in subsets.items()}
        return cls(
            per_class_iou=iou.tolist(),
            class_names=names,
            pixel_accuracy=pixel_accuracy(m),
            miou=nanmean(iou),
            subset_mious=subset_mious,
            subsets=subsets,
            meta=dict(meta or {}),
            confusion=m.astype(np.int64).tolist() if keep_matrix else None,
        )

    @property
    def num_classes(self) -> int:
        return len(self.per_class_iou)

    def summary(self) -> dict[str, float]:
        """Headline numbers: ``mIoU`` (all classes), subset mIoUs, ``pixel_acc``."""
        out = {"mIoU": self.miou}
        out.update(self.subset_mious)
        out["pixel_acc"] = self.pixel_accuracy
        return out

    # -- text reports ------------------------------------------------------ #
    def _summary_rows(self) -> list[tuple[str, str]]:
        rows = [(f"mIoU ({self.num_classes} classes)", _pct(self.miou))]
        for name, value in self.subset_mious.items():
            k = len(self.subsets.get(name, []))
            label = f"{name} ({k} classes)" if k else name
            rows.append((label, _pct(value)))
        rows.append(("pixel accuracy", _pct(self.pixel_accuracy)))
        return rows

    def table(self) -> str:
        """Plain-text table for the terminal (percent, 2 decimals, n/a = undefined)."""
        rows = [(n, _pct(v)) for n, v in zip(self.class_names, self.per_class_iou)]
        summary = self._summary_rows()
        w0 = max(len("class"), *(len(r[0]) for r in rows + summary))
        w1 = max(len("IoU (%)"), *(len(r[1]) for r in rows + summary))
        line = "-" * (w0 + w1 + 3)
        out = []
        for k, v in self.meta.items():
            out.append(f"{k}: {v}")
        out += [f"{'class':<{w0}}   {'IoU (%)':>{w1}}", line]
        out += [f"{a:<{w0}}   {b:>{w1}}" for a, b in rows]
        out.append(line)
        out += [f"{a:<{w0}}   {b:>{w1}}" for a, b in summary]
        return "\n".join(out)

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.table()

    def to_markdown(self) -> str:
        out = ["# Evaluation results", ""]
        if self.meta:
            out += [f"- **{k}**: {v}" for k, v in self.meta.items()]
            out.append("")
        out += ["| metric | value (%) |", "|---|---:|"]
        out += [f"| {a} | {b} |" for a, b in self._summary_rows()]
        out += ["", "| class | IoU (%) |", "|---|---:|"]
        out += [f"| {n} | {_pct(v)} |" for n, v in zip(self.class_names, self.per_class_iou)]
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        """One header row and one data row (percent, 2 decimals; empty = undefined).

        Columns: every class, then ``mIoU``, the subset mIoUs and ``pixel_acc``,
        so CSVs of several runs (seeds) can be concatenated row-wise.
        """
        summary = self.summary()
        header = list(self.class_names) + list(summary)
        values = list(self.per_class_iou) + list(summary.values())
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerow(["" if math.isnan(v) else f"{100.0 * v:.2f}" for v in values])
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        d = {
            "units": "fraction",
            "class_names": list(self.class_names),
            "per_class_iou": list(self.per_class_iou),
            "miou": self.miou,
            "subset_mious": dict(self.subset_mious),
            "subsets": {k: list(v) for k, v in self.subsets.items()},
            "pixel_accuracy": self.pixel_accuracy,
            "meta": _jsonable(self.meta),
        }
        if self.confusion is not None:
            d["confusion"] = [list(map(int, r)) for r in self.confusion]
        return nonfinite_to_none(d)

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text; NaN is written as ``null``."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvalResult":
        return cls(
            per_class_iou=[_none_to_nan(v) for v in d["per_class_iou"]],
            class_names=list(d["class_names"]),
            pixel_accuracy=_none_to_nan(d.get("pixel_accuracy")),
            miou=_none_to_nan(d.get("miou")),
            subset_mious={k: _none_to_nan(v) for k, v in (d.get("subset_mious") or {}).items()},
            subsets={k: [int(i) for i in v] for k, v in (d.get("subsets") or {}).items()},
            meta=dict(d.get("meta") or {}),
            confusion=d.get("confusion"),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "EvalResult":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save(self, out_dir: str | os.PathLike, stem: str = "results") -> dict[str, Path]:
        """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.json``; return their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "md": out / f"{stem}.md",
            "csv": out / f"{stem}.csv",
            "json": out / f"{stem}.json",
        }
        # one set: a full disk keeps the earlier three whole, never a new file beside old ones
        write_texts_atomic({paths["md"]: self.to_markdown(), paths["csv"]: self.to_csv(),
                            paths["json"]: self.to_json() + "\n"})
        return paths
