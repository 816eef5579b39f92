"""Is method A better than method B? Seeds of each method against a baseline's.

A *run group* is a folder whose direct subfolders (`seed0/`, `seed1/`, ...) hold a
`results.json`, e.g. `runs/synthetic_daformer/`; a run folder with `results.json` directly
is a group of one seed. Every group is compared with the first (the baseline), or every
pair with ``pairs="all"``:

* seeds that both groups ran are paired; the mean of the per-seed differences gets a 95%
  confidence interval from Student's t on those differences (n-1 degrees of freedom);
* with fewer than 2 paired seeds, Welch's t interval for two unpaired groups;
* the verdict says whether the interval excludes 0, and if it does not, about how many seeds
  per method would resolve a difference of ``delta`` points at this spread (80% power).

Scores are shown in percentage points (EvalResult stores fractions).

    groups = [load_group(spec) for spec in ("runs/synthetic_dacs", "DAFormer=runs/synthetic_daformer")]
    result = compare_groups(groups)
    print(result.to_markdown()); print(result.final_line())
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError, SegadaptWarning
from ..utils.files import atomic_write, write_texts_atomic
from .metrics import EvalResult, nonfinite_to_none

__all__ = ["SeedRun", "Group", "Comparison", "CompareResult", "parse_group_spec", "load_group", "compare_groups",
           "compare_values", "t_cdf", "t_quantile", "paired_interval", "welch_interval", "seeds_needed_paired",
           "seeds_needed_unpaired", "write_outputs", "figure_png", "figure_size"]

LEVEL = 0.95  # confidence level of every interval
POWER = 0.80  # power behind the suggested number of seeds
RUN_MARKERS = ("last.pth", "final.pth", "config.yaml", "metrics.jsonl")  # a run folder without results yet


# --------------------------------------------------------------------------- Student's t
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast; else use the symmetry
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with `dof` (> 0, not necessarily whole) degrees of freedom."""
    tail = 0.5 * regularized_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The t with P(T <= t) = p, by bisection on :func:`t_cdf` (accurate to ~1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if dof <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {dof}")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- intervals
def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean, sd, t, half-width) of the t interval for the mean of paired differences (n >= 2)."""
    n = len(diffs)
    if n < 2:
        raise ValueError("a paired interval needs at least 2 differences")
    mean, sd = _mean_sd(diffs)
    t = t_quantile(0.5 + level / 2.0, n - 1)
    return mean, sd, t, t * sd / math.sqrt(n)


def welch_interval(a: Sequence[float], b: Sequence[float],
                   level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean(a) - mean(b), Welch-Satterthwaite dof, t, half-width); both groups need >= 2 values."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's interval needs at least 2 values per group")
    (mean_a, sd_a), (mean_b, sd_b) = _mean_sd(a), _mean_sd(b)
    va, vb = sd_a ** 2 / len(a), sd_b ** 2 / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # no spread at all: the interval is the point itself
        return mean_a - mean_b, float(len(a) + len(b) - 2), 0.0, 0.0
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = t_quantile(0.5 + level / 2.0, dof)
    return mean_a - mean_b, dof, t, t * se


MAX_SEEDS = 1_000_000  # a search bound, far beyond any real suggestion


def _smallest_n(enough) -> Optional[int]:
    """The smallest n >= 2 with enough(n) (a predicate that stays true once true), else None."""
    hi = 2
    while not enough(hi):
        if hi >= MAX_SEEDS:
            return None
        hi *= 2
    lo = hi // 2 if hi > 2 else 1  # enough(lo) is false (or lo < 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def seeds_needed_paired(sd: float, delta: float, level: float = LEVEL, power: float = POWER) -> Optional[int]:
    """Seeds per method (= pairs) so that a paired t test at `level` detects a true mean
    difference `delta` with probability `power`, for differences with standard deviation `sd`:
    the smallest n >= 2 with n >= ((t_{(1+level)/2, n-1} + t_{power, n-1}) * sd / delta)^2."""
    if math.isnan(sd) or delta <= 0:
        return None
    z = 0.5 + level / 2.0

    def enough(n: int) -> bool:
        return n >= ((t_quantile(z, n - 1) + t_quantile(power, n - 1)) * sd / delta) ** 2

    return _smallest_n(enough)


def seeds_needed_unpaired(sd_a: float, sd_b: float, delta: float, level: float = LEVEL,
                          power: float = POWER) -> Optional[int]:
    """Seeds per method for two unpaired groups of equal size n with the average variance
    s^2 = (sd_a^2 + sd_b^2) / 2: the smallest n >= 2 with
    n >= 2 ((t_{(1+level)/2, 2n-2} + t_{power, 2n-2}) * s / delta)^2."""
    if math.isnan(sd_a) or math.isnan(sd_b) or delta <= 0:
        return None
    s = math.sqrt((sd_a ** 2 + sd_b ** 2) / 2.0)
    z = 0.5 + level / 2.0

    def enough(n: int) -> bool:
        return n >= 2.0 * ((t_quantile(z, 2 * n - 2) + t_quantile(power, 2 * n - 2)) * s / delta) ** 2

    return _smallest_n(enough)


# --------------------------------------------------------------------------- groups
@dataclass
class SeedRun:
    seed: Optional[int]
    folder: Path
    value: float  # the compared metric, percentage points
    per_class: list[float]  # percentage points, NaN where undefined
    class_names: list[str]
    meta: dict


@dataclass
class Group:
    label: str
    path: Path
    runs: list[SeedRun]  # sorted by seed
    class_names: list[str]
    left_out: list[str] = field(default_factory=list)  # subfolders without results, as notes

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def values(self) -> list[float]:
        return [r.value for r in self.runs]

    def by_seed(self) -> dict:
        return {r.seed: r.value for r in self.runs if r.seed is not None}

    @property
    def mean_sd(self) -> tuple[float, float]:
        return _mean_sd(self.values)

    def class_mean_sd(self, c: int) -> tuple[float, float, int]:
        defined = [r.per_class[c] for r in self.runs if not math.isnan(r.per_class[c])]
        return (*_mean_sd(defined), len(defined))

    @property
    def benchmark(self) -> dict:
        """Where the first seed was evaluated (all seeds agree, see load_group)."""
        return _benchmark(self.runs[0].meta, self.class_names)


def parse_group_spec(spec: str) -> tuple[str, Path]:
    """`label=path` or `path` (label: the folder's name); a path that exists as given wins."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        if not label or not path:
            raise ConfigError(f"group {spec!r}: give LABEL=PATH or a folder")
        return label, Path(path)
    path = Path(spec)
    return (path.resolve().name if path.name in ("", ".", "..") else path.name), path


def _seed_of(meta: dict, folder: Path) -> Optional[int]:
    seed = meta.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    m = re.fullmatch(r"seed_?(\d+)", folder.name)
    return int(m.group(1)) if m else None


def _metric_value(result: EvalResult, metric: str, path: Path) -> float:
    if metric == "mIoU":
        value = result.miou
    elif metric == "pixel_acc":
        value = result.pixel_accuracy
    elif metric in result.subset_mious:
        value = result.subset_mious[metric]
    else:
        known = ", ".join(["mIoU", *result.subset_mious, "pixel_acc"])
        raise ConfigError(f"{path} has no metric {metric!r} (it has {known})")
    if value is None or math.isnan(value):
        raise ConfigError(f"{path}: {metric} is undefined (null)")
    return 100.0 * value


def _load_run(folder: Path, metric: str) -> SeedRun:
    path = folder / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is corrupt (not JSON: {e.msg} at line {e.lineno})") from None
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        result = EvalResult.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        what = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"{path} is corrupt (not a segadapt result: {what})") from None
    meta = result.meta if isinstance(result.meta, dict) else {}
    return SeedRun(_seed_of(meta, folder), folder, _metric_value(result, metric, path),
                   [100.0 * v for v in result.per_class_iou], list(result.class_names), meta)


def _benchmark(meta: dict, class_names: Sequence[str]) -> dict:
    bench = {k: meta.get(k) for k in ("eval_root", "eval_split", "eval_list")}
    if bench["eval_root"] is not None:
        bench["eval_root"] = os.path.normpath(str(bench["eval_root"]))
    bench["num_classes"] = len(class_names)
    return bench


def _describe_benchmark(bench: dict) -> str:
    parts = [str(bench["eval_root"]) if bench.get("eval_root") is not None else "an unrecorded root"]
    if bench.get("eval_split") is not None:
        parts.append(f"split {bench['eval_split']}")
    if bench.get("eval_list") is not None:
        parts.append(f"list {bench['eval_list']}")
    parts.append(f"{bench['num_classes']} classes")
    return ", ".join(parts)


def _benchmark_mismatch(a_name: str, a: SeedRun, a_classes: list, b_name: str, b: SeedRun,
                        b_classes: list) -> Optional[str]:
    """A one-line reason why two runs were not evaluated on the same benchmark, or None."""
    bench_a, bench_b = _benchmark(a.meta, a_classes), _benchmark(b.meta, b_classes)
    differs = [k for k in ("eval_root", "eval_split", "eval_list")
               if bench_a[k] is not None and bench_b[k] is not None and bench_a[k] != bench_b[k]]
    if differs or len(a_classes) != len(b_classes):
        return (f"{a_name} and {b_name} were evaluated on different benchmarks: {a_name} on "
                f"{_describe_benchmark(bench_a)}, {b_name} on {_describe_benchmark(bench_b)}")
    if a_classes != b_classes:
        c = next(i for i, (x, y) in enumerate(zip(a_classes, b_classes)) if x != y)
        return (f"{a_name} and {b_name} name their classes differently (class {c}: {a_classes[c]!r} in "
                f"{a_name}, {b_classes[c]!r} in {b_name}): not the same benchmark")
    return None


def load_group(spec: str, metric: str = "mIoU") -> Group:
    """One group from `path` or `label=path`: a run folder (one seed) or a folder of run folders."""
    label, path = parse_group_spec(spec)
    if not path.exists():
        raise ConfigError(f"run group {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"run group {path} is not a folder")
    if (path / "results.json").is_file():
        folders, left_out = [path], []
    else:
        subfolders = sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")),
                            key=lambda d: d.name)
        folders = [d for d in subfolders if (d / "results.json").is_file()]
        unfinished = [d for d in ([path] + subfolders) if any((d / m).is_file() for m in RUN_MARKERS)
                      and not (d / "results.json").is_file()]
        left_out = [f"{d}: {_present(d)} but no results.json (still training?)" for d in unfinished if d != path]
        if not folders:
            hint = f"; {unfinished[0]} has {_present(unfinished[0])} but no results.json (still training?)" \
                if unfinished else ""
            raise ConfigError(f"run group {path} holds no results.json (looked for {path}/results.json and "
                              f"{path}/*/results.json){hint}")
        for note in left_out:
            warnings.warn(f"{label}: left out {note}", SegadaptWarning, stacklevel=2)
    runs = [_load_run(d, metric) for d in folders]
    names = runs[0].class_names
    for run in runs[1:]:
        mismatch = _benchmark_mismatch(str(runs[0].folder), runs[0], names, str(run.folder), run, run.class_names)
        if mismatch:
            raise ConfigError(mismatch)
    seen: dict = {}
    for run in runs:
        if run.seed is None:
            if len(runs) > 1:
                raise ConfigError(f"{run.folder}/results.json records no seed (meta.seed) and the folder is not "
                                  f"named seedN: cannot pair it with the other seeds of {label}")
            continue
        if run.seed in seen:
            raise ConfigError(f"group {label} has seed {run.seed} twice: {seen[run.seed]} and {run.folder}")
        seen[run.seed] = run.folder
    runs.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
    return Group(label, path, runs, names, left_out)


def _present(folder: Path) -> str:
    return ", ".join(m for m in RUN_MARKERS if (folder / m).is_file())


def check_same_benchmark(groups: Sequence[Group]) -> None:
    base = groups[0]
    for g in groups[1:]:
        mismatch = _benchmark_mismatch(base.label, base.runs[0], base.class_names, g.label, g.runs[0],
                                       g.class_names)
        if mismatch:
            raise ConfigError(mismatch)


# --------------------------------------------------------------------------- comparisons
def _fmt_seeds(seeds: Sequence) -> str:
    return ",".join(str(s) for s in seeds) if seeds else "-"


def _signed(x: float) -> str:
    return f"{x:+.2f}"


@dataclass
class Comparison:
    """`group - baseline` over the seeds: the interval, its test and the verdict."""
    group: str
    baseline: str
    test: str  # "paired" | "welch" | "none"
    seeds: list  # the paired seeds used (paired), else []
    n_group: int
    n_baseline: int
    mean_diff: float
    diffs: list[float] = field(default_factory=list)  # per paired seed (paired)
    sd: float = float("nan")  # sd of the differences (paired)
    sd_group: float = float("nan")
    sd_baseline: float = float("nan")
    dof: float = float("nan")
    t: float = float("nan")
    ci: Optional[tuple[float, float]] = None
    seeds_needed: Optional[int] = None
    delta: float = 0.5
    note: str = ""  # why the test is not the paired one

    @property
    def name(self) -> str:
        return f"{self.group} - {self.baseline}"

    @property
    def distinguishable(self) -> bool:
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)

    @property
    def ahead(self) -> int:
        return sum(d > 0 for d in self.diffs)

    @property
    def behind(self) -> int:
        return sum(d < 0 for d in self.diffs)

    @property
    def test_label(self) -> str:
        if self.test == "paired":
            return f"t, paired, n-1 = {int(self.dof)} dof"
        if self.test == "welch":
            return f"Welch t, unpaired, {self.dof:.1f} dof"
        return "none"

    def _ci_text(self) -> str:
        return f"[{_signed(self.ci[0])}, {_signed(self.ci[1])}]"

    def verdict(self, unit: str = "mIoU points") -> str:
        if self.ci is None:
            return (f"{self.name} = {_signed(self.mean_diff)} {unit}: no confidence interval ({self.note}; "
                    f"needs 2 paired seeds, or 2 seeds in each group)")
        if self.test == "paired":
            how = f"paired t over seeds {_fmt_seeds(self.seeds)}"
            n_text = f"{len(self.seeds)} seeds"
            spread = f"sd of differences {self.sd:.2f}"
        else:
            n_text = f"{self.n_group} vs {self.n_baseline} seeds"
            # the not-distinguishable text names the seed counts already
            how = f"Welch t, unpaired, {n_text}: {self.note}" if self.distinguishable else \
                f"Welch t, unpaired: {self.note}"
            spread = f"sd {self.sd_group:.2f} in {self.group}, {self.sd_baseline:.2f} in {self.baseline}"
        if self.distinguishable:
            text = f"{self.name} = {_signed(self.mean_diff)} {self._ci_text()} {unit} (95% CI, {how})"
            if self.test == "paired":
                side, count = ("ahead", self.ahead) if self.mean_diff > 0 else ("behind", self.behind)
                text += f": {side} on {count}/{len(self.diffs)} seeds"
            return text
        need = (f"about {self.seeds_needed} seeds per method" if self.seeds_needed is not None
                else f"more than {MAX_SEEDS} seeds per method")
        return (f"{self.name}: not distinguishable at {n_text} (95% CI {self._ci_text()} contains 0; {how}): "
                f"at this spread ({spread}) {need} would resolve a {self.delta:g}-point difference")

    def short(self) -> str:
        if self.ci is None:
            return f"{self.group} vs {self.baseline}: no CI"
        if self.distinguishable:
            side = "ahead of" if self.mean_diff > 0 else "behind"
            return f"{self.group} {side} {self.baseline} by {_signed(self.mean_diff)} {self._ci_text()}"
        return f"{self.group} not distinguishable from {self.baseline}"

    def to_dict(self, unit: str = "mIoU points") -> dict:
        return {"group": self.group, "baseline": self.baseline, "test": self.test, "test_label": self.test_label,
                "paired_seeds": list(self.seeds), "n_group": self.n_group, "n_baseline": self.n_baseline,
                "differences": list(self.diffs), "mean_difference": self.mean_diff, "sd_of_differences": _num(self.sd),
                "sd_group": _num(self.sd_group), "sd_baseline": _num(self.sd_baseline), "dof": _num(self.dof),
                "t_quantile": _num(self.t), "ci95": list(self.ci) if self.ci else None,
                "distinguishable": self.distinguishable, "delta": self.delta, "seeds_needed": self.seeds_needed,
                "note": self.note, "verdict": self.verdict(unit)}


def _num(x: float):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def compare_values(group: str, values: dict, baseline: str, base_values: dict, *, unpaired_values=None,
                   base_unpaired_values=None, require_pairs: bool = False, delta: float = 0.5) -> Comparison:
    """`group - baseline` from {seed: value} of each (percentage points). Seeds present in both
    are paired; with fewer than 2 pairs, Welch's interval on all values (`*_unpaired_values`:
    values of runs without a seed, used there too). `require_pairs`: ConfigError instead."""
    all_group = list(values.values()) + list(unpaired_values or [])
    all_base = list(base_values.values()) + list(base_unpaired_values or [])
    seeds = sorted(set(values) & set(base_values))
    mean_g, sd_g = _mean_sd(all_group)
    mean_b, sd_b = _mean_sd(all_base)
    common = dict(group=group, baseline=baseline, n_group=len(all_group), n_baseline=len(all_base),
                  sd_group=sd_g, sd_baseline=sd_b, delta=delta)
    if len(seeds) >= 2:
        diffs = [values[s] - base_values[s] for s in seeds]
        mean, sd, t, half = paired_interval(diffs)
        return Comparison(test="paired", seeds=seeds, mean_diff=mean, diffs=diffs, sd=sd, dof=len(seeds) - 1, t=t,
                          ci=(mean - half, mean + half), seeds_needed=seeds_needed_paired(sd, delta), **common)
    if not seeds:
        note = (f"no seeds pair ({group}: {_fmt_seeds(sorted(values))}; "
                f"{baseline}: {_fmt_seeds(sorted(base_values))})")
    else:
        note = f"only seed {seeds[0]} is in both"
    if require_pairs:
        raise ConfigError(f"--paired: {group} and {baseline} need at least 2 seeds in common, {note}")
    if len(all_group) < 2 or len(all_base) < 2:
        lone, count = (group, len(all_group)) if len(all_group) < 2 else (baseline, len(all_base))
        return Comparison(test="none", seeds=[], mean_diff=mean_g - mean_b,
                          note=f"{note}, and {lone} has {'no seed' if count == 0 else 'one seed'}", **common)
    mean, dof, t, half = welch_interval(all_group, all_base)
    return Comparison(test="welch", seeds=[], mean_diff=mean, dof=dof, t=t, ci=(mean - half, mean + half),
                      seeds_needed=seeds_needed_unpaired(sd_g, sd_b, delta), note=note, **common)


def _group_values(g: Group, class_index: Optional[int] = None) -> tuple[dict, list]:
    """({seed: value}, [values of runs without a seed]); a class's undefined IoU is left out."""
    by_seed, unseeded = {}, []
    for r in g.runs:
        v = r.value if class_index is None else r.per_class[class_index]
        if math.isnan(v):
            continue
        if r.seed is None:
            unseeded.append(v)
        else:
            by_seed[r.seed] = v
    return by_seed, unseeded


def _pair_indices(n: int, pairs: str) -> list[tuple[int, int]]:
    if pairs == "baseline":
        return [(i, 0) for i in range(1, n)]
    if pairs == "all":
        return [(j, i) for i in range(n) for j in range(i + 1, n)]
    raise ConfigError(f"--pairs must be baseline or all, got {pairs!r}")


@dataclass
class CompareResult:
    groups: list[Group]
    comparisons: list[Comparison]
    class_comparisons: list[list[Comparison]]  # per comparison, one per class
    metric: str = "mIoU"
    delta: float = 0.5
    pairs: str = "baseline"

    @property
    def unit(self) -> str:
        return f"{self.metric} points"

    def verdicts(self) -> list[str]:
        return [c.verdict(self.unit) for c in self.comparisons]

    def final_line(self) -> str:
        """The one-line answer: the verdict, or a summary of several."""
        if len(self.comparisons) == 1:
            return self.verdicts()[0]
        if not self.comparisons:
            return "nothing to compare: give at least two groups"
        return f"{len(self.comparisons)} comparisons (95% CI): " + "; ".join(c.short() for c in self.comparisons)

    # -- Markdown ---------------------------------------------------------- #
    def to_markdown(self, per_class: bool = False) -> str:
        bench = self.groups[0].benchmark
        out = [f"# Comparison: {self.metric} (%)", "",
               f"Benchmark: {_describe_benchmark(bench)}. {self.metric} in percent; mean ± sample std (ddof=1) "
               f"over seeds.", "",
               f"| group | folder | seeds | {self.metric} mean ± std | per seed |", "|---|---|---|---:|---|"]
        for g in self.groups:
            mean, sd = g.mean_sd
            per_seed = ", ".join(f"{r.seed if r.seed is not None else r.folder.name}: {r.value:.2f}" for r in g.runs)
            out.append(f"| {g.label} | {g.path} | {_fmt_seeds([s for s in g.seeds if s is not None])} "
                       f"| {_mean_sd_text(mean, sd)} | {per_seed} |")
        if self.comparisons:
            out += ["", "## Comparisons", "",
                    "| comparison | test | seeds | difference | 95% CI | sd of differences | ahead / behind "
                    f"| seeds per method for {self.delta:g} points |",
                    "|---|---|---|---:|---|---:|---|---:|"]
            for c in self.comparisons:
                seeds = _fmt_seeds(c.seeds) if c.test == "paired" else f"{c.n_group} vs {c.n_baseline}"
                ci = c._ci_text() if c.ci else "n/a"
                sd = f"{c.sd:.2f}" if c.test == "paired" else "n/a"
                wins = f"{c.ahead} / {c.behind} of {len(c.diffs)}" if c.test == "paired" else "n/a"
                need = str(c.seeds_needed) if c.seeds_needed is not None else "n/a"
                out.append(f"| {c.name} | {c.test_label} | {seeds} | {_signed(c.mean_diff)} | {ci} | {sd} | {wins} "
                           f"| {need} |")
            out += ["", "## Verdicts", ""] + [f"- {v}" for v in self.verdicts()]
        notes = [f"{g.label}: left out {n}" for g in self.groups for n in g.left_out]
        restyled = sorted({str(r.meta["restyled_eval_split"]) for g in self.groups for r in g.runs
                           if r.meta.get("restyled_eval_split")})
        notes += [f"evaluated on a restyled copy, not the standard benchmark: {n}" for n in restyled]
        if notes:
            out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
        if per_class:
            out += ["", *self._per_class_markdown()]
        return "\n".join(out) + "\n"

    def _per_class_markdown(self) -> list[str]:
        names = self.groups[0].class_names
        head = ["class"] + [f"{g.label} (mean ± std)" for g in self.groups] + [f"{c.name} (95% CI)"
                                                                               for c in self.comparisons]
        out = ["## Per class (IoU %)", "", "| " + " | ".join(head) + " |",
               "|---|" + "---:|" * (len(self.groups) + len(self.comparisons))]
        for k, name in enumerate(names):
            cells = [name]
            for g in self.groups:
                mean, sd, n = g.class_mean_sd(k)
                cells.append(_mean_sd_text(mean, sd) if n else "n/a")
            for per_class in self.class_comparisons:
                c = per_class[k]
                cells.append(f"{_signed(c.mean_diff)} {c._ci_text()}" if c.ci else
                             ("n/a" if math.isnan(c.mean_diff) else _signed(c.mean_diff)))
            out.append("| " + " | ".join(cells) + " |")
        out += ["", "Per-class intervals are each at 95%; with many classes some exclude 0 by chance."]
        return out

    # -- CSV and JSON ------------------------------------------------------ #
    def to_csv(self) -> str:
        """One row per group and seed: the metric and every class's IoU (percent)."""
        names = self.groups[0].class_names
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["group", "folder", "seed", self.metric] + list(names))
        for g in self.groups:
            for r in g.runs:
                w.writerow([g.label, str(r.folder), "" if r.seed is None else r.seed, f"{r.value:.4f}"]
                           + ["" if math.isnan(v) else f"{v:.4f}" for v in r.per_class])
        return buf.getvalue()

    def pairs_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["group", "baseline", "test", "paired_seeds", "n_group", "n_baseline", "mean_difference",
                    "ci95_low", "ci95_high", "sd_of_differences", "dof", "distinguishable", "seeds_needed",
                    "delta", "verdict"])
        for c in self.comparisons:
            w.writerow([c.group, c.baseline, c.test, " ".join(map(str, c.seeds)), c.n_group, c.n_baseline,
                        f"{c.mean_diff:.4f}", *(f"{x:.4f}" for x in (c.ci or ())), *(("", "") if not c.ci else ()),
                        "" if math.isnan(c.sd) else f"{c.sd:.4f}", "" if math.isnan(c.dof) else f"{c.dof:.4f}",
                        str(c.distinguishable).lower(), "" if c.seeds_needed is None else c.seeds_needed,
                        c.delta, c.verdict(self.unit)])
        return buf.getvalue()

    def to_dict(self) -> dict:
        names = self.groups[0].class_names
        groups = []
        for g in self.groups:
            mean, sd = g.mean_sd
            per_class = {}
            for k, name in enumerate(names):
                m, s, n = g.class_mean_sd(k)
                per_class[name] = {"mean": _num(m), "std": _num(s), "n": n}
            groups.append({"label": g.label, "path": str(g.path), "n": len(g.runs), "seeds": g.seeds,
                           "mean": mean, "std": _num(sd), "per_class": per_class, "left_out": list(g.left_out),
                           "runs": [{"seed": r.seed, "folder": str(r.folder), "value": r.value,
                                     "per_class": [_num(v) for v in r.per_class],
                                     "method": r.meta.get("method"), "config": r.meta.get("config"),
                                     "iteration": r.meta.get("iteration")} for r in g.runs]})
        return nonfinite_to_none({"units": "percentage points", "metric": self.metric, "level": LEVEL, "power": POWER,
                "delta": self.delta, "pairs": self.pairs, "benchmark": self.groups[0].benchmark,
                "class_names": list(names), "groups": groups,
                "comparisons": [c.to_dict(self.unit) for c in self.comparisons],
                "per_class_comparisons": [{"comparison": c.name,
                                           "classes": {name: pc.to_dict(f"{name} IoU points")
                                                       for name, pc in zip(names, per_class)}}
                                          for c, per_class in zip(self.comparisons, self.class_comparisons)],
                "verdicts": self.verdicts(), "final": self.final_line()})


def _mean_sd_text(mean: float, sd: float) -> str:
    return f"{mean:.2f}" if math.isnan(sd) else f"{mean:.2f} ± {sd:.2f}"


def compare_groups(groups: Sequence[Group], *, delta: float = 0.5, pairs: str = "baseline",
                   require_pairs: bool = False, metric: str = "mIoU") -> CompareResult:
    """Every group against the first (`pairs="baseline"`) or every later group against every
    earlier one (`pairs="all"`), on the metric and on each class."""
    if not delta > 0 or math.isinf(delta):
        raise ConfigError(f"--delta must be a positive number of points, got {delta}")
    groups = list(groups)
    labels = [g.label for g in groups]
    for label in labels:
        if labels.count(label) > 1:
            raise ConfigError(f"two groups are named {label}: name them with LABEL=PATH")
    check_same_benchmark(groups)
    comparisons, class_comparisons = [], []
    for i, j in _pair_indices(len(groups), pairs):
        g, b = groups[i], groups[j]
        (gv, gu), (bv, bu) = _group_values(g), _group_values(b)
        comparisons.append(compare_values(g.label, gv, b.label, bv, unpaired_values=gu, base_unpaired_values=bu,
                                          require_pairs=require_pairs, delta=delta))
        per_class = []
        for k in range(len(groups[0].class_names)):
            (gv, gu), (bv, bu) = _group_values(g, k), _group_values(b, k)
            if not (gv or gu) or not (bv or bu):  # a class no seed of one group defines
                per_class.append(Comparison(g.label, b.label, "none", [], len(gv) + len(gu), len(bv) + len(bu),
                                            float("nan"), delta=delta, note="undefined in a group"))
                continue
            per_class.append(compare_values(g.label, gv, b.label, bv, unpaired_values=gu, base_unpaired_values=bu,
                                            delta=delta))
        class_comparisons.append(per_class)
    return CompareResult(groups, comparisons, class_comparisons, metric=metric, delta=delta, pairs=pairs)


# --------------------------------------------------------------------------- figure
FIG_LEFT, FIG_GROUP_W, FIG_LEGEND_W, FIG_H = 80, 150, 110, 420
FIG_TOP, FIG_BOTTOM = 40, 70  # margins of the plot area
SEED_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def figure_size(num_groups: int) -> tuple[int, int]:
    """(width, height) of compare.png in pixels."""
    return FIG_LEFT + FIG_GROUP_W * max(1, num_groups) + FIG_LEGEND_W, FIG_H


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, target: int = 8) -> list[float]:
    raw = (hi - lo) / max(1, target - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _fit(draw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def figure_png(result: CompareResult) -> bytes:
    """Per-seed points of every group (one colour per seed, the same in every group, and a thin
    line joining a seed across neighbouring groups), with each group's mean ± std bar."""
    from PIL import Image, ImageDraw

    groups = result.groups
    width, height = figure_size(len(groups))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    values = [v for g in groups for v in g.values]
    stds = [g.mean_sd for g in groups]
    lo = min(values + [m - s for m, s in stds if not math.isnan(s)])
    hi = max(values + [m + s for m, s in stds if not math.isnan(s)])
    pad = 0.1 * (hi - lo) if hi > lo else max(0.5, 0.01 * abs(hi))
    lo, hi = lo - pad, hi + pad
    top, bottom = FIG_TOP, height - FIG_BOTTOM
    right = FIG_LEFT + FIG_GROUP_W * len(groups)

    def y_of(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    for tick in _nice_ticks(lo, hi):  # grid, ticks and their labels
        y = y_of(tick)
        draw.line([(FIG_LEFT, y), (right, y)], fill=(232, 232, 232))
        draw.line([(FIG_LEFT - 5, y), (FIG_LEFT, y)], fill="black")
        label = f"{tick:g}" if abs(tick) >= 1 or tick == 0 else f"{tick:.2g}"
        draw.text((FIG_LEFT - 8, y), label, fill="black", font=small, anchor="rm")
    draw.rectangle([FIG_LEFT, top, right, bottom], outline="black")
    draw.text((FIG_LEFT, 12), f"{result.metric} (%) per seed, mean ± std per group", fill="black", font=font)
    axis = Image.new("RGB", (bottom - top, 18), "white")  # the y label, drawn sideways
    ImageDraw.Draw(axis).text(((bottom - top) / 2, 9), f"{result.metric} (%)", fill="black", font=font, anchor="mm")
    img.paste(axis.rotate(90, expand=True), (16, top))

    seeds = sorted({s for g in groups for s in g.seeds if s is not None})
    color = {s: SEED_COLORS[k % len(SEED_COLORS)] for k, s in enumerate(seeds)}
    spread = min(14.0, 70.0 / max(1, len(seeds)))
    offset = {s: (k - (len(seeds) - 1) / 2) * spread for k, s in enumerate(seeds)}
    centers = [FIG_LEFT + FIG_GROUP_W * (i + 0.5) + 15 for i in range(len(groups))]
    for a, b, ca, cb in zip(groups, groups[1:], centers, centers[1:]):  # a seed across neighbours
        for s in seeds:
            va, vb = a.by_seed().get(s), b.by_seed().get(s)
            if va is not None and vb is not None:
                draw.line([(ca + offset[s], y_of(va)), (cb + offset[s], y_of(vb))], fill=_pale(color[s]))
    for g, cx in zip(groups, centers):
        mean, sd = g.mean_sd
        bar_x = cx - 50
        if not math.isnan(sd):
            draw.line([(bar_x, y_of(mean - sd)), (bar_x, y_of(mean + sd))], fill="black", width=2)
            for v in (mean - sd, mean + sd):
                draw.line([(bar_x - 5, y_of(v)), (bar_x + 5, y_of(v))], fill="black", width=2)
        draw.line([(bar_x - 9, y_of(mean)), (bar_x + 9, y_of(mean))], fill="black", width=3)
        for r in g.runs:
            x, y = cx + offset.get(r.seed, 0.0), y_of(r.value)
            fill = color.get(r.seed, (0, 0, 0))
            draw.ellipse([x - 4.5, y - 4.5, x + 4.5, y + 4.5], fill=fill, outline="black")
        label_x = FIG_LEFT + FIG_GROUP_W * (groups.index(g) + 0.5)
        draw.text((label_x, bottom + 16), _fit(draw, g.label, font, FIG_GROUP_W - 10), fill="black", font=font,
                  anchor="mm")
        text = f"n={len(g.runs)}: {mean:.2f}" + ("" if math.isnan(sd) else f" ± {sd:.2f}")
        draw.text((label_x, bottom + 36), text, fill=(80, 80, 80), font=small, anchor="mm")
    legend_x, legend_y = right + 18, top
    draw.text((legend_x, legend_y), "seed", fill="black", font=font)
    shown = seeds[:16]
    for k, s in enumerate(shown):
        y = legend_y + 24 + 18 * k
        draw.ellipse([legend_x, y - 4.5, legend_x + 9, y + 4.5], fill=color[s], outline="black")
        draw.text((legend_x + 16, y), str(s), fill="black", font=small, anchor="lm")
    if len(seeds) > len(shown):
        draw.text((legend_x, legend_y + 24 + 18 * len(shown)), f"+{len(seeds) - len(shown)} more", fill="black",
                  font=small, anchor="lm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pale(rgb: tuple) -> tuple:
    return tuple(int(c + 0.6 * (255 - c)) for c in rgb)


# --------------------------------------------------------------------------- outputs
OUTPUT_NAMES = ("compare.md", "compare.csv", "compare_pairs.csv", "compare.json", "compare.png")


def write_outputs(result: CompareResult, out_dir, per_class: bool = False) -> dict[str, Path]:
    """compare.md, compare.csv, compare_pairs.csv, compare.json (one set) and compare.png in `out_dir`."""
    out = Path(out_dir)
    paths = {name: out / name for name in OUTPUT_NAMES}
    png = figure_png(result)  # drawn before anything is written
    write_texts_atomic({paths["compare.md"]: result.to_markdown(per_class=per_class),
                        paths["compare.csv"]: result.to_csv(),
                        paths["compare_pairs.csv"]: result.pairs_csv(),
                        paths["compare.json"]: json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"})
    with atomic_write(paths["compare.png"]) as f:
        f.write(png)
    return paths
