import base64
import json
import re
import shutil
import statistics
import sys

import pytest

from segadapt.cli import main
from segadapt.config import load_config
from segadapt.engine.metrics import EvalResult
from segadapt.engine.report import _read_metrics, group_runs, load_run, mean_std
from segadapt.engine.trainer import train_from_config

from .conftest import tiny_overrides

@pytest.fixture(scope="module")
def runs_root(tiny_synth, tmp_path_factory):
    """runs/seed0 and runs/seed1: one config, two seeds, 2 iterations each."""
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("report") / "runs"
    for seed in (0, 1):
        cfg = load_config("synthetic/source_only", tiny_overrides(
            tiny_synth, root / f"seed{seed}", **{"train.iters": 2, "train.ckpt_every": 2, "train.log_every": 1,
                                                 "train.seed": seed}))
        train_from_config(cfg, progress=False)
    return root


def stderr_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def embedded_pngs(text):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_report_on_two_seeds(runs_root, tmp_path, capsys):
    out = tmp_path / "rep"
    # the parent folder is searched for its runs
    assert main(["report", str(runs_root), "--out", str(out), "--samples", "2", "--markdown"]) == 0
    assert "report on 2 run(s)" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    for anchor in ("results", "curves", "per-class", "confusion", "samples"):
        assert f'<section id="{anchor}">' in page
    pngs = embedded_pngs(page)
    assert len(pngs) == 4  # curves, per-class bars, one confusion matrix for the group, one sample grid
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 1000 for p in pngs)

    mious = [json.loads((runs_root / f"seed{s}" / "results.json").read_text())["miou"] for s in (0, 1)]
    cell = f"{100 * statistics.mean(mious):.2f} ± {100 * statistics.stdev(mious):.2f}"
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", page)]
    assert ["synthetic_source_only", "source_only", "2", "0, 1", "2", cell] in [c[:6] for c in cells]

    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4 and all((out / name).is_file() for name in links)
    assert f"| synthetic_source_only | source_only | 2 | 0, 1 | 2 | {cell} |" in md


def _write_result(run, miou_values, pixel_acc):
    names = ["road", "sidewalk", "building"]
    res = EvalResult(per_class_iou=miou_values, class_names=names, pixel_accuracy=pixel_acc,
                     miou=sum(miou_values) / 3, confusion=[[8, 2, 0], [1, 3, 0], [0, 0, 5]])
    (run / "results.json").write_text(res.to_json())


def test_seed_group_mean_and_std_by_hand(runs_root, tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        shutil.copytree(runs_root / f"seed{seed}", runs / f"seed{seed}",
                        ignore=shutil.ignore_patterns("*.pth"))  # no checkpoint: samples are skipped
    # mIoU 0.40 and 0.50 -> 45.00 ± 7.07 (sample std: |0.5 - 0.4| / sqrt(2))
    _write_result(runs / "seed0", [0.2, 0.4, 0.6], 0.80)
    _write_result(runs / "seed1", [0.4, 0.5, 0.6], 0.90)
    out = tmp_path / "rep"
    assert main(["report", str(runs / "seed0"), str(runs / "seed1"), "--out", str(out), "--markdown"]) == 0
    md = (out / "report.md").read_text()
    assert "| 45.00 ± 7.07 | 85.00 ± 7.07 |" in md  # mIoU, pixel accuracy
    assert "| road | 30.00 ± 14.14 |" in md
    assert "| sidewalk | 45.00 ± 7.07 |" in md
    assert "| building | 60.00 ± 0.00 |" in md
    assert "samples skipped" in md and "no final.pth or last.pth" in md

    group = group_runs([load_run(runs / "seed0"), load_run(runs / "seed1")])
    assert len(group) == 1 and group[0].seeds == [0, 1]
    assert (group[0].confusion() == [[16, 4, 0], [2, 6, 0], [0, 0, 10]]).all()

    # a seed still training (no results.json) is counted in the group but not in its scores
    shutil.copytree(runs / "seed1", runs / "seed2")
    (runs / "seed2" / "results.json").unlink()
    cfg_file = runs / "seed2" / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("seed: 1", "seed: 2"))
    group = group_runs([load_run(runs / f"seed{s}") for s in (0, 1, 2)])
    assert group[0].seeds == [0, 1, 2]
    assert group[0].label == "synthetic_source_only (2/3 seeds evaluated)"
    assert group[0].metric("mIoU").n == 2


def test_mean_std_and_grouping_rules(runs_root):
    s = mean_std([0.4, 0.5, float("nan"), None])
    assert s.n == 2 and s.mean == pytest.approx(0.45) and s.std == pytest.approx(0.0707107, abs=1e-6)
    assert mean_std([0.3]).pct() == "30.00" and mean_std([]).pct() == "n/a"
    a, b = load_run(runs_root / "seed0"), load_run(runs_root / "seed0")
    assert len(group_runs([a, b])) == 2  # the same seed twice is not a seed group


def test_metrics_of_a_resumed_run_keep_the_last_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([
        json.dumps({"iteration": 1, "loss": 3.0}),
        json.dumps({"iteration": 2, "loss": 2.5}),  # logged, then the run was killed and resumed at 1
        json.dumps({"iteration": 2, "loss": 2.0}),
        json.dumps({"iteration": 2, "eval/mIoU": 0.25}),
        '{"iteration": 3, "lo',  # cut short
    ]) + "\n")
    train, evals = _read_metrics(path)
    assert [(r["iteration"], r["loss"]) for r in train] == [(1, 3.0), (2, 2.0)]
    assert evals == [{"iteration": 2, "mIoU": 0.25}]


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: x\n")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r")]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and "pip install 'segadapt[report]'" in err[0]


def test_missing_run_folder_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and "nowhere" in err[0] and "does not exist" in err[0]


def _fake_group_runs(means_by_name):
    from pathlib import Path

    from segadapt.engine.report import Run

    runs = []
    for name, values in means_by_name.items():
        for seed, m in enumerate(values):
            res = EvalResult(per_class_iou=[m], class_names=["road"], pixel_accuracy=0.5, miou=m)
            runs.append(Run(Path(f"/runs/{name}/seed{seed}"), name, seed, "x", {}, result=res))
    return group_runs(runs)


def test_gap_table_compares_each_config_with_its_own_tracks_baselines():
    from segadapt.engine.report import gap_table

    groups = _fake_group_runs({
        "synthetic_source_only": [0.18, 0.20], "synthetic_oracle": [0.35, 0.35], "synthetic_dacs": [0.26, 0.28],
        "synthetic_mit_source_only": [0.10], "synthetic_mit_oracle": [0.30], "synthetic_mit_dacs": [0.15],
        "synthetic_mit_x_dacs": [0.20],  # track synthetic_mit_ (no synthetic_mit_x_ pair)
        "other_dacs": [0.5]})  # no track: left out
    header, rows = gap_table(groups)
    assert header[-2:] == ["gain (points)", "gap closed (%)"]
    # synthetic: 27 - 19 = +8 of a 35 - 19 = 16 gap -> 50 %; mit: +5 of 20 -> 25 %, +10 of 20 -> 50 %
    assert rows == [["synthetic_dacs", "27.00 ± 1.41", "19.00", "35.00", "+8.00", "50"],
                    ["synthetic_mit_dacs", "15.00", "10.00", "30.00", "+5.00", "25"],
                    ["synthetic_mit_x_dacs", "20.00", "10.00", "30.00", "+10.00", "50"]]
    assert gap_table(_fake_group_runs({"synthetic_source_only": [0.2], "synthetic_dacs": [0.3]})) is None
    # an oracle below source-only has no gap to close
    _, rows = gap_table(_fake_group_runs({"a_source_only": [0.3], "a_oracle": [0.2], "a_dacs": [0.25]}))
    assert rows == [["a_dacs", "25.00", "30.00", "20.00", "-5.00", "n/a"]]


def test_report_page_has_the_gap_table(runs_root, tmp_path):
    runs = tmp_path / "runs"
    for name, miou in (("synthetic_source_only", 0.2), ("synthetic_oracle", 0.4), ("synthetic_minent", 0.25)):
        shutil.copytree(runs_root / "seed0", runs / name, ignore=shutil.ignore_patterns("*.pth"))
        cfg = (runs / name / "config.yaml").read_text().replace("name: synthetic_source_only", f"name: {name}")
        (runs / name / "config.yaml").write_text(cfg)
        _write_result(runs / name, [miou] * 3, 0.5)
    out = tmp_path / "rep"
    assert main(["report", str(runs), "--out", str(out), "--markdown", "--samples", "0"]) == 0
    md = (out / "report.md").read_text()
    assert "| synthetic_minent | 25.00 | 20.00 | 40.00 | +5.00 | 25 |" in md
