"""What CFContra's contrastive alignment costs on top of MinEnt, per training step.

Same segmenter, same input, same optimizer; only the method differs. A step
is what the trainer does: zero_grad, forward + losses, one backward, every
optimizer steps, ``after_step`` (the bank update). Reported per variant, each
also as a ratio to MinEnt (target: CFContra <= 1.10x):

* seconds per step: median over ``--steps`` rounds in ONE process where the
  variants take turns step by step, so that a busy machine slows them alike;
* peak step memory: peak minus the memory held after building model and
  optimizers (activations, gradients, optimizer state), each variant in a
  fresh process; ``torch.cuda.max_memory_allocated`` on CUDA, on CPU the
  peak resident set size (``resource.getrusage``, coarser: allocator caching);
* matmul/convolution FLOPs of one step, forward and backward
  (``torch.utils.flop_counter``), a measure nothing can disturb;

plus the size of CFContra's two prototype banks in bytes (2 x classes x dim
x 4: O(classes x dim), independent of images and pixels). The banks are
filled with random unit rows instead of the data pass, a one-off cost that is
not part of a step.

Usage:
    python benchmarks/bench_cfcontra_cost.py                        # small, CPU-friendly
    python benchmarks/bench_cfcontra_cost.py --full                 # ResNet-101 at 1280x640 (GPU advised)
    python benchmarks/bench_cfcontra_cost.py --full --device meta   # its FLOPs only, in seconds

Arguments:
    --full                the reference setting: gta5_cityscapes configs, ResNet-101 (width 64), both
                          domains 1280x640, batch 1 + 1 (overrides --backbone/--base-width/--size/--batch)
    --backbone NAME       resnet18|resnet34|resnet50|resnet101 (default resnet50)
    --base-width N        backbone width, 64 = standard (default 16)
    --size W H            input size of both domains (default 256 128)
    --batch N             images per domain (default 1)
    --heads LIST          CFContra projection heads to measure, comma-separated from mlp,linear,none
                          (default mlp,linear,none)
    --frozen-head         also measure contrast.train_head=false (the reference's untrained head)
    --steps N             timed rounds (default 5); --warmup N untimed rounds first (default 2)
    --device D            auto|cpu|cuda|cuda:N (default auto), or meta: FLOPs only, nothing computed
                          (quick even with --full on a laptop; no time or memory then)
    --amp MODE            none|bf16 (default none)
    --threads N           CPU threads (default 1)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Variant:
    """One method built from a config, with a fixed random batch and the trainer's step."""

    def __init__(self, spec: dict):
        import torch

        from segadapt.config import load_config
        from segadapt.utils.distributed import resolve_device
        from segadapt.methods import build_method
        from segadapt.models.segmenter import build_segmenter

        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        cfg = load_config(spec["config"], spec["overrides"])
        self.device = torch.device("meta") if spec["device"] == "meta" else resolve_device(spec["device"])
        self.model = build_segmenter(cfg.model).to(self.device)
        self.method = build_method(cfg, self.model).to(self.device).train()
        self.bank = getattr(self.method, "bank_source", None)
        if self.bank is not None:
            unit = [torch.nn.functional.normalize(torch.randn(self.bank.shape), dim=1) for _ in range(2)]
            self.method.load_banks(*(u.to(self.device) for u in unit))
        self.optimizers = self.method.build_optimizers()
        w, h = spec["size"]
        b = spec["batch"]
        g = torch.Generator().manual_seed(0)
        label = torch.randint(0, cfg.model.num_classes, (b, h, w), generator=g)
        label[:, : h // 8] = 255
        self.batch = {"source": {"image": torch.rand(b, 3, h, w, generator=g), "label": label},
                      "target": {"image": torch.rand(b, 3, h, w, generator=g)}}
        self.batch = {d: {k: v.to(self.device) for k, v in x.items()} for d, x in self.batch.items()}
        self.amp = {"bf16": torch.bfloat16}.get(spec["amp"])
        self.feature_map_bytes = self.model.feature_channels * -(-h // 8) * -(-w // 8) * 4

    def step(self, it: int, update: bool = True) -> None:
        import torch

        for o in self.optimizers.values():
            o.set_iteration(it)
            o.optimizer.zero_grad(set_to_none=True)
        if self.amp is None:
            out = self.method.training_step(self.batch, it)
        else:
            with torch.autocast(self.device.type, dtype=self.amp):
                out = self.method.training_step(self.batch, it)
        sum(v.float() for k, v in out.items() if k.startswith("loss")).backward()
        if update:  # (no optimizer step on the meta device)
            for o in self.optimizers.values():
                o.optimizer.step()
            self.method.after_step(it)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def memory_and_flops(spec: dict) -> dict:
    """One variant in this (fresh) process: peak step memory, FLOPs, bank size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    v = Variant(spec)
    cuda, meta = v.device.type == "cuda", v.device.type == "meta"
    base = peak = 0
    if not meta:
        if cuda:
            base = torch.cuda.memory_allocated(v.device)
            torch.cuda.reset_peak_memory_stats(v.device)
        else:
            base = _rss_bytes()
        for it in range(max(spec["warmup"], 1) + 1):
            v.step(it)
        peak = torch.cuda.max_memory_allocated(v.device) if cuda else _peak_rss_bytes()
    with FlopCounterMode(display=False) as counter:
        v.step(0, update=not meta)
    return {"peak_step_bytes": peak - base, "flops": counter.get_total_flops(), "device": str(v.device),
            "bank_shape": list(v.bank.shape) if v.bank is not None else None,
            "bank_bytes": 2 * v.bank.numel() * v.bank.element_size() if v.bank is not None else 0,
            "feature_map_bytes": v.feature_map_bytes}


def interleaved_times(specs: dict) -> dict:
    """All variants in this process, taking turns step by step; median seconds per step."""
    variants = {name: Variant(spec) for name, spec in specs.items()}
    first = next(iter(specs.values()))
    times = {name: [] for name in variants}
    for it in range(first["warmup"] + first["steps"]):
        for name, v in variants.items():
            t0 = time.perf_counter()
            v.step(it)
            if it >= first["warmup"]:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _child(mode: str, payload) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--{mode}", json.dumps(payload)],
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr.strip()[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("W", "H"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", default="mlp,linear,none")
    p.add_argument("--frozen-head", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory", help=argparse.SUPPRESS)  # internal: one variant in a fresh process
    p.add_argument("--time", help=argparse.SUPPRESS)  # internal: all variants, interleaved
    args = p.parse_args(argv)
    if args.memory or args.time:
        result = memory_and_flops(json.loads(args.memory)) if args.memory else interleaved_times(json.loads(args.time))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if args.full:
        bench, backbone, width, size, batch = "gta5_cityscapes", "resnet101", 64, [1280, 640], 1
    else:
        bench, backbone, width, size, batch = "synthetic", args.backbone, args.base_width, args.size, args.batch
    common = [f"model.backbone={backbone}", f"model.base_width={width}", "model.pretrained=null",
              f"train.batch_source={batch}", f"train.batch_target={batch}", "train.num_workers=0",
              "train.iters=1000", "optim.poly_iters=null"]
    variants = {"minent": (f"{bench}/minent", [])}
    for head in [h.strip() for h in args.heads.split(",") if h.strip()]:
        cf = [f"method.contrast.head={head}", "method.contrast.start_iter=0"]
        variants[f"cfcontra[{head}]"] = (f"{bench}/cfcontra", cf)
        if args.frozen_head and head != "none":
            variants[f"cfcontra[{head},frozen]"] = (f"{bench}/cfcontra", cf + ["method.contrast.train_head=false"])
    specs = {name: {"config": config, "overrides": common + extra, "device": args.device, "amp": args.amp,
                    "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "size": size,
                    "batch": batch} for name, (config, extra) in variants.items()}

    try:
        results = {name: _child("memory", spec) for name, spec in specs.items()}
        timed = args.device != "meta"
        seconds = _child("time", specs) if timed else {}
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1

    ref = results["minent"]
    rounds = f"median of {args.steps} interleaved steps after {args.warmup} warm-up" if timed else "FLOPs only"
    print(f"device {ref['device']} ({args.threads} CPU threads), {backbone} width {width}, "
          f"input {size[0]}x{size[1]}, batch {batch} + {batch}, amp {args.amp}, {rounds}")
    print(f"{'method':24s} {'s/step':>9s} {'x MinEnt':>9s} {'peak step MiB':>14s} {'x MinEnt':>9s} "
          f"{'GFLOP/step':>11s} {'x MinEnt':>9s}")
    for name, r in results.items():
        if timed:
            mem_ratio = r["peak_step_bytes"] / max(ref["peak_step_bytes"], 1)
            cost = (f"{seconds[name]:9.4f} {seconds[name] / seconds['minent']:9.3f} "
                    f"{r['peak_step_bytes'] / 2**20:14.1f} {mem_ratio:9.3f}")
        else:
            cost = f"{'-':>9s} {'-':>9s} {'-':>14s} {'-':>9s}"
        print(f"{name:24s} {cost} {r['flops'] / 1e9:11.2f} {r['flops'] / ref['flops']:9.3f}")
    for shape in sorted({tuple(r["bank_shape"]) for r in results.values() if r["bank_shape"]}):
        r = next(r for r in results.values() if r["bank_shape"] and tuple(r["bank_shape"]) == shape)
        print(f"prototype banks: 2 x {shape[0]} x {shape[1]} x 4 B = {r['bank_bytes']:,} bytes (O(classes x dim)); "
              f"one image's layer4 map alone is {r['feature_map_bytes']:,} bytes")
    print("target: CFContra time <= 1.10 x MinEnt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
