"""Colour statistics quoted in the README's synthetic-benchmark notes.

    python docs/synthetic_benchmark/image_stats.py --folders data/synthetic/source/images \
        data/synthetic/source_adain/images data/synthetic/source_cut/images \
        data/synthetic/target/leftImg8bit/train
    python docs/synthetic_benchmark/image_stats.py --generators runs/synthetic_confeti_stage1/seed0 \
        runs/synthetic_confeti_stage1/seed1 runs/synthetic_confeti_stage1/seed2
    python docs/synthetic_benchmark/image_stats.py --decoders data/synthetic/adain_mnv2_decoder.pth

``--folders``: mean RGB and pixel standard deviation (per channel over the first 200 images
in name order, then averaged over channels). ``--generators``: mean RGB of road pixels in 50
source images (every 12th of the first 600) translated by each CUT generator, with the
source's own and that of 50 target training images (every 8th of 400), road pixels found by
their labels. ``--decoders``: how well each AdaIN decoder reconstructs the source without
styling (alpha 0): PSNR and mean absolute shift of the image's mean colour, over 50 source
images (every 12th of the first 600). A source-side criterion: no target label is used.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from segadapt.commands.stylize import cut_translate
from segadapt.config import DatasetConfig
from segadapt.data.datasets import build_dataset
from segadapt.data.io import read_image
from segadapt.models.adain import AdaINStylizer
from segadapt.models.cut import generator_from_file

ROAD = 0


def folder_stats(folder: str, n: int = 200):
    files = sorted(Path(folder).rglob("*.png"))[:n]
    a = np.stack([read_image(f).astype(np.float32) / 255 for f in files])
    return a.mean((0, 1, 2)), a.std((0, 1, 2))


def road_colour(images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    road = labels == ROAD
    return np.array([float(images[:, c][road].mean()) for c in range(3)])


def reconstruction(decoder: str, images: torch.Tensor):
    stylizer = AdaINStylizer(decoder_path=decoder).eval()
    with torch.no_grad():
        out = torch.cat([stylizer.stylize_with_stats(images[i:i + 10], None, None, alpha=0.0)
                         for i in range(0, len(images), 10)])
    psnr = (-10 * torch.log10(((out - images) ** 2).mean((1, 2, 3)))).mean()
    shift = (out.mean((2, 3)) - images.mean((2, 3))).abs().mean()
    return float(psnr), float(shift), float(out.std())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folders", nargs="*", default=[])
    p.add_argument("--generators", nargs="*", default=[], help="CUT runs or latest_net_G.pth files")
    p.add_argument("--decoders", nargs="*", default=[], help="AdaIN decoder files")
    p.add_argument("--source", default="data/synthetic/source")
    p.add_argument("--target", default="data/synthetic/target")
    args = p.parse_args()
    for folder in args.folders:
        mean, std = folder_stats(folder)
        print(f"{folder}: mean RGB {np.round(mean, 3)}, std {np.round(std, 3)} (mean {std.mean():.2f})")
    if not (args.generators or args.decoders):
        return
    src = build_dataset(DatasetConfig(kind="gta5", root=args.source, split="all"))
    idx = range(0, 600, 12)  # the 50 source images both --generators and --decoders use
    x = torch.stack([src[i]["image"] for i in idx])
    if args.generators:
        tgt = build_dataset(DatasetConfig(kind="cityscapes", root=args.target, split="train"))
        y = torch.stack([src[i]["label"] for i in idx])
        t_idx = range(0, 400, 8)
        tx = torch.stack([tgt[i]["image"] for i in t_idx])
        ty = torch.stack([tgt[i]["label"] for i in t_idx])
        print(f"target road RGB {np.round(road_colour(tx, ty), 2)}; source road RGB {np.round(road_colour(x, y), 2)}")
        with torch.no_grad():
            for run in args.generators:
                translated = cut_translate(generator_from_file(run).eval(), x)
                print(f"{run}: translated road RGB {np.round(road_colour(translated, y), 2)}")
    for decoder in args.decoders:
        psnr, shift, std = reconstruction(decoder, x)
        print(f"{decoder}: reconstruction PSNR {psnr:.2f} dB, mean colour shift {shift:.4f}, "
              f"pixel std {std:.3f} (source {float(x.std()):.3f})")


if __name__ == "__main__":
    main()
