"""`segadapt compare`: statistics checked by hand, verdicts, outputs and every bad input."""
import csv
import json
import math

import pytest
from PIL import Image

from segadapt.cli import main
from segadapt.engine.compare import (compare_groups, compare_values, figure_size, load_group, paired_interval,
                                     seeds_needed_paired, seeds_needed_unpaired, t_cdf, t_quantile, welch_interval)
from segadapt.engine.metrics import EvalResult
from segadapt.errors import SegadaptWarning

CLASSES = ("road", "car")


def make_run(folder, seed, miou_pct, *, classes=CLASSES, eval_root="data/bench/target", eval_split="val",
             seed_in_meta=True):
    """A results.json as the trainer writes it; per-class IoU: miou and miou + 10 points (2 classes)."""
    per_class = [miou_pct / 100, miou_pct / 100 + 0.1] + [float("nan")] * (len(classes) - 2)
    meta = {"config": folder.parent.name, "method": "m", "iteration": 100, "eval_root": eval_root,
            "eval_split": eval_split}
    if seed_in_meta:
        meta["seed"] = seed
    EvalResult(per_class_iou=per_class, class_names=list(classes), pixel_accuracy=0.9, miou=miou_pct / 100,
               meta=meta).save(folder)
    return folder


def make_group(root, values, seeds=None, **kw):
    """runs in root/seed<S>/ with mIoU values (percent)."""
    seeds = range(len(values)) if seeds is None else seeds
    for s, v in zip(seeds, values):
        make_run(root / f"seed{s}", s, v, **kw)
    return root


def run_cli(capsys, *argv):
    code = main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- Student's t
@pytest.mark.parametrize("p, dof, expected", [(0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 29, 2.0452),
                                              (0.975, 1, 12.7062), (0.975, 9, 2.2622), (0.8, 9, 0.8834),
                                              (0.8, 8, 0.8889), (0.995, 10, 3.1693), (0.9, 3, 1.6377)])
def test_t_quantile_matches_tables(p, dof, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(1 - p, dof) == pytest.approx(-expected, abs=1e-4)


def test_t_cdf_is_symmetric_and_inverts_the_quantile():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(-1.3, 2.5) == pytest.approx(1 - t_cdf(1.3, 2.5))
    assert t_cdf(t_quantile(0.975, 4.0755), 4.0755) == pytest.approx(0.975, abs=1e-10)
    assert t_quantile(0.975, 2.5) < t_quantile(0.975, 2) and t_quantile(0.975, 2.5) > t_quantile(0.975, 3)


# --------------------------------------------------------------------------- intervals and seed counts
def test_paired_interval_by_hand():
    mean, sd, t, half = paired_interval([1.0, 2.0, 3.0])
    assert (mean, sd) == (2.0, 1.0)
    assert t == pytest.approx(4.3027, abs=1e-4)
    assert half == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)


def test_welch_interval_by_hand():
    # a: mean 2, var 1 (n 3); b: mean 5, var 20/3 (n 4): se^2 = 1/3 + 5/3 = 2
    mean, dof, t, half = welch_interval([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0])
    assert mean == -3.0
    assert dof == pytest.approx(4 / ((1 / 3) ** 2 / 2 + (5 / 3) ** 2 / 3))
    assert 2.5706 < t < 2.7764  # between t_{0.975,5} and t_{0.975,4}
    assert half == pytest.approx(t * math.sqrt(2))


def test_seeds_needed_by_hand():
    # sd 1, delta 1: n = 10 passes ((2.2622 + 0.8834)^2 = 9.89 <= 10), n = 9 fails ((2.3060 + 0.8889)^2 = 10.21 > 9)
    assert seeds_needed_paired(1.0, 1.0) == 10
    # two unpaired groups, sd 1 each, delta 1: the textbook 17 per group
    assert seeds_needed_unpaired(1.0, 1.0, 1.0) == 17
    n = seeds_needed_paired(1.0, 0.5)
    formula = lambda k: ((t_quantile(0.975, k - 1) + t_quantile(0.8, k - 1)) * 1.0 / 0.5) ** 2  # noqa: E731
    assert formula(n) <= n and formula(n - 1) > n - 1
    assert seeds_needed_paired(0.0, 0.5) == 2  # no spread: the smallest group with a t interval
    assert seeds_needed_paired(float("nan"), 0.5) is None


def test_compare_values_falls_back_to_welch_without_pairs():
    c = compare_values("A", {0: 1.0, 1: 2.0, 2: 3.0}, "B", {3: 2.0, 4: 4.0, 5: 6.0, 6: 8.0})
    assert c.test == "welch" and "no seeds pair" in c.note
    assert c.ci[0] == pytest.approx(-3 - welch_interval([1, 2, 3], [2, 4, 6, 8])[3])
    c = compare_values("A", {0: 1.0, 1: 2.0}, "B", {0: 2.0, 5: 4.0})
    assert c.test == "welch" and c.note == "only seed 0 is in both"
    c = compare_values("A", {0: 1.0}, "B", {1: 2.0})
    assert c.test == "none" and c.ci is None
    assert c.verdict() == ("A - B = -1.00 mIoU points: no confidence interval (no seeds pair (A: 0; B: 1), and A has "
                           "one seed; needs 2 paired seeds, or 2 seeds in each group)")
    c = compare_values("A", {0: 1.0, 1: 2.0, 2: 3.0}, "B", {3: 1.5, 4: 2.0, 5: 3.0})
    assert c.verdict().startswith("A - B: not distinguishable at 3 vs 3 seeds (95% CI [")
    assert c.verdict().endswith("contains 0; Welch t, unpaired: no seeds pair (A: 0,1,2; B: 3,4,5)): at this spread "
                                f"(sd 1.00 in A, 0.76 in B) about {seeds_needed_unpaired(1.0, math.sqrt(7 / 12), 0.5)} "
                                "seeds per method would resolve a 0.5-point difference")


# --------------------------------------------------------------------------- groups
def test_group_mean_std_and_paired_differences(tmp_path):
    base = make_group(tmp_path / "dacs", [25.0, 26.0, 25.5])
    other = make_group(tmp_path / "daformer", [26.0, 28.0, 28.5])  # differences 1, 2, 3
    groups = [load_group(str(base)), load_group(f"DAFormer={other}")]
    assert groups[0].label == "dacs" and groups[1].label == "DAFormer"
    mean, sd = groups[0].mean_sd
    assert mean == pytest.approx(25.5) and sd == pytest.approx(0.5)
    assert groups[0].class_mean_sd(1)[:2] == (pytest.approx(35.5), pytest.approx(0.5))
    result = compare_groups(groups)
    (c,) = result.comparisons
    assert c.test == "paired" and c.seeds == [0, 1, 2]
    assert c.diffs == pytest.approx([1.0, 2.0, 3.0])
    assert c.ci == (pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-5),
                    pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-5))
    assert c.test_label == "t, paired, n-1 = 2 dof"


def test_single_run_folder_is_a_group_of_one(tmp_path):
    run = make_run(tmp_path / "a" / "seed3", 3, 20.0)
    group = load_group(str(run))
    assert group.seeds == [3] and group.values == [20.0] and math.isnan(group.mean_sd[1])


# --------------------------------------------------------------------------- the command
def test_verdict_when_the_interval_excludes_zero(tmp_path, capsys):
    make_group(tmp_path / "dacs", [20.0, 21.0, 22.0])
    make_group(tmp_path / "daformer", [22.0, 23.5, 25.0])  # differences 2, 2.5, 3: mean 2.5, sd 0.5
    code, out, _ = run_cli(capsys, f"DACS={tmp_path / 'dacs'}", f"DAFormer={tmp_path / 'daformer'}")
    assert code == 0
    half = 4.302653 * 0.5 / math.sqrt(3)  # 1.242
    assert out.splitlines()[-1] == (f"DAFormer - DACS = +2.50 [+{2.5 - half:.2f}, +{2.5 + half:.2f}] mIoU points "
                                    "(95% CI, paired t over seeds 0,1,2): ahead on 3/3 seeds")
    assert "| DACS |" in out and "21.00 ± 1.00" in out and "t, paired, n-1 = 2 dof" in out


def test_verdict_when_the_interval_contains_zero(tmp_path, capsys):
    make_group(tmp_path / "dacs", [20.0, 21.0, 22.0])
    make_group(tmp_path / "daformer", [21.0, 23.0, 25.0])  # differences 1, 2, 3: CI 2 +- 2.48
    code, out, _ = run_cli(capsys, tmp_path / "dacs", tmp_path / "daformer", "--delta", "1")
    assert code == 0
    assert out.splitlines()[-1] == (
        "daformer - dacs: not distinguishable at 3 seeds (95% CI [-0.48, +4.48] contains 0; paired t over seeds "
        "0,1,2): at this spread (sd of differences 1.00) about 10 seeds per method would resolve a 1-point "
        "difference")


def test_unpaired_seeds_fall_back_to_welch_or_fail_with_paired(tmp_path, capsys):
    make_group(tmp_path / "a", [20.0, 21.0, 22.0], seeds=[0, 1, 2])
    make_group(tmp_path / "b", [25.0, 26.0, 27.0], seeds=[3, 4, 5])
    code, out, _ = run_cli(capsys, tmp_path / "a", tmp_path / "b")
    assert code == 0
    last = out.splitlines()[-1]
    assert last.startswith("b - a = +5.00 [")
    assert last.endswith("(95% CI, Welch t, unpaired, 3 vs 3 seeds: no seeds pair (b: 3,4,5; a: 0,1,2))")
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "b", "--paired")
    assert code == 2
    assert err.strip() == ("segadapt compare: error: --paired: b and a need at least 2 seeds in common, "
                           "no seeds pair (b: 3,4,5; a: 0,1,2)")


def test_output_files_and_figure(tmp_path, capsys):
    for name, values in (("dacs", [20.0, 21.0, 22.0]), ("daformer", [22.0, 23.5, 25.0]), ("mic", [21.0, 21.0, 23.0])):
        make_group(tmp_path / name, values)
    out_dir = tmp_path / "cmp"
    code, out, _ = run_cli(capsys, tmp_path / "dacs", tmp_path / "daformer", tmp_path / "mic", "--out", out_dir,
                           "--per-class", "--pairs", "all")
    assert code == 0
    assert out.splitlines()[-1].startswith("3 comparisons (95% CI): daformer ahead of dacs by +2.50")
    assert "## Per class (IoU %)" in out and "| car |" in out
    data = json.loads((out_dir / "compare.json").read_text())
    assert [g["label"] for g in data["groups"]] == ["dacs", "daformer", "mic"]
    assert data["groups"][0]["mean"] == pytest.approx(21.0) and data["groups"][0]["std"] == pytest.approx(1.0)
    assert [c["group"] + "-" + c["baseline"] for c in data["comparisons"]] == \
        ["daformer-dacs", "mic-dacs", "mic-daformer"]
    assert data["comparisons"][0]["paired_seeds"] == [0, 1, 2] and data["comparisons"][0]["distinguishable"]
    rows = list(csv.DictReader((out_dir / "compare.csv").open()))
    assert len(rows) == 9 and rows[0]["group"] == "dacs" and float(rows[0]["mIoU"]) == 20.0
    assert float(rows[0]["car"]) == pytest.approx(30.0)
    pairs = list(csv.DictReader((out_dir / "compare_pairs.csv").open()))
    assert len(pairs) == 3 and pairs[0]["test"] == "paired" and float(pairs[0]["mean_difference"]) == 2.5
    assert (out_dir / "compare.md").read_text().startswith("# Comparison: mIoU (%)")
    with Image.open(out_dir / "compare.png") as img:
        assert img.format == "PNG" and img.size == figure_size(3) == (80 + 3 * 150 + 110, 420)


def test_a_run_still_training_is_left_out_with_a_warning(tmp_path, capsys):
    make_group(tmp_path / "a", [20.0, 21.0])
    make_group(tmp_path / "b", [21.0, 22.0])
    (tmp_path / "b" / "seed2").mkdir()
    (tmp_path / "b" / "seed2" / "last.pth").write_bytes(b"")
    with pytest.warns(SegadaptWarning) as caught:
        code, out, _ = run_cli(capsys, tmp_path / "a", tmp_path / "b")
    assert code == 0
    assert str(caught[0].message) == (f"b: left out {tmp_path / 'b' / 'seed2'}: last.pth but no results.json "
                                      "(still training?)")
    assert "## Notes" in out and "| b |" in out and "0: 21.00, 1: 22.00 |" in out


# --------------------------------------------------------------------------- bad input
def test_folder_that_does_not_exist(tmp_path, capsys):
    make_group(tmp_path / "a", [20.0, 21.0])
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "missing")
    assert code == 2
    assert err.strip() == f"segadapt compare: error: run group {tmp_path / 'missing'} does not exist"


def test_folder_without_results(tmp_path, capsys):
    make_group(tmp_path / "a", [20.0, 21.0])
    (tmp_path / "b" / "seed0").mkdir(parents=True)
    (tmp_path / "b" / "seed0" / "last.pth").write_bytes(b"")
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "b")
    assert code == 2
    b = tmp_path / "b"
    assert err.strip() == (f"segadapt compare: error: run group {b} holds no results.json (looked for "
                           f"{b}/results.json and {b}/*/results.json); {b / 'seed0'} has last.pth but no "
                           "results.json (still training?)")


def test_different_benchmarks_name_both(tmp_path, capsys):
    make_group(tmp_path / "a", [20.0, 21.0])
    make_group(tmp_path / "b", [21.0, 22.0], eval_root="data/other")
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "b")
    assert code == 2
    assert err.strip() == ("segadapt compare: error: a and b were evaluated on different benchmarks: a on "
                           "data/bench/target, split val, 2 classes, b on data/other, split val, 2 classes")
    make_group(tmp_path / "c", [21.0, 22.0], classes=("road", "car", "sky"))
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "c")
    assert code == 2 and "a on data/bench/target, split val, 2 classes, c on data/bench/target, split val, 3 " \
                          "classes" in err
    make_group(tmp_path / "d", [21.0, 22.0], classes=("road", "bus"))
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "d")
    assert code == 2 and "(class 1: 'car' in a, 'bus' in d)" in err


def test_duplicate_seed_in_a_group(tmp_path, capsys):
    make_group(tmp_path / "a", [20.0, 21.0])
    make_run(tmp_path / "b" / "run_x", 0, 21.0)
    make_run(tmp_path / "b" / "run_y", 0, 22.0)
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "b")
    assert code == 2
    assert err.strip() == (f"segadapt compare: error: group b has seed 0 twice: {tmp_path / 'b' / 'run_x'} and "
                           f"{tmp_path / 'b' / 'run_y'}")


def test_corrupt_results_json(tmp_path, capsys):
    make_group(tmp_path / "a", [20.0, 21.0])
    make_group(tmp_path / "b", [20.0, 21.0])
    bad = tmp_path / "b" / "seed1" / "results.json"
    bad.write_text('{"miou": 0.2, "per_class')
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "b")
    assert code == 2 and err.startswith(f"segadapt compare: error: {bad} is corrupt (not JSON: ")
    bad.write_text('{"miou": 0.2}')
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "b")
    assert code == 2
    assert err.strip() == f"segadapt compare: error: {bad} is corrupt (not a segadapt result: no 'per_class_iou')"


def test_other_bad_options(tmp_path, capsys):
    make_group(tmp_path / "a", [20.0, 21.0])
    make_group(tmp_path / "b", [20.0, 21.0])
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "b", "--delta", "0")
    assert code == 2 and "--delta must be a positive number of points" in err
    code, _, err = run_cli(capsys, tmp_path / "a", f"a={tmp_path / 'b'}")
    assert code == 2 and "two groups are named a" in err
    code, _, err = run_cli(capsys, tmp_path / "a", tmp_path / "b", "--metric", "mIoU16")
    assert code == 2 and "has no metric 'mIoU16' (it has mIoU, pixel_acc)" in err
    code, _, err = run_cli(capsys, tmp_path / "a")
    assert code == 2 and "at least two groups" in err
