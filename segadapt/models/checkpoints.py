"""Load published / saved segmenter weights by path, detecting the format.

Supported formats (detected from the file's keys):

* ``advent``      -- a plain state dict with DeepLabV2 key names (ADVENT
  releases; ``num_batches_tracked`` may be absent);
* ``imagenet_init`` -- the DeepLab/ADVENT ImageNet initialisation file: keys
  prefixed ``Scale.``; the prefix is stripped and ``layer5.*`` is skipped;
* ``classification`` -- a plain ImageNet classification ResNet state dict
  (``fc.*`` present); ``fc.*`` is skipped, the trunk loaded;
* ``segadapt``    -- ``{'model': state_dict, 'format': 'segadapt', ...}``;
* ``mmseg``       -- an mmseg ``EncoderDecoder``: ``backbone.*`` + ``decode_head.*``. A UDA
  checkpoint (``model.`` / ``ema_model.`` / ``imnet_model.`` / extra heads) gives its
  ``model.`` segmenter, the one DAFormer's test script evaluates. The model maps the keys
  (``adapt_checkpoint``): DeepLabV2 takes DAFormer / CONFETI's ResNetV1c + ``DLV2Head``
  (``decode_head.aspp_modules.i.conv.*`` -> ``layer6.conv2d_list.i.*``, ``resnet_style='v1c'``
  only); the encoder-decoder (MiT / DINOv2 + DAFormer head) has mmseg's layout itself;
* ``pretrained_backbone`` -- a published pre-trained backbone file for the encoder-decoder
  (``mit_b*.pth``, ``dinov2_vit*14_pretrain.pth``): its keys go under ``backbone.``, its
  classifier is skipped;
* any of the above inside ``{'state_dict': ...}``, with ``module.`` (DDP) or
  ``_orig_mod.`` (torch.compile) prefixes.

Initialisation files (``imagenet_init``, ``classification``, ``pretrained_backbone``) only need to
cover the trunk: the classifiers may be missing, and classifier tensors whose
shape differs (another number of classes) are skipped with a warning. A full
checkpoint (``advent``, ``segadapt``) must match the model exactly in the
trunk; any difference raises ``CheckpointError`` naming the file and the
mismatch. Its classifier (``layer5``/``layer6``) may differ only when
``strict_head=False`` (then those tensors are skipped with a warning).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from segadapt.errors import CheckpointError, SegadaptWarning

__all__ = ["LoadReport", "read_checkpoint", "extract_state_dict", "load_pretrained", "load_state_dict_checked"]

log = logging.getLogger(__name__)

DEFAULT_HEAD_PREFIXES: Tuple[str, ...] = ("layer5.", "layer6.")
INIT_FORMATS = ("imagenet_init", "classification", "pretrained_backbone")  # weights without trained heads
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_MMSEG_HEAD = re.compile(r"^decode_head\.aspp_modules\.(\d+)\.conv\.(weight|bias)$")
_N_EXAMPLES = 3


@dataclass
class LoadReport:
    """What ``load_pretrained`` did."""

    path: str
    format: str
    loaded: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # in the file, not loaded
    missing: List[str] = field(default_factory=list)  # in the model, left as initialised

    def __str__(self) -> str:
        return (
            f"{self.path} ({self.format}): loaded {len(self.loaded)} tensors, "
            f"skipped {len(self.skipped)}, left initialised {len(self.missing)}"
        )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _examples(keys: Sequence[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_N_EXAMPLES])
    return shown + (", ..." if len(keys) > _N_EXAMPLES else "")


def describe_mismatch(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str]) -> str:
    """'N missing keys (e.g. ...); N unexpected keys (...); N shape mismatches (...)', empty parts left out."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {_examples(shapes)})")
    return "; ".join(parts)


def read_checkpoint(path: str | os.PathLike) -> object:
    """``torch.load`` the file on CPU; any failure becomes a one-line ``CheckpointError``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: file not found")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: is a directory, expected a .pth file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path}: empty file (0 bytes), not a PyTorch checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(e)
        if refused is None:
            raise CheckpointError(f"checkpoint {path}: not a readable PyTorch file ({_load_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a non-torch file
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch file ({_load_reason(e)})") from None
    # Older checkpoints keep plain Python objects next to the weights (an
    # argparse.Namespace, numpy scalars). The safe loader reads those once they
    # are allowlisted; the full unpickler could run code from the file, so it
    # is never used (nor suggested).
    try:
        with torch.serialization.safe_globals(_LEGACY_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        other = _refused_global(e) or refused
        raise CheckpointError(
            f"checkpoint {path}: holds a Python object ({other}) that the safe loader refuses; "
            "re-save only its tensors, e.g. torch.save(model.state_dict(), path)") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch file ({_load_reason(e)})") from None
    warnings.warn(
        f"checkpoint {path} holds non-tensor Python objects ({refused}); read by the safe loader with an "
        "allowlist of plain types (never with weights_only=False)",
        SegadaptWarning, stacklevel=2,
    )
    return obj


def _legacy_safe_globals() -> list:
    import argparse

    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    names = [argparse.Namespace, np.dtype, np.ndarray, multiarray.multiarray.scalar, multiarray.multiarray._reconstruct]
    names += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object)) if n.endswith("DType")]
    return names


_LEGACY_SAFE_GLOBALS = _legacy_safe_globals()


def _refused_global(error: Exception) -> Optional[str]:
    """`module.Name` of the global that torch's safe unpickler refused, else None."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return m.group(1) if m else None


def _load_reason(error: Exception) -> str:
    """A short cause from torch.load's error, without its advice to disable the safe loader."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    reason = lines[0].split(". ")[0] if lines else ""
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)[:160]
    if isinstance(error, EOFError):
        return "the file ends early: truncated"
    if not isinstance(error, (pickle.UnpicklingError, RuntimeError)) or not reason:
        reason = f"{type(error).__name__}{': ' + reason if reason else ''}"
    return reason + "; corrupt, or not a checkpoint"


def _strip_prefix(sd: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def extract_state_dict(obj: object, path: str = "<object>") -> Tuple[Dict[str, Tensor], str]:
    """Unwrap a loaded checkpoint to ``(state_dict, format)``.

    ``format`` is one of ``'advent'``, ``'imagenet_init'``, ``'classification'``,
    ``'segadapt'``, ``'mmseg'``.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path}: expected a dict of tensors, found {type(obj).__name__}")
    fmt: Optional[str] = None
    if "model" in obj and isinstance(obj["model"], Mapping):
        fmt = "segadapt"
        obj = obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad or not obj:
        detail = f"non-tensor entries ({_examples([str(k) for k in bad])})" if bad else "no tensors"
        raise CheckpointError(f"checkpoint {path}: not a model state dict: {detail}")
    sd: Dict[str, Tensor] = dict(obj)
    for prefix in _STRIP_PREFIXES:
        sd = _strip_prefix(sd, prefix)
    if fmt is None and any(k.startswith("model.backbone.") for k in sd):
        # mmseg UDA wrapper (DAFormer/CONFETI): keep the student segmenter
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if fmt is None and any(k.startswith("backbone.") for k in sd):
        fmt = "mmseg"  # keys as in the file: the model maps them (``adapt_checkpoint``)
    if fmt is None:
        if any(k.startswith("Scale.") for k in sd):
            fmt = "imagenet_init"
            sd = {k[len("Scale."):]: v for k, v in sd.items() if k.startswith("Scale.")}
            # The DeepLab init file's layer5 is its own classifier (ImageNet /
            # VOC classes), never ours: always skipped by name.
        elif "fc.weight" in sd:
            fmt = "classification"
        else:
            fmt = "advent"
    return sd, fmt


def mmseg_to_deeplabv2(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """mmseg EncoderDecoder keys -> ours; keys with no counterpart stay as they are (reported unexpected)."""
    out: Dict[str, Tensor] = {}
    for k, v in sd.items():
        head = _MMSEG_HEAD.match(k)
        if k.startswith("backbone."):
            k = k[len("backbone."):]
        elif head:
            k = f"layer6.conv2d_list.{head.group(1)}.{head.group(2)}"
        out[k] = v
    return out


def _is_head(key: str, head_prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in head_prefixes)


def load_state_dict_checked(
    model: nn.Module,
    sd: Dict[str, Tensor],
    fmt: str,
    path: str = "<state dict>",
    strict_head: bool = False,
    trained: bool = False,
) -> LoadReport:
    """Load an already-unwrapped state dict with the rules of ``load_pretrained``;
    ``trained=True`` refuses initialisation files (a segmenter to evaluate must have its heads)."""
    head_prefixes: Sequence[str] = getattr(model, "HEAD_PREFIXES", DEFAULT_HEAD_PREFIXES)
    adapt = getattr(model, "adapt_checkpoint", None)
    if adapt is not None:
        sd, fmt = adapt(sd, fmt)
    if trained and fmt in INIT_FORMATS:
        raise CheckpointError(f"{path} is an initialisation file ({fmt}: a backbone's pre-trained weights), "
                              "not a trained segmenter")
    style = getattr(model, "resnet_style", None)
    if fmt == "mmseg" and style is not None and style != "v1c":
        # same keys as the caffe-style trunk with the v1c stem, another network
        raise CheckpointError(
            f"checkpoint {path} (mmseg) holds an mmseg ResNetV1c segmenter; the model is "
            f"resnet_style={style!r}: set model.resnet_style=v1c"
        )
    init_file = fmt in INIT_FORMATS
    target = model.state_dict()
    report = LoadReport(path=path, format=fmt)

    to_load: Dict[str, Tensor] = {}
    unexpected: List[str] = []
    shape_bad: List[str] = []
    head_skipped: List[str] = []
    for k, v in sd.items():
        if fmt == "imagenet_init" and k.startswith("layer5."):
            report.skipped.append(k)
            continue
        if fmt == "classification" and k.startswith("fc."):
            report.skipped.append(k)
            continue
        if k not in target:
            if k.endswith("num_batches_tracked"):
                report.skipped.append(k)
            elif _is_head(k, head_prefixes) and (init_file or not strict_head):
                head_skipped.append(k)
            else:
                unexpected.append(k)
            continue
        if tuple(v.shape) != tuple(target[k].shape):
            if _is_head(k, head_prefixes) and (init_file or not strict_head):
                head_skipped.append(f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}")
            else:
                shape_bad.append(f"{k} file {tuple(v.shape)} vs model {tuple(target[k].shape)}")
            continue
        to_load[k] = v

    missing: List[str] = []
    allowed_missing: List[str] = []
    for k in target:
        if k in to_load or (k in sd and tuple(sd[k].shape) != tuple(target[k].shape)):
            continue  # loaded, or already named as a shape mismatch
        if k.endswith("num_batches_tracked") or (_is_head(k, head_prefixes) and (init_file or not strict_head)):
            allowed_missing.append(k)
        else:
            missing.append(k)

    if missing or unexpected or shape_bad:
        raise CheckpointError(
            f"checkpoint {path} ({fmt}) does not match the model "
            f"({type(model).__name__}): " + describe_mismatch(missing, unexpected, shape_bad) + _layout_hint(sd, model)
        )
    head_absent = [k for k in allowed_missing if not k.endswith("num_batches_tracked") and k not in sd]
    if head_absent and not init_file:
        warnings.warn(
            f"checkpoint {path} ({fmt}): no classifier weights for {len(head_absent)} model tensors "
            f"(left initialised; e.g. {_examples(head_absent)})",
            SegadaptWarning, stacklevel=3,
        )
    if head_skipped:
        warnings.warn(
            f"checkpoint {path} ({fmt}): classifier tensors not loaded (left initialised): "
            f"{len(head_skipped)} (e.g. {_examples(head_skipped)})",
            SegadaptWarning, stacklevel=3,
        )
        report.skipped.extend(k.split(":")[0] for k in head_skipped)

    try:
        result = model.load_state_dict(to_load, strict=False)
    except RuntimeError as e:  # should not happen after the checks above
        raise CheckpointError(f"checkpoint {path}: {_one_line(e)[:300]}") from None
    report.loaded = sorted(to_load)
    report.missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    log.info("%s", report)
    return report


def _layout_hint(sd: Dict[str, Tensor], model: nn.Module) -> str:
    """A pointer to the switch that builds the file's layout, when it is HRDA's and the model's not
    (or the reverse)."""
    file_hrda = any(k.startswith("decode_head.scale_attention.") for k in sd)
    model_hrda = any(k.startswith("decode_head.scale_attention.") for k in model.state_dict())
    if file_hrda and not model_hrda:
        return " (an HRDA checkpoint: set model.hrda.enabled=true, e.g. -c gta5_cityscapes/hrda_daformer_mitb5)"
    if model_hrda and not file_hrda:
        return " (a single-resolution checkpoint: the model has HRDA on, set model.hrda.enabled=false)"
    return ""


def load_pretrained(model: nn.Module, path: str | os.PathLike, strict_head: bool = False) -> LoadReport:
    """Load weights from ``path`` into ``model`` (in place); see the module doc.

    Returns a ``LoadReport`` (``format``, ``loaded``, ``skipped``, ``missing``).
    Raises ``CheckpointError`` (one line, naming the file) when the file is
    missing/unreadable or belongs to a different model.
    """
    path = os.fspath(path)
    obj = read_checkpoint(path)
    sd, fmt = extract_state_dict(obj, path)
    return load_state_dict_checked(model, sd, fmt, path=path, strict_head=strict_head)
