"""Time and peak memory per training step of any method, through the real trainer.

    python benchmarks/bench_train_step.py                      # synthetic/source_only, CPU-sized
    python benchmarks/bench_train_step.py -c gta5_cityscapes/source_only --synthetic-input \
        --steps 20 train.amp=bf16 train.channels_last=true     # reference model and input sizes

`--synthetic-input` feeds random tensors of the config's crop/resize sizes instead of
reading a dataset (for the real benchmarks' configs on a machine without the data).
Prints seconds per step (median of the timed steps after `--warmup`) and peak memory
(CUDA: max allocated; CPU: peak resident set size of the process).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segadapt.config import load_config  # noqa: E402
from segadapt.engine import trainer as trainer_mod  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(t, iterations, warmup: int) -> list[float]:
    """Run the trainer `t`'s full step at each iteration number; seconds per step after the first `warmup`."""
    t.method.train()
    times = []
    for i, it in enumerate(iterations):
        batch = {k: trainer_mod.move_to(next(s), t.device, t.cfg.train.channels_last) for k, s in t.streams.items()}
        _sync(t.device)
        t0 = time.perf_counter()
        t.step(batch, it)
        _sync(t.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="synthetic/source_only")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--synthetic-input", action="store_true", help="random tensors instead of a dataset")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="bench_")
    cfg = load_config(args.config, [*args.overrides, f"out_dir={out}", "train.num_workers=0",
                                    f"train.iters={args.steps + args.warmup}", "train.eval_every=0"])
    if args.synthetic_input:
        _patch_random_data(cfg)
    t = trainer_mod.Trainer(cfg, progress=False)
    times = time_steps(t, range(args.steps + args.warmup), args.warmup)
    if t.device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated(t.device) / 2**20:.0f} MiB (CUDA max allocated)"
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"
    print(f"{args.config} [{cfg.method.name}] on {t.device}, threads={torch.get_num_threads()}, "
          f"amp={cfg.train.amp}: {statistics.median(times) * 1000:.1f} ms/step "
          f"(median of {len(times)}), peak memory {mem}")


def _patch_random_data(cfg):
    """Replace dataset construction by random images/labels of the configured size."""

    class RandomSeg(torch.utils.data.Dataset):
        def __init__(self, dcfg):
            w, h = dcfg.crop or dcfg.resize or (512, 256)
            self.size, self.labels = (h, w), dcfg.labels

        def __len__(self):
            return 64

        def __getitem__(self, key):
            g = torch.Generator().manual_seed(key[0] if isinstance(key, tuple) else key)
            item = {"image": torch.rand(3, *self.size, generator=g), "index": 0, "name": "random"}
            if self.labels:
                item["label"] = torch.randint(0, 19, self.size, generator=g)
            return item

    trainer_mod.build_dataset = lambda dcfg: RandomSeg(dcfg)
    cfg.synthetic.auto = False


if __name__ == "__main__":
    main()
