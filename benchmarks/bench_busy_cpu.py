"""The main job on a busy CPU: seconds per iteration alone, beside one and beside two busy
single-thread processes, for each CPU thread policy (issue #30; segadapt/utils/threads.py).

    python benchmarks/bench_busy_cpu.py                        # first 100 iterations of synthetic/source_only
    python benchmarks/bench_busy_cpu.py --repeats 3 --out busy.md
    python benchmarks/bench_busy_cpu.py --tiny --iters 4       # a smoke check: tiny data and model

Every cell is a fresh `segadapt train` process (the OpenMP wait policy is read once, when torch
loads), timed by its own metrics.jsonl: the mean seconds per iteration over its first N
iterations (what the trainer logs; data loading, forward, backward and the optimizer, not the
start-up or the final evaluation). The busy neighbours are Python busy loops, started before the
job and stopped after it. Policies:

- spin: what segadapt did before: GNU OpenMP's default short spin (GOMP_SPINCOUNT=300000),
  one thread per usable core;
- passive: OMP_WAIT_POLICY=PASSIVE, one thread per usable core, fixed;
- one-thread: train.threads=1;
- auto: segadapt's default (passive waiting, train.threads=auto: fewer threads while other work
  leaves cores free).

Run it on an otherwise quiet machine: the table's ratios are against the spin policy alone. The
first run generates the synthetic benchmark (data/synthetic, or --synthetic-out) before timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segadapt.utils.threads import usable_cores  # noqa: E402  (no torch import here)

POLICIES = {  # name -> (environment changes, overrides)
    "spin": ({"GOMP_SPINCOUNT": "300000"}, ["train.threads={cores}"]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["train.threads={cores}"]),
    "one-thread": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["train.threads=1"]),
    "auto": ({}, ["train.threads=auto"]),
}
TINY = ["synthetic.size=[64,32]", "synthetic.num_source=16", "synthetic.num_source_val=4",
        "synthetic.num_target_train=8", "synthetic.num_target_val=4", "synthetic.workers=1", "model.base_width=8",
        "train.batch_source=2", "eval.max_images=2"]
BUSY_LOOP = "while True: pass"


def child_env(changes: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(changes)
    return env


def seconds_per_iteration(metrics: Path, iters: int) -> float:
    """Mean over the first `iters` iterations, from the logged intervals."""
    total, last = 0.0, 0
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "sec_per_iter" in rec and rec["iteration"] <= iters:
            total += rec["sec_per_iter"] * (rec["iteration"] - last)
            last = rec["iteration"]
    if last == 0:
        raise RuntimeError(f"{metrics}: no training record")
    return total / last


def run_cell(policy: str, busy: int, args, work: Path, base_overrides: list) -> float:
    env_changes, overrides = POLICIES[policy]
    overrides = [o.format(cores=usable_cores()) for o in overrides]
    out = work / f"{policy}_{busy}_{time.monotonic_ns()}"
    neighbours = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        time.sleep(0.5)  # they are running when the job starts
        cmd = [sys.executable, "-m", "segadapt", "train", "--no-progress", "-c", args.config, *base_overrides,
               *overrides, f"out_dir={out}"]
        p = subprocess.run(cmd, env=child_env(env_changes), capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{policy}, {busy} busy: exit {p.returncode}\n{p.stderr[-2000:]}")
    finally:
        for n in neighbours:
            n.kill()
            n.wait()
    return seconds_per_iteration(out / "metrics.jsonl", args.iters)


def machine_line() -> str:
    model, avx512 = platform.processor() or "?", False
    try:
        text = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
        avx512 = "avx512f" in text
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} logical CPUs ({usable_cores()} usable), "
            f"{'with' if avx512 else 'without'} AVX-512, Python {platform.python_version()}")


def table(results: dict, policies: list, loads: list) -> str:
    ref = results[("spin", 0)] if ("spin", 0) in results else None
    head = ["policy"] + ["alone" if b == 0 else f"beside {b} busy" for b in loads]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(loads) + "|"]
    for policy in policies:
        cells = []
        for b in loads:
            t = results[(policy, b)]
            cells.append(f"{t:.3f} ({t / ref:.2f}x)" if ref else f"{t:.3f}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="synthetic/source_only")
    ap.add_argument("--iters", type=int, default=100, help="iterations timed per cell (the main job's first N)")
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy neighbours per column")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell (the median is shown)")
    ap.add_argument("--synthetic-out", default=None, help="where the synthetic benchmark is (default: the config's)")
    ap.add_argument("--tiny", action="store_true", help="tiny data and model: checks the script, times nothing real")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_busy_cpu_") as tmp:
        work = Path(tmp)
        base = [f"train.iters={args.iters}", f"train.log_every={max(1, min(10, args.iters))}",
                "train.eval_every=0", f"train.ckpt_every={args.iters}"]
        if args.tiny:
            base += TINY + [f"synthetic.out={args.synthetic_out or work / 'synth'}"]
        elif args.synthetic_out:
            base.append(f"synthetic.out={args.synthetic_out}")
        # generate the data (and warm the file cache) outside the timings
        prep = subprocess.run([sys.executable, "-m", "segadapt", "train", "--no-progress", "-c", args.config, *base,
                               "train.iters=1", "train.log_every=1", "train.ckpt_every=1", f"out_dir={work / 'prep'}"],
                              env=child_env({}), capture_output=True, text=True)
        if prep.returncode != 0:
            print(prep.stderr[-3000:], file=sys.stderr)
            return prep.returncode
        results = {}
        for policy in args.policies:
            for busy in args.busy:
                times = [run_cell(policy, busy, args, work, base) for _ in range(args.repeats)]
                results[(policy, busy)] = statistics.median(times)
                print(f"{policy:10s} beside {busy} busy: {results[(policy, busy)]:.3f} s/it "
                      f"({', '.join(f'{t:.3f}' for t in times)})", file=sys.stderr, flush=True)
    text = (f"{args.config}, first {args.iters} iterations{' (tiny)' if args.tiny else ''}, median of "
            f"{args.repeats}; s/iteration (x the spin policy alone)\n{machine_line()}\n\n"
            + table(results, args.policies, args.busy))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
