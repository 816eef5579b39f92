"""`segadapt predict`: segment image files with a trained checkpoint.

    segadapt predict photos/ extra.jpg "more/*.png" --checkpoint runs/x/seed0 --out preds/
    segadapt predict img.png --checkpoint advent_gta.pth --config gta5_cityscapes/source_only --out p/ --entropy

Writes `<name>_color.png`, `<name>_overlay.png`, `<name>_trainid.png` (and
with --entropy `<name>_entropy.png`, `<name>_confidence.png`) at each input's
original size. Unreadable inputs are reported and skipped; the exit status is
1 when any input failed.
"""
from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="segment images with a trained checkpoint (colour, overlay, train ids)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--checkpoint", required=True,
                   help="segadapt checkpoint (.pth or run folder), or ADVENT DeepLabV2 weights with --config")
    p.add_argument("-c", "--config", default=None,
                   help="config for the model (default: the one stored in a segadapt checkpoint)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", choices=("whole", "slide"), default=None,
                   help="whole image or sliding window (default: the config's eval.mode)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("W", "H"), default=None, help="sliding-window size")
    p.add_argument("--stride", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="sliding-window step (default: half the crop)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="model input size (default: the config's eval resize, else each image's own size)")
    p.add_argument("--entropy", action="store_true", help="also write entropy and confidence maps")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours (default 0.5)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (same-size images)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..engine.predictor import (OUTPUT_SUFFIXES, Predictor, collect_images, infer_kwargs_from,
                                    load_segmenter_and_classes, resolve_checkpoint, resolve_device)
    from ..engine.run_folder import refuse_output_over_inputs
    from ..utils.files import ensure_writable
    from ..errors import ConfigError, DatasetError

    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    for option, value in (("--crop", args.crop), ("--stride", args.stride)):
        if value is not None and min(value) < 1:
            raise ConfigError(f"{option}: expected W H with positive sizes, got {value}")
    device = resolve_device(args.device)
    images, missing = collect_images(args.inputs)
    if not images:
        raise DatasetError("no images to predict: " + "; ".join(f"{spec}: {why}" for spec, why in missing[:3]))
    for spec, reason in missing:
        print(f"segadapt predict: warning: skipped {spec}: {reason}", file=sys.stderr)
    # no output replaces an input image (or the checkpoint), none lands in a folder read as input
    refuse_output_over_inputs(
        [Path(args.out)] + [Path(args.out) / f"{name}{suffix}" for _, name in images for suffix in OUTPUT_SUFFIXES],
        [("input folder", s) for s in args.inputs if Path(s).is_dir()] + [("input", p) for p, _ in images]
        + [("the checkpoint", resolve_checkpoint(args.checkpoint))], shown_as=args.out, inside_inputs=True)
    # a read-only or misplaced --out fails here, before the model is loaded
    ensure_writable(Path(args.out) / f"{images[0][1]}_trainid.png")

    # the colours are the classes' the model predicts (its dataset's class map, else Cityscapes')
    model, cfg, classes = load_segmenter_and_classes(args.checkpoint, args.config)
    infer = infer_kwargs_from(cfg)
    if args.mode is not None:
        infer["mode"] = args.mode
    if args.crop is not None:
        infer["crop"] = args.crop
    if args.stride is not None:
        infer["stride"] = args.stride
    if infer["mode"] == "slide" and not infer["crop"]:
        raise ConfigError("--mode slide needs --crop W H (the config has no eval.crop)")
    size = args.size if args.size is not None else cfg.eval.data.resize

    predictor = Predictor(model, device, infer, size=size, batch_size=args.batch_size,
                          palette=classes.palette if classes is not None else None)
    summary = predictor.predict_paths(images, args.out, entropy=args.entropy, alpha=args.alpha,
                                      progress=not args.no_progress,
                                      log=lambda msg: tqdm.write(f"segadapt predict: {msg}", file=sys.stderr))
    failed = missing + summary.failed
    done = f"{len(summary.written)} of {len(images) + len(missing)} inputs segmented; outputs in {args.out}"
    if failed:
        sys.stdout.flush()
        print(f"segadapt predict: {len(failed)} input(s) failed:", file=sys.stderr)
        for path, reason in failed:
            print(f"  {path}: {reason}", file=sys.stderr)
        # the verdict last, on one line
        print(f"segadapt predict: error: {len(failed)} input(s) failed (listed above); {done}", file=sys.stderr)
        return 1
    print(done)
    return 0
