import json

import pytest

from segadapt.cli import main
from segadapt.engine.sweep import parse_seeds
from segadapt.errors import ConfigError
from tests.conftest import tiny_overrides


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5,9") == [3, 4, 5, 9]
    for bad, what in (("1,1", "twice"), ("0-2,2", "twice"), ("a", "not a seed"), ("5-3", "empty range")):
        with pytest.raises(ConfigError, match=what):
            parse_seeds(bad)


def _args(tiny_synth, group, *extra):
    o = tiny_overrides(tiny_synth, group / "unused", **{"train.iters": 4, "train.ckpt_every": 2})
    o = [x for x in o if not x.startswith("out_dir=")]
    return ["train", "--no-progress", "--out", str(group), *o, *extra]


def test_sweep_runs_each_seed_resumes_and_skips_finished(tiny_synth, tmp_path, capsys):
    group = tmp_path / "group"
    # seed 1 was stopped after 2 of 4 iterations (its last.pth at iteration 2)
    first = tiny_overrides(tiny_synth, group / "seed1", **{"train.iters": 2, "train.ckpt_every": 2,
                                                          "train.seed": 1})
    assert main(["train", "--no-progress", *first]) == 0
    (group / "seed1" / "final.pth").unlink()

    # a fresh sweep refuses a group that holds runs, naming them
    assert main(_args(tiny_synth, group, "--seeds", "0,1", "--jobs", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed 1 (partial)" in err[0] and "--resume" in err[0]

    assert main(_args(tiny_synth, group, "--seeds", "0,1", "--jobs", "2", "--resume")) == 0
    out = capsys.readouterr().out
    assert "seed 1 resumes from its last.pth" in out and "seed 0 starts" in out
    state = json.loads((group / "sweep.json").read_text())
    assert state["seeds"] == [0, 1] and state["jobs"] == 2 and state["threads_per_run"] >= 1
    for s in (0, 1):
        run = state["runs"][str(s)]
        assert run["state"] == "finished" and run["exit_code"] == 0 and 0 <= run["mIoU"] <= 1
        res = json.loads((group / f"seed{s}" / "results.json").read_text())
        assert res["meta"]["seed"] == s and res["meta"]["iteration"] == 4
        assert (group / "logs" / f"seed{s}.log").is_file()
    # seed 1 went on from iteration 2: two sessions in its provenance, the second one resumed
    prov = json.loads((group / "seed1" / "provenance.json").read_text())
    assert [x["start_iteration"] for x in prov["sessions"]] == [0, 2]
    assert "mIoU over 2 seeds" in out

    # continuing a finished sweep runs nothing
    before = (group / "seed0" / "final.pth").stat().st_mtime_ns
    assert main(_args(tiny_synth, group, "--seeds", "0,1", "--resume")) == 0
    out = capsys.readouterr().out
    assert "seed 0 already finished" in out and "0 of 2 seeds to run" in out
    assert (group / "seed0" / "final.pth").stat().st_mtime_ns == before


def test_sweep_reports_a_failed_seed_in_one_line(tiny_synth, tmp_path, capsys):
    group = tmp_path / "group"
    group.mkdir()
    (group / "seed1").write_text("a file where seed 1's run folder goes")
    assert main(_args(tiny_synth, group, "--seeds", "0,1")) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert "1 of 2 seeds did not finish" in err[-1] and "--resume" in err[-1]
    # the seed's own one-line error, also on the terminal and in its log
    assert "seed 1: cannot write" in err[-1] and "Not a directory" in err[-1]
    assert "Not a directory" in cap.out and "Not a directory" in (group / "logs" / "seed1.log").read_text()
    state = json.loads((group / "sweep.json").read_text())
    assert state["runs"]["0"]["state"] == "finished" and state["runs"]["1"]["state"] == "failed"


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0,1", "--seed", "3"], "not both"),
    (["--seeds", "0,x"], "not a seed"),
    (["--jobs", "2"], "belong to --seeds"),
    (["--seeds", "0,1", "--jobs", "0"], "--jobs"),
    (["--seeds", "0,1", "--resume", "--overwrite"], "give one of them"),
])
def test_sweep_bad_arguments_are_one_line(tiny_synth, tmp_path, capsys, extra, message):
    assert main(_args(tiny_synth, tmp_path / "g", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "g").exists()


def test_sweep_needs_one_folder_per_seed(tiny_synth, tmp_path, capsys):
    o = tiny_overrides(tiny_synth, tmp_path / "same")
    assert main(["train", "--no-progress", "--seeds", "0,1", *o]) == 2
    assert "for every seed" in capsys.readouterr().err
