"""A run folder belongs to one run and one process at a time.

- a fresh run refuses a folder that already holds a run (unless `--overwrite`);
- an exclusive `flock` on `<run>/.lock` keeps a second process out (the OS
  drops the lock when its holder dies, so a crash never leaves it stuck);
- under the lock, temporary checkpoint files of a killed write are removed.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, write_error

LOCK_NAME = ".lock"
# files a training run writes; any of the first four marks a folder as holding a run
RUN_MARKERS = ("last.pth", "final.pth", "metrics.jsonl", "config.yaml")
RUN_FILES = RUN_MARKERS + ("history.json", "results.md", "results.csv", "results.json", "provenance.json")
CHECKPOINT_NAMES = ("last.pth", "final.pth")
# the atomic writers (checkpoint.atomic_save, data.io.atomic_write) write `.<name>.<8 random>.tmp`
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def holds_run(folder: Path) -> bool:
    return any((Path(folder) / name).exists() for name in RUN_MARKERS)


class RunFolderLock:
    """Exclusive lock on a run folder for the lifetime of one training process."""

    def __init__(self, folder: Path):
        import fcntl

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        self._file = open(path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise ConfigError(f"run folder {self.folder} is in use by {holder} "
                              "(two runs cannot write one folder; wait for it or choose another out_dir)") from None
        try:  # who holds it, for the message a second process prints
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"segadapt pid {os.getpid()} on host {socket.gethostname()}\n")
            self._file.flush()
        except OSError as e:  # a full disk: not even these bytes fit
            self.release()
            raise write_error(path, e) from None

    def release(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()  # closing the descriptor drops the flock
            except OSError:  # the buffered pid line could not be flushed (full disk): closed all the same
                pass


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first (what creating it
    would create)."""
    out = []
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def remove_unused_run_folder(folder: Path, created, lock_existed: bool) -> None:
    """After a run refused before it wrote anything: remove the lock file it made (when that is
    all the folder holds and nobody holds the lock) and the folders of `created` left empty."""
    import fcntl

    folder = Path(folder)
    lock = folder / LOCK_NAME
    try:
        if not lock_existed and folder.is_dir() and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return  # another run took the folder meanwhile
                lock.unlink()
        for p in created:  # deepest first; stops at the first one holding something
            p.rmdir()
    except OSError:
        pass


def remove_orphan_temps(folder: Path) -> list[Path]:
    """Temporary checkpoint files left by a killed write; call only while holding the folder's lock."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if TEMP_NAME.match(p.name) and p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def prepare_run_folder(folder: Path, resume: Optional[str], overwrite: bool, inputs=()) -> RunFolderLock:
    """Lock `folder`, refuse to start a fresh run over an existing one (or clear it with
    `overwrite`), remove orphan temporary files. Returns the held lock.
    inputs: [(what, path)] the run reads (weights, data roots): never cleared, never the folder."""
    folder = Path(folder)
    refuse_output_over_inputs(folder, inputs, "out_dir")
    lock = RunFolderLock(folder)
    try:
        continues_here = resume is not None and _checkpoint_folder(resume) == folder.resolve()
        if holds_run(folder) and not continues_here:
            if not overwrite:
                if not any((folder / n).is_file() for n in CHECKPOINT_NAMES):
                    raise ConfigError(f"run folder {folder} already holds a run that wrote no checkpoint "
                                      "(nothing for --resume to continue): replace it with --overwrite")
                raise ConfigError(f"run folder {folder} already holds a run: continue it with --resume, "
                                  "or replace it with --overwrite")
            for what, p in inputs:
                if p is not None and Path(p).resolve().parent == folder.resolve() and Path(p).name in RUN_FILES:
                    raise ConfigError(f"--overwrite would delete {what} {p} before the run reads it: "
                                      "copy it out of the run folder first")
            for name in RUN_FILES:
                if (folder / name).is_file():
                    (folder / name).unlink()
            shutil.rmtree(folder / "tb", ignore_errors=True)
        remove_orphan_temps(folder)
    except BaseException:
        lock.release()
        raise
    return lock


def _checkpoint_folder(resume: str) -> Path:
    p = Path(resume).resolve()
    return p if p.is_dir() else p.parent


# --------------------------------------------------------------------------- outputs vs inputs
def refuse_output_over_inputs(outputs, inputs, option: str = "--out", *, shown_as=None, inside_inputs: bool = False,
                              contains_inputs: bool = False) -> None:
    """One line (ConfigError) when a command's output would replace what it reads or a run's record.

    outputs: the path(s) the command writes (a file, or a folder it writes into), shown in the
    message as `shown_as` (default: the output itself);
    inputs: [(what, path)] the command reads (None and empty entries are skipped).
    Always refused: an output that resolves to an input, or that would replace an existing
    checkpoint or record file of a run folder. `inside_inputs`: also refuse an output inside an
    input folder; `contains_inputs`: also refuse an input inside an output folder.
    """
    if isinstance(outputs, (str, os.PathLike)):
        outputs = [outputs]
    by_resolved = {}  # resolved input -> (what, as given)
    for what, p in inputs:
        if p is not None and str(p) != "":
            by_resolved.setdefault(Path(p).resolve(), (what, p))
    resolved_outputs = {}
    for out in outputs:
        r_out = Path(out).resolve()
        resolved_outputs.setdefault(r_out, out)
        name = f"{option} {shown_as if shown_as is not None else out}"
        if r_out in by_resolved:
            what, p = by_resolved[r_out]
            raise ConfigError(f"{name} would write over {what} {p}: choose another output")
        if inside_inputs:
            for parent in r_out.parents:
                if parent in by_resolved:
                    what, p = by_resolved[parent]
                    raise ConfigError(f"{name} is inside {what} {p}: choose an output outside it")
        if r_out.is_file() and (r_out.name in CHECKPOINT_NAMES
                                or (r_out.name in RUN_FILES and holds_run(r_out.parent))):
            raise ConfigError(f"{name} would replace the run file {r_out}: choose another output")
    if contains_inputs:
        for r_in, (what, p) in by_resolved.items():
            for parent in r_in.parents:
                if parent in resolved_outputs:
                    out = shown_as if shown_as is not None else resolved_outputs[parent]
                    raise ConfigError(f"{option} {out} contains {what} {p}: choose an output outside it")


# --------------------------------------------------------------------------- resume
# Keys a resumed run may change: they do not alter its trajectory (logging, checkpoint and
# evaluation cadence, workers, CPU threads, decoded-image caches, where the data and the run
# folder now live) or, for train.iters, extend it. Any other override that differs from the
# checkpoint's config is refused.
RESUME_MAY_CHANGE = (
    "train.iters", "train.log_every", "train.eval_every", "train.ckpt_every", "train.num_workers",
    "train.tensorboard", "train.device", "out_dir", "source.root", "target.root", "eval.data.root",
    "synthetic.out", "synthetic.workers", "eval.batch_size", "source.cache", "target.cache", "eval.data.cache",
    "train.threads", "train.loggers", "train.debug_every",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _override_keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].strip().lstrip("-") for o in overrides if "=" in o]


def _given_on_command_line(key: str, cli_keys: list[str]) -> bool:
    return any(key == c or key.startswith(c + ".") for c in cli_keys)


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _referencing(changed: set, raw: dict) -> set:
    """`changed` plus the keys whose written value refers to a changed one (`${a.b}`), transitively:
    the recorded config holds resolved values, so a changed reference changes them too."""
    out = set(changed)
    grew = True
    while grew:
        grew = False
        for key, value in raw.items():
            if key not in out and isinstance(value, str) and any("${" + c + "}" in value for c in out):
                out.add(key)
                grew = True
    return out


def config_file_record(config: str) -> Optional[dict]:
    """What a checkpoint records of the config file a run was started (or resumed) with: the
    values the file sets, so a later `--resume -c FILE` can tell what was changed in it since."""
    from ..config import config_file_values
    from ..errors import SegadaptError

    def plain(v):  # checkpoints load with the safe loader: no YAML dates or other objects
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)

    try:
        return {"config": str(config), "values": {k: plain(v) for k, v in config_file_values(config).items()}}
    except SegadaptError:
        return None


def resume_config(resume: str, overrides: list[str], config: Optional[str], default_config: str):
    """(Config, checkpoint path, config-file record) for `train --resume [PATH] [-c FILE]`: the
    checkpoint's own config plus the overrides RESUME_MAY_CHANGE allows; refuses other changes
    and a `-c` of another method.

    A change made to the `-c` file since the run started (or was last resumed with it) counts
    as the same override given on the command line (which wins over the file): allowed keys
    take effect, are said once and recorded; others are refused naming the key and both values.
    Checkpoints from before such records only warn about the file's differences."""
    from ..config import load_config
    from .checkpoint import load_checkpoint

    cli_keys = _override_keys(overrides)
    if config is not None:
        given = load_config(config, overrides)
    elif resume == "auto":
        # only to find the run folder: the method's own keys are checked against the run's method,
        # not the default config's
        given = load_config(default_config, [o for o, k in zip(overrides, cli_keys)
                                             if k != "method" and not k.startswith("method.")])
    else:
        given = None
    out_given = "out_dir" in cli_keys
    if resume == "auto":
        path = Path(given.out_dir) / "last.pth"
    else:
        path = Path(resume)
        path = path / "last.pth" if path.is_dir() else path
    ckpt = load_checkpoint(path)
    ckpt_cfg, ckpt_iter, record = ckpt["config"], int(ckpt["iteration"]), ckpt.get("config_file")
    version = int(ckpt.get("version", 1))
    del ckpt
    try:
        recorded = load_config(None, [], base=ckpt_cfg, base_version=version)
    except ConfigError as e:  # a key this version does not know, or a value it refuses
        raise ConfigError(f"checkpoint {path}: its config does not load in this segadapt version ({e})") from None
    before = _flat(recorded.to_dict())
    base = ckpt_cfg
    from_file: dict = {}  # key -> the -c file's value, where the file changed it
    if config is not None:
        if given.method.name != recorded.method.name:
            raise ConfigError(f"checkpoint {path} was trained with method '{recorded.method.name}', "
                              f"-c {config} names '{given.method.name}': resume without -c, or start a new run")
        if given.name != recorded.name:
            print(f"segadapt train: warning: --resume continues with the checkpoint's config '{recorded.name}', "
                  f"not -c {config} ('{given.name}')", file=sys.stderr)
        else:
            now = config_file_record(config)
            given_flat = _flat(given.to_dict())
            if isinstance(record, dict) and isinstance(record.get("values"), dict) and now is not None:
                then = record["values"]
                changed = {k for k in set(then) | set(now["values"]) if then.get(k) != now["values"].get(k)}
                changed = _referencing(changed, now["values"])
                from_file = {k: given_flat[k] for k in sorted(changed)
                             if k in given_flat and k not in ("out_dir", "name")
                             and not _given_on_command_line(k, cli_keys)}
                record = now
            else:  # a run from before the record: say what differs, change nothing
                differs = [k for k in sorted(now["values"] if now else [])
                           if k in given_flat and k not in ("out_dir", "name") and given_flat[k] != before.get(k)
                           and not _given_on_command_line(k, cli_keys)]
                if differs:
                    shown = ", ".join(f"{k} ({before.get(k)!r} in the run, {given_flat[k]!r} in the file)"
                                      for k in differs[:4]) + (" ..." if len(differs) > 4 else "")
                    print(f"segadapt train: warning: --resume: -c {config} differs from the run's recorded config "
                          f"in {shown}; this checkpoint does not record its config file, so the run's values are "
                          "kept: give a change on the command line to apply it", file=sys.stderr)
                record = now  # later resumes compare with the file as it is now
            if from_file:
                import copy

                base = copy.deepcopy(ckpt_cfg)
                for key, value in from_file.items():
                    _set_dotted(base, key, value)
    if not out_given and Path(recorded.out_dir).resolve() != path.resolve().parent:
        # the run continues in the folder its checkpoint is in (it may have been moved)
        overrides = [*overrides, f"out_dir={path.resolve().parent}"]
    cfg = load_config(None, overrides, base=base, base_version=version)
    after = _flat(cfg.to_dict())
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key) or key in RESUME_MAY_CHANGE:
            continue
        where = f"in -c {config} (changed since the run started)" if key in from_file else "given"
        raise ConfigError(f"--resume: {key} was {before.get(key)!r} in the checkpoint, {after.get(key)!r} {where}; "
                          "a resumed run keeps its settings (only cadence, workers, threads, paths and train.iters may "
                          "change): start a new run to change it")
    for key in from_file:
        if before.get(key) != after.get(key):
            print(f"segadapt train: --resume: {key} {before.get(key)!r} -> {after.get(key)!r} "
                  f"(changed in -c {config})", file=sys.stderr)
    if cfg.train.iters < ckpt_iter:
        raise ConfigError(f"--resume: train.iters={cfg.train.iters} is below the checkpoint's iteration {ckpt_iter}")
    return cfg, str(path), record
