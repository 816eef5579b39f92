"""Peak memory and time per step with one backward vs staged backward (`train.staged_backward`),
per method at its gta5_cityscapes config, random input, on the CPU or a GPU.

    python benchmarks/bench_staged_memory.py --size 640 320 --threads 2 --out table.md

Each (config, mode) runs in a fresh process (peak RSS is a per-process high-water mark), builds
the real Trainer on random input (as benchmarks/gpu_check.py: RCS off, random CUT G for CONFETI,
a 1 + 1 batch prototype bank for CFContra), takes `--warmup` steps then `--steps` timed ones at
the method's first iteration with every loss on. CPU: peak resident set size of the process, and
its rise over the RSS after the warm-up steps (weights, optimizer state and data excluded;
glibc's mmap threshold is pinned at 64 KiB so freed tensors leave the RSS); CUDA: max
allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = ("minent", "advent", "cfcontra", "dacs", "daformer", "confeti_stage1")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure_one(name: str, staged: bool, args) -> dict:
    from gpu_check import _fresh, build_trainer, first_iteration  # noqa: E402
    from segadapt.engine import trainer as trainer_mod  # noqa: E402

    class Opts:  # what build_trainer reads
        device, tiny, size, seed = args.device, False, args.size, 0

    with tempfile.TemporaryDirectory(prefix="staged_") as tmp:
        t, _ = build_trainer(name, [f"train.staged_backward={str(staged).lower()}"], Opts, Path(tmp))
        try:
            it = first_iteration(t.method.mcfg)
            batch = {k: trainer_mod.move_to(next(s), t.device) for k, s in t.streams.items()}
            t.method.train()
            times, built = [], None
            for i in range(args.warmup + args.steps):
                if i == args.warmup:  # optimizer state exists now
                    built = _rss_mib()
                    if t.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(t.device)
                if t.device.type == "cuda":
                    torch.cuda.synchronize(t.device)
                t0 = time.perf_counter()
                t.step(_fresh(batch), it + i)
                if t.device.type == "cuda":
                    torch.cuda.synchronize(t.device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        finally:
            t.release()
    if t.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(t.device) / 2**20
        rise = None
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rise = peak - built
    return {"config": name, "staged": staged, "ms": 1000 * sum(times) / len(times), "peak_mib": peak,
            "rise_mib": rise}


def table(rows: list[dict], args) -> str:
    by = {(r["config"], r["staged"]): r for r in rows}
    cpu = args.device == "cpu"
    what = "peak RSS / rise over built" if cpu else "max allocated"
    lines = [f"{args.device}, {args.threads} threads, {args.size[0]}x{args.size[1]} random input, "
             f"mean of {args.steps} steps after {args.warmup}; memory: {what} (MiB)", "",
             "| config | one backward ms/step | staged ms/step | one backward MiB | staged MiB | staged / one |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in args.configs:
        a, b = by.get((name, False)), by.get((name, True))
        if a is None or b is None:
            lines.append(f"| {name} | failed | | | | |")
            continue
        if cpu:
            mem_a, mem_b = f"{a['peak_mib']:.0f} / {a['rise_mib']:.0f}", f"{b['peak_mib']:.0f} / {b['rise_mib']:.0f}"
            ratio = b["rise_mib"] / a["rise_mib"]
        else:
            mem_a, mem_b = f"{a['peak_mib']:.0f}", f"{b['peak_mib']:.0f}"
            ratio = b["peak_mib"] / a["peak_mib"]
        lines.append(f"| {name} | {a['ms']:.0f} | {b['ms']:.0f} | {mem_a} | {mem_b} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="gta5_cityscapes config names")
    ap.add_argument("--size", type=int, nargs=2, default=[640, 320], metavar=("W", "H"), help="crop of both domains")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--staged", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1 (the memory baseline is taken after the warm-up)")
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args.one, args.staged == "true", args)))
        return 0
    rows = []
    for name in args.configs:
        for staged in ("false", "true"):
            cmd = [sys.executable, __file__, "--one", name, "--staged", staged, "--size", *map(str, args.size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--device", args.device]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(f"{name} staged={staged}: failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"{name} staged={staged}: {rows[-1]}", file=sys.stderr)
    text = table(rows, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if len(rows) == 2 * len(args.configs) else 1


if __name__ == "__main__":
    sys.exit(main())
