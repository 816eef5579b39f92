"""Class maps: a dataset's own classes (names, label id -> train id, ignored ids, colours).

Without a class map every reader uses the 19 Cityscapes classes. A class map is a YAML
file (or the same mapping written inline in a config under ``class_map:``)::

    names: [background, road, car]      # train ids 0, 1, 2 in this order
    ids: {0: background, 7: road, 26: 2}  # label id in the files -> class name or train id
    ignore: [255, 1]                    # label ids read as "ignore" (default [255])
    palette: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]  # one RGB colour per class

``ids`` may be left out when the files already hold train ids 0..C-1; ``palette`` may be
left out (the Cityscapes colours for up to 19 classes, then generated ones). Any id that
is neither in ``ids`` nor in ``ignore`` makes the reading of a label fail with a line that
names the file and the id. Mistakes in the map itself (a label id given twice, a name
given twice, a train id out of range, a short palette, unknown keys) are one
:class:`~segadapt.errors.ConfigError` line naming the file.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import yaml

from segadapt.data.labels import (CITYSCAPES_ID_TO_TRAIN, CLASS_NAMES, IGNORE_INDEX, INVALID, LUT_SIZE, NUM_CLASSES,
                                  PALETTE)
from segadapt.errors import ConfigError

KEYS = ("names", "ids", "ignore", "palette")
MAX_CLASSES = IGNORE_INDEX  # train ids are stored as uint8 with 255 = ignore


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently,
    which would hide a label id mapped twice)."""


def _construct_unique(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{{where}}: key {key!r} appears twice (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique)


def generated_palette(n: int) -> np.ndarray:
    """Distinct colours for classes beyond the 19 Cityscapes ones (golden-ratio hues)."""
    import colorsys

    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        h = (0.13 + i * 0.6180339887) % 1.0
        s, v = (0.65, 0.95) if i % 2 == 0 else (0.9, 0.7)
        out[i] = [round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)]
    return out


def default_palette(n: int) -> np.ndarray:
    """Cityscapes colours for the first 19 classes, generated ones after them."""
    out = generated_palette(n)
    k = min(n, NUM_CLASSES)
    out[:k] = PALETTE[:k]
    return out


@dataclass(frozen=True)
class ClassMap:
    """The classes of a dataset. ``lut[label id]`` is the train id (255 ignore, INVALID unknown)."""

    names: tuple
    id_to_train: tuple  # ((label id, train id), ...) including ignored ids (train id 255)
    palette: np.ndarray  # (C, 3) uint8
    source: str = "Cityscapes"  # file it came from, "inline" or "Cityscapes"

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def is_cityscapes(self) -> bool:
        return self.source == "Cityscapes"

    @property
    def ignore_ids(self) -> list:
        return sorted(i for i, t in self.id_to_train if t == IGNORE_INDEX)

    def lut(self) -> np.ndarray:
        lut = np.full(LUT_SIZE, INVALID, dtype=np.uint16)
        for raw, train in self.id_to_train:
            lut[raw] = train
        lut.setflags(write=False)
        return lut

    def colorize(self, train_ids) -> np.ndarray:
        from segadapt.data.labels import colorize

        return colorize(train_ids, self.palette)

    def to_dict(self) -> dict:
        """The YAML mapping (train ids as numbers): stored in checkpoints and export metadata."""
        return {"names": list(self.names),
                "ids": {int(i): int(t) for i, t in self.id_to_train if t != IGNORE_INDEX},
                "ignore": self.ignore_ids,
                "palette": self.palette.astype(int).tolist()}

    def __eq__(self, other) -> bool:
        return (isinstance(other, ClassMap) and self.names == other.names
                and self.id_to_train == other.id_to_train and np.array_equal(self.palette, other.palette))

    def __hash__(self) -> int:
        return hash((self.names, self.id_to_train))


def cityscapes_classes() -> ClassMap:
    """The default: Cityscapes label ids -> the 19 train ids, the official colours."""
    pairs = tuple(sorted(CITYSCAPES_ID_TO_TRAIN.items()))
    return ClassMap(tuple(CLASS_NAMES), pairs, PALETTE.copy(), "Cityscapes")


def _int(value, what: str, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        else:
            raise ConfigError(f"{where}: {what} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: {what} {value} is outside {lo}..{hi}")
    return value


def class_map_from_dict(data: Any, where: str = "class map", source: str = "inline") -> ClassMap:
    """Validate a class-map mapping (see the module doc); every mistake is one ConfigError line
    starting with ``where``; ``source`` (the file, or "inline") is kept in the result."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(KEYS)}, got {type(data).__name__}")
    for k in data:
        if k not in KEYS:
            close = difflib.get_close_matches(str(k), KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key {k!r}{hint}; keys: {', '.join(KEYS)}")
    names = data.get("names")
    if not isinstance(names, (list, tuple)) or not names:
        raise ConfigError(f"{where}: 'names' must be a non-empty list of class names (train ids 0, 1, ... in order)")
    names = [str(n).strip() if n is not None else "" for n in names]
    if any(not n for n in names):
        raise ConfigError(f"{where}: class {names.index('')} has an empty name")
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ConfigError(f"{where}: class name '{dup}' appears twice (train ids {names.index(dup)} and "
                          f"{names.index(dup, names.index(dup) + 1)})")
    c = len(names)
    if c > MAX_CLASSES:
        raise ConfigError(f"{where}: {c} classes; at most {MAX_CLASSES} fit (train ids are stored in 8 bits, "
                          f"{IGNORE_INDEX} = ignore)")
    by_name = {n: i for i, n in enumerate(names)}

    pairs: dict[int, int] = {}
    ids = data.get("ids")
    if ids is None:
        pairs = {i: i for i in range(c)}  # the files already hold train ids
    elif not isinstance(ids, Mapping) or not ids:
        raise ConfigError(f"{where}: 'ids' must map label ids to class names or train ids, e.g. {{7: road}}")
    else:
        for raw, train in ids.items():
            rid = _int(raw, "label id", where, 0, LUT_SIZE - 1)
            if rid in pairs:
                raise ConfigError(f"{where}: label id {rid} appears twice in 'ids'")
            if isinstance(train, str) and not train.strip().isdigit():
                if train not in by_name:
                    close = difflib.get_close_matches(train, list(by_name), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise ConfigError(f"{where}: label id {rid} maps to unknown class '{train}'{hint}")
                tid = by_name[train]
            else:
                tid = _int(train, f"train id of label id {rid}", where, 0, IGNORE_INDEX)
                if tid >= c and tid != IGNORE_INDEX:
                    raise ConfigError(f"{where}: label id {rid} maps to train id {tid}, but there are only {c} "
                                      f"classes (0..{c - 1}; {IGNORE_INDEX} = ignore)")
            pairs[rid] = tid
    ignore = data.get("ignore", [IGNORE_INDEX])
    if ignore is None:
        ignore = []
    if not isinstance(ignore, (list, tuple)):
        ignore = [ignore]
    seen_ignore: set = set()
    for raw in ignore:
        rid = _int(raw, "ignored label id", where, 0, LUT_SIZE - 1)
        if rid in seen_ignore:
            raise ConfigError(f"{where}: label id {rid} appears twice in 'ignore'")
        seen_ignore.add(rid)
        if rid in pairs and pairs[rid] != IGNORE_INDEX:
            raise ConfigError(f"{where}: label id {rid} is both class '{names[pairs[rid]]}' (in 'ids') and ignored "
                              f"(in 'ignore')")
        pairs[rid] = IGNORE_INDEX
    unused = [names[t] for t in range(c) if t not in pairs.values()]
    if unused:
        raise ConfigError(f"{where}: no label id maps to class '{unused[0]}'"
                          + (f" (nor to {len(unused) - 1} more)" if len(unused) > 1 else ""))

    palette = data.get("palette")
    if palette is None:
        pal = default_palette(c)
    else:
        if not isinstance(palette, (list, tuple)):
            raise ConfigError(f"{where}: 'palette' must be a list of [R, G, B] colours, one per class")
        if len(palette) != c:
            short = "only " if len(palette) < c else ""
            raise ConfigError(f"{where}: 'palette' has {short}{len(palette)} colours for {c} classes")
        pal = np.zeros((c, 3), np.uint8)
        for i, col in enumerate(palette):
            if not isinstance(col, (list, tuple)) or len(col) != 3:
                raise ConfigError(f"{where}: palette entry {i} ({names[i]}) must be [R, G, B], got {col!r}")
            pal[i] = [_int(v, f"colour of '{names[i]}'", where, 0, 255) for v in col]
    pal.setflags(write=False)
    return ClassMap(tuple(names), tuple(sorted(pairs.items())), pal, source)


def load_class_map(spec, key: str = "class_map") -> ClassMap:
    """A class map from a YAML file path (``~`` expanded) or an inline mapping (``key`` names the
    config entry in messages)."""
    if isinstance(spec, ClassMap):
        return spec
    if isinstance(spec, Mapping):
        return class_map_from_dict(spec, f"{key} (inline class map)")
    path = Path(os.path.expanduser(str(spec)))
    if not path.is_file():
        what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{key}: class map {path} {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read class map {path}: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(str(e).replace("{where}", f"class map {path}")) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in class map {path}{loc}: {getattr(e, 'problem', e)}") from None
    return class_map_from_dict(data, f"class map {path}", str(path))


def classes_of(ds_cfg) -> Optional[ClassMap]:
    """The class map a dataset config names (None: the Cityscapes default)."""
    spec = getattr(ds_cfg, "class_map", None)
    return None if spec is None else load_class_map(spec)
