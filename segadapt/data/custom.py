"""Kind ``custom``: your own labelled dataset, with a class map of its own.

Images and label maps are matched by name::

    <root>/<image_dir>/<name><image_suffix>     image_dir default images/{split}; suffix default any image type
    <root>/<label_dir>/<name><label_suffix>     label_dir default labels/{split}; suffix default .png

``{split}`` in either folder is replaced by the split; ``<name>`` may hold sub-folders.
A ``list_file`` (relative to root) narrows the samples: one name per line (with or
without the image suffix), or two paths relative to root per line, ``image label``
(then the folders are not used). The label files hold the ids of the ``class_map``
(required while labels are read): see ``segadapt.data.classmap``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from segadapt.data.datasets import IMAGE_EXTENSIONS, SegDataset, _DirCache
from segadapt.errors import ConfigError, DatasetError
from segadapt.registry import DATASETS

DEFAULT_IMAGE_DIR = "images/{split}"
DEFAULT_LABEL_DIR = "labels/{split}"
DEFAULT_LABEL_SUFFIX = ".png"


@DATASETS.register("custom")
class CustomDataset(SegDataset):
    kind = "custom"
    display = "custom dataset"

    def __init__(self, cfg) -> None:
        type(self)._check(cfg, "dataset")  # the config checks, for datasets built without a Config
        split = str(getattr(cfg, "split", "train"))
        self.image_dir = (getattr(cfg, "image_dir", None) or DEFAULT_IMAGE_DIR).replace("{split}", split)
        self.label_dir = (getattr(cfg, "label_dir", None) or DEFAULT_LABEL_DIR).replace("{split}", split)
        self.image_suffix: Optional[str] = getattr(cfg, "image_suffix", None)
        self.label_suffix: str = getattr(cfg, "label_suffix", None) or DEFAULT_LABEL_SUFFIX
        self._pairs: Dict[str, Tuple[Path, Path]] = {}  # name -> (image, label) from a two-column list file
        self._found: Dict[str, Path] = {}  # name -> image found by the scan
        super().__init__(cfg)

    @classmethod
    def _check(cls, cfg, key: str) -> None:
        if bool(getattr(cfg, "labels", True)) and getattr(cfg, "class_map", None) is None:
            raise ConfigError(f"{key}: kind 'custom' reads its labels through a class map: set {key}.class_map "
                              f"(a YAML file, see docs/datasets.md), or {key}.labels=false for images only")
        for field in ("image_suffix", "label_suffix"):
            v = getattr(cfg, field, None)
            if v is not None and (not v or "/" in v):
                raise ConfigError(f"{key}.{field} must be the end of a file name (e.g. .png or _label.png), "
                                  f"got {v!r}")

    @classmethod
    def check_config(cls, cfg, key: str = "dataset") -> Optional[int]:
        cls._check(cfg, key)
        return super().check_config(cfg, key)

    # ------------------------------------------------------------------ layout
    def _image_folder(self) -> Path:
        return self.root / self.image_dir

    def _label_folder(self) -> Optional[Path]:
        return None if self._pairs else self.root / self.label_dir

    def _strip(self, name: str) -> str:
        name = name.replace("\\", "/").lstrip("/")
        if self.image_suffix:
            return name[: -len(self.image_suffix)] if name.endswith(self.image_suffix) else name
        stem, ext = os.path.splitext(name)
        return stem if ext.lower() in IMAGE_EXTENSIONS else name

    def _all_names(self) -> List[str]:
        folder = self._image_folder()
        found: Dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(folder)
            for f in filenames:
                if f.startswith("."):
                    continue
                if self.image_suffix is not None:
                    if not f.endswith(self.image_suffix):
                        continue
                elif not f.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                name = self._strip((rel / f).as_posix())
                if name in found:
                    raise DatasetError(
                        f"{self.display}: images {found[name]} and {Path(dirpath) / f} share the name {name!r}; "
                        f"set image_suffix to choose one")
                found[name] = Path(dirpath) / f
        self._found = found
        return sorted(found)

    def _normalize_listed(self, line: str) -> str:
        parts = line.split()
        if len(parts) == 2:  # image label, relative to root
            image, label = (p.replace("\\", "/") for p in parts)
            name = self._strip(image)
            self._pairs[name] = (self.root / image, self.root / label)
            return name
        return self._strip(line)

    def _scan_images(self) -> Tuple[List[str], List[Path]]:
        if not self.list_file:
            return super()._scan_images()
        names = self._read_list_file()
        if self._pairs and len(self._pairs) != len(names):
            raise DatasetError(f"{self.display}: list file {self.list_file} mixes 'image label' lines with "
                               f"lines that name one sample: use one form")
        if not self._pairs and not self._image_folder().is_dir():
            raise DatasetError(f"{self.display}: image folder {self._image_folder()} does not exist")
        images = [self._image_path(n) for n in names]
        cache = _DirCache()
        missing = [p for p in images if not cache.exists(p)]
        if missing:
            more = f" ({len(missing)} listed images missing)" if len(missing) > 1 else ""
            raise DatasetError(
                f"{self.display}: image {missing[0]} named in list file {self.list_file} does not exist{more}")
        return names, images

    def _image_path(self, name: str) -> Path:
        if name in self._pairs:
            return self._pairs[name][0]
        if name in self._found:
            return self._found[name]
        folder = self._image_folder()
        if self.image_suffix is not None:
            return folder / (name + self.image_suffix)
        # a listed name without extension: the first image type that exists
        cache = _DirCache()
        candidates = [folder / (name + ext) for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)]
        return next((c for c in candidates if cache.exists(c)), candidates[0])

    def _label_candidates(self, name: str) -> List[Path]:
        if name in self._pairs:
            return [self._pairs[name][1]]
        return [self.root / self.label_dir / (name + self.label_suffix)]
