"""Kind ``acdc``: ACDC (Sakaridis et al., ICCV 2021), adverse conditions, as downloaded::

    <root>/rgb_anon/<condition>/<split>/<sequence>/<frame>_rgb_anon.png
    <root>/gt/<condition>/<split>/<sequence>/<frame>_gt_labelTrainIds.png   (_gt_labelIds.png also read)

conditions fog, night, rain, snow; splits train, val, test (test has no public labels).
``condition`` picks one, or ``all`` (the default: every condition folder present).
Sample names are ``<condition>/<sequence>/<frame>``. The copy that DAFormer/HRDA/MIC's
instructions make with rsync (``rgb_anon/<split>/*_rgb_anon.png``, no condition
folders) is read too, with condition ``all`` only (its file names do not say the condition).

:class:`ConditionDataset` is the shared reader of such condition/sequence layouts
(``dark_zurich`` is another).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from segadapt.data.datasets import SegDataset, _list_files
from segadapt.data.labels import cityscapes_lut, train_id_lut
from segadapt.errors import ConfigError, DatasetError
from segadapt.registry import DATASETS

IMAGE_SUFFIX = "_rgb_anon.png"
TRAIN_ID_SUFFIX = "_gt_labelTrainIds.png"
LABEL_ID_SUFFIX = "_gt_labelIds.png"


class ConditionDataset(SegDataset):
    """Images under ``rgb_anon`` and labels under ``gt``, by condition, split and sequence."""

    conditions: Tuple[str, ...] = ()
    default_condition = "all"
    splits: Tuple[str, ...] = ("train", "val", "test")
    labelled_splits: Tuple[str, ...] = ("train", "val")
    unlabelled_note = "has no public labels"

    def __init__(self, cfg) -> None:
        type(self)._check(cfg, "dataset")
        condition = getattr(cfg, "condition", None) or self.default_condition
        self.condition = condition
        self.flat = False  # DAFormer's restructured copy (ACDC only)
        super().__init__(cfg)

    # ------------------------------------------------------------------ config checks
    @classmethod
    def _check(cls, cfg, key: str) -> None:
        condition = getattr(cfg, "condition", None) or cls.default_condition
        choices = cls.conditions + ("all",)
        if condition not in choices:
            close = difflib.get_close_matches(str(condition), choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}.condition: '{condition}' is not a condition of {cls.display}{hint}; "
                              f"conditions: {', '.join(choices)}")
        split = getattr(cfg, "split", "train")
        if split not in cls.splits:
            raise ConfigError(f"{key}.split: {cls.display} has no split '{split}'; splits: {', '.join(cls.splits)} "
                              f"(a list_file chooses images within one)")
        if bool(getattr(cfg, "labels", True)) and split not in cls.labelled_splits:
            raise ConfigError(f"{key}: {cls.display}'s {split} split {cls.unlabelled_note}: set {key}.labels=false"
                              + (f" (evaluate on {cls.labelled_splits[-1]})" if cls.labelled_splits else ""))

    @classmethod
    def check_config(cls, cfg, key: str = "dataset") -> Optional[int]:
        cls._check(cfg, key)
        return super().check_config(cfg, key)

    # ------------------------------------------------------------------ layout
    def _cond_dir(self, top: str, condition: str) -> Path:
        """The folder of one condition's split under ``top`` (rgb_anon or gt)."""
        raise NotImplementedError

    def _selected(self) -> List[str]:
        return list(self.conditions) if self.condition == "all" else [self.condition]

    def _image_folder(self) -> Path:
        return self.root / "rgb_anon"

    def _label_folder(self) -> Path:
        return self.root / "gt"

    def _all_names(self) -> List[str]:
        if self.flat:
            folder = self.root / "rgb_anon" / self.split
            return [f[: -len(IMAGE_SUFFIX)] for f in _list_files(folder, IMAGE_SUFFIX)]
        names = []
        present = []
        for cond in self._selected():
            folder = self._cond_dir("rgb_anon", cond)
            if not folder.is_dir():
                if self.condition != "all":
                    raise DatasetError(f"{self.display}: condition folder {folder} does not exist")
                continue
            present.append(cond)
            with os.scandir(folder) as it:
                seqs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
            for seq in seqs:
                names += [f"{cond}/{seq}/{f[: -len(IMAGE_SUFFIX)]}" for f in _list_files(folder / seq, IMAGE_SUFFIX)]
        if not present:
            shown = ", ".join(str(self._cond_dir("rgb_anon", c)) for c in self._selected()[:2])
            raise DatasetError(f"{self.display}: no condition folder for split '{self.split}' ({shown}, ...) "
                               f"under {self.root}")
        return names

    def _scan_images(self):
        self.flat = self._is_flat()
        return super()._scan_images()

    def _is_flat(self) -> bool:
        return False

    def _normalize_listed(self, name: str) -> str:
        name = name.replace("\\", "/").strip("/")
        for suffix in (IMAGE_SUFFIX, ".png"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        if name.startswith("rgb_anon/"):
            name = name[len("rgb_anon/"):]
        if self.flat:
            return name.rsplit("/", 1)[-1]
        parts = name.split("/")
        if len(parts) == 4 and self.split in parts[:2]:  # the split folder named too
            parts.remove(self.split)
        if len(parts) != 3:
            raise DatasetError(f"{self.display}: list file {self.list_file} names {name!r}; expected "
                               f"<condition>/<sequence>/<frame>")
        if parts[0] not in self._selected():
            raise DatasetError(f"{self.display}: list file {self.list_file} names {name!r}, not of condition "
                               f"{self.condition}")
        return "/".join(parts)

    def _image_path(self, name: str) -> Path:
        if self.flat:
            return self.root / "rgb_anon" / self.split / (name + IMAGE_SUFFIX)
        cond, seq, frame = name.split("/")
        return self._cond_dir("rgb_anon", cond) / seq / (frame + IMAGE_SUFFIX)

    def _label_candidates(self, name: str) -> List[Path]:
        if self.flat:
            base = self.root / "gt" / self.split / name
        else:
            cond, seq, frame = name.split("/")
            base = self._cond_dir("gt", cond) / seq / frame
        return [base.with_name(base.name + TRAIN_ID_SUFFIX), base.with_name(base.name + LABEL_ID_SUFFIX)]

    def _default_lut(self, path: Path) -> np.ndarray:
        return train_id_lut() if path.name.endswith(TRAIN_ID_SUFFIX) else cityscapes_lut()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, condition={self.condition!r}, "
                f"samples={len(self)}, labels={self.with_labels})")


@DATASETS.register("acdc")
class ACDCDataset(ConditionDataset):
    kind = "acdc"
    display = "ACDC"
    conditions = ("fog", "night", "rain", "snow")
    default_condition = "all"

    def _cond_dir(self, top: str, condition: str) -> Path:
        return self.root / top / condition / self.split

    def _is_flat(self) -> bool:
        top = self.root / "rgb_anon"
        if any((top / c).is_dir() for c in self.conditions) or not (top / self.split).is_dir():
            return False
        if self.condition != "all":
            raise DatasetError(f"{self.display}: {top / self.split} is the restructured copy without condition "
                               f"folders; condition '{self.condition}' needs the layout as downloaded "
                               f"(rgb_anon/<condition>/<split>/...), or set condition: all")
        return True
