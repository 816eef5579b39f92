"""The README's figure of CONFETI's stage-1 generators: source images (top row), then their
translations by the final G of each stage-1 seed (one row per seed).

    python docs/synthetic_benchmark/make_cut_seeds_figure.py runs/synthetic_confeti_stage1/seed0 \
        runs/synthetic_confeti_stage1/seed1 runs/synthetic_confeti_stage1/seed2 \
        --out docs/synthetic_benchmark/confeti_stage1_generators.png
"""
import argparse

import numpy as np
import torch

from segadapt.commands.stylize import cut_translate
from segadapt.config import DatasetConfig
from segadapt.data.datasets import build_dataset
from segadapt.data.io import write_png
from segadapt.models.cut import generator_from_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="stage-1 run folders (or latest_net_G.pth files)")
    p.add_argument("--source", default="data/synthetic/source")
    p.add_argument("--images", type=int, nargs="+", default=[0, 5, 10, 15])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    src = build_dataset(DatasetConfig(kind="gta5", root=args.source, split="all", labels=False))
    x = torch.stack([src[i]["image"] for i in args.images])
    rows = [x]
    with torch.no_grad():
        for run in args.runs:
            rows.append(cut_translate(generator_from_file(run).eval(), x))
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    write_png(args.out, (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
