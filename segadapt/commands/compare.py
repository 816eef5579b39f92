"""`segadapt compare`: is method A better than method B, given the spread over seeds?

    segadapt compare runs/synthetic_dacs runs/synthetic_daformer
    segadapt compare DACS=runs/synthetic_dacs DAFormer=runs/synthetic_daformer MIC=runs/synthetic_mic_daformer \\
        --out reports/cmp --per-class --pairs all

Markdown goes to stdout; its last line is the verdict (or a summary of the verdicts).
See docs/compare.md.
"""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="is group A better than group B? paired t intervals over seeds")
    p.add_argument("groups", nargs="+", metavar="GROUP",
                   help="run group folders (seed*/ with results.json inside) or run folders, optionally "
                        "LABEL=PATH; the first is the baseline")
    p.add_argument("--out", default=None,
                   help="folder for compare.md, compare.csv, compare_pairs.csv, compare.json, compare.png "
                        "(default: print only)")
    p.add_argument("--delta", type=float, default=0.5,
                   help="difference (points) the suggested number of seeds should resolve (default 0.5)")
    p.add_argument("--per-class", action="store_true", help="add a per-class IoU table")
    p.add_argument("--pairs", choices=("baseline", "all"), default="baseline",
                   help="compare each group with the first (default) or every pair")
    p.add_argument("--paired", action="store_true",
                   help="refuse groups that share fewer than 2 seeds (default: Welch's unpaired t, with a note)")
    p.add_argument("--metric", default="mIoU", help="mIoU (default), a subset such as mIoU16, or pixel_acc")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..engine.compare import OUTPUT_NAMES, compare_groups, load_group
    from ..engine.run_folder import refuse_output_over_inputs
    from ..errors import ConfigError
    from ..utils.files import ensure_writable

    if len(args.groups) < 2:
        raise ConfigError("compare needs at least two groups (the first is the baseline)")
    groups = [load_group(spec, args.metric) for spec in args.groups]
    if args.out is not None:
        out = Path(args.out)
        refuse_output_over_inputs([out / n for n in OUTPUT_NAMES], [("run group", g.path) for g in groups],
                                  shown_as=out)
        ensure_writable(out / "compare.json")
    result = compare_groups(groups, delta=args.delta, pairs=args.pairs, require_pairs=args.paired,
                            metric=args.metric)
    print(result.to_markdown(per_class=args.per_class))
    if args.out is not None:
        from ..engine.compare import write_outputs

        write_outputs(result, out, per_class=args.per_class)
        print(f"written to {out}/compare.{{md,csv,json,png}} and {out}/compare_pairs.csv")
    print(result.final_line())
    return 0
