"""Seeds as an axis: one config trained over several seeds into one group folder.

`segadapt train -c X --seeds 0,1,2 [--jobs N]` runs `segadapt train --seed S` for each seed as
its own process (one after another, or N at a time, each with its share of the cores), into
`<group>/seed<S>/`, the folders `segadapt compare` reads. `<group>/sweep.json` records the
command, the seeds and each run's state. A killed sweep continues with the same command and
`--resume`: finished seeds are skipped, interrupted ones resume from their `last.pth`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..utils.files import write_text_atomic
from ..utils.threads import usable_cores
from .run_folder import holds_run

STATE_FILE = "sweep.json"


def parse_seeds(text: str) -> list[int]:
    """`0,1,2`, `0-4` or a mix (`0-2,7`); each seed once, in the order given."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"--seeds: '{part}' is not a seed or a range (expected e.g. 0,1,2 or 0-4)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"--seeds: empty range {part}")
        for s in range(lo, hi + 1):
            if s in seeds:
                raise ConfigError(f"--seeds: seed {s} is given twice")
            seeds.append(s)
    return seeds


@dataclass
class SeedRun:
    seed: int
    out_dir: Path
    state: str = "pending"  # pending | done | running | finished | failed | interrupted
    mode: str = "fresh"  # fresh | resume | overwrite | skip
    exit_code: Optional[int] = None
    miou: Optional[float] = None
    seconds: Optional[float] = None
    error: Optional[str] = None
    log: Optional[Path] = None
    process: Optional[subprocess.Popen] = field(default=None, repr=False)
    copier: Optional[threading.Thread] = field(default=None, repr=False)
    started: float = 0.0


def run_state(out_dir: Path) -> str:
    """done (final checkpoint written) | partial (a checkpoint to resume from) | started (a run
    without a checkpoint) | empty."""
    if (out_dir / "final.pth").is_file():
        return "done"
    if (out_dir / "last.pth").is_file():
        return "partial"
    return "started" if holds_run(out_dir) else "empty"


def _final_miou(out_dir: Path) -> Optional[float]:
    try:
        return float(json.loads((out_dir / "results.json").read_text())["miou"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _copy_output(stream, log) -> None:
    """A child's output, as it arrives, to our stdout and its log (chunks: a progress bar's
    carriage returns pass through)."""
    out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    with log:
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stdout.write(chunk.decode(errors="replace"))


def _last_error_line(log: Optional[Path]) -> str:
    if log is None or not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "interrupted" in ln:
            return ln.split(": error: ", 1)[-1]
    return lines[-1] if lines else ""


class Sweep:
    """The runs of one config over `seeds`; `run_dirs[s]` is each seed's run folder."""

    def __init__(self, config: Optional[str], overrides: list[str], seeds: list[int], run_dirs: dict,
                 group: Path, jobs: int = 1, threads: Optional[int] = None, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, command: Optional[list[str]] = None):
        if jobs < 1:
            raise ConfigError(f"--jobs: expected a positive number of runs at a time, got {jobs}")
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads-per-run: expected a positive number, got {threads}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--seeds starts one process per seed: run it without torchrun "
                              "(or run each seed under torchrun with --seed)")
        self.config, self.overrides, self.group = config, list(overrides), Path(group)
        self.jobs = min(jobs, len(seeds))
        self.threads = threads or max(1, usable_cores() // self.jobs)
        self.resume, self.overwrite, self.progress = resume, overwrite, progress
        self.command = command or ["segadapt", "train"]
        self.runs = [SeedRun(s, Path(run_dirs[s])) for s in seeds]
        self._plan()

    def _plan(self) -> None:
        states = {r.seed: run_state(r.out_dir) for r in self.runs}
        if not (self.resume or self.overwrite):
            held = [f"seed {s} ({st})" for s, st in states.items() if st != "empty"]
            if held:
                raise ConfigError(f"{self.group} already holds runs of this sweep: {', '.join(held)}; continue "
                                  "them with --resume (finished seeds are kept) or replace them with --overwrite")
        for r in self.runs:
            st = states[r.seed]
            if self.overwrite:
                r.mode = "overwrite" if st != "empty" else "fresh"
            elif st == "done":
                r.mode, r.state, r.miou = "skip", "done", _final_miou(r.out_dir)
            elif st == "partial":
                r.mode = "resume"
            elif st == "started":
                r.mode = "overwrite"  # nothing was checkpointed: it starts again
            r.log = self.group / "logs" / f"seed{r.seed}.log"

    def child_command(self, r: SeedRun) -> list[str]:
        cmd = [sys.executable, "-m", "segadapt", "train"]
        if self.config is not None:
            cmd += ["-c", self.config]
        if r.mode == "resume":
            cmd += ["--resume", str(r.out_dir)]
        cmd += ["--seed", str(r.seed), "--out", str(r.out_dir)]
        if r.mode == "overwrite":
            cmd.append("--overwrite")
        if self.jobs > 1 or not self.progress:
            cmd.append("--no-progress")
        return cmd + self.overrides

    def _write_state(self) -> None:
        state = {
            "command": " ".join(shlex.quote(a) for a in self.command), "config": self.config,
            "overrides": self.overrides, "seeds": [r.seed for r in self.runs], "jobs": self.jobs,
            "threads_per_run": self.threads,
            "runs": {str(r.seed): {"out_dir": str(r.out_dir), "state": r.state, "exit_code": r.exit_code,
                                   "mIoU": r.miou, "seconds": r.seconds, "error": r.error,
                                   "log": str(r.log) if r.log else None} for r in self.runs},
        }
        write_text_atomic(self.group / STATE_FILE, json.dumps(state, indent=1) + "\n")

    def _say(self, msg: str) -> None:
        print(f"[sweep] {msg}", flush=True)

    def _start(self, r: SeedRun) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        r.log.parent.mkdir(parents=True, exist_ok=True)
        log = open(r.log, "ab")
        what = {"fresh": "starts", "resume": "resumes from its last.pth", "overwrite": "starts again"}[r.mode]
        self._say(f"seed {r.seed} {what} in {r.out_dir} (log: {r.log})")
        r.started = time.time()
        if self.jobs > 1:  # into its log only
            r.process = subprocess.Popen(self.child_command(r), env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()  # the child holds its own descriptor
        else:  # on the terminal as it comes (progress bar included) and into its log
            r.process = subprocess.Popen(self.child_command(r), env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT)
            r.copier = threading.Thread(target=_copy_output, args=(r.process.stdout, log), daemon=True)
            r.copier.start()
        r.state = "running"

    def _finish(self, r: SeedRun, code: int) -> None:
        if r.copier is not None:
            r.copier.join(timeout=10)
            r.copier = None
        r.exit_code, r.seconds, r.process = code, round(time.time() - r.started, 1), None
        if code == 0:
            r.state, r.miou = "finished", _final_miou(r.out_dir)
            score = f", mIoU {r.miou * 100:.2f}" if r.miou is not None else ""
            self._say(f"seed {r.seed} finished in {r.seconds / 60:.1f} min{score}")
        else:
            r.state = "interrupted" if code in (130, -2) else "failed"
            r.error = _last_error_line(r.log) or f"exit status {code}"
            self._say(f"seed {r.seed} {r.state} (exit {code}): {r.error}")

    def run(self) -> int:
        self.group.mkdir(parents=True, exist_ok=True)
        todo = [r for r in self.runs if r.mode != "skip"]
        for r in self.runs:
            if r.mode == "skip":
                self._say(f"seed {r.seed} already finished in {r.out_dir}: kept")
        self._say(f"{len(todo)} of {len(self.runs)} seeds to run, {self.jobs} at a time, "
                  f"{self.threads} thread(s) each")
        self._write_state()
        running: list[SeedRun] = []
        try:
            while todo or running:
                while todo and len(running) < self.jobs:
                    r = todo.pop(0)
                    self._start(r)
                    running.append(r)
                    self._write_state()
                time.sleep(0.2)
                for r in list(running):
                    code = r.process.poll()
                    if code is not None:
                        running.remove(r)
                        self._finish(r, code)
                        self._write_state()
        except KeyboardInterrupt:
            for r in running:  # they received the same SIGINT and save nothing more than their checkpoints
                try:
                    code = r.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    r.process.kill()
                    code = r.process.wait()
                self._finish(r, code)
            self._write_state()
            raise ConfigError(f"sweep interrupted; continue it with the same command and --resume "
                              f"(state: {self.group / STATE_FILE})") from None
        return self._report()

    def _report(self) -> int:
        rows = [f"| {r.seed} | {r.state} | " + (f"{r.miou * 100:.2f}" if r.miou is not None else "") + f" | {r.out_dir} |"
                for r in self.runs]
        print("\n| seed | state | mIoU (%) | run folder |\n|---|---|---:|---|\n" + "\n".join(rows))
        scores = [r.miou * 100 for r in self.runs if r.miou is not None]
        if len(scores) >= 2:
            print(f"mIoU over {len(scores)} seeds: {statistics.mean(scores):.2f} ± {statistics.stdev(scores):.2f} "
                  f"(mean ± sample std); compare groups with: segadapt compare {self.group} OTHER_GROUP")
        failed = [r for r in self.runs if r.state in ("failed", "interrupted")]
        if failed:
            detail = "; ".join(f"seed {r.seed}: {r.error}" for r in failed)
            raise ConfigError(f"{len(failed)} of {len(self.runs)} seeds did not finish ({detail}); "
                              f"rerun with --resume to continue them")
        return 0


def group_and_run_dirs(out_dirs: dict, out: Optional[str]) -> tuple[Path, dict]:
    """The group folder and each seed's run folder: `--out GROUP` -> GROUP/seed<S>; otherwise the
    config's out_dir per seed (default runs/<name>/seed<S>), which must differ between seeds."""
    if out is not None:
        group = Path(out)
        return group, {s: group / f"seed{s}" for s in out_dirs}
    paths = {s: Path(p) for s, p in out_dirs.items()}
    if len(set(paths.values())) < len(paths):
        raise ConfigError(f"out_dir is {next(iter(paths.values()))} for every seed: put ${{train.seed}} in it "
                          "or give --out GROUP (runs go to GROUP/seed<S>)")
    parents = {p.parent for p in paths.values()}
    group = parents.pop() if len(parents) == 1 else Path(os.path.commonpath([str(p) for p in paths.values()]))
    if any(p == group for p in paths.values()):
        raise ConfigError(f"the runs of the seeds would nest in one another under {group}: give --out GROUP")
    return group, paths
