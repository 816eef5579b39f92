"""Compare training runs in one page: result tables, curves, per-class IoU,
confusion matrices, sample predictions and the newest debug grids of each run.

A run folder is what the trainer writes: `config.yaml`, `metrics.jsonl`,
`history.json`, `results.json`, `final.pth`/`last.pth`, `debug/iter_<N>.png`. Runs of one config
(same `name`) with different `train.seed` form a group, reported as
mean +- sample standard deviation (ddof=1) over its seeds.

    runs = [load_run(p) for p in find_runs(["runs/a", "runs/b"])]
    build_report(runs, "report/")           # report/report.html (images embedded)
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from ..errors import ConfigError, SegadaptError
from .metrics import EvalResult
from ..utils.files import write_text_atomic

__all__ = ["Run", "RunGroup", "Stat", "mean_std", "find_runs", "load_run", "group_runs", "build_report",
           "require_matplotlib"]

RUN_FILES = ("config.yaml", "metrics.jsonl", "history.json", "results.json", "final.pth", "last.pth")
REPORT_HINT = "pip install 'segadapt[report]'"


# --------------------------------------------------------------------------- runs
@dataclass
class Run:
    path: Path
    name: str  # config.name
    seed: Optional[int]
    method: str
    config: dict  # as written to config.yaml (empty when absent)
    train_log: list[dict] = field(default_factory=list)  # metrics.jsonl training records, by iteration
    eval_log: list[dict] = field(default_factory=list)  # [{'iteration', 'mIoU', ...}]
    result: Optional[EvalResult] = None

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}" if self.seed is not None else f"{self.name} ({self.path.name})"

    @property
    def checkpoint(self) -> Optional[Path]:
        return next((self.path / n for n in ("final.pth", "last.pth") if (self.path / n).is_file()), None)

    @property
    def iterations(self) -> Optional[int]:
        if self.result is not None and isinstance(self.result.meta.get("iteration"), int):
            return self.result.meta["iteration"]
        return self.train_log[-1]["iteration"] if self.train_log else None


def _is_run(folder: Path) -> bool:
    return any((folder / f).is_file() for f in RUN_FILES)


def find_runs(paths: Sequence[str | os.PathLike], max_depth: int = 3) -> list[Path]:
    """Run folders among `paths`; a folder that is not a run is searched for runs
    (e.g. `runs/synthetic_source_only` holding `seed0/`, `seed1/`)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"run folder {p} does not exist" if not p.exists() else f"{p} is not a folder")
        if _is_run(p):
            found.append(p)
            continue
        runs, frontier = [], [p]
        for _ in range(max_depth):
            frontier = sorted(d for f in frontier for d in f.iterdir() if d.is_dir() and not d.name.startswith("."))
            runs += [d for d in frontier if _is_run(d)]
            frontier = [d for d in frontier if not _is_run(d)]
        if not runs:
            raise ConfigError(f"{p} is not a run folder (none of {', '.join(RUN_FILES)}) and holds no runs")
        found += sorted(runs)
    unique = []
    for p in found:
        if p.resolve() not in {q.resolve() for q in unique}:
            unique.append(p)
    return unique


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'msg', None) or e}") from None


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records) from metrics.jsonl; a resumed run logs some
    iterations twice: the later record wins."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), int):
            continue
        if "eval/mIoU" in rec:
            # {"iteration", "eval/mIoU", "eval/mIoU16", ...} -> the history.json form
            evals[rec["iteration"]] = {"iteration": rec["iteration"],
                                       **{k[5:]: v for k, v in rec.items() if k.startswith("eval/")}}
        elif any(k.startswith("loss") for k in rec):
            train[rec["iteration"]] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def load_run(path: str | os.PathLike) -> Run:
    """Read what a run folder holds; any file may be missing (a run in progress)."""
    path = Path(path)
    config: dict = {}
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read {path / 'config.yaml'}: {getattr(e, 'problem', e)}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{path / 'config.yaml'} is not a mapping")
    result = None
    if (path / "results.json").is_file():
        data = _read_json(path / "results.json")
        try:
            result = EvalResult.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path / 'results.json'} is not a segadapt result: {e}") from None
    meta = result.meta if result is not None else {}
    train_cfg = config.get("train") if isinstance(config.get("train"), dict) else {}
    method_cfg = config.get("method") if isinstance(config.get("method"), dict) else {}
    name = str(config.get("name") or meta.get("config") or path.name)
    seed = train_cfg.get("seed", meta.get("seed"))
    method = str(method_cfg.get("name") or meta.get("method") or "?")
    train_log, eval_log = [], []
    if (path / "metrics.jsonl").is_file():
        train_log, eval_log = _read_metrics(path / "metrics.jsonl")
    if (path / "history.json").is_file():
        history = _read_json(path / "history.json")
        if isinstance(history, list):
            eval_log = [h for h in history if isinstance(h, dict) and "iteration" in h and "mIoU" in h]
    return Run(path, name, seed if isinstance(seed, int) else None, method, config, train_log, eval_log, result)


# --------------------------------------------------------------------------- statistics
@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN for fewer than 2 values
    n: int

    def pct(self) -> str:
        """`45.00 ± 7.07` (percent), a single value for one run, `n/a` for none."""
        if self.n == 0 or math.isnan(self.mean):
            return "n/a"
        if self.n == 1 or math.isnan(self.std):
            return f"{100 * self.mean:.2f}"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"


def mean_std(values: Sequence[float]) -> Stat:
    """Mean and sample std over the defined (non-NaN, non-None) values."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size))


@dataclass
class RunGroup:
    name: str
    runs: list[Run]

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def label(self) -> str:
        if len(self.runs) == 1:
            return self.runs[0].label
        # columns of per-class scores average only the evaluated seeds: say how many those are
        partial = len(self.results) < len(self.runs)
        return f"{self.name} ({self.evaluated} seeds{' evaluated' if partial else ''})"

    @property
    def evaluated(self) -> str:
        """How many runs have results: "3", or "2/3" while one is still training."""
        done = len(self.results)
        return str(done) if done == len(self.runs) else f"{done}/{len(self.runs)}"

    @property
    def results(self) -> list[EvalResult]:
        return [r.result for r in self.runs if r.result is not None]

    @property
    def method(self) -> str:
        return ", ".join(sorted({r.method for r in self.runs}))

    def metric(self, key: str) -> Stat:
        """`mIoU`, `pixel_acc` or a subset name such as `mIoU16`."""
        values = []
        for res in self.results:
            values.append(res.miou if key == "mIoU" else res.pixel_accuracy if key == "pixel_acc"
                          else res.subset_mious.get(key, float("nan")))
        return mean_std(values)

    @property
    def class_names(self) -> list[str]:
        return self.results[0].class_names if self.results else []

    def per_class(self) -> list[Stat]:
        results = [r for r in self.results if r.class_names == self.class_names]
        return [mean_std([r.per_class_iou[c] for r in results]) for c in range(len(self.class_names))]

    def confusion(self) -> Optional[np.ndarray]:
        """Confusion matrix summed over the group's runs (rows = ground truth)."""
        mats = [np.asarray(r.confusion, dtype=np.float64) for r in self.results if r.confusion is not None]
        mats = [m for m in mats if m.shape == mats[0].shape] if mats else []
        return np.sum(mats, axis=0) if mats else None


def group_runs(runs: Sequence[Run]) -> list[RunGroup]:
    """Runs with the same config name and distinct seeds form one group (in order
    of first appearance); a name whose seeds repeat is reported run by run."""
    by_name: dict[str, list[Run]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    groups = []
    for name, members in by_name.items():
        seeds = [r.seed for r in members]
        if None in seeds or len(set(seeds)) < len(seeds):
            groups += [RunGroup(name, [r]) for r in members]
        else:
            groups.append(RunGroup(name, sorted(members, key=lambda r: r.seed)))
    return groups


# --------------------------------------------------------------------------- figures
def require_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"segadapt report needs matplotlib: {REPORT_HINT}") from None
    return Figure, FigureCanvasAgg


def _png(fig) -> bytes:
    _, canvas_cls = require_matplotlib()
    canvas_cls(fig)  # the Agg canvas: no pyplot, no global backend switch
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


_LINESTYLES = ("-", "--", ":", "-.")


def curves_figure(groups: Sequence[RunGroup]) -> Optional[bytes]:
    """Training loss and mIoU against iterations; one colour per group, one line per run."""
    if not any(r.train_log or r.eval_log for g in groups for r in g.runs):
        return None
    Figure, _ = require_matplotlib()
    fig = Figure(figsize=(12, 4))
    ax_loss, ax_miou = fig.subplots(1, 2)
    for color, g in zip(_colors(len(groups)), groups):
        for k, r in enumerate(g.runs):
            style = _LINESTYLES[k % len(_LINESTYLES)]
            pts = [(t["iteration"], t["loss"]) for t in r.train_log if isinstance(t.get("loss"), (int, float))]
            if pts:
                ax_loss.plot(*zip(*pts), style, color=color, label=r.label, linewidth=1.2)
            pts = [(e["iteration"], 100 * e["mIoU"]) for e in r.eval_log if isinstance(e.get("mIoU"), (int, float))]
            if pts:
                ax_miou.plot(*zip(*pts), style, color=color, marker="o", markersize=3, label=r.label)
    ax_loss.set(title="training loss", xlabel="iteration", ylabel="loss (sum of loss terms)")
    ax_miou.set(title="mIoU during training", xlabel="iteration", ylabel="mIoU (%)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_miou):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def per_class_figure(groups: Sequence[RunGroup]) -> Optional[bytes]:
    """Per-class IoU bars side by side (mean over seeds, error bar = std)."""
    groups = [g for g in groups if g.results]
    if not groups:
        return None
    names = groups[0].class_names
    groups = [g for g in groups if g.class_names == names]
    Figure, _ = require_matplotlib()
    fig = Figure(figsize=(max(8.0, 0.6 * len(names) * max(1, len(groups)) ** 0.5), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(groups)
    x = np.arange(len(names))
    for i, (color, g) in enumerate(zip(_colors(len(groups)), groups)):
        stats = g.per_class()
        means = np.array([100 * s.mean if s.n else 0.0 for s in stats])
        errs = np.array([100 * s.std if s.n > 1 and not math.isnan(s.std) else 0.0 for s in stats])
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, means, width, yerr=errs if errs.any() else None,
               color=color, label=g.label, capsize=2, error_kw={"linewidth": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="IoU (%)", ylim=(0, 100), title="per-class IoU")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def row_normalize(matrix: np.ndarray) -> np.ndarray:
    """Each ground-truth row divided by its total (NaN for classes absent from the ground truth)."""
    m = np.asarray(matrix, dtype=np.float64)
    totals = m.sum(axis=1, keepdims=True)
    out = np.full_like(m, np.nan)
    np.divide(m, totals, out=out, where=totals > 0)
    return out


def confusion_figure(group: RunGroup) -> Optional[bytes]:
    mat = group.confusion()
    if mat is None:
        return None
    Figure, _ = require_matplotlib()
    names = group.class_names if len(group.class_names) == mat.shape[0] else [str(i) for i in range(mat.shape[0])]
    norm = np.ma.masked_invalid(row_normalize(mat))
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    from matplotlib import colormaps

    cmap = colormaps["Blues"].with_extremes(bad="#dddddd")  # grey: classes without ground truth
    im = ax.imshow(norm, cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="ground truth")
    runs = f", summed over {len(group.results)} runs" if len(group.results) > 1 else ""
    ax.set_title(f"{group.label}: row-normalised confusion{runs}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def _tile(array: np.ndarray, width: int, nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = array.shape[:2]
    if w <= width:
        return array
    size = (width, max(1, round(h * width / w)))
    return np.asarray(Image.fromarray(array).resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def samples_figure(run: Run, num_images: int, device="cpu", tile_width: int = 384) -> bytes:
    """Input, prediction, label and error map for the first images of the run's
    eval set, predicted by its final checkpoint with its evaluation protocol."""
    from ..data.datasets import build_dataset
    from ..data.labels import IGNORE_INDEX, colorize
    from ..data.transforms import resize_image
    from .inference import predict
    from .predictor import infer_kwargs_from, load_segmenter_and_classes

    if run.checkpoint is None:
        raise ConfigError(f"{run.path} has no final.pth or last.pth")
    model, cfg, classes = load_segmenter_and_classes(run.checkpoint)
    palette = classes.palette if classes is not None else None  # the run's dataset colours
    model.to(device)
    dataset = build_dataset(cfg.eval.data)
    infer = infer_kwargs_from(cfg)
    rows = []
    for i in range(min(num_images, len(dataset))):
        item = dataset[i]
        image = item["image"][None].to(device)
        label = item.get("label")
        out_hw = tuple(label.shape) if label is not None else tuple(image.shape[-2:])
        pred = predict(model, image, out_hw, **infer)[0].cpu().numpy()
        rgb = (item["image"].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        rgb = resize_image(rgb, (out_hw[1], out_hw[0]))
        row = [_tile(rgb, tile_width, False), _tile(colorize(pred, palette), tile_width, True)]
        if label is not None:
            lbl = label.numpy()
            err = np.zeros(lbl.shape + (3,), dtype=np.uint8)
            err[(lbl != IGNORE_INDEX) & (lbl != pred)] = 255
            err[lbl == IGNORE_INDEX] = 100
            row += [_tile(colorize(lbl, palette), tile_width, True), _tile(err, tile_width, True)]
        rows.append((item.get("name", str(i)), row))
    if not rows:
        raise ConfigError(f"the eval set of {run.path} is empty")
    titles = ["input", "prediction", "label", "error (white = wrong, grey = ignored)"]
    Figure, _ = require_matplotlib()
    h, w = rows[0][1][0].shape[:2]
    cols = len(rows[0][1])
    fig = Figure(figsize=(3.2 * cols, 3.2 * h / w * len(rows) + 0.4))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (name, tiles) in enumerate(rows):
        for c, tile in enumerate(tiles):
            ax = axes[r, c]
            ax.imshow(tile, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(str(name)[-28:], fontsize=6)
    return _png(fig)


# --------------------------------------------------------------------------- page
def _subset_keys(groups: Sequence[RunGroup]) -> list[str]:
    keys: list[str] = []
    for g in groups:
        for res in g.results:
            keys += [k for k in res.subset_mious if k not in keys]
    return keys


def results_table(groups: Sequence[RunGroup]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per group, scores in percent as mean ± std."""
    subsets = _subset_keys(groups)
    header = ["config", "method", "runs", "seeds", "iterations", "mIoU", *subsets, "pixel acc."]
    rows = []
    for g in groups:
        iters = sorted({r.iterations for r in g.runs if r.iterations is not None})
        rows.append([g.name, g.method, g.evaluated,
                     ", ".join("?" if s is None else str(s) for s in g.seeds),
                     ", ".join(map(str, iters)) or "?", g.metric("mIoU").pct(),
                     *(g.metric(k).pct() for k in subsets), g.metric("pixel_acc").pct()])
    return header, rows


BASELINE_SUFFIX, ORACLE_SUFFIX = "source_only", "oracle"


def _track_of(name: str, names: set) -> Optional[str]:
    """The longest prefix P of ``name`` such that configs ``P + 'source_only'`` and ``P + 'oracle'``
    are both reported (``synthetic_mit_daformer`` -> ``synthetic_mit_``); None without one."""
    cuts = [i for i, ch in enumerate(name) if ch == "_"] + [-1]
    for i in sorted(cuts, reverse=True):
        prefix = name[:i + 1]
        if prefix + BASELINE_SUFFIX in names and prefix + ORACLE_SUFFIX in names:
            return prefix
    return None


def gap_table(groups: Sequence[RunGroup]) -> Optional[tuple[list[str], list[list[str]]]]:
    """(header, rows): each config against the source-only and oracle runs of its own track (the
    configs named ``<track>source_only`` and ``<track>oracle``): the gain of its mean mIoU over
    source-only and the share of the source-only -> oracle gap it closes. None without such a pair."""
    means = {g.name: g.metric("mIoU") for g in groups}
    names = {n for n, s in means.items() if s.n}
    rows = []
    for g in groups:
        track = _track_of(g.name, names)
        if track is None or g.name in (track + BASELINE_SUFFIX, track + ORACLE_SUFFIX) or not means[g.name].n:
            continue
        low, high, own = (means[track + BASELINE_SUFFIX].mean, means[track + ORACLE_SUFFIX].mean,
                          means[g.name].mean)
        closed = "n/a" if high <= low else f"{100 * (own - low) / (high - low):.0f}"
        rows.append([g.name, means[g.name].pct(), f"{100 * low:.2f}", f"{100 * high:.2f}",
                     f"{100 * (own - low):+.2f}", closed])
    if not rows:
        return None
    return ["config", "mIoU", "source-only", "oracle", "gain (points)", "gap closed (%)"], rows


def runs_table(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["run folder", "config", "seed", "iterations", "final train loss", "mIoU"]
    rows = []
    for r in runs:
        loss = next((t["loss"] for t in reversed(r.train_log) if isinstance(t.get("loss"), (int, float))), None)
        rows.append([str(r.path), r.name, "?" if r.seed is None else str(r.seed),
                     "?" if r.iterations is None else str(r.iterations),
                     "n/a" if loss is None else f"{loss:.4g}",
                     mean_std([r.result.miou] if r.result else []).pct()])
    return header, rows


def per_class_table(groups: Sequence[RunGroup]) -> Optional[tuple[list[str], list[list[str]]]]:
    groups = [g for g in groups if g.results]
    if not groups:
        return None
    names = groups[0].class_names
    groups = [g for g in groups if g.class_names == names]
    stats = [g.per_class() for g in groups]
    return ["class", *(g.label for g in groups)], [[n, *(s[c].pct() for s in stats)] for c, n in enumerate(names)]


def _slug(text: str, used: set) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"
    slug, k = base, 1
    while slug in used:
        k += 1
        slug = f"{base}_{k}"
    used.add(slug)
    return slug


@dataclass
class _Figure:
    file: str
    caption: str
    png: bytes


@dataclass
class _Section:
    anchor: str
    title: str
    tables: list = field(default_factory=list)  # (caption, header, rows)
    figures: list = field(default_factory=list)  # _Figure
    notes: list = field(default_factory=list)


def debug_section(runs, latest: int, used: set) -> _Section:
    """The last `latest` debug grids (`train.debug_every`, debug/iter_<N>.png) of each run."""
    from .debug_grid import debug_grid_files

    sec = _Section("debug", "Debug grids")
    if latest <= 0:
        sec.notes.append("disabled (--debug-grids 0)")
        return sec
    for run in runs:
        grids = debug_grid_files(run.path)[-latest:]
        if not grids:
            continue
        slug = _slug(f"debug {run.label}", used)
        for it, path in reversed(grids):
            try:
                png = path.read_bytes()
            except OSError as e:
                sec.notes.append(f"{run.label}: cannot read {path}: {e.strerror or e}")
                continue
            sec.figures.append(_Figure(f"{slug}_iter_{it}.png", f"{run.label}: training step {it}", png))
    if not sec.figures:
        sec.notes.append("no debug grids in these runs (train.debug_every=N writes one every N iterations)")
    else:
        sec.notes.insert(0, "What the method saw and made at a training step: a row per image of the batch; "
                            "labels and predictions in the class colours, confidence and entropy black (0) "
                            "to white (1). Newest first.")
    return sec


def _sections(runs, groups, samples, device, log, debug_grids: int = 3) -> list[_Section]:
    used: set = set()
    results = _Section("results", "Results")
    results.notes.append("Scores in percent. Runs of one config with different seeds are grouped: "
                         "mean ± sample standard deviation over the seeds.")
    results.tables.append(("By config", *results_table(groups)))
    gaps = gap_table(groups)
    if gaps:
        results.tables.append(("Against each track's source-only and oracle", *gaps))
    results.tables.append(("By run", *runs_table(runs)))

    curves = _Section("curves", "Training curves")
    png = curves_figure(groups)
    if png:
        curves.figures.append(_Figure("curves.png", "training loss and mIoU against iterations", png))
    else:
        curves.notes.append("no metrics.jsonl or history.json in these runs")

    per_class = _Section("per-class", "Per-class IoU")
    png = per_class_figure(groups)
    if png:
        per_class.figures.append(_Figure("per_class_iou.png", "per-class IoU (error bars: std over seeds)", png))
        per_class.tables.append(("", *per_class_table(groups)))
    else:
        per_class.notes.append("no results.json in these runs")

    confusion = _Section("confusion", "Confusion matrices")
    sample_sec = _Section("samples", "Target samples")
    for g in groups:
        slug = _slug(g.label, used)
        png = confusion_figure(g)
        if png:
            confusion.figures.append(_Figure(f"confusion_{slug}.png", g.label, png))
        else:
            confusion.notes.append(f"{g.label}: no confusion matrix in results.json")
        if samples <= 0:
            continue
        run = g.runs[0]
        try:
            png = samples_figure(run, samples, device)
        except SegadaptError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            sample_sec.notes.append(f"{run.label}: samples skipped ({msg})")
            log(f"warning: {run.label}: samples skipped ({msg})")
            continue
        sample_sec.figures.append(_Figure(f"samples_{slug}.png", f"{run.label}: first {samples} eval images", png))
    if samples <= 0:
        sample_sec.notes.append("disabled (--samples 0)")
    return [results, curves, per_class, confusion, sample_sec, debug_section(runs, debug_grids, used)]


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1250px;color:#222}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}.num{text-align:right}.txt{text-align:left}img{max-width:100%}
figure{margin:1em 0}figcaption{font-size:0.85em;color:#555}.note{color:#666;font-size:0.9em}"""


def _numeric(rows, col: int) -> bool:
    """Right-align a column whose cells are all numbers (or n/a, ?)."""
    return all(re.fullmatch(r"[-+\d.,±/ ]+|n/a|\?", str(row[col])) for row in rows)


def _html_table(caption, header, rows) -> str:
    esc = html.escape
    align = ["num" if _numeric(rows, c) else "txt" for c in range(len(header))]
    head = "".join(f'<th class="{a}">{esc(h)}</th>' for a, h in zip(align, header))
    body = "".join("<tr>" + "".join(f'<td class="{a}">{esc(c)}</td>' for a, c in zip(align, row)) + "</tr>"
                   for row in rows)
    title = f"<h3>{esc(caption)}</h3>" if caption else ""
    return f"{title}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(sections: Sequence[_Section], title: str, embed: bool = True) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
           "<nav>" + " · ".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections) + "</nav>"]
    for s in sections:
        out.append(f'<section id="{s.anchor}"><h2>{esc(s.title)}</h2>')
        out += [f'<p class="note">{esc(n)}</p>' for n in s.notes]
        out += [_html_table(*t) for t in s.tables]
        for f in s.figures:
            src = "data:image/png;base64," + base64.b64encode(f.png).decode("ascii") if embed else f.file
            out.append(f'<figure><img alt="{esc(f.caption)}" src="{src}">'
                       f"<figcaption>{esc(f.caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_table(caption, header, rows) -> str:
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = [f"### {caption}", ""] if caption else []
    rule = "|".join("---:" if _numeric(rows, c) else "---" for c in range(len(header)))
    lines += ["| " + " | ".join(map(cell, header)) + " |", f"|{rule}|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(sections: Sequence[_Section], title: str) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        out += [f"_{n}_\n" for n in s.notes]
        out += [_md_table(*t) + "\n" for t in s.tables]
        out += [f"![{f.caption}]({f.file})\n" for f in s.figures]
    return "\n".join(out).rstrip() + "\n"


def build_report(runs: Sequence[Run], out_dir: str | os.PathLike, markdown: bool = False, samples: int = 4,
                 device="cpu", title: str = "segadapt report", embed: bool = True,
                 log=print, debug_grids: int = 3) -> dict[str, Path]:
    """Write `report.html` (images embedded as base64 unless `embed=False`,
    then PNG files beside it) and with `markdown` also `report.md` + PNGs.
    `debug_grids`: the newest debug grids shown per run. Returns the written paths by kind."""
    require_matplotlib()
    if not runs:
        raise ConfigError("no runs to report")
    groups = group_runs(runs)
    sections = _sections(runs, groups, samples, device, log, debug_grids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"html": out / "report.html"}
    if markdown or not embed:
        for s in sections:
            for f in s.figures:
                (out / f.file).write_bytes(f.png)
                written[f.file] = out / f.file
    write_text_atomic(written["html"], render_html(sections, title, embed))
    if markdown:
        written["markdown"] = out / "report.md"
        write_text_atomic(written["markdown"], render_markdown(sections, title))
    return written
