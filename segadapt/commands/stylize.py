"""`segadapt stylize`: write a restyled copy of a dataset in its own layout.

Images are restyled with AdaIN toward a few style images (default: the target
domain's Cityscapes train images), or translated by a trained CUT generator
(``--cut-generator``); labels and list files are copied byte for byte, so
the copy is read by the same dataset readers (point ``source.root`` at it).
The evaluation split (Cityscapes ``val``) is refused unless ``--include-eval``
is given: restyling it changes the benchmark, and the copy then says so in
``RESTYLED_EVAL_SPLIT.txt``. ``stylize.json`` records the settings, including
whether the encoder was the random one.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

SETTINGS_FILE = "stylize.json"
KINDS = ("gta5", "cityscapes", "synthia", "folder")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "stylize", help="write an AdaIN- or CUT-restyled copy of a dataset (same layout, labels copied)",
        description="Restyle a dataset's images with AdaIN (or a CUT generator) and write a copy in the same layout; "
                    "labels and list files are copied unchanged. Cityscapes val is refused unless --include-eval.")
    p.add_argument("--data-kind", required=True, choices=KINDS, help="layout of --root")
    p.add_argument("--root", required=True, help="dataset to restyle")
    p.add_argument("--out", required=True, help="folder for the restyled copy")
    p.add_argument("--split", default="train",
                   help="cityscapes: train/val/test; gta5/synthia: train or all (every image) (default: train)")
    p.add_argument("--list-file", default=None, help="restyle only the samples named in this list (relative to --root)")
    p.add_argument("--vgg", default=None, help="vgg_normalised.pth (default: a seeded RANDOM encoder, with a warning)")
    p.add_argument("--mobilenet", default=None, metavar="PATH|installed",
                   help="MobileNetV2 weights for a decoder trained with them (default: the file the decoder records)")
    p.add_argument("--decoder", default=None, help="decoder.pth (published, or from `segadapt adain-train`)")
    p.add_argument("--cut-generator", default=None,
                   help="translate with a CUT generator instead of AdaIN: a latest_net_G.pth, or a folder holding "
                        "one (e.g. a `segadapt train -c <benchmark>/cut` run); style options are then unused")
    p.add_argument("--style-dir", default=None, help="folder of style images (any layout, searched recursively)")
    p.add_argument("--target-root", default=None,
                   help="Cityscapes root whose leftImg8bit/train images are the styles (when no --style-dir)")
    p.add_argument("--num-styles", type=int, default=4, help="style images drawn at random (default 4, blended equally)")
    p.add_argument("--style-size", type=int, nargs=2, metavar=("W", "H"), default=[512, 256],
                   help="size the style images are resized to (default 512 256)")
    p.add_argument("--alpha", type=float, default=1.0, help="style strength in [0, 1] (default 1)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="restyle at this size, then resize back to each image's own size (default: own size)")
    p.add_argument("--include-eval", action="store_true",
                   help="allow restyling the evaluation split (changes the benchmark; marked in the output)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="image reading/writing threads and loader workers")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="which style images are drawn")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- helpers


def is_eval_split(kind: str, split: str, root: Path) -> bool:
    """The benchmark's evaluation images: Cityscapes val, or a bare folder inside a val split."""
    if kind == "cityscapes":
        return split == "val"
    if kind == "folder":
        return "val" in Path(os.path.abspath(root)).parts
    return False


def _write_image(path: Path, array) -> None:
    from PIL import Image

    from segadapt.utils.files import atomic_write

    ext = path.suffix.lower()
    im = Image.fromarray(array)
    # all or nothing: an interrupted run or a full disk never leaves a half-written image
    with atomic_write(path) as f:
        if ext in (".jpg", ".jpeg"):
            im.save(f, format="JPEG", quality=95)
        elif ext == ".bmp":
            im.save(f, format="BMP")
        else:
            im.save(f, format="PNG")


def _copy(src: Path, dst: Path) -> None:
    from segadapt.utils.files import atomic_write

    with open(src, "rb") as fin, atomic_write(dst) as fout:
        shutil.copyfileobj(fin, fout)


class _ImageFiles:
    """Dataset of (uint8 CHW tensor, index) for a DataLoader: decoding runs in its workers."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import numpy as np
        import torch

        from segadapt.data.io import read_image

        # the transposed copy is writable and contiguous: one copy, no read-only numpy buffer
        return torch.from_numpy(np.ascontiguousarray(read_image(self.paths[i]).transpose(2, 0, 1))), i


def _collate_list(items):
    return items


def _build_dataset(args, root: Path):
    from segadapt.config import DatasetConfig
    from segadapt.data.datasets import build_dataset

    if args.data_kind == "folder":
        return build_dataset(DatasetConfig(kind="folder", root=str(root), labels=False)), False
    probe = build_dataset(DatasetConfig(kind=args.data_kind, root=str(root), split=args.split,
                                        list_file=args.list_file, labels=False))
    label_folder = probe._label_folder()
    if label_folder is None or not label_folder.is_dir():
        print(f"segadapt stylize: no label folder {label_folder}: restyling images only", file=sys.stderr)
        return probe, False
    return build_dataset(DatasetConfig(kind=args.data_kind, root=str(root), split=args.split,
                                       list_file=args.list_file, labels=True)), True


def _label_files(ds, kind: str, with_labels: bool):
    """Every label file to copy: each sample's, plus its Cityscapes siblings (instance ids, colours, ...)."""
    if not with_labels:
        return []
    files = []
    for _, label in ds.samples:
        if kind == "cityscapes":
            prefix = label.name.split("_gtFine_")[0] + "_gtFine_"
            files += sorted(p for p in label.parent.glob(prefix + "*") if p.is_file())
        else:
            files.append(label)
    return list(dict.fromkeys(files))


def _list_files(root: Path, list_file):
    """The list files to copy: the one restyled (other lists would name images the copy lacks), else all at root."""
    if list_file:
        p = Path(os.path.expanduser(list_file))
        p = p if p.is_absolute() else root / p
        return [p] if p.is_file() and root.resolve() in p.resolve().parents else []
    from segadapt.data.datasets import RESTYLED_EVAL_MARKER

    return sorted(p for p in root.glob("*.txt") if p.is_file() and p.name != RESTYLED_EVAL_MARKER)


def cut_translate(G, x):
    """[0, 1] RGB through a CUT generator; sides reflect-padded to a multiple of 4 (its two
    stride-2 steps) and the output cropped back."""
    import torch
    import torch.nn.functional as F

    from segadapt.models.cut import from_cut_range, to_cut_range

    h, w = x.shape[-2:]
    ph, pw = -h % 4, -w % 4
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    with torch.no_grad():
        return from_cut_range(G(to_cut_range(x)))[..., :h, :w]


def _style_images(args):
    from segadapt.errors import ConfigError
    from segadapt.models.adain import load_style_images

    if args.style_dir:
        folder = Path(args.style_dir)
    elif args.target_root:
        folder = Path(args.target_root) / "leftImg8bit" / "train"
    else:
        raise ConfigError("give --style-dir or --target-root (whose Cityscapes train images are the styles)")
    if args.num_styles < 1:
        raise ConfigError(f"--num-styles must be >= 1, got {args.num_styles}")
    images, names = load_style_images(folder, tuple(args.style_size), max_images=args.num_styles,
                                      seed=args.seed, return_names=True)
    return folder, images, names


# --------------------------------------------------------------------------- command


def run(args) -> int:
    import torch
    import torch.nn.functional as F
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from segadapt.data.datasets import RESTYLED_EVAL_MARKER
    from segadapt.utils.files import ensure_writable, write_text_atomic
    from segadapt.errors import ConfigError
    from segadapt.models.adain import AdaINStylizer
    from segadapt.models.cut import generator_from_file

    root, out = Path(args.root), Path(args.out)
    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.batch_size < 1 or args.workers < 0:
        raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
    if args.size is not None and min(args.size) < 8:
        raise ConfigError(f"--size must be at least 8x8, got {args.size}")
    if (args.decoder is None) == (args.cut_generator is None):
        raise ConfigError("give --decoder (AdaIN: a published decoder.pth with --vgg, or one trained with "
                          "`segadapt adain-train`) or --cut-generator (a CUT latest_net_G.pth), not both")
    if not root.is_dir():
        raise ConfigError(f"--root {root} is not a folder")
    from segadapt.engine.run_folder import refuse_output_over_inputs

    refuse_output_over_inputs(out, [("--root", root), ("--style-dir", args.style_dir),
                                    ("--target-root", args.target_root), ("--decoder", args.decoder),
                                    ("--vgg", args.vgg), ("--cut-generator", args.cut_generator),
                                    ("--mobilenet", None if args.mobilenet == "installed" else args.mobilenet)],
                              inside_inputs=True, contains_inputs=True)
    eval_split = is_eval_split(args.data_kind, args.split, root)
    if eval_split and not args.include_eval:
        raise ConfigError(f"{args.data_kind} split {args.split!r} at {root} is the evaluation split; "
                          f"restyling it changes the benchmark (pass --include-eval to do it anyway)")
    settings_path = out / SETTINGS_FILE
    ensure_writable(settings_path)  # a file in the way or a read-only disk: now, not after the work
    if out.exists() and any(out.iterdir()) and not settings_path.is_file():
        raise ConfigError(f"--out {out} is a non-empty folder that is not a stylize output")

    from segadapt.utils.distributed import resolve_device

    device = resolve_device(args.device)
    ds, with_labels = _build_dataset(args, root)
    if args.cut_generator is not None:
        G = generator_from_file(args.cut_generator).to(device).eval()
        restyle, style_info = partial(cut_translate, G), {
            "stylizer": "cut", "cut_generator": os.path.abspath(args.cut_generator),
            "cut_ngf": G.model[1].out_channels, "random_encoder": False}
    else:
        style_folder, styles, style_names = _style_images(args)
        stylizer = AdaINStylizer(vgg_path=args.vgg, decoder_path=args.decoder,
                                 mobilenet_path=args.mobilenet).to(device).eval()
        mean, std = stylizer.style_stats(styles.to(device))
        restyle = partial(stylizer.stylize_with_stats, mean=mean, std=std, alpha=args.alpha)
        style_info = {
            "stylizer": "adain", "style_dir": os.path.abspath(style_folder), "style_images": style_names,
            "style_size": list(args.style_size), "num_styles": len(style_names), "style_weights": "equal",
            "alpha": args.alpha, "vgg": args.vgg, "decoder": args.decoder, "encoder": stylizer.describe(),
            "random_encoder": stylizer.random_encoder}

    if eval_split:
        print(f"WARNING: restyling the evaluation split ({args.data_kind} {args.split}); results evaluated on "
              f"{out} are not comparable to the standard benchmark", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    images = [img for img, _ in ds.samples]
    loader = DataLoader(_ImageFiles(images), batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=_collate_list, pin_memory=device.type == "cuda")
    pending = []
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for batch in tqdm(loader, desc="stylize", unit="batch", disable=args.no_progress, dynamic_ncols=True):
            by_size = {}
            for img, i in batch:
                by_size.setdefault(tuple(img.shape[-2:]), []).append((img, i))
            for (h, w), group in by_size.items():
                x = torch.stack([g[0] for g in group]).to(device, non_blocking=True).float().div_(255.0)
                if args.size is not None:
                    x = F.interpolate(x, size=(args.size[1], args.size[0]), mode="bilinear",
                                      align_corners=False, antialias=True)
                y = restyle(x)
                if y.shape[-2:] != (h, w):
                    y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False).clamp_(0, 1)
                arrays = y.mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
                for arr, (_, i) in zip(arrays, group):
                    dst = out / images[i].relative_to(root)
                    pending.append(pool.submit(_write_image, dst, arr))
            # bound the images waiting to be written; also surfaces write errors early
            while len(pending) > 4 * args.batch_size:
                pending.pop(0).result()
        for label in _label_files(ds, args.data_kind, with_labels):
            pending.append(pool.submit(_copy, label, out / label.relative_to(root)))
        lists = _list_files(root, args.list_file)
        lists = [(p, p.resolve().relative_to(root.resolve())) for p in lists]
        for lst, rel in lists:
            pending.append(pool.submit(_copy, lst, out / rel))
        for f in pending:
            f.result()

    run_info = {
        "kind": args.data_kind, "root": os.path.abspath(root), "split": args.split if args.data_kind != "folder" else None,
        "list_file": args.list_file, "images": len(images), "labels_copied": with_labels,
        "list_files_copied": [rel.as_posix() for _, rel in lists],
        "size": list(args.size) if args.size else None, "seed": args.seed, "eval_split": eval_split, **style_info,
    }
    _record(out, run_info)
    if eval_split:
        write_text_atomic(
            out / RESTYLED_EVAL_MARKER,
            f"This copy contains RESTYLED EVALUATION images ({args.data_kind} split {args.split} of {root}).\n"
            "Results evaluated on it are not comparable to the standard benchmark; say so when reporting them.\n")
    note = " (RANDOM encoder)" if style_info["random_encoder"] else ""
    print(f"restyled {len(images)} images{note} -> {out}")
    return 0


def _record(out: Path, run_info: dict) -> None:
    """stylize.json: one entry per restyled split (runs into the same --out accumulate)."""
    from segadapt.utils.files import write_text_atomic

    path = out / SETTINGS_FILE
    data = {"runs": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {"runs": {}}
    key = f"{run_info['kind']}:{run_info['split'] or '.'}:{run_info['list_file'] or ''}"
    data.setdefault("runs", {})[key] = run_info
    data["random_encoder"] = any(r.get("random_encoder") for r in data["runs"].values())
    data["includes_eval_split"] = any(r.get("eval_split") for r in data["runs"].values())
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
