"""The AdaIN figure of the README: source images (top), the decoder's reconstruction without
styling (alpha 0, middle) and the restyled images (alpha 1, bottom).

    python docs/synthetic_benchmark/make_adain_figure.py data/synthetic/adain_mnv2_decoder.pth \
        --out docs/synthetic_benchmark/adain_mobilenet.png
"""
import argparse

import numpy as np
import torch

from segadapt.config import DatasetConfig
from segadapt.data.datasets import build_dataset
from segadapt.data.io import write_png
from segadapt.models.adain import AdaINStylizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("decoder")
    p.add_argument("--source", default="data/synthetic/source")
    p.add_argument("--target", default="data/synthetic/target")
    p.add_argument("--images", type=int, nargs="+", default=[0, 5, 10, 15])
    p.add_argument("--num-styles", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    src = build_dataset(DatasetConfig(kind="gta5", root=args.source, split="all", labels=False))
    tgt = build_dataset(DatasetConfig(kind="cityscapes", root=args.target, split="train", labels=False))
    styles = torch.stack([tgt[i]["image"] for i in np.random.default_rng(0).choice(len(tgt), args.num_styles, False)])
    content = torch.stack([src[i]["image"] for i in args.images])
    s = AdaINStylizer(decoder_path=args.decoder).eval()
    mean, std = s.style_stats(styles)
    rows = [content, s.stylize_with_stats(content, mean, std, alpha=0.0), s.stylize_with_stats(content, mean, std)]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    write_png(args.out, (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    print(f"wrote {args.out} ({s.describe()['encoder']} encoder)")


if __name__ == "__main__":
    main()
