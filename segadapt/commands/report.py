"""`segadapt report`: one HTML page comparing runs (tables, curves, per-class IoU,
confusion matrices, sample predictions, the newest debug grids of each run); seeds of one
config become mean ± std.

    segadapt report runs/synthetic_source_only runs/synthetic_advent --out reports/cmp
    segadapt report runs/*/seed* --out docs/results --markdown --samples 3
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="HTML/Markdown report comparing training runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders, or folders holding run folders (e.g. runs/<name> with seed*/ inside)")
    p.add_argument("--out", required=True, help="output folder for report.html (and report.md + PNGs)")
    p.add_argument("--markdown", action="store_true", help="also write report.md with PNG files beside it")
    p.add_argument("--linked", action="store_true", help="link PNG files beside report.html instead of embedding")
    p.add_argument("--samples", type=int, default=4, help="eval images per config in the sample grid (0: none)")
    p.add_argument("--debug-grids", type=int, default=3, metavar="N",
                   help="the newest N debug grids (train.debug_every) per run (0: none)")
    p.add_argument("--title", default="segadapt report")
    p.add_argument("--device", default="auto", help="device for the sample predictions: auto | cpu | cuda")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..utils.files import ensure_writable
    from ..engine.predictor import resolve_device
    from ..engine.report import build_report, find_runs, load_run, require_matplotlib
    from ..engine.run_folder import refuse_output_over_inputs
    from ..errors import ConfigError, write_error

    if args.samples < 0:
        raise ConfigError(f"--samples must be >= 0, got {args.samples}")
    if args.debug_grids < 0:
        raise ConfigError(f"--debug-grids must be >= 0, got {args.debug_grids}")
    require_matplotlib()  # fail before any work
    refuse_output_over_inputs(args.out, [("run folder", r) for r in args.runs])
    ensure_writable(Path(args.out) / "report.html")
    device = resolve_device(args.device)
    runs = [load_run(p) for p in find_runs(args.runs)]
    try:
        written = build_report(runs, args.out, markdown=args.markdown, samples=args.samples, device=device,
                               title=args.title, embed=not args.linked, debug_grids=args.debug_grids,
                               log=lambda msg: print(f"segadapt report: {msg}", file=sys.stderr))
    except OSError as e:  # a failed write() names no file
        raise write_error(e.filename or args.out, e) from None
    print(f"report on {len(runs)} run(s) written to {written['html']}"
          + (f" and {written['markdown']}" if "markdown" in written else ""))
    return 0
