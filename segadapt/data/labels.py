"""Label spaces: the 19 Cityscapes train ids and the raw-id -> train-id lookup tables.

Raw label images hold dataset-specific ids (Cityscapes/GTA5 label ids 0..33,
SYNTHIA class ids 0..22).  They are mapped to the 19 Cityscapes train ids with a
lookup table (``lut[raw]``).  Ids that exist in the dataset but are not among the
19 classes map to ``IGNORE_INDEX``; ids that do not exist in the dataset at all
(a corrupt label, or the wrong kind of file) map to the sentinel ``INVALID`` and
make :func:`map_labels` raise :class:`~segadapt.errors.DatasetError`.

The Cityscapes table below is written out here (not imported from
``cityscapesscripts``, which is only a test dependency); a test checks it against
the official one.
"""

from __future__ import annotations

from collections import namedtuple
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np

from segadapt.errors import DatasetError

NUM_CLASSES = 19
IGNORE_INDEX = 255

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

#: train ids of the "thing" classes (traffic light, traffic sign, person .. bicycle)
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

#: train ids evaluated for SYNTHIA -> Cityscapes (no terrain, truck, train)
SYNTHIA_16 = tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16))
#: the 13-class SYNTHIA protocol additionally drops wall, fence, pole
SYNTHIA_13 = tuple(c for c in SYNTHIA_16 if c not in (3, 4, 5))

Label = namedtuple("Label", ["name", "id", "train_id", "color"])

#: Cityscapes label ids -> train ids and colours (the official table, written out).
CITYSCAPES_LABELS = (
    Label("unlabeled", 0, 255, (0, 0, 0)),
    Label("ego vehicle", 1, 255, (0, 0, 0)),
    Label("rectification border", 2, 255, (0, 0, 0)),
    Label("out of roi", 3, 255, (0, 0, 0)),
    Label("static", 4, 255, (0, 0, 0)),
    Label("dynamic", 5, 255, (111, 74, 0)),
    Label("ground", 6, 255, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, 255, (250, 170, 160)),
    Label("rail track", 10, 255, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, 255, (180, 165, 180)),
    Label("bridge", 15, 255, (150, 100, 100)),
    Label("tunnel", 16, 255, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, 255, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, 255, (0, 0, 90)),
    Label("trailer", 30, 255, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
    Label("license plate", -1, -1, (0, 0, 142)),
)

#: Cityscapes / GTA5 label id -> train id (ids 0..33; license plate excluded)
CITYSCAPES_ID_TO_TRAIN = {lab.id: lab.train_id for lab in CITYSCAPES_LABELS if lab.id >= 0}

#: SYNTHIA-RAND-CITYSCAPES class id -> train id; other ids 0..22 -> ignore
SYNTHIA_ID_TO_TRAIN = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11,
    17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}
SYNTHIA_MAX_ID = 22

#: official colours of the 19 train ids, (19, 3) uint8
PALETTE = np.array(
    [next(lab.color for lab in CITYSCAPES_LABELS if lab.train_id == t) for t in range(NUM_CLASSES)],
    dtype=np.uint8,
)

#: LUT sentinel for ids that do not exist in a dataset (never a valid train id)
INVALID = 256
LUT_SIZE = 65536  # any uint8 / uint16 raw id can index a LUT directly


def _frozen(lut: np.ndarray) -> np.ndarray:
    lut.setflags(write=False)  # cached and shared: callers must copy before editing
    return lut


def _new_lut() -> np.ndarray:
    return np.full(LUT_SIZE, INVALID, dtype=np.uint16)


@lru_cache(maxsize=None)
def cityscapes_lut() -> np.ndarray:
    """LUT for Cityscapes ``*_labelIds.png`` and GTA5 labels (label ids 0..33).

    Raw value 255 is accepted as the license plate (id -1 stored in 8 bits) and
    maps to ignore.
    """
    lut = _new_lut()
    for raw, train in CITYSCAPES_ID_TO_TRAIN.items():
        lut[raw] = train
    lut[255] = IGNORE_INDEX
    return _frozen(lut)


@lru_cache(maxsize=None)
def synthia_lut() -> np.ndarray:
    """LUT for SYNTHIA-RAND-CITYSCAPES class ids 0..22."""
    lut = _new_lut()
    lut[: SYNTHIA_MAX_ID + 1] = IGNORE_INDEX
    for raw, train in SYNTHIA_ID_TO_TRAIN.items():
        lut[raw] = train
    return _frozen(lut)


@lru_cache(maxsize=None)
def train_id_lut() -> np.ndarray:
    """Identity LUT for files that already hold train ids (``*_labelTrainIds.png``)."""
    lut = _new_lut()
    lut[:NUM_CLASSES] = np.arange(NUM_CLASSES)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return _frozen(lut)


def _describe_valid(lut: np.ndarray) -> str:
    valid = np.flatnonzero(lut != INVALID)
    if valid.size == 0:
        return "none"
    # compress to runs: "0..33, 255"
    breaks = np.flatnonzero(np.diff(valid) != 1)
    starts = np.concatenate([valid[:1], valid[breaks + 1]])
    ends = np.concatenate([valid[breaks], valid[-1:]])
    return ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in zip(starts.tolist(), ends.tolist()))


def map_labels(raw: np.ndarray, lut: np.ndarray, path: Union[str, Path, None] = None) -> np.ndarray:
    """Map a raw id image to train ids (uint8, ignore = 255) with ``lut``.

    Raises DatasetError naming ``path`` and the offending ids when the image holds
    ids that are not in the map.
    """
    raw = np.asarray(raw)
    where = f"label {path}" if path is not None else "label"
    if raw.dtype.kind not in "ui":
        raise DatasetError(f"{where}: label ids must be integers, got dtype {raw.dtype}")
    if raw.dtype == np.uint8 or raw.dtype == np.uint16:
        out = lut[raw]
    else:
        if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
            bad = np.unique(raw[(raw < 0) | (raw >= len(lut))])
            shown = ", ".join(str(int(v)) for v in bad[:10])
            raise DatasetError(
                f"{where} contains ids not in the label map: {shown} (valid ids: {_describe_valid(lut)})"
            )
        out = lut[raw]
    invalid = out == INVALID
    if invalid.any():
        bad = np.unique(raw[invalid])
        shown = ", ".join(str(int(v)) for v in bad[:10])
        more = f" and {bad.size - 10} more" if bad.size > 10 else ""
        raise DatasetError(
            f"{where} contains ids not in the label map: {shown}{more} (valid ids: {_describe_valid(lut)})"
        )
    return out.astype(np.uint8)


def colorize(train_ids, palette=None) -> np.ndarray:
    """Train-id map (H, W) -> RGB image (H, W, 3) uint8 with the official colours, or with
    ``palette`` ((C, 3) uint8: a dataset's own classes).

    Ignore (255) and any other id outside the palette are black.
    """
    ids = np.asarray(train_ids)
    if ids.ndim != 2:
        raise ValueError(f"colorize expects an (H, W) array, got shape {ids.shape}")
    palette = PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)[:255]
    table = np.zeros((257, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    idx = ids.astype(np.int64, copy=False)
    idx = np.where((idx < 0) | (idx > 255), 256, idx)
    return table[idx]
