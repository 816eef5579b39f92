"""Cost of optim.param_list=advent_repeated (ADVENT's repeated backbone list) against unique.

    python benchmarks/bench_advent_params.py --threads 2                 # gta5_cityscapes/minent
    python benchmarks/bench_advent_params.py -c gta5_cityscapes/cfcontra --size 640 320 --steps 5

1. The optimizer step alone on the config's segmenter at full size (random gradients): ms per
   step for each param_list (how many tensor updates each makes) and the momentum state.
2. The whole training step, through bench_train_step.py with random input of `--size`, one
   process per param_list so that each peak memory is its own.
Extra arguments are config overrides for both.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segadapt.config import load_config  # noqa: E402
from segadapt.methods import build_method  # noqa: E402
from segadapt.models.segmenter import build_segmenter  # noqa: E402


def mode_overrides(param_list: str, overrides: list[str]) -> list[str]:
    """Overrides selecting `param_list`; decay_into_grad stays the config's where it applies."""
    extra = [f"optim.param_list={param_list}"]
    if param_list == "unique":
        extra.append("optim.decay_into_grad=false")
    return [*overrides, "optim.name=sgd", *extra]


def optimizer_step_ms(cfg_name: str, overrides: list[str], steps: int) -> dict:
    torch.manual_seed(0)
    cfg = load_config(cfg_name, overrides)
    model = build_segmenter(cfg.model)
    sched = build_method(cfg, model).build_optimizers()["segmenter"]
    opt = sched.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    updates = sum(len(v) for v in opt.visits) if hasattr(opt, "visits") else len(params)
    times = []
    for it in range(steps + 1):
        sched.set_iteration(it)
        t0 = time.perf_counter()
        opt.step()
        if it > 0:  # the first step allocates the momentum buffers
            times.append(time.perf_counter() - t0)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return {"ms": statistics.median(times) * 1000, "updates": updates, "tensors": len(params),
            "state_mib": state / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="gta5_cityscapes/minent")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--optim-steps", type=int, default=20, help="timed optimizer-only steps per mode")
    ap.add_argument("--size", type=int, nargs=2, default=[512, 256], metavar=("W", "H"),
                    help="source and target input size of the training step")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--skip-train-step", action="store_true", help="only the optimizer-step part")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ("unique", "advent_repeated")
    for mode in modes:
        r = optimizer_step_ms(args.config, mode_overrides(mode, args.overrides), args.optim_steps)
        print(f"optimizer step [{mode}]: {r['ms']:.1f} ms ({r['updates']} tensor updates of {r['tensors']} "
              f"tensors), momentum state {r['state_mib']:.0f} MiB")
    if args.skip_train_step:
        return
    w, h = args.size
    for mode in modes:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), "-c", args.config,
               "--synthetic-input", "--steps", str(args.steps), "--warmup", str(args.warmup),
               *(["--threads", str(args.threads)] if args.threads else []),
               *mode_overrides(mode, [*args.overrides, f"source.resize=[{w},{h}]",
                                                   f"target.resize=[{w},{h}]"])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        print(f"train step [{mode}], input {w}x{h}: {out[-1] if out else '(no output)'}")


if __name__ == "__main__":
    main()
