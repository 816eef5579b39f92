"""Run a trained segmenter on image files: the library side of `segadapt predict`.

    model, cfg = load_segmenter("runs/x/seed0")            # run folder or .pth
    predictor = Predictor(model, "cuda", infer_kwargs_from(cfg), size=(1024, 512))
    summary = predictor.predict_paths(collect_images(["photos/"])[0], "out/")

Each image is resized to the model input size (`size`, or its own size), the
class scores are upsampled back to the image's original size (bilinear) and
argmaxed, exactly as the evaluator does for labels, one band of rows at a time
(memory stays bounded for very large images). Images of the same
original size are batched together; one device->host copy per batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..data.datasets import IMAGE_EXTENSIONS
from ..data.io import image_size, read_image, write_png
from ..data.labels import colorize
from ..data.transforms import resize_image, to_tensor
from ..errors import CheckpointError, ConfigError, DatasetError
from ..utils.distributed import resolve_device  # noqa: F401 - part of this module's API
from .inference import strip_scores, view_logits
from .evaluator import inference_options

__all__ = [
    "resolve_checkpoint",
    "resolve_device",
    "load_segmenter",
    "load_segmenter_and_classes",
    "infer_kwargs_from",
    "collect_images",
    "Prediction",
    "PredictSummary",
    "Predictor",
    "OUTPUT_SUFFIXES",
]

#: files written per image by `Predictor.predict_paths` (entropy/confidence only on request)
OUTPUT_SUFFIXES = ("_color.png", "_overlay.png", "_trainid.png", "_entropy.png", "_confidence.png")


# --------------------------------------------------------------------------- loading
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its `final.pth`, else `last.pth`)."""
    p = Path(path)
    if p.is_dir():
        for name in ("final.pth", "last.pth"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"run folder {p} holds no final.pth or last.pth")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_segmenter(checkpoint: str | os.PathLike, config: Optional[str] = None,
                   overrides: Sequence[str] = ()):
    """(plain segmenter in eval mode on CPU, Config) from a checkpoint.

    A segadapt checkpoint carries its config; other weights (ADVENT `.pth`)
    need `config` for the architecture. `config`, when given, wins over the
    stored one. Only the segmenter is loaded: method state (discriminators,
    memory banks) is ignored; a checkpoint's `eval_model` weights (the
    segmenter its evaluation used, e.g. an EMA teacher) win over `model`.
    """
    model, cfg, _ = load_segmenter_and_classes(checkpoint, config, overrides)
    return model, cfg


def _inline_missing_class_maps(stored: dict, classes: Mapping) -> dict:
    """The stored config with each class-map file that is not here (another machine) replaced by
    the class map the checkpoint carries, so that the config still loads."""
    import copy

    stored = copy.deepcopy(stored)
    for section in (stored.get("source"), stored.get("target"), (stored.get("eval") or {}).get("data")):
        spec = section.get("class_map") if isinstance(section, dict) else None
        if isinstance(spec, str) and not Path(os.path.expanduser(spec)).is_file():
            section["class_map"] = dict(classes)
    return stored


def load_segmenter_and_classes(checkpoint: str | os.PathLike, config: Optional[str] = None,
                               overrides: Sequence[str] = ()):
    """`load_segmenter`, plus the classes the model predicts: a `ClassMap` (names, colours), the
    one the checkpoint carries unless `config` is given, else the config's evaluation data's;
    None for the 19 Cityscapes classes. A config whose number of
    classes is not the checkpoint's is one CheckpointError line."""
    from ..config import CONFIG_FORMAT, load_config
    from ..data.classmap import class_map_from_dict, classes_of
    from ..models.checkpoints import extract_state_dict, load_state_dict_checked, read_checkpoint
    from ..models.segmenter import build_segmenter
    from .checkpoint import FORMAT

    path = resolve_checkpoint(checkpoint)
    obj = read_checkpoint(path)
    stored = obj.get("config") if isinstance(obj, Mapping) and obj.get("format") == FORMAT else None
    if config is None and stored is None:
        raise CheckpointError(f"{path} holds no segadapt config: pass --config for its model")
    carried = obj.get("classes") if stored is not None and isinstance(obj.get("classes"), Mapping) else None
    base = stored if config is None else None
    if base is not None and carried is not None:
        base = _inline_missing_class_maps(base, carried)
    cfg = load_config(config, list(overrides), base=base,
                      base_version=int(obj.get("version", 1)) if base is not None else CONFIG_FORMAT)
    if stored is not None:
        trained = int((stored.get("model") or {}).get("num_classes", 19))
        if trained != cfg.model.num_classes:
            spec = cfg.eval.data.class_map
            why = f" (eval.data.class_map {'(inline)' if isinstance(spec, dict) else spec})" if spec else ""
            raise CheckpointError(f"checkpoint {path} predicts {trained} classes, the config has "
                                  f"model.num_classes={cfg.model.num_classes}{why}: evaluate it on data with "
                                  f"{trained} classes")
    if config is None and carried is not None:  # what the model was trained to predict
        classes = class_map_from_dict(carried, f"classes stored in {path}")
    else:
        classes = classes_of(cfg.eval.data)
    if stored is not None and isinstance(obj.get("eval_model"), Mapping):
        # the weights that were evaluated (e.g. an EMA teacher), when the run saved them apart
        obj = {**obj, "model": obj["eval_model"]}
    sd, fmt = extract_state_dict(obj, str(path))
    # the stored model.pretrained is the *initialisation* the run started from:
    # not needed (and maybe not present) here
    model = build_segmenter(dataclasses.replace(cfg.model, pretrained=None))
    load_state_dict_checked(model, sd, fmt, path=str(path), strict_head=True, trained=True)
    return model.eval(), cfg, classes


def infer_kwargs_from(cfg) -> dict:
    """The evaluation protocol of a config as `predict_logits` keyword arguments."""
    return inference_options(cfg.eval)


# --------------------------------------------------------------------------- inputs
def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _folder_images(folder: Path) -> list[tuple[Path, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if _is_image(p):
                out.append((p, p.relative_to(folder).with_suffix("").as_posix()))
    return out


def collect_images(specs: Iterable[str]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and globs into `[(path, output name)]`.

    A folder's images keep their sub-path (`a/b/x.png` -> name `b/x` under
    folder `a`); a file's name is its stem. Duplicates are dropped; clashing
    names get `_2`, `_3`... Returns (images, failures) where failures are
    `(spec, reason)` for inputs that match nothing.
    """
    found: list[tuple[Path, str]] = []
    failures: list[tuple[str, str]] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            items = _folder_images(p)
            if not items:
                failures.append((spec, "no images (png/jpg/jpeg/bmp) in this folder"))
        elif p.is_file():
            items = [(p, p.stem)]
        elif glob.has_magic(spec):
            items = []
            for m in sorted(glob.glob(spec, recursive=True)):
                mp = Path(m)
                items += _folder_images(mp) if mp.is_dir() else [(mp, mp.stem)] if _is_image(mp) else []
            if not items:
                failures.append((spec, "no images match this pattern"))
        else:
            items = []
            failures.append((spec, "no such file or folder"))
        found += items

    images, seen_paths, used = [], set(), set()
    for path, name in found:
        key = os.path.realpath(path)
        if key in seen_paths:
            continue
        seen_paths.add(key)
        unique, k = name, 1
        while unique in used:
            k += 1
            unique = f"{name}_{k}"
        used.add(unique)
        images.append((path, unique))
    return images, failures


# --------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """One image's result at its original size."""

    train_ids: np.ndarray  # (H, W) uint8
    confidence: Optional[np.ndarray] = None  # (H, W) uint8: max softmax probability * 255
    entropy: Optional[np.ndarray] = None  # (H, W) uint8: entropy / log(C) * 255


@dataclass
class PredictSummary:
    written: list[Path] = field(default_factory=list)  # the `_trainid.png` of every image done
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)

    @property
    def ok(self) -> bool:
        return not self.failed


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5, palette=None) -> np.ndarray:
    """Blend the palette colours of `train_ids` (Cityscapes', or `palette`) over an (H, W, 3) uint8 image."""
    out = np.empty_like(image)
    rows = 256  # float temporaries for a band of rows, not for the whole (maybe huge) image
    for y in range(0, image.shape[0], rows):
        blend = ((1.0 - alpha) * image[y:y + rows].astype(np.float32)
                 + alpha * colorize(train_ids[y:y + rows], palette).astype(np.float32))
        out[y:y + rows] = np.clip(np.rint(blend), 0, 255)
    return out


class Predictor:
    """Batched inference of a plain segmenter on uint8 RGB images.

    `infer_kwargs` are `predict_logits` options (mode, crop, stride, scales,
    flip); `size` (W, H) is the model input size, None = each image's own.
    `strip_bytes` / `strip_rows`: the band of rows in which full-size scores are made.
    `palette`: (C, 3) colours of the written colour and overlay images (default Cityscapes').
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu",
                 infer_kwargs: Optional[Mapping] = None, size: Optional[Sequence[int]] = None,
                 batch_size: int = 1, amp_dtype: Optional[torch.dtype] = None,
                 strip_bytes: int = 64 << 20, strip_rows: Optional[int] = None, palette=None):
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {batch_size}")
        if size is not None and (len(size) != 2 or min(size) <= 0):
            raise ConfigError(f"--size: expected W H with positive sizes, got {list(size)}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.infer_kwargs = dict(infer_kwargs or {})
        self.size = (int(size[0]), int(size[1])) if size is not None else None
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        # full-size class scores exist one band of rows at a time: at most `strip_bytes`
        # of float32 per band (or exactly `strip_rows` rows)
        self.strip_bytes = int(strip_bytes)
        self.strip_rows = strip_rows
        self.palette = None if palette is None else np.asarray(palette, dtype=np.uint8)
        views = len(tuple(self.infer_kwargs.get("scales", (1.0,)))) * (2 if self.infer_kwargs.get("flip") else 1)
        self._returns_logits = views == 1  # several views come back as averaged probabilities

    # ------------------------------------------------------------------ arrays
    @torch.no_grad()
    def predict_arrays(self, images: Sequence[np.ndarray], maps: bool = False) -> list[Prediction]:
        """Predictions for (H, W, 3) uint8 RGB images that all have the same size.

        `maps=True` adds the confidence and normalised entropy maps. Only the
        low-resolution logits and the uint8 maps are kept whole: the class scores at
        the original size are made, argmaxed (and turned into confidence / entropy)
        a band of rows at a time (`strip_rows`), so a huge image does not need a
        full-size float map per class.
        """
        if not images:
            return []
        h, w = images[0].shape[:2]
        if any(im.shape[:2] != (h, w) for im in images):
            raise ValueError("predict_arrays needs images of one size; group them first")
        size = self.size or (w, h)
        batch = torch.stack([to_tensor(resize_image(im, size)) for im in images]).to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            views = view_logits(self.model, batch, **self.infer_kwargs)
        del batch
        align_corners = bool(self.infer_kwargs.get("align_corners", False))
        num_classes = views[0][0].shape[1]
        b = len(images)
        out = [torch.empty((b, h, w), dtype=torch.uint8, device=self.device)
               for _ in range(3 if maps else 1)]
        rows = self.strip_rows or max(1, self.strip_bytes // (4 * b * num_classes * w))
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            scores = strip_scores(views, (h, w), y0, y1, align_corners=align_corners)
            out[0][:, y0:y1] = scores.argmax(dim=1)
            if maps:
                probs = scores.softmax(dim=1) if self._returns_logits else scores
                ent = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1) / math.log(max(num_classes, 2))
                out[1][:, y0:y1] = _to_uint8(probs.amax(dim=1))
                out[2][:, y0:y1] = _to_uint8(ent)
            del scores
        host = [t.cpu().numpy() for t in out]  # one copy per batch and map
        return [Prediction(host[0][i], *(m[i] for m in host[1:])) for i in range(len(images))]

    # ------------------------------------------------------------------ files
    def predict_paths(self, images: Sequence[tuple[Path, str]], out_dir: str | os.PathLike,
                      entropy: bool = False, alpha: float = 0.5, progress: bool = True,
                      log: Optional[Callable[[str], None]] = None) -> PredictSummary:
        """Predict `[(path, name)]` (see `collect_images`) and write, under `out_dir`,
        `<name>_color.png`, `<name>_overlay.png`, `<name>_trainid.png` and with
        `entropy` also `<name>_entropy.png`, `<name>_confidence.png`.

        An unreadable image is reported through `log` (default: stderr) and
        skipped; it is listed in the summary's `failed`.
        """
        from tqdm import tqdm

        out_dir = Path(out_dir)
        summary = PredictSummary()
        bar = tqdm(total=len(images), desc="predict", dynamic_ncols=True, disable=not progress)

        def fail(path, reason: str) -> None:
            summary.failed.append((str(path), reason))
            message = f"warning: skipped {path}: {reason}"
            if log is not None:
                log(message)
            else:
                bar.write(message, file=sys.stderr)
            bar.update(1)

        # group by original size from the file headers (cheap; pixels are read per batch)
        groups: dict[tuple[int, int], list[tuple[Path, str]]] = defaultdict(list)
        for path, name in images:
            try:
                w, h = image_size(path)
            except DatasetError as e:
                fail(path, _reason(e, path))
                continue
            groups[(h, w)].append((path, name))

        chunks = [((h, w), members[i:i + self.batch_size])
                  for (h, w), members in groups.items() for i in range(0, len(members), self.batch_size)]
        # decoding and PNG encoding are the slow parts next to a GPU: threads read
        # the next chunk and write the last one while the device works
        with ThreadPoolExecutor(2) as readers, ThreadPoolExecutor(2) as writers:
            def read(k):
                return [readers.submit(_try_read, p) for p, _ in chunks[k][1]] if k < len(chunks) else []

            next_reads, pending = read(0), []
            for k, ((h, w), chunk) in enumerate(chunks):
                loaded = [f.result() for f in next_reads]
                next_reads = read(k + 1)
                good = []
                for (path, name), (image, error) in zip(chunk, loaded):
                    if error is None and image.shape[:2] != (h, w):
                        error = "unreadable image: pixel data does not match its header size"
                    if error is not None:
                        fail(path, error)
                    else:
                        good.append((path, name, image))
                if not good:
                    continue
                preds = self.predict_arrays([g[2] for g in good], maps=entropy)
                for (path, name, image), pred in zip(good, preds):
                    pending.append((path, writers.submit(_write_outputs, out_dir, name, image, pred, alpha,
                                                         self.palette)))
                self._drain(pending, summary, fail, bar, keep=2 * self.batch_size)
            self._drain(pending, summary, fail, bar, keep=0)
        bar.close()
        return summary

    @staticmethod
    def _drain(pending, summary, fail, bar, keep: int):
        """Collect finished writes, keeping at most `keep` in flight (bounded memory)."""
        while len(pending) > keep:
            path, future = pending.pop(0)
            try:
                summary.written.append(future.result())
                bar.update(1)
            except OSError as e:
                fail(path, f"cannot write its outputs: {e.strerror or e}")


def _reason(error: Exception, path) -> str:
    text = str(error)
    prefix = f"cannot read image {path}: "
    return "unreadable image: " + (text[len(prefix):] if text.startswith(prefix) else text)


def _try_read(path: Path):
    try:
        return read_image(path), None
    except DatasetError as e:
        return None, _reason(e, path)


def _write_outputs(out_dir: Path, name: str, image: np.ndarray, pred: Prediction, alpha: float,
                   palette=None) -> Path:
    trainid = out_dir / f"{name}_trainid.png"
    write_png(trainid, pred.train_ids)
    write_png(out_dir / f"{name}_color.png", colorize(pred.train_ids, palette))
    write_png(out_dir / f"{name}_overlay.png", overlay(image, pred.train_ids, alpha, palette))
    if pred.entropy is not None:
        write_png(out_dir / f"{name}_entropy.png", pred.entropy)
        write_png(out_dir / f"{name}_confidence.png", pred.confidence)
    return trainid
