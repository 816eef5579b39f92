"""Where a run's numbers came from: `provenance.json` in every run folder.

One record per session (the fresh start and each `--resume`): the command line, the working
folder, the project's git commit and whether its tree had changes, python/torch/CUDA versions,
the device, the installed packages, and the wall time of each phase (setup: data generation,
datasets, model and method; train: the steps; eval; checkpoint: writing them). Written at the
start, at every checkpoint and at the end, so a killed run keeps what it did.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..utils.files import write_text_atomic

FILE_NAME = "provenance.json"
PHASES = ("setup", "train", "eval", "checkpoint")
PROJECT_DIR = Path(__file__).resolve().parents[2]  # the folder holding the segadapt package


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """The commit of the segadapt source tree and whether tracked files differ from it (None
    outside a git checkout, e.g. an installed wheel)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "changed_files": []}
    changed = _git("status", "--porcelain", "--untracked-files=no") or ""
    files = [line[3:] for line in changed.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(files), "changed_files": files[:50]}


def installed_packages() -> list[str]:
    from importlib import metadata

    seen = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            seen.setdefault(name.lower(), f"{name}=={dist.version}")
    return sorted(seen.values(), key=str.lower)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device=None) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "platform": platform.platform(), "host": socket.gethostname(), "cpu": _cpu_name(),
           "cpu_count": os.cpu_count()}
    from .. import __version__

    env["segadapt"] = __version__
    if device is not None:
        env["device"] = str(device)
        if getattr(device, "type", None) == "cuda" and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(device)
    env.update({k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES",
                                           "WORLD_SIZE") if k in os.environ})
    return env


class Provenance:
    """The provenance of one run folder; the current session's record is the last one."""

    def __init__(self, out_dir: Path, device=None, resumed_from: Optional[str] = None,
                 start_iteration: int = 0, argv: Optional[list[str]] = None):
        self.path = Path(out_dir) / FILE_NAME
        self.sessions = self._earlier_sessions() if resumed_from is not None else []
        argv = list(sys.argv if argv is None else argv)
        self.session = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in argv),
            "cwd": os.getcwd(),
            "resumed_from": resumed_from, "start_iteration": start_iteration,
            "git": git_state(), "environment": environment(device),
            "phases_s": {p: 0.0 for p in PHASES},
            "packages": installed_packages(),
        }
        self._open: dict[str, float] = {}

    def _earlier_sessions(self) -> list:
        try:
            data = json.loads(self.path.read_text())
            return list(data.get("sessions", []))
        except (OSError, ValueError, AttributeError):
            return []  # none or torn: this session's record is still written

    def add(self, phase: str, seconds: float) -> None:
        self.session["phases_s"][phase] = self.session["phases_s"].get(phase, 0.0) + seconds

    def begin(self, phase: str) -> None:
        self._open[phase] = time.perf_counter()

    def end(self, phase: str) -> None:
        t = self._open.pop(phase, None)
        if t is not None:
            self.add(phase, time.perf_counter() - t)

    def write(self, iteration: Optional[int] = None, finished: bool = False) -> None:
        s = self.session
        s["phases_s"] = {k: round(v, 3) for k, v in s["phases_s"].items()}
        if iteration is not None:
            s["iteration"] = iteration
        if finished:
            s["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        totals = {p: round(sum(x.get("phases_s", {}).get(p, 0.0) for x in self.sessions + [s]), 3)
                  for p in PHASES}
        write_text_atomic(self.path, json.dumps({"sessions": self.sessions + [s], "total_phases_s": totals},
                                                indent=1) + "\n")

    def summary(self) -> dict:
        """The short form results.json carries."""
        g = self.session["git"]
        return {"git_commit": g["commit"], "git_dirty": g["dirty"], "torch": self.session["environment"]["torch"]}
