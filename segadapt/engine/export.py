"""Export the plain segmenter (no method state) to TorchScript or ONNX.

The exported graph takes a float RGB batch in [0, 1] of shape (1, 3, H, W) at
the export size (it normalises internally, like the eager model) and returns
the main logits at the model's output stride, or with `with_argmax` the train ids
(int64, (1, H, W)) after bilinear upsampling to the input size. Every export
is checked against the eager model on a random input.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError

__all__ = ["FORMATS", "ExportReport", "SegmenterExport", "export_segmenter", "require_onnx"]

FORMATS = ("torchscript", "onnx")
ONNX_HINT = "pip install 'segadapt[onnx]'"


class SegmenterExport(nn.Module):
    """What gets exported: image -> main logits (or upsampled argmax train ids)."""

    def __init__(self, model: nn.Module, with_argmax: bool = False):
        super().__init__()
        model = copy.deepcopy(model).cpu().eval()
        if getattr(model, "aux", False):
            model.drop_aux()
        self.model = model
        self.with_argmax = with_argmax

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.model(image)
        logits = out["main"] if isinstance(out, dict) else out
        if not self.with_argmax:
            return logits
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)


@dataclass
class ExportReport:
    path: Path
    format: str
    max_abs_diff: Optional[float]  # logits export; None when not checked or argmax
    mismatched_pixels: Optional[int]  # argmax export
    total_pixels: Optional[int]
    checked: bool
    note: str = ""

    def summary(self) -> str:
        if not self.checked:
            return f"exported {self.format} to {self.path} ({self.note})"
        if self.max_abs_diff is not None:
            check = f"max abs diff vs eager {self.max_abs_diff:.3g}"
        else:
            check = f"{self.mismatched_pixels} of {self.total_pixels} pixels differ from eager"
        return f"exported {self.format} to {self.path}; {check}" + (f" ({self.note})" if self.note else "")


def _compare(got: torch.Tensor, ref: torch.Tensor, with_argmax: bool, tolerance: Optional[float], fmt: str,
             path: Path) -> tuple[Optional[float], Optional[int]]:
    if tuple(got.shape) != tuple(ref.shape):
        raise CheckpointError(f"{fmt} export {path}: output shape {tuple(got.shape)} != eager {tuple(ref.shape)}")
    if with_argmax:
        bad = int((got.long() != ref.long()).sum())
        # near-ties may flip under a different kernel order; anything beyond that is a broken export
        allowed = ref.numel() * (tolerance if tolerance is not None else 1e-3)
        if bad > allowed:
            raise CheckpointError(f"{fmt} export {path}: {bad} of {ref.numel()} pixels differ from the eager model")
        return None, bad
    diff = float((got.float() - ref.float()).abs().max())
    tol = tolerance if tolerance is not None else 1e-4 * (1.0 + float(ref.abs().max()))
    if not diff <= tol:  # also catches NaN
        raise CheckpointError(f"{fmt} export {path}: max abs diff {diff:.3g} vs the eager model exceeds {tol:.3g}")
    return diff, None


def _metadata(model: nn.Module, size: tuple[int, int], with_argmax: bool, classes=None) -> dict:
    """What a consumer of the file needs: input, output, and the classes (names and colours of
    train ids 0..C-1: the dataset's class map, else Cityscapes' for 19 classes)."""
    from ..data.classmap import default_palette
    from .metrics import default_class_names

    n = int(getattr(model, "num_classes", 0))
    names = list(classes.names) if classes is not None else default_class_names(n)
    palette = classes.palette if classes is not None else default_palette(n)
    return {"producer": "segadapt", "input": f"float32 RGB in [0,1], shape (1, 3, {size[1]}, {size[0]})",
            "output": "train ids (1, H, W) int64" if with_argmax else f"logits (1, C, h, w) at output stride {model.output_stride}",
            "num_classes": n, "class_names": names, "palette": [[int(v) for v in c] for c in palette],
            "normalization": str(getattr(model, "normalization", "")), "size_wh": list(size)}


def export_segmenter(model: nn.Module, fmt: str, out: str | os.PathLike, size: Sequence[int],
                     with_argmax: bool = False, tolerance: Optional[float] = None,
                     opset: Optional[int] = None, classes=None) -> ExportReport:
    """Export `model` to `out` and verify the file's outputs against eager mode.

    `size` is (W, H). `tolerance`: max abs logit difference (default
    1e-4 * (1 + max |logit|)), or for argmax exports the allowed fraction of
    differing pixels (default 1e-3). Raises `ConfigError` for a missing ONNX
    package and `CheckpointError` when the check fails. `classes` (a `ClassMap`) names the
    classes in the file's metadata (default: Cityscapes' for 19 classes).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"--size: expected W H with positive sizes, got {list(size)}")
    w, h = int(size[0]), int(size[1])
    if tolerance is not None and not (0 <= tolerance and (not with_argmax or tolerance <= 1)):
        what = "a fraction of pixels in [0, 1]" if with_argmax else "a non-negative logit difference"
        raise ConfigError(f"--tolerance: expected {what}, got {tolerance}")
    _check_memory(w, h)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create its folder ({e.strerror or e})") from None
    wrapper = SegmenterExport(model, with_argmax).eval()
    example = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    probe = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))  # not the tracing input
    with torch.no_grad():
        ref = wrapper(probe)
    meta = _metadata(model, (w, h), with_argmax, classes)
    if fmt == "torchscript":
        return _export_torchscript(wrapper, example, probe, ref, out, meta, with_argmax, tolerance)
    return _export_onnx(wrapper, example, probe, ref, out, meta, with_argmax, tolerance, opset)


#: rough peak of an eager forward, in copies of the input image: a few feature maps of a
#: stride-8 network alive at once (DeepLabV2's layer4: 2048 channels at 1/64 of the pixels)
MEMORY_PER_INPUT = 64


def _available_memory() -> Optional[int]:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(w: int, h: int) -> None:
    """Refuse a size whose forward passes cannot fit in memory (the kernel would kill the process,
    no error to report): an estimate, `MEMORY_PER_INPUT` copies of the float input."""
    need = MEMORY_PER_INPUT * 3 * 4 * w * h
    available = _available_memory()
    if available is not None and need > available:
        raise ConfigError(f"--size {w} {h}: exporting at this size needs about {need / 2**30:.1f} GiB of memory "
                          f"(an estimate), {available / 2**30:.1f} GiB are available: choose a smaller size")


def _export_torchscript(wrapper, example, probe, ref, out, meta, with_argmax, tolerance) -> ExportReport:
    with warnings.catch_warnings():
        # torch.jit is deprecated in recent torch but remains the way to ship a
        # Python-free model; the user asked for it explicitly. Tracer warnings say that shapes
        # become constants: the graph is built for one input size, and checked below
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, example, check_trace=False)
        except Exception as e:  # noqa: BLE001 - tracer failures come in many types
            raise CheckpointError(f"TorchScript export to {out} failed: {_one_line(e)}") from None
        # serialised in memory, then written by Python: torch's C++ file writer aborts the
        # process on a full disk (an exception in a destructor), a Python write is an OSError
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"segadapt.json": json.dumps(meta)})
        _write_bytes(out, buffer.getvalue())
        del buffer
        loaded = torch.jit.load(str(out), map_location="cpu")
        with torch.no_grad():
            got = loaded(probe)
    diff, bad = _compare(got, ref, with_argmax, tolerance, "torchscript", out)
    return ExportReport(out, "torchscript", diff, bad, ref.numel() if with_argmax else None, True)


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _write_bytes(out: Path, data: bytes) -> None:
    """`data` to `out` all or nothing; OutputError("cannot write <out>: <cause>") on failure."""
    from ..utils.files import atomic_write

    with atomic_write(out) as f:
        f.write(data)


def require_onnx() -> None:
    """One-line `ConfigError` unless the ONNX exporter's packages are importable."""
    for name in ("onnx", "onnxscript"):  # torch.onnx.export (the dynamo exporter) needs both
        try:
            __import__(name)
        except ImportError:
            raise ConfigError(f"ONNX export needs the '{name}' package: {ONNX_HINT}") from None


def _export_onnx(wrapper, example, probe, ref, out, meta, with_argmax, tolerance, opset) -> ExportReport:
    require_onnx()
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not 1 <= opset <= newest:
        raise ConfigError(f"--opset {opset}: the installed onnx package knows opsets 1 to {newest}")
    kwargs = {"opset_version": opset} if opset else {}
    # exporter chatter: deprecations, "torchvision is not installed", the version converter's
    # tracebacks when it cannot convert (checked below instead)
    quiet = {name: logging.getLogger(name) for name in ("torch.onnx", "onnxscript")}
    old_levels = {name: log.level for name, log in quiet.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, log in quiet.items():
            log.setLevel(logging.ERROR if name == "torch.onnx" else logging.CRITICAL)
        try:
            # built in memory (no file argument), written below through the atomic writer
            program = torch.onnx.export(wrapper, (example,), None, input_names=["image"],
                                        output_names=["labels" if with_argmax else "logits"], dynamo=True,
                                        external_data=False, verbose=False, **kwargs)
            proto = program.model_proto
        except Exception as e:  # noqa: BLE001 - exporter failures come in many types
            raise CheckpointError(f"ONNX export to {out} failed: {_one_line(e)}") from None
        finally:
            for name, log in quiet.items():
                log.setLevel(old_levels[name])
    made = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and made != opset:  # the exporter falls back to its own opset, silently
        raise CheckpointError(f"--opset {opset}: the exporter could not convert this model to opset {opset} "
                              f"(it made opset {made}); choose one from {made} to {newest}")
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"segadapt.{key}", json.dumps(value)
    onnx.checker.check_model(proto)
    _write_bytes(out, proto.SerializeToString())
    del program, proto
    try:
        import onnxruntime as ort
    except ImportError:
        return ExportReport(out, "onnx", None, None, None, False,
                            note=f"onnxruntime not installed, output check skipped: {ONNX_HINT}")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0])
    diff, bad = _compare(got, ref, with_argmax, tolerance, "onnx", out)
    return ExportReport(out, "onnx", diff, bad, ref.numel() if with_argmax else None, True)
