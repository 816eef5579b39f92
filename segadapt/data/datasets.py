"""Segmentation datasets in the layouts users already have on disk.

``build_dataset(cfg)`` returns a :class:`SegDataset` for ``cfg.kind``, a name in the
dataset registry (``segadapt.registry.DATASETS``: 'gta5', 'cityscapes', 'synthia', 'folder'
here, 'acdc', 'dark_zurich' and 'custom' in their own modules, a user's readers through
the config key ``imports:``).  Items are read with
``ds[index]`` (deterministic: resize only) or ``ds[(index, seed)]`` (random crop
and flip drawn from ``np.random.default_rng(seed)``, so an augmentation is
reproducible from its per-sample seed).  Rare class sampling uses
``ds[(index, seed, class_id, min_pixels[, attempts])]``: the crop is re-drawn
until it holds ``min_pixels`` pixels of ``class_id``.
"""

from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch.utils.data

from segadapt.data import io as _io
from segadapt.data.classmap import ClassMap, classes_of, cityscapes_classes
from segadapt.data.labels import IGNORE_INDEX, cityscapes_lut, map_labels, synthia_lut, train_id_lut
from segadapt.data.transforms import (
    INTERPOLATIONS,
    keep_ratio_size,
    label_to_tensor,
    pad_to,
    random_crop,
    random_hflip,
    resize_image,
    resize_label,
    resize_label_cv2_nearest,
    to_tensor,
)
from segadapt.errors import ConfigError, DatasetError, SegadaptWarning
from segadapt.registry import DATASETS

SIZE_MISMATCH_POLICIES = ("resize", "skip", "error")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

# written by `segadapt stylize --include-eval` into a copy whose evaluation split is restyled
RESTYLED_EVAL_MARKER = "RESTYLED_EVAL_SPLIT.txt"



class Sample(dict):
    """A dataset item: a dict, plus ``files`` ({'image': path, 'label': path}) kept out of the
    collated batch. Batches of samples go through :func:`collate_samples`, registered with
    torch's default collate, so every DataLoader over these datasets names the files when
    the tensors of one batch differ in size (instead of torch.stack's bare shape error)."""

    files: dict = {}


def collate_samples(batch, *, collate_fn_map=None):
    from torch.utils.data._utils.collate import collate

    first = batch[0]
    for key in ("image", "label"):
        if key not in first:
            continue
        odd = next((s for s in batch[1:] if s[key].shape != first[key].shape), None)
        if odd is not None:
            def described(s):
                h, w = s[key].shape[-2:]
                return f"{s.files.get(key, s.get('name'))} is {w}x{h}"

            raise DatasetError(
                f"{key}s in one batch differ in size: {described(first)}, {described(odd)}; set a crop or "
                "resize (e.g. source.crop=[W,H], target.resize=[W,H]; for evaluation eval.data.resize or "
                "eval.batch_size=1) so that every batch shares one size")
    return {k: collate([s[k] for s in batch], collate_fn_map=collate_fn_map) for k in first}


def _register_collate() -> None:
    from torch.utils.data._utils.collate import default_collate_fn_map

    default_collate_fn_map[Sample] = collate_samples


_register_collate()

_CS_IMAGE_SUFFIX = "_leftImg8bit.png"
_CS_LABEL_SUFFIX = "_gtFine_labelIds.png"
_CS_TRAIN_LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


def _size_option(cfg, field: str) -> Optional[Tuple[int, int]]:
    value = getattr(cfg, field, None)
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"dataset option {field} must be [W, H], got {value!r}") from None
    if w <= 0 or h <= 0:
        raise ConfigError(f"dataset option {field} must be positive, got {value!r}")
    return w, h


class _DirCache:
    """Listings of folders, read once, for cheap existence checks during a scan."""

    def __init__(self) -> None:
        self._entries: Dict[Path, set] = {}

    def exists(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._entries:
            try:
                self._entries[folder] = set(os.listdir(folder))
            except OSError:
                self._entries[folder] = set()
        return path.name in self._entries[folder]


def _list_files(folder: Path, suffix: str) -> List[str]:
    """Sorted file names in ``folder`` ending with ``suffix`` (hidden files skipped)."""
    with os.scandir(folder) as it:
        return sorted(
            e.name for e in it
            if e.name.endswith(suffix) and not e.name.startswith(".") and e.is_file()
        )


class SegDataset(torch.utils.data.Dataset):
    """Base class: a sorted list of (image path, label path or None) samples."""

    kind = ""
    display = "dataset"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.root = Path(os.path.expanduser(str(cfg.root)))
        self.split = getattr(cfg, "split", "train")
        self.list_file = getattr(cfg, "list_file", None)
        self.resize = _size_option(cfg, "resize")
        self.resize_keep_ratio = bool(getattr(cfg, "resize_keep_ratio", False))
        self.resize_interpolation = getattr(cfg, "resize_interpolation", "bicubic")
        if self.resize_interpolation not in INTERPOLATIONS:
            raise ConfigError(f"dataset option resize_interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                              f"got {self.resize_interpolation!r}")
        self.crop = _size_option(cfg, "crop")
        self.flip = bool(getattr(cfg, "flip", False))
        self.cat_max_ratio = float(getattr(cfg, "cat_max_ratio", 1.0))
        if not 0.0 < self.cat_max_ratio <= 1.0:
            raise ConfigError(f"dataset option cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        self.with_labels = bool(getattr(cfg, "labels", True))
        self.pseudo_margins = getattr(cfg, "pseudo_margins", None)
        self._classes: Optional[ClassMap] = classes_of(cfg)  # None: the layout's own (Cityscapes) classes
        self._class_lut = self._classes.lut() if self._classes is not None else None
        self.keep_label_size = bool(getattr(cfg, "keep_label_size", False))
        self.size_mismatch = getattr(cfg, "size_mismatch", "resize")
        if self.size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise ConfigError(
                f"dataset option size_mismatch must be one of {', '.join(SIZE_MISMATCH_POLICIES)}, "
                f"got {self.size_mismatch!r}"
            )
        if self.keep_label_size and self.crop is not None:
            raise ConfigError("dataset options keep_label_size and crop cannot be combined")
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise DatasetError(f"{self.display} root {self.root} {what}")

        names, images = self._scan_images()
        if not names:
            raise DatasetError(f"{self.display}: no images found in {self._image_folder()}")
        labels: List[Optional[Path]] = [None] * len(names)
        if self.with_labels:
            labels = self._find_labels(names, images)
        self.samples: List[Tuple[Path, Optional[Path]]] = list(zip(images, labels))
        self.names: List[str] = list(names)
        if self.with_labels and self.size_mismatch == "skip":
            self._drop_mismatched()
        self._warned: set = set()
        self._lossy_warned = False
        self.cache = bool(getattr(cfg, "cache", False))
        self._cache: dict = {}

    # ------------------------------------------------------------------ classes

    @classmethod
    def check_config(cls, cfg, key: str = "dataset") -> Optional[int]:
        """Checks of the options that need no file of the dataset (run when a config is loaded,
        ``key`` names the entry in messages); returns the number of classes its labels have
        when a class map sets it, else None (the reader's own classes)."""
        condition = getattr(cfg, "condition", None)
        if condition is not None and not getattr(cls, "conditions", ()):
            raise ConfigError(f"{key}.condition: dataset kind '{cls.kind}' has no conditions (acdc and "
                              f"dark_zurich have): leave it unset")
        spec = getattr(cfg, "class_map", None)
        if spec is None:
            return None
        from segadapt.data.classmap import load_class_map

        return load_class_map(spec, f"{key}.class_map").num_classes

    @property
    def classes(self) -> ClassMap:
        """The dataset's classes: its class map, else the 19 Cityscapes classes."""
        return self._classes if self._classes is not None else cityscapes_classes()

    @property
    def has_class_map(self) -> bool:
        return self._classes is not None

    # ------------------------------------------------------------------ layout hooks

    def _image_folder(self) -> Path:
        raise NotImplementedError

    def _label_folder(self) -> Optional[Path]:
        return None

    def _all_names(self) -> List[str]:
        """Sample names found by listing the image folder (sorted)."""
        raise NotImplementedError

    def _normalize_listed(self, name: str) -> str:
        return name

    def _image_path(self, name: str) -> Path:
        raise NotImplementedError

    def _label_candidates(self, name: str) -> List[Path]:
        """Label files for ``name`` in order of preference (the first is reported if none exists)."""
        raise NotImplementedError

    def _read_label_raw(self, path: Path) -> np.ndarray:
        return _io.read_label(path)

    def _lut_for(self, path: Path) -> np.ndarray:
        """Raw label id -> train id for the label file ``path``: the class map's when one is
        given, else the layout's own table."""
        if self._class_lut is not None:
            return self._class_lut
        return self._default_lut(path)

    def _default_lut(self, path: Path) -> np.ndarray:
        return cityscapes_lut()

    # ------------------------------------------------------------------ scanning

    def _read_list_file(self) -> List[str]:
        path = Path(os.path.expanduser(str(self.list_file)))
        if not path.is_absolute():
            path = self.root / path
        if not path.is_file():
            raise DatasetError(f"{self.display}: list file {path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"{self.display}: cannot read list file {path}: {e}") from None
        names = []
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(self._normalize_listed(line))
        if not names:
            raise DatasetError(f"{self.display}: list file {path} names no samples")
        return names

    def _scan_images(self) -> Tuple[List[str], List[Path]]:
        folder = self._image_folder()
        if not folder.is_dir():
            raise DatasetError(f"{self.display}: image folder {folder} does not exist")
        if self.list_file:
            names = self._read_list_file()
            images = [self._image_path(n) for n in names]
            cache = _DirCache()
            missing = [p for p in images if not cache.exists(p)]
            if missing:
                more = f" ({len(missing)} listed images missing)" if len(missing) > 1 else ""
                raise DatasetError(
                    f"{self.display}: image {missing[0]} named in list file {self.list_file} does not exist{more}"
                )
            return names, images
        names = self._all_names()
        return names, [self._image_path(n) for n in names]

    def _find_labels(self, names: Sequence[str], images: Sequence[Path]) -> List[Path]:
        folder = self._label_folder()
        if folder is not None and not folder.is_dir():
            raise DatasetError(
                f"{self.display}: label folder {folder} does not exist "
                f"(set labels: false to use the images without labels)"
            )
        cache = _DirCache()
        labels: List[Path] = []
        missing = []
        for name, image in zip(names, images):
            candidates = self._label_candidates(name)
            found = next((c for c in candidates if cache.exists(c)), None)
            if found is None:
                missing.append((image, candidates[0]))
            labels.append(found)
        if missing:
            image, expected = missing[0]
            more = f" ({len(missing)} images without label)" if len(missing) > 1 else ""
            raise DatasetError(f"{self.display}: image {image} has no label {expected}{more}")
        return labels

    def _drop_mismatched(self) -> None:
        keep, dropped = [], []
        for (img, lbl), name in zip(self.samples, self.names):
            try:
                same = _io.image_size(img) == _io.image_size(lbl)
            except DatasetError:
                same = True  # unreadable: reported when the sample is loaded
            (keep if same else dropped).append(((img, lbl), name))
        if dropped:
            shown = ", ".join(str(s[0][1]) for s in dropped[:3])
            warnings.warn(
                f"{self.display}: skipped {len(dropped)} sample(s) whose label size differs from the image "
                f"size: {shown}{' ...' if len(dropped) > 3 else ''}",
                SegadaptWarning, stacklevel=3,
            )
        if not keep:
            raise DatasetError(f"{self.display}: every sample in {self.root} has a label/image size mismatch")
        self.samples = [s for s, _ in keep]
        self.names = [n for _, n in keep]

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.samples)

    def _index(self, index) -> int:
        i = operator.index(index)
        n = len(self.samples)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {self.display} of {n} samples")
        return i

    def load_label_train_ids(self, index) -> np.ndarray:
        """Train-id map (uint8, ignore 255) of sample ``index`` at the label's own resolution."""
        i = self._index(index)
        path = self.samples[i][1]
        if path is None:
            raise DatasetError(f"{self.display}: sample {self.names[i]} has no label (labels are off)")
        raw = self._read_label_raw(path)
        if not self._lossy_warned:
            self._warn_if_jpeg(path)
        return map_labels(raw, self._lut_for(path), path)

    def _warn_if_jpeg(self, path: Path) -> None:
        """Once per dataset (per data worker): a JPEG label file, whatever its name, has class ids
        changed at every edge by the compression. Training goes on (the damage is at edges, and
        the user may know); `segadapt prepare --check` lists every such file, and catches
        formerly-JPEG PNGs too, which would cost a scan of every label here."""
        try:
            with open(path, "rb") as f:
                is_jpeg = f.read(3) == b"\xff\xd8\xff"
        except OSError:
            return
        if is_jpeg:
            self._lossy_warned = True
            warnings.warn(f"{self.display}: label {path} is a JPEG file: lossy compression changes class ids at "
                          "every edge and training learns them; save labels as PNG (`segadapt prepare --check` "
                          "lists every lossy label)", SegadaptWarning, stacklevel=3)

    def _fit_label(self, label: np.ndarray, image_hw: Tuple[int, int], path: Path, image_path: Path) -> np.ndarray:
        if label.shape == image_hw:
            return label
        lh, lw = label.shape
        ih, iw = image_hw
        problem = f"label {path} is {lw}x{lh} but image {image_path} is {iw}x{ih}"
        if self.size_mismatch == "error":
            raise DatasetError(f"{self.display}: {problem} (size_mismatch: error)")
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(f"{self.display}: {problem}; label nearest-resized to the image size", SegadaptWarning,
                          stacklevel=3)
        return resize_label(label, (iw, ih))

    def _crop(self, image, label, rng):
        """Random crop; with ``cat_max_ratio`` < 1 (mmseg's RandomCrop) the window is re-drawn,
        up to 10 times, until it holds more than one labelled class and none covers
        ``cat_max_ratio`` or more of its labelled pixels (the 11th window is kept unchecked)."""
        if label is None or self.cat_max_ratio >= 1.0:
            return random_crop(image, label, self.crop, rng)
        image, label = pad_to(image, label, self.crop)  # once, not per attempt
        for _ in range(10):
            img_c, lbl_c = random_crop(image, label, self.crop, rng)
            counts = np.bincount(lbl_c[lbl_c != IGNORE_INDEX].ravel().astype(np.int64))
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                return img_c, lbl_c
        return random_crop(image, label, self.crop, rng)

    def _class_crop(self, image, label, rng, class_id: int, min_pixels: int, attempts: int):
        """Rare class sampling (DAFormer): a crop, then up to ``attempts`` re-draws while it holds
        ``min_pixels`` or fewer pixels of ``class_id`` (at most attempts + 1 crops; the last is kept)."""
        img_c, lbl_c = self._crop(image, label, rng)
        if label is None:
            return img_c, lbl_c
        for _ in range(attempts):
            if int(np.count_nonzero(lbl_c == class_id)) > min_pixels:
                break
            img_c, lbl_c = self._crop(image, label, rng)
        return img_c, lbl_c

    def __getitem__(self, key) -> dict:
        """``index`` | ``(index, seed)`` | ``(index, seed, class_id, min_pixels[, attempts=10])``.

        The long form (rare class sampling) re-draws the crop until it holds
        ``min_pixels`` of ``class_id`` (see ``_class_crop``).
        """
        crop_class = None
        if isinstance(key, tuple):
            if len(key) == 2:
                index, seed = key
            elif len(key) in (4, 5):
                index, seed, crop_class, crop_min_pixels = key[:4]
                crop_attempts = key[4] if len(key) == 5 else 10
            else:
                raise TypeError(
                    f"dataset key must be an index, (index, seed) or (index, seed, class_id, min_pixels[, attempts]), "
                    f"got {key!r}")
            rng = np.random.default_rng(seed)
        else:
            index, rng = key, None
        i = self._index(index)
        image_path, label_path = self.samples[i]
        image, label = self._cache.get(i) or self._decode(i)
        if rng is not None:
            if self.crop is not None and crop_class is not None:
                image, label = self._class_crop(image, label, rng, crop_class, crop_min_pixels, crop_attempts)
            elif self.crop is not None:
                image, label = self._crop(image, label, rng)
            if self.flip:
                image, label = random_hflip(image, label, rng)
        item = Sample(image=to_tensor(image), index=i, name=self.names[i])
        item.files = {"image": image_path, "label": label_path}
        if label is not None and not self.with_labels:
            item["valid_pseudo_mask"] = torch.from_numpy((label == 1).astype(np.float32))
        elif label is not None:
            item["label"] = label_to_tensor(label)
        return item

    def _decode(self, i: int):
        """Sample ``i``'s image (and train-id label) as read and resized, before augmentation;
        kept read-only in ``self._cache`` when the dataset option ``cache`` is on."""
        image_path, label_path = self.samples[i]
        image = _io.read_image(image_path)
        label = None
        if self.with_labels and label_path is not None:
            label = self.load_label_train_ids(i)
            label = self._fit_label(label, image.shape[:2], label_path, image_path)
        elif self.pseudo_margins:
            # an unlabelled image's label slot carries where its pseudo-labels may weigh (1): it is
            # resized, cropped and flipped with the image, padded as 255 (no weight)
            label = margin_mask(image.shape[:2], self.pseudo_margins)
        if self.resize is not None:
            size = keep_ratio_size(image.shape[1::-1], self.resize) if self.resize_keep_ratio else self.resize
            image = resize_image(image, size, self.resize_interpolation)
            if label is not None and not self.keep_label_size:
                # mmcv resizes label maps with OpenCV's nearest neighbour, ADVENT with Pillow's
                cv2_like = self.resize_interpolation == "bilinear"
                label = resize_label_cv2_nearest(label, size) if cv2_like else resize_label(label, size)
        if self.cache:
            for a in (image, label):
                if a is not None:
                    a.setflags(write=False)  # shared by every later draw of this sample
            self._cache[i] = (image, label)
        return image, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, samples={len(self)}, labels={self.with_labels})"


def margin_mask(hw, margins) -> np.ndarray:
    """(H, W) uint8: 1 inside the image, 0 in the [top, bottom, left, right] margins."""
    top, bottom, left, right = margins
    mask = np.ones(hw, dtype=np.uint8)
    mask[:top] = 0
    mask[hw[0] - bottom:] = 0
    mask[:, :left] = 0
    mask[:, hw[1] - right:] = 0
    return mask


# ---------------------------------------------------------------------- layouts


class GTA5Dataset(SegDataset):
    """``<root>/images/NNNNN.png`` + ``<root>/labels/NNNNN.png`` (Cityscapes label ids)."""

    kind = "gta5"
    display = "GTA5"
    _image_dir = "images"
    _label_dir = "labels"

    def __init__(self, cfg) -> None:
        split = getattr(cfg, "split", "train")
        if not getattr(cfg, "list_file", None) and split not in ("all", "train"):
            raise ConfigError(
                f"{self.display} has no built-in split {split!r}; use split 'all' or give a list_file"
            )
        super().__init__(cfg)

    def _image_folder(self) -> Path:
        return self.root / self._image_dir

    def _label_folder(self) -> Path:
        return self.root / self._label_dir

    def _all_names(self) -> List[str]:
        return _list_files(self._image_folder(), ".png")

    def _normalize_listed(self, name: str) -> str:
        return name if name.lower().endswith(".png") else name + ".png"

    def _image_path(self, name: str) -> Path:
        return self._image_folder() / name

    def _label_candidates(self, name: str) -> List[Path]:
        return [self._label_folder() / name]


class SynthiaDataset(GTA5Dataset):
    """``<root>/RGB/NNNNNNN.png`` + ``<root>/GT/LABELS/NNNNNNN.png`` (16-bit, class in channel 0)."""

    kind = "synthia"
    display = "SYNTHIA"
    _image_dir = "RGB"
    _label_dir = os.path.join("GT", "LABELS")

    def _read_label_raw(self, path: Path) -> np.ndarray:
        return _io.read_synthia_label(path)

    def _default_lut(self, path: Path) -> np.ndarray:
        return synthia_lut()


class CityscapesDataset(SegDataset):
    """``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` + ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png``.

    ``_gtFine_labelTrainIds.png`` is used where the labelIds file is absent.
    Sample names are ``<city>/<name>``.
    """

    kind = "cityscapes"
    display = "Cityscapes"

    def _image_folder(self) -> Path:
        return self.root / "leftImg8bit" / self.split

    def _label_folder(self) -> Path:
        return self.root / "gtFine" / self.split

    def _all_names(self) -> List[str]:
        folder = self._image_folder()
        names = []
        with os.scandir(folder) as it:
            cities = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        for city in cities:
            for f in _list_files(folder / city, _CS_IMAGE_SUFFIX):
                names.append(f"{city}/{f[: -len(_CS_IMAGE_SUFFIX)]}")
        return names

    def _normalize_listed(self, name: str) -> str:
        name = name.replace("\\", "/")
        for suffix in (_CS_IMAGE_SUFFIX, ".png"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    def _image_path(self, name: str) -> Path:
        return self._image_folder() / (name + _CS_IMAGE_SUFFIX)

    def _label_candidates(self, name: str) -> List[Path]:
        base = self._label_folder()
        return [base / (name + _CS_LABEL_SUFFIX), base / (name + _CS_TRAIN_LABEL_SUFFIX)]

    def _default_lut(self, path: Path) -> np.ndarray:
        return train_id_lut() if path.name.endswith(_CS_TRAIN_LABEL_SUFFIX) else cityscapes_lut()


class FolderDataset(SegDataset):
    """Every image (png/jpg/jpeg/bmp) under ``root``, recursively, sorted; no labels.

    Sample names are paths relative to root (with '/').
    """

    kind = "folder"
    display = "image folder"

    def __init__(self, cfg) -> None:
        if bool(getattr(cfg, "labels", True)):
            raise ConfigError("a 'folder' dataset has no labels; set labels: false")
        super().__init__(cfg)

    def _image_folder(self) -> Path:
        return self.root

    def _all_names(self) -> List[str]:
        names = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    names.append((rel / f).as_posix())
        return sorted(names)

    def _image_path(self, name: str) -> Path:
        return self.root / name


# the built-in layouts, in the order messages list them
for _kind, _cls in (("gta5", GTA5Dataset), ("cityscapes", CityscapesDataset), ("synthia", SynthiaDataset),
                    ("folder", FolderDataset)):
    DATASETS.register(_kind)(_cls)


def restyled_eval_note(root) -> Optional[str]:
    """First line of the marker when ``root`` is a copy with a restyled evaluation split, else None.

    Results on such a copy are not the standard benchmark, so the evaluators
    record this line in the results and warn.
    """
    marker = Path(root) / RESTYLED_EVAL_MARKER if root else None
    if marker is None or not marker.is_file():
        return None
    lines = marker.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return lines[0] if lines else f"{root} has a restyled evaluation split"


def build_dataset(cfg) -> SegDataset:
    """Dataset for ``cfg.kind`` (a registered reader, see ``segadapt.registry.DATASETS``)."""
    kind = getattr(cfg, "kind", None)
    name = str(kind).lower() if kind is not None else None
    if name is None or name not in DATASETS:
        raise DatasetError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASETS.registered())}")
    return DATASETS.get(name)(cfg)
