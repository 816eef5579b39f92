"""Rare class sampling (DAFormer): draw a class with a probability that favours
rare classes, then a source image holding enough pixels of it.

    f_c  = pixels of class c / all labelled pixels          (over the source set)
    P(c) = softmax((1 - f_c) / T)   over the classes with at least one eligible image
    eligible images of c: more than `min_pixels` pixels of c (at the label's own resolution)

The per-image class pixel counts are computed once and cached beside the
dataset (`<root>/segadapt_class_stats.json`, or any file given), keyed by the
label file's path relative to the root and checked against its byte size.
`segadapt prepare` writes the same file ahead of time (e.g. for read-only roots).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError, DatasetError, OutputError
from ..utils.files import ensure_writable, write_text_atomic
from .labels import IGNORE_INDEX, NUM_CLASSES
from .sampling import _draw_seed

STATS_FILE = "segadapt_class_stats.json"
STATS_FORMAT = "segadapt-class-stats"
STATS_VERSION = 1


# --------------------------------------------------------------------------- per-image counts
def label_class_counts(train_ids: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Pixels of each class 0..num_classes-1 in a train-id map (ignore and other ids not counted)."""
    counts = np.bincount(np.asarray(train_ids).ravel().astype(np.int64), minlength=IGNORE_INDEX + 1)
    return counts[:num_classes].astype(np.int64)


def stats_key(dataset, index: int) -> str:
    """Cache key of a sample: its label file relative to the dataset root, '/'-separated."""
    label = Path(dataset.samples[index][1])
    try:
        return label.relative_to(dataset.root).as_posix()
    except ValueError:
        return label.as_posix()


def default_stats_path(dataset) -> Path:
    """<root>/segadapt_class_stats.json; with a class map of its own, a file named after the map's
    content (the counts are per train id of that map, not of the Cityscapes table)."""
    if getattr(dataset, "has_class_map", False):
        import hashlib
        import json

        digest = hashlib.sha1(json.dumps(dataset.classes.to_dict()["ids"], sort_keys=True).encode()).hexdigest()
        return Path(dataset.root) / f"{Path(STATS_FILE).stem}_{digest[:10]}.json"
    return Path(dataset.root) / STATS_FILE


class _CountLabels(torch.utils.data.Dataset):
    """Reads labels in DataLoader workers; returns each one's class counts."""

    def __init__(self, dataset, indices: Sequence[int], num_classes: int):
        self.dataset, self.indices, self.num_classes = dataset, list(indices), num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        return j, label_class_counts(self.dataset.load_label_train_ids(j), self.num_classes)


def compute_class_counts(dataset, indices: Optional[Sequence[int]] = None, num_classes: int = NUM_CLASSES,
                         workers: int = 0, progress: Optional[bool] = None) -> dict[int, np.ndarray]:
    """Class pixel counts of the labels of `indices` (default: all), index -> (num_classes,) int64."""
    indices = range(len(dataset)) if indices is None else indices
    # its own generator: building the cache must not move the global RNG (a run with and one
    # without a cache would otherwise draw different augmentations)
    loader = DataLoader(_CountLabels(dataset, indices, num_classes), batch_size=None, shuffle=False,
                        num_workers=workers, generator=torch.Generator())
    from tqdm import tqdm

    out = {}
    # progress=None: a bar only on a terminal
    for j, counts in tqdm(loader, total=len(loader), desc="class statistics", disable=None if progress is None
                          else not progress, leave=False, dynamic_ncols=True):
        out[int(j)] = np.asarray(counts, dtype=np.int64)
    return out


# --------------------------------------------------------------------------- the cache file
def read_class_stats(path: Path) -> dict:
    """The cache's `images` table {key: {'bytes': int, 'counts': {class: pixels}}}; {} if absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"class statistics cache {path} is unreadable ({e}); delete it or run "
                           "`segadapt prepare` again") from None
    if not isinstance(data, dict) or data.get("format") != STATS_FORMAT or not isinstance(data.get("images"), dict):
        raise DatasetError(f"{path} is not a segadapt class statistics file; delete it or run `segadapt prepare`")
    return data["images"]


def stats_entry(counts: np.ndarray, nbytes: int) -> dict:
    return {"bytes": int(nbytes), "counts": {str(c): int(n) for c, n in enumerate(counts) if n}}


def _entry_counts(entry: dict, num_classes: int) -> np.ndarray:
    out = np.zeros(num_classes, dtype=np.int64)
    for c, n in entry["counts"].items():
        if int(c) < num_classes:
            out[int(c)] = n
    return out


def _check_writable(path: Path, dataset_kind: str, root) -> None:
    """Fail before a long pass, not after it."""
    hint = (f"run `segadapt prepare --kind {dataset_kind} --root {root} --out FILE` with FILE somewhere "
            f"writable and set method.rcs.stats=FILE")
    try:
        ensure_writable(path)
    except OutputError as e:
        raise DatasetError(f"class statistics cache: {e}; {hint}") from None


def write_class_stats(path: Path, images: dict, kind: str, root) -> None:
    """Atomically write the cache (`images` as returned by `read_class_stats`)."""
    path = Path(path)
    _check_writable(path, kind, root)
    data = {"format": STATS_FORMAT, "version": STATS_VERSION, "kind": kind, "root": str(root),
            "classes": NUM_CLASSES, "images": dict(sorted(images.items()))}
    write_text_atomic(path, json.dumps(data, separators=(",", ":")))


def dataset_class_counts(dataset, path=None, num_classes: int = NUM_CLASSES, workers: int = 0,
                         progress: Optional[bool] = None) -> np.ndarray:
    """(N, num_classes) pixel counts of every sample of `dataset`, from the cache where it is
    current; missing or changed labels are counted and the cache rewritten."""
    if not getattr(dataset, "with_labels", False):
        raise ConfigError(f"rare class sampling needs a labelled source dataset ({dataset.root} has labels: false)")
    path = Path(path) if path else default_stats_path(dataset)
    images = read_class_stats(path)
    keys = [stats_key(dataset, i) for i in range(len(dataset))]
    sizes = [os.path.getsize(dataset.samples[i][1]) for i in range(len(dataset))]
    todo = [i for i, (k, n) in enumerate(zip(keys, sizes)) if k not in images or images[k].get("bytes") != n]
    if todo:
        _check_writable(path, dataset.kind, dataset.root)
        for i, counts in compute_class_counts(dataset, todo, num_classes, workers, progress).items():
            images[keys[i]] = stats_entry(counts, sizes[i])
        write_class_stats(path, images, dataset.kind, dataset.root)
    return np.stack([_entry_counts(images[k], num_classes) for k in keys])


# --------------------------------------------------------------------------- sampling plan
def rcs_class_probs(class_pixels: np.ndarray, temperature: float, eligible: Optional[np.ndarray] = None) -> np.ndarray:
    """P(c) = softmax((1 - f_c) / T) over the eligible classes (others 0), f_c = pixel frequency."""
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    total = class_pixels.sum()
    if total <= 0:
        raise ConfigError("rare class sampling: the source labels hold no labelled pixel")
    eligible = class_pixels > 0 if eligible is None else np.asarray(eligible, dtype=bool) & (class_pixels > 0)
    logits = (1.0 - class_pixels / total) / temperature
    logits = np.where(eligible, logits, -np.inf)
    z = np.exp(logits - logits[eligible].max())
    return z / z.sum()


class RareClassPlan:
    """Which images each class may be drawn from, and the class probabilities."""

    def __init__(self, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000):
        counts = np.asarray(counts, dtype=np.int64)
        self.min_pixels = min_pixels
        self.images_per_class = [np.flatnonzero(counts[:, c] > min_pixels).tolist() for c in range(counts.shape[1])]
        eligible = np.array([len(v) > 0 for v in self.images_per_class])
        if not eligible.any():
            raise ConfigError(f"method.rcs.min_pixels={min_pixels}: no source image has more pixels than that of any "
                              f"class (the largest count is {int(counts.max(initial=0))}); lower it")
        self.class_pixels = counts.sum(0)
        self.probs = rcs_class_probs(self.class_pixels, temperature, eligible)

    def sampler_kwargs(self, min_crop_pixels: int, crop_attempts: int) -> dict:
        classes = np.flatnonzero(self.probs > 0)
        return {"classes": classes.tolist(), "probs": self.probs[classes].tolist(),
                "images": [self.images_per_class[c] for c in classes],
                "min_crop_pixels": int(min_crop_pixels), "crop_attempts": int(crop_attempts)}


class RareClassSampler(Sampler):
    """Yields `(index, seed, class_id, min_crop_pixels, crop_attempts)` dataset keys forever.

    Draw k (global, over ranks) uses only `_draw_seed(seed, k)`: a class by its
    probability, an image holding that class, and the augmentation seed. A
    stream resumed at draw k continues exactly as an uninterrupted one.
    Drop-in for `segadapt.data.sampling.StreamSampler` in a `DataStream`.
    """

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1, *,
                 classes: Sequence[int], probs: Sequence[float], images: Sequence[Sequence[int]],
                 min_crop_pixels: int, crop_attempts: int = 10):
        if not (len(classes) == len(probs) == len(images)) or not classes:
            raise ValueError("classes, probs and images must be non-empty and of equal length")
        if any(i >= size for imgs in images for i in imgs):
            raise ValueError("an image index is out of range for the dataset")
        self.size, self.seed, self.start, self.rank, self.world_size = size, seed, start, rank, world_size
        self.classes = [int(c) for c in classes]
        p = np.asarray(probs, dtype=np.float64)
        self.probs = p / p.sum()
        self.images = [np.asarray(v, dtype=np.int64) for v in images]
        self.min_crop_pixels = int(min_crop_pixels)
        self.crop_attempts = int(crop_attempts)

    def draw(self, g: int) -> tuple:
        rng = np.random.default_rng(_draw_seed(self.seed, g))
        k = int(rng.choice(len(self.classes), p=self.probs))
        imgs = self.images[k]
        index = int(imgs[rng.integers(len(imgs))])
        aug_seed = int(rng.integers(2**63 - 1))
        return index, aug_seed, self.classes[k], self.min_crop_pixels, self.crop_attempts

    def __iter__(self) -> Iterator[tuple]:
        k = self.start
        while True:
            yield self.draw(k * self.world_size + self.rank)
            k += 1

    def __len__(self) -> int:  # infinite
        return 2**62
