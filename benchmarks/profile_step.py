"""Where a training iteration's time goes, through the real trainer on the real (synthetic) data.

    python benchmarks/profile_step.py -c synthetic/source_only --threads 2 --steps 40
    python benchmarks/profile_step.py -c synthetic/confeti_stage1 --first-iteration 301 method.cut.init=null

Phases, in ms per iteration (wall clock, CPU; on CUDA add a sync per phase):
  data wait   next() on the data streams (decoding and augmentation run in the
              DataLoader workers, in parallel with the step, when num_workers > 0;
              the synthetic benchmark caches decoded images and uses none)
  to device   moving the batch
  forward     the method's forward passes and losses (step time minus the rest)
  backward    every backward (staged or not)
  optimizer   unscale, clip and the optimizer steps
  after step  the method's hook (EMA teacher, memory banks)
Then, separately: one item's read + decode and its augmentation in this process, and one
evaluation on the target val split (the main job runs 3).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segadapt.config import load_config  # noqa: E402
from segadapt.engine import trainer as trainer_mod  # noqa: E402


class PhaseTimer:
    def __init__(self):
        self.total: dict[str, float] = {}

    def wrap(self, obj, attr: str, phase: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[phase] = self.total.get(phase, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)


def profile(config: str, steps: int, warmup: int, overrides: list[str], first: int = 0) -> list[tuple[str, float]]:
    out = tempfile.mkdtemp(prefix="profile_")
    cfg = load_config(config, [*overrides, f"out_dir={out}", f"train.iters={first + steps + warmup}",
                               "train.eval_every=0"])
    t = trainer_mod.Trainer(cfg, progress=False)
    try:
        timer = PhaseTimer()
        timer.wrap(t, "_backward", "backward")
        timer.wrap(t, "_step", "optimizer")
        timer.wrap(t.method, "after_step", "after step")
        for stream in t.streams.values():  # steady state: a whole run decodes each cached image once
            ds = stream.dataset
            if getattr(ds, "cache", False):
                for j in range(len(ds)):
                    ds._decode(j)
        t.method.train()
        data = to_dev = step = 0.0
        for i in range(warmup + steps):
            if i == warmup:
                timer.total, data, to_dev, step = {}, 0.0, 0.0, 0.0
            t0 = time.perf_counter()
            raw = {k: next(s) for k, s in t.streams.items()}
            t1 = time.perf_counter()
            batch = {k: trainer_mod.move_to(v, t.device, cfg.train.channels_last) for k, v in raw.items()}
            t2 = time.perf_counter()
            t.step(batch, first + i)
            t3 = time.perf_counter()
            data, to_dev, step = data + t1 - t0, to_dev + t2 - t1, step + t3 - t2
        # a staged backward runs inside the forward call: forward = step minus the timed parts
        timed = sum(timer.total.values())
        rows = [("data wait", data), ("to device", to_dev), ("forward", step - timed),
                *[(k, timer.total.get(k, 0.0)) for k in ("backward", "optimizer", "after step")]]
        rows = [(k, 1000 * v / steps) for k, v in rows]
        ds = t.source_ds
        decode, augment = [], []
        for j in range(min(20, len(ds))):
            t0 = time.perf_counter()
            ds._decode(j)  # read, decode, map labels (fills the cache where it is on)
            t1 = time.perf_counter()
            ds[(j, j)]
            decode.append(t1 - t0)
            augment.append(time.perf_counter() - t1)
        rows.append(("(one source item: read and decode)", 1000 * statistics.median(decode)))
        what = "from the cache" if ds.cache else "read and decode again"
        rows.append((f"(one source item: augment, {what})", 1000 * statistics.median(augment)))
        t0 = time.perf_counter()
        t.evaluate(first + steps + warmup)
        rows.append(("(one evaluation of the val split)", 1000 * (time.perf_counter() - t0)))
        return rows
    finally:
        for s in t.streams.values():
            s.close()
        t.release()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="synthetic/source_only")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--first-iteration", type=int, default=0,
                    help="iteration number of the first step (past a method's switch-on thresholds)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = profile(args.config, args.steps, args.warmup, args.overrides, args.first_iteration)
    per_iter = sum(v for k, v in rows if not k.startswith("("))
    print(f"{args.config}, {torch.get_num_threads()} threads, mean of {args.steps} iterations after {args.warmup}")
    print("\n| phase | ms / iteration | share |\n|---|---:|---:|")
    for k, v in rows:
        share = f"{100 * v / per_iter:.0f}%" if not k.startswith("(") else ""
        print(f"| {k} | {v:.1f} | {share} |")
    print(f"| total | {per_iter:.1f} | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
