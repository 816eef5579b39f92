import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segadapt.cli import main

from .conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args):
    """Run the real console entry point in a subprocess; returns (code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "segadapt", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("segadapt")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_train_then_test_roundtrip(tiny_synth, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--no-progress", *tiny_overrides(tiny_synth, out)]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "road" in printed
    # evaluate the final checkpoint on the held-out *source* split
    assert main(["test", str(out), "--no-progress", "--out", str(tmp_path / "t"), "eval.data.kind=gta5",
                 f"eval.data.root={tiny_synth}/source", "eval.data.list_file=val.txt"]) == 0
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    assert res["meta"]["eval_list"] == "val.txt"
    # and on the target val split it reproduces the number the trainer saved
    assert main(["test", str(out / "final.pth"), "--no-progress", "--out", str(tmp_path / "t2")]) == 0
    again = json.loads((tmp_path / "t2" / "results.json").read_text())
    saved = json.loads((out / "results.json").read_text())
    assert again["miou"] == pytest.approx(saved["miou"], abs=1e-9)
    assert "restyled_eval_split" not in saved["meta"]
    # a copy whose val split was restyled (stylize --include-eval) is marked in the results
    copy = tmp_path / "target_copy"
    shutil.copytree(tiny_synth / "target", copy)
    (copy / "RESTYLED_EVAL_SPLIT.txt").write_text("This copy contains RESTYLED EVALUATION images.\nsecond line\n")
    capsys.readouterr()
    assert main(["test", str(out), "--no-progress", "--out", str(tmp_path / "t3"), f"eval.data.root={copy}"]) == 0
    assert "not the standard benchmark: This copy contains RESTYLED" in capsys.readouterr().err
    marked = json.loads((tmp_path / "t3" / "results.json").read_text())
    assert marked["meta"]["restyled_eval_split"] == "This copy contains RESTYLED EVALUATION images."
    assert "restyled_eval_split" in (tmp_path / "t3" / "results.md").read_text()
    # and so is a training run that evaluates on it
    assert main(["train", "--no-progress", *tiny_overrides(tiny_synth, tmp_path / "run2", **{
        "train.iters": 2, "eval.data.root": copy})]) == 0
    assert "not the standard benchmark" in capsys.readouterr().err
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["meta"]["restyled_eval_split"]


def test_missing_dataset_root_is_one_line(tmp_path):
    code, _, err = run_cli("train", "--no-progress", "source.root=" + str(tmp_path / "nowhere"),
                           "synthetic.auto=false", f"out_dir={tmp_path / 'run'}")
    assert_one_line_error(code, err, "nowhere")


def test_config_typo_is_one_line(tmp_path):
    code, _, err = run_cli("train", "optim.lrate=0.1")
    assert_one_line_error(code, err, "optim.lrate", "command line")


def test_corrupt_png_in_worker_is_one_line(tiny_synth, tmp_path):
    data = tmp_path / "bench"
    shutil.copytree(tiny_synth, data)
    victim = sorted((data / "source" / "images").glob("*.png"))[0]
    victim.write_bytes(b"not a png at all")
    code, _, err = run_cli("train", "--no-progress",
                           *tiny_overrides(data, tmp_path / "run", **{"train.num_workers": 1, "train.iters": 20}))
    assert_one_line_error(code, err, victim.name)


def test_wrong_checkpoint_is_one_line(tiny_synth, tmp_path):
    bogus = tmp_path / "bogus.pth"
    bogus.write_bytes(b"\x00garbage")
    code, _, err = run_cli("test", bogus, "--config", "synthetic/source_only",
                           *tiny_overrides(tiny_synth, tmp_path / "run"))
    assert_one_line_error(code, err, "bogus.pth")


def test_synth_command(tmp_path):
    code, out, err = run_cli("synth", "--out", tmp_path / "s", "--size", 32, 16, "--num-source", 3,
                             "--num-source-val", 1, "--num-target-train", 2, "--num-target-val", 1)
    assert code == 0, err
    assert (tmp_path / "s" / "synthetic.json").is_file()
    assert len(list((tmp_path / "s" / "source" / "images").glob("*.png"))) == 4
