"""What CONFETI costs per training step over DAFormer, and where the time goes.

Same segmenter, same input size, same batch; the trainer's full step (forward +
losses, one backward, every optimizer, ``after_step``) on random tensors of the
configs' sizes. A ladder of variants, each adding one part of CONFETI, so that
the differences say where the time goes:

  daformer                DACS + RCS + feature distance (the base)
  + frozen G, prototypes  stage 2: G inference, CAM head, prototype update, source/mix contrast
  + joint CUT             stage 1 without consistency and target contrast: G, D, F trained
  + consistency           the prototypical semantic consistency (two frozen segmenter passes)
  = stage 1               + target-image contrast (one more student pass)
  single stage            the single-stage variant's settings

Every variant runs at an iteration past all switch-on thresholds, each in a
fresh process (peak memory: CUDA max allocated, or the process's peak RSS on
CPU). Reports ms/step (median), peak memory and the ratio to daformer.

    python benchmarks/bench_confeti_cost.py                           # synthetic configs (CPU-sized)
    python benchmarks/bench_confeti_cost.py --benchmark gta5_cityscapes --device cuda train.amp=bf16
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LADDER = [
    ("daformer", "daformer", []),
    ("+ frozen G, prototypes (stage 2)", "confeti_stage2", []),
    ("+ joint CUT training", "confeti_stage1", ["method.consistency=none", "method.target_contrast=false"]),
    ("+ consistency", "confeti_stage1", ["method.target_contrast=false"]),
    ("= stage 1 (+ target contrast)", "confeti_stage1", []),
    ("single stage", "confeti_single", []),
]


def run_variant(spec: dict) -> dict:
    import torch

    from benchmarks.bench_train_step import _patch_random_data, time_steps
    from segadapt.config import load_config
    from segadapt.engine import trainer as trainer_mod

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix="bench_confeti_")
    # rcs off: it only changes which images are drawn, and random data must not write a class-statistics cache
    overrides = [*spec["overrides"], f"out_dir={out}", "train.num_workers=0", "train.eval_every=0", "method.rcs=false",
                 f"train.device={spec['device']}"]
    cfg = load_config(spec["config"], overrides)
    if cfg.method.name == "confeti":
        if cfg.method.stage == 2:  # a G file of the configured width stands in for stage 1's
            from segadapt.models.cut import ResnetGenerator, save_cut_weights

            save_cut_weights(out, G=ResnetGenerator(cfg.method.cut.ngf, cfg.method.cut.n_blocks))
            cfg.method.cut.init = out
        else:
            cfg.method.cut.init = None
    _patch_random_data(cfg)
    t = trainer_mod.Trainer(cfg, progress=False)
    m = cfg.method
    start = 1 + max(int(getattr(m, k, 0) or 0) for k in ("contrast_start", "cross_domain_start", "cam_mix_start",
                                                          "consistency_start"))
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.device)
    times = time_steps(t, range(start, start + spec["warmup"] + spec["steps"]), spec["warmup"])
    if t.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(t.device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": statistics.median(times) * 1000, "peak_mib": peak, "device": str(t.device)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="synthetic", help="config folder: synthetic|gta5_cityscapes|...")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant (JSON spec)
    ap.add_argument("overrides", nargs="*", help="config overrides for every variant")
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(json.loads(args.variant))))
        return
    if args.benchmark == "synthetic":  # random tensors at the generated images' size (no resize in the configs)
        args.overrides = ["source.resize=[256,128]", "target.resize=[256,128]", *args.overrides]
    rows = []
    for label, name, extra in LADDER:
        spec = {"config": f"{args.benchmark}/{name}", "overrides": [*args.overrides, *extra], "steps": args.steps,
                "warmup": args.warmup, "threads": args.threads, "device": args.device}
        res = subprocess.run([sys.executable, __file__, "--variant", json.dumps(spec)], capture_output=True,
                             text=True, cwd=ROOT)
        if res.returncode != 0:
            sys.exit(f"{label}: failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else '?'}")
        rows.append({"variant": label, **json.loads(res.stdout.strip().splitlines()[-1])})
        print(f"{label:36s} {rows[-1]['ms']:9.1f} ms/step  peak {rows[-1]['peak_mib']:7.0f} MiB", flush=True)
    base = rows[0]
    print(f"\n{args.benchmark}, {base['device']}, {args.threads} thread(s), median of {args.steps} steps")
    print("| variant | ms/step | x daformer | + ms over the previous row | peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        delta = "" if i == 0 or i == len(rows) - 1 else f"{r['ms'] - rows[i - 1]['ms']:+.0f}"
        print(f"| {r['variant']} | {r['ms']:.0f} | {r['ms'] / base['ms']:.2f} | {delta} | {r['peak_mib']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
