"""CPU threads on a machine shared with other work: how idle threads wait, and how many run.

What the main job measured on a 2-core CPU (issue #30; s per iteration, quiet / beside one /
beside two busy single-thread processes): GNU OpenMP's default lets idle threads spin, and the
two compute threads wait for each other at every parallel region, so one thread descheduled by
a neighbour stalls the other: 0.30 / 0.84 / 1.00. Passive waiting (threads sleep at once):
0.30 / 0.49 / 0.66. One thread: 0.51 / 0.48 / 0.82. Hence the policy:

1. passive waiting, set before torch loads the OpenMP runtime (:func:`prefer_passive_waiting`,
   called by the CLI first thing) when other work runs as the process starts: most of the
   gain; on a quiet machine the default short spin stays (passive waiting cost 1.5x there on
   a fast AVX-512 CPU, 2026-12-05);
2. ``train.threads: auto``: the cores this process may use (CPU affinity, a cgroup CPU quota);
3. with ``auto`` and passive waiting, fewer threads while other work keeps cores busy: with
   ``b`` other runnable tasks on ``c`` cores and 0 < b < c, ``c - b`` threads (no thread of ours
   waits for a core); with b >= c all ``c`` (no core is free: more threads get a larger fair
   share, 0.66 vs 0.82 above). Other demand is the kernel's count of runnable tasks
   (``/proc/loadavg``, read once per step: microseconds) less our sampling thread; re-decided
   every few seconds, changed only when two decisions in a row agree.

An explicit choice wins: ``train.threads: N``, or ``OMP_NUM_THREADS`` in the environment (torchrun
sets it to 1 per process) with ``auto``, or the user's own ``OMP_WAIT_POLICY``/``GOMP_SPINCOUNT``.
The thread count can change floating-point results in the last bits for some operators (not for
the synthetic benchmark's ResNet, checked bit-identical with 1 and 2 threads); ``train.threads: N``
fixes it.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Callable, Optional, Union

__all__ = ["prefer_passive_waiting", "usable_cores", "runnable_others", "threads_for", "ThreadPolicy"]

WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
LOADAVG = "/proc/loadavg"
RECHECK_SECONDS = 5.0


def prefer_passive_waiting(sample: Optional[Callable[[], Optional[int]]] = None) -> bool:
    """Let idle OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``) when other work is
    running as this process starts, unless the user chose a wait policy. On a quiet machine
    GNU OpenMP's short spin stays: passive waiting cost 1.5x there on a fast AVX-512 CPU (0.09
    -> 0.14 s/it, docs/methods.md). Takes effect only before torch (and with it libgomp) is
    loaded: True when set. `sample`: runnable tasks besides us (default: /proc/loadavg)."""
    if "torch" in sys.modules or any(v in os.environ for v in WAIT_POLICY_VARIABLES):
        return False
    sample = runnable_others if sample is None else sample
    for look in range(3):  # a few looks, ~10 ms apart: a passing process is not a busy neighbour
        if look:
            time.sleep(0.01)
        if sample() == 0:
            return False  # a quiet moment: no neighbour (and no delay on a quiet machine)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def passive_waiting() -> bool:
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def _cgroup_cpu_quota() -> Optional[float]:
    """CPUs a cgroup CPU quota grants (containers, CI runners), or None without one."""
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-6)))
    return max(1, n)


def runnable_others(path: str = LOADAVG) -> Optional[int]:
    """Runnable tasks on the machine other than the calling thread (``/proc/loadavg``'s
    running/total field), or None where it cannot be read."""
    try:
        with open(path) as f:
            running = f.read().split()[3].split("/")[0]
        return max(0, int(running) - 1)
    except (OSError, IndexError, ValueError):
        return None


def threads_for(cores: int, others: int) -> int:
    """Threads for `cores` cores beside `others` runnable tasks (the rule in the module doc)."""
    return cores - others if 0 < others < cores else cores


class ThreadPolicy:
    """Applies ``train.threads`` for one training loop: :meth:`start` before it, :meth:`step`
    after each iteration (cheap), :meth:`stop` after it (torch's previous count comes back)."""

    def __init__(self, setting: Union[int, str] = "auto", cores: Optional[int] = None,
                 sample: Callable[[], Optional[int]] = runnable_others, clock: Callable[[], float] = time.monotonic,
                 recheck: float = RECHECK_SECONDS):
        self.setting, self.sample, self.clock, self.recheck = setting, sample, clock, recheck
        self.cores = cores if cores is not None else usable_cores()
        self.adaptive = False
        self.threads: Optional[int] = None
        self._previous: Optional[int] = None
        self._samples: list[int] = []
        self._pending: Optional[int] = None
        self._next_check = 0.0

    def describe(self) -> str:
        mode = "adapting to other work" if self.adaptive else "fixed"
        return f"{self.threads} thread(s) ({mode}; {self.cores} usable core(s))"

    def start(self) -> int:
        import torch

        self._previous = torch.get_num_threads()
        if self.setting != "auto":
            self.threads = int(self.setting)
        elif "OMP_NUM_THREADS" in os.environ:
            self.threads = self._previous  # the environment chose (torchrun does, per process)
        else:
            self.threads = self.cores
            # the loadavg count covers the whole machine: only meaningful when we may use all of it;
            # with spinning waits our own idle threads would count as others
            self.adaptive = (self.cores > 1 and passive_waiting() and self.cores == (os.cpu_count() or 1)
                             and self.sample() is not None)
            if self.adaptive:
                burst = [self.sample() for _ in range(5)]
                burst = [b for b in burst if b is not None]
                if burst:
                    self.threads = threads_for(self.cores, statistics.median_low(burst))
        if self.threads != self._previous:
            torch.set_num_threads(self.threads)
        self._next_check = self.clock() + self.recheck
        return self.threads

    def step(self) -> None:
        if not self.adaptive:
            return
        others = self.sample()
        if others is not None:
            self._samples.append(others)
        if self.clock() < self._next_check or not self._samples:
            return
        self._next_check = self.clock() + self.recheck
        proposed = threads_for(self.cores, statistics.median_low(self._samples))
        self._samples = []
        if proposed == self.threads:
            self._pending = None
        elif proposed == self._pending:  # two decisions in a row: change
            import torch

            torch.set_num_threads(proposed)
            self.threads, self._pending = proposed, None
        else:
            self._pending = proposed

    def stop(self) -> None:
        if self._previous is not None and self.threads != self._previous:
            import torch

            torch.set_num_threads(self._previous)
        self._previous = None
