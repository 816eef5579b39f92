"""`segadapt export`: the plain segmenter as TorchScript or ONNX, checked against eager mode.

    segadapt export runs/x/seed0 --format torchscript --out model.pt --size 1024 512
    segadapt export advent_gta.pth --config gta5_cityscapes/source_only --format onnx --out m.onnx --with-argmax
"""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export the segmenter to TorchScript or ONNX (verified vs eager)")
    p.add_argument("checkpoint",
                   help="segadapt checkpoint (.pth or run folder), or ADVENT DeepLabV2 weights with --config")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="input size of the exported graph (default: the config's eval resize)")
    p.add_argument("-c", "--config", default=None,
                   help="config for the model (default: the one stored in a segadapt checkpoint)")
    p.add_argument("--with-argmax", action="store_true",
                   help="output train ids upsampled to the input size instead of stride-8 logits")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max abs logit difference allowed vs eager (default 1e-4 * (1 + max |logit|)); "
                        "with --with-argmax the allowed fraction of differing pixels (default 1e-3)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.export import export_segmenter, require_onnx
    from ..engine.predictor import load_segmenter
    from ..errors import ConfigError

    if args.format == "onnx":
        require_onnx()  # before the (slow) checkpoint load
    model, cfg = load_segmenter(args.checkpoint, args.config)
    size = args.size or cfg.eval.data.resize
    if size is None:
        raise ConfigError("export needs --size W H (the config has no eval.data.resize)")
    report = export_segmenter(model, args.format, args.out, size, with_argmax=args.with_argmax,
                              tolerance=args.tolerance, opset=args.opset)
    print(report.summary())
    return 0
