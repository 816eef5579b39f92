"""Cost of each segmenter at its real config: parameters, GFLOP of one training step of the
segmenter (forward + backward of one batch at the config's crop: 3x the forward FLOP counted on
the meta device, no memory, no time), and CPU time of one forward + backward at a reduced size with random input.

    python benchmarks/bench_backbones.py                 # Markdown table
    python benchmarks/bench_backbones.py --cpu-size 256 --threads 2 --json out.json

GFLOP counts multiply-adds as 2 FLOPs (torch.utils.flop_counter). The backward is taken as twice
the forward: torch 2.13's counter ignores `groups` in convolution_backward, so it counts a
depthwise conv's backward C times over (the DAFormer head's separable ASPP: 10x the forward). A UDA method's whole step
costs more (teacher forward, mixed-batch forward, method heads); this is the segmenter's share,
the part that differs between backbones. Run it on a quiet machine: the CPU column is a timing.
HRDA rows count the training forward (the context at its scale, one detail crop, the scale
attention); their CPU time uses a detail crop of half each side of the timing input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from segadapt.config import load_config
from segadapt.models.segmenter import build_segmenter

ROWS = [
    ("DeepLabV2, ResNet-101 (ADVENT, caffe)", "gta5_cityscapes/source_only", []),
    ("DeepLabV2, ResNetV1c-101 (DAFormer's)", "gta5_cityscapes/daformer", []),
    ("SegFormer MiT-B5 + DAFormer head", "gta5_cityscapes/daformer_mitb5", []),
    ("DINOv2 ViT-L/14 + DAFormer head", "gta5_cityscapes/daformer_dinov2_vitl", []),
    ("DINOv2 ViT-L/14 + linear head", "gta5_cityscapes/daformer_dinov2_vitl", ["model.decode_head=linear"]),
    ("synthetic: ResNet-18 / 4 DeepLabV2", "synthetic/source_only", []),
    ("synthetic: MiT-B0 / 2 + DAFormer head 64", "synthetic_mit/source_only", []),
    ("synthetic: ImageNet MobileNetV2 DeepLabV2, output stride 8", "synthetic_mnv2/source_only", []),
    ("HRDA: MiT-B5 + DAFormer head, scale attention", "gta5_cityscapes/hrda_daformer_mitb5", []),
    ("synthetic: HRDA ResNet-18 / 4 DeepLabV2", "synthetic/hrda_daformer", []),
    ("synthetic: HRDA MiT-B0 / 2 + DAFormer head 64", "synthetic_mit/hrda_daformer", []),
]


def step_gflop(model_cfg, batch: int, hw: tuple[int, int]) -> float:
    with torch.device("meta"):
        model = build_segmenter(model_cfg).train()
        x = torch.empty(batch, 3, *hw)
    with FlopCounterMode(display=False) as fc:
        model(x)
    return 3 * fc.get_total_flops() / 1e9


def cpu_ms(model_cfg, size: int, repeats: int, channels_last: bool = False) -> float:
    if model_cfg.hrda.enabled:  # HRDA's geometry at the timing size: a detail crop of half each side
        model_cfg = dataclasses.replace(model_cfg, hrda=dataclasses.replace(model_cfg.hrda,
                                                                            detail_crop=[size // 2, size // 2]))
    torch.manual_seed(0)
    model = build_segmenter(model_cfg).train()
    x = torch.rand(1, 3, size, size)
    if channels_last:  # as the config trains (train.channels_last)
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        model(x)["main"].sum().backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first run allocates
            times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-size", type=int, default=256, help="side of the random CPU input (default 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-cpu", action="store_true", help="parameters and GFLOP only")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="rows whose config name contains this text")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"| segmenter (config) | parameters | train crop x batch | GFLOP / step | CPU ms, fwd+bwd 1x{args.cpu_size}² |")
    print("|---|---|---|---|---|")
    for label, name, overrides in ROWS:
        if args.only and args.only not in name:
            continue
        cfg = load_config(name, overrides)
        m = dataclasses.replace(cfg.model, pretrained=None)
        w, h = cfg.source.crop or cfg.source.resize or (256, 128)  # ADVENT: whole resized images
        batch = cfg.train.batch_source
        with torch.device("meta"):
            params = sum(p.numel() for p in build_segmenter(m).parameters())
        gflop = step_gflop(m, batch, (h, w))
        ms = None if args.no_cpu else cpu_ms(m, args.cpu_size, args.repeats, cfg.train.channels_last)
        rows.append(dict(label=label, config=name, overrides=overrides, params=params, crop=[w, h], batch=batch,
                         gflop_per_step=gflop, cpu_ms=ms))
        cpu = "-" if ms is None else f"{ms:,.0f}"
        print(f"| {label} (`{name}`{' ' + ' '.join(overrides) if overrides else ''}) | {params / 1e6:.2f} M | "
              f"{w}x{h} x {batch} | {gflop:,.0f} | {cpu} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
