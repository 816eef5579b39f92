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
    import dataclasses
    import os

    from ..utils.files import ensure_writable
    from ..engine.export import export_segmenter, require_onnx
    from ..engine.predictor import load_segmenter_and_classes, resolve_checkpoint
    from ..engine.run_folder import refuse_output_over_inputs
    from ..errors import ConfigError, SegadaptError, write_error

    if args.out.endswith(("/", os.sep)):  # Path() would drop the slash and write a file of that name
        suffix = ".onnx" if args.format == "onnx" else ".pt"
        raise ConfigError(f"--out {args.out} names a folder: give the file, e.g. {args.out}model{suffix}")
    refuse_output_over_inputs(args.out, [("the checkpoint", resolve_checkpoint(args.checkpoint)),
                                         ("the config", args.config)])
    if args.format == "onnx":
        require_onnx()  # before the (slow) checkpoint load
    model, cfg, classes = load_segmenter_and_classes(args.checkpoint, args.config)
    size = args.size or cfg.eval.data.resize
    if size is None:
        raise ConfigError("export needs --size W H (the config has no eval.data.resize)")
    out = ensure_writable(args.out)  # before the export, not after it
    # written beside --out and renamed once verified: a failed export or a full disk
    # leaves an earlier file at --out as it was
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        report = export_segmenter(model, args.format, tmp, size, with_argmax=args.with_argmax,
                                  tolerance=args.tolerance, opset=args.opset, classes=classes)
        os.replace(tmp, out)
    except SegadaptError as e:
        raise type(e)(str(e).replace(str(tmp), str(out))) from None
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    print(dataclasses.replace(report, path=out).summary())
    return 0
