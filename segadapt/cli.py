"""`segadapt` command line: train, test, synth.

Errors caused by input (data, config, checkpoints) or by the file system (a
full or read-only disk, a file or folder in the way: "cannot write <path>:
<cause>") are printed as one line and exit with status 2; `--debug` shows the
full traceback instead.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from .utils.threads import prefer_passive_waiting

# before anything loads torch (and its OpenMP runtime): beside other work, idle threads sleep
# instead of spinning, so a busy neighbour slows training far less (segadapt/utils/threads.py);
# the user's own setting wins
prefer_passive_waiting()

DEFAULT_CONFIG = "synthetic/source_only"


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.iters=500 optim.lr=0.01 model.backbone=resnet50")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segadapt", description="Unsupervised domain adaptation for semantic segmentation.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a segmenter with a UDA method (default: the synthetic benchmark)")
    p.add_argument("-c", "--config", default=None,
                   help=f"config file or packaged name (default: {DEFAULT_CONFIG}); see `segadapt configs`")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint or run folder (default: this config's out_dir/last.pth); "
                        "only cadence, workers, threads, paths and train.iters may be overridden, on the command "
                        "line or by a change to the -c file since the run started")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the run folder (default: refuse)")
    p.add_argument("--out", default=None, help="run folder (overrides out_dir)")
    p.add_argument("--seed", type=int, default=None, help="overrides train.seed")
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help="train once per seed (e.g. 0,1,2 or 0-4) into one group folder, <group>/seed<S>; "
                        "a killed sweep continues with the same command and --resume")
    p.add_argument("--jobs", type=int, default=1, help="with --seeds: runs at a time (default 1)")
    p.add_argument("--threads-per-run", type=int, default=None,
                   help="with --seeds: CPU threads of each run (default: the usable cores / --jobs)")
    p.add_argument("--pretrained", default=None, help="backbone/segmenter weights to start from (model.pretrained)")
    p.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars and image grids")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_overrides(p)

    p = sub.add_parser("test", help="evaluate a checkpoint (per-class IoU, mIoU)")
    p.add_argument("checkpoint", help="segadapt checkpoint (.pth or run folder), or ADVENT DeepLabV2 weights with --config")
    p.add_argument("-c", "--config", default=None, help="config for the model and evaluation data "
                   "(default: the one stored in a segadapt checkpoint)")
    p.add_argument("--out", default=None, help="folder for results.{md,csv,json} (default: next to the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    _add_overrides(p)

    p = sub.add_parser("synth", help="generate the built-in synthetic source->target benchmark")
    p.add_argument("--out", default="data/synthetic", help="output folder (default: data/synthetic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None)
    p.add_argument("--num-source", type=int, default=None)
    p.add_argument("--num-source-val", type=int, default=None)
    p.add_argument("--num-target-train", type=int, default=None)
    p.add_argument("--num-target-val", type=int, default=None)
    p.add_argument("--gap", type=float, default=None, help="strength of the appearance shift (default 1.0)")
    p.add_argument("--synthia", action="store_true", help="also write a SYNTHIA-layout copy of the source")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--condition", choices=("none", "fog", "night", "rain"), default=None,
                   help="render the target domain (train and val) in fog (contrast falls with depth), at night "
                        "(dark, headlights, street lamps, noise) or in rain (streaks, wet roads); the scenes and "
                        "labels are the daytime benchmark's (default: none, daytime)")

    sub.add_parser("configs", help="list the packaged configs")
    _register_extra_commands(sub)
    return parser


def _register_extra_commands(sub) -> None:
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)


def cmd_train(args) -> int:
    from .config import load_config
    from .engine.trainer import train_from_config

    overrides = list(args.overrides)
    if args.pretrained is not None:
        overrides.append(f"model.pretrained={args.pretrained}")
    if args.tensorboard:
        overrides.append("train.tensorboard=true")
    if args.seeds is not None:
        return _train_seeds(args, overrides)
    if args.jobs != 1 or args.threads_per_run is not None:
        from .errors import ConfigError

        raise ConfigError("--jobs and --threads-per-run belong to --seeds (one run uses train.threads)")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.out is not None:
        overrides.append(f"out_dir={args.out}")
    resume = None
    if args.resume is not None:
        from .engine.run_folder import resume_config
        from .errors import ConfigError

        if args.overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
        if args.resume != "auto" and "=" in args.resume and not Path(args.resume).exists():
            # `--resume optim.lr=0.1`: argparse took the override for the optional path
            overrides.insert(0, args.resume)
            args.resume = "auto"
        # the run continues with the configuration it started with (plus the overrides it allows)
        cfg, resume, config_file = resume_config(args.resume, overrides, args.config, DEFAULT_CONFIG)
    else:
        from .engine.run_folder import config_file_record

        cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
        config_file = config_file_record(args.config or DEFAULT_CONFIG)  # what a later --resume -c compares
    from .engine.run_folder import LOCK_NAME, missing_folders, remove_unused_run_folder
    from .utils.files import ensure_writable

    out_dir = Path(cfg.out_dir)
    created, lock_existed = missing_folders(out_dir), (out_dir / LOCK_NAME).exists()
    try:
        for name in ("last.pth", "final.pth"):  # a run that could not save its checkpoints fails now, not hours later
            ensure_writable(out_dir / name)
        result = train_from_config(cfg, resume=resume, progress=not args.no_progress, overwrite=args.overwrite,
                                   config_file=config_file, command=args.command_line)
    except BaseException:
        if _is_main():  # refused before anything was written: no empty run folder left behind
            remove_unused_run_folder(out_dir, created, lock_existed)
        raise
    if result is not None and _is_main():
        print(result.table())
        print(f"results written to {cfg.out_dir}/results.{{md,csv,json}}")
    return 0


def _train_seeds(args, overrides: list[str]) -> int:
    """`train --seeds`: one run per seed, each its own process (engine/sweep.py)."""
    from .config import load_config
    from .engine.sweep import Sweep, group_and_run_dirs, parse_seeds
    from .errors import ConfigError

    if args.seed is not None:
        raise ConfigError("give --seed (one run) or --seeds (several), not both")
    if args.resume not in (None, "auto"):
        if "=" in args.resume and not Path(args.resume).exists():
            overrides.insert(0, args.resume)  # `--resume key=value`: argparse took the override
        else:
            raise ConfigError("with --seeds, --resume continues the sweep and takes no path")
    if args.resume is not None and args.overwrite:
        raise ConfigError("--resume continues a sweep and --overwrite replaces it: give one of them")
    seeds = parse_seeds(args.seeds)
    # every seed's config checked (and its run folder found) before anything runs
    out_dirs = {s: load_config(args.config or DEFAULT_CONFIG, overrides + [f"train.seed={s}"]).out_dir
                for s in seeds}
    group, run_dirs = group_and_run_dirs(out_dirs, args.out)
    sweep = Sweep(args.config or DEFAULT_CONFIG, overrides, seeds, run_dirs, group, jobs=args.jobs,
                  threads=args.threads_per_run, resume=args.resume is not None, overwrite=args.overwrite,
                  progress=not args.no_progress, command=args.command_line)
    return sweep.run()


def cmd_test(args) -> int:
    from .data.datasets import build_dataset, restyled_eval_note
    from .utils import distributed as dist_utils
    from .engine.evaluator import evaluate
    from .engine.trainer import build_eval_loader, ensure_data, eval_kwargs
    from .utils.files import ensure_writable
    from .errors import CheckpointError, write_error
    from .engine.predictor import load_segmenter

    ckpt_path = Path(args.checkpoint)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / ("final.pth" if (ckpt_path / "final.pth").is_file() else "last.pth")
    if not ckpt_path.is_file():
        raise CheckpointError(f"checkpoint not found: {ckpt_path}")
    from .engine.run_folder import refuse_output_over_inputs

    out_dir = Path(args.out) if args.out else ckpt_path.parent / "test"
    refuse_output_over_inputs([out_dir] + [out_dir / f"results.{ext}" for ext in ("md", "csv", "json")],
                              [("the checkpoint", ckpt_path), ("the config", args.config)], shown_as=out_dir)
    ensure_writable(out_dir / "results.json")  # before the evaluation, not after it
    # the weights the run evaluated (an EMA teacher where it saved one), built without re-reading
    # its initialisation file; a backbone-only or ImageNet file is refused
    model, cfg = load_segmenter(ckpt_path, args.config, list(args.overrides))  # class counts checked there
    device = dist_utils.init_from_env(cfg.train.device)
    ensure_data(cfg)
    model.to(device)
    dataset = build_dataset(cfg.eval.data)
    loader = build_eval_loader(cfg, dataset)
    # per-class names from the dataset's class map (the 19 Cityscapes names without one)
    result = evaluate(model, loader, device=device, progress=not args.no_progress, **eval_kwargs(cfg, dataset))
    result.meta.update({"checkpoint": str(ckpt_path), "eval_root": cfg.eval.data.root,
                        "eval_split": cfg.eval.data.split, "eval_list": cfg.eval.data.list_file,
                        "eval_mode": cfg.eval.mode, "scales": list(cfg.eval.scales), "flip": cfg.eval.flip})
    note = restyled_eval_note(cfg.eval.data.root)
    if note:
        result.meta["restyled_eval_split"] = note
        if _is_main():
            print(f"warning: evaluated on a restyled copy, not the standard benchmark: {note}", file=sys.stderr)
    if _is_main():
        out = out_dir
        try:
            result.save(out, "results")
        except OSError as e:  # a failed write() names no file: say which ones
            raise write_error(e.filename or f"{out}/results.{{md,csv,json}}", e) from None
        print(result.table())
        print(f"results written to {out}/results.{{md,csv,json}}")
    return 0


def cmd_synth(args) -> int:
    from .data.synthetic import SynthParams, generate

    kwargs = {"seed": args.seed, "synthia": args.synthia, "condition": args.condition}
    for name in ("num_source", "num_source_val", "num_target_train", "num_target_val", "gap", "workers"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.size is not None:
        kwargs["size"] = tuple(args.size)
    if not Path(args.out).is_dir():
        from .utils.files import ensure_writable

        ensure_writable(args.out)  # named as given, not as the temporary folder the files go to first
    out = generate(Path(args.out), SynthParams(**kwargs))
    print(f"synthetic benchmark written to {out}")
    return 0


def cmd_configs(args) -> int:
    from .config import packaged_config_names

    for name in packaged_config_names():
        print(name)
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _one_line(exc: BaseException) -> str:
    """A worker-process error arrives wrapped with its traceback: keep its last line."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1].strip() if len(lines) > 1 else lines[0]
    for prefix in ("segadapt.errors.",):
        if last.startswith(prefix) and ": " in last:
            last = last.split(": ", 1)[1]
    return last


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                 errno.EDQUOT, errno.EFBIG}


def _os_error_line(e: OSError) -> str:
    """`cannot write <path>: <cause>` (or `<path>: <cause>`) for an OSError that reached the top."""
    cause = e.strerror or _one_line(e)
    if e.errno == errno.EEXIST and e.filename is not None and os.path.isfile(e.filename):
        cause = "a file is in the way (a folder is needed here)"  # mkdir over a file
    if e.filename is None:
        return f"{cause}" if e.errno not in _WRITE_ERRNOS else f"cannot write: {cause}"
    path = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"cannot write {path}: {cause}" if e.errno in _WRITE_ERRNOS else f"{path}: {cause}"


def _one_line_warnings(command: str) -> None:
    """segadapt's own warnings (SegadaptWarning) as one line each, like its errors; other
    libraries' warnings keep Python's format."""
    import warnings

    from .errors import SegadaptWarning

    python_format = getattr(warnings.formatwarning, "_python_format", warnings.formatwarning)

    def formatwarning(message, category, filename, lineno, line=None):
        if isinstance(category, type) and issubclass(category, SegadaptWarning):
            return f"segadapt {command}: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    formatwarning._python_format = python_format
    warnings.formatwarning = formatwarning


def main(argv=None) -> int:
    distributed = [False]
    code = _main(argv, distributed)
    if distributed[0]:  # a torchrun rank: leave before the interpreter's teardown
        from .utils.distributed import exit_now

        exit_now(code)
    return code


def _main(argv, distributed: list) -> int:
    parser = build_parser()
    # overrides may stand anywhere among the options (argparse stops filling a
    # positional list once an option follows it)
    args, extra = parser.parse_known_args(argv)
    args.command_line = ["segadapt", *(sys.argv[1:] if argv is None else argv)]
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    from .engine.host_memory import tune_malloc
    from .errors import PeerError, SegadaptError

    tune_malloc()  # before the first tensor: freed tensors stay reusable (see engine/host_memory.py)
    _one_line_warnings(args.command)
    handlers = {"train": cmd_train, "test": cmd_test, "synth": cmd_synth, "configs": cmd_configs}
    finished = False
    try:
        code = handlers[args.command](args) if args.command in handlers else args.func(args)
        finished = True
        return code
    except PeerError:
        return 2  # another rank printed the error
    except SegadaptError as e:
        if args.debug:
            raise
        sys.stdout.flush()  # what the command printed comes first, the error line last
        print(f"segadapt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segadapt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as e:
        # what the atomic writer does not wrap: a full or read-only disk, a file or
        # folder in the way, met anywhere (mkdir, a results file, a worker)
        if args.debug:
            raise
        sys.stdout.flush()
        print(f"segadapt {args.command}: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    finally:
        from .utils.distributed import cleanup

        # a failed rank must not wait at the exit barrier for peers that may never come
        distributed[0] = cleanup(wait_for_peers=finished)


if __name__ == "__main__":
    sys.exit(main())
