"""Checkpoint-file helpers: atomic torch.save, the RNG states a resumed run restores, and a
finiteness check of named tensors before anything is written."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .files import atomic_write


def atomic_save(obj, path: Path) -> None:
    """torch.save through the shared atomic writer (OutputError naming `path` on failure)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def rng_state() -> dict:
    # numpy's key array as a tensor, so checkpoints load with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def first_non_finite(named_tensors) -> Optional[str]:
    """Name of the first floating tensor holding NaN/inf among `(name, tensor)` pairs, else None.
    One reduction per tensor, one host transfer per device (meant for checkpoint time, not per step)."""
    named = [(n, t) for n, t in named_tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    by_device: dict = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad = []
    for idx in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).cpu().tolist()
        bad += [i for i, ok in zip(idx, flags) if not ok]
    return named[min(bad)][0] if bad else None
