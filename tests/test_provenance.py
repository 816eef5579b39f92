import json

from segadapt.cli import main
from tests.conftest import tiny_overrides


def test_run_records_its_provenance_and_resume_adds_a_session(tiny_synth, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--no-progress", *tiny_overrides(tiny_synth, out, **{"train.iters": 4, "train.ckpt_every": 2})]
    assert main(args) == 0
    prov = json.loads((out / "provenance.json").read_text())
    (first,) = prov["sessions"]
    assert "train" in first["command"] and "train.iters=4" in first["command"]
    assert first["resumed_from"] is None and first["iteration"] == 4 and "ended" in first
    env = first["environment"]
    assert env["torch"] and env["python"] and env["device"] == "cpu"
    assert any(p.lower().startswith("torch==") for p in first["packages"])
    assert set(first["git"]) == {"commit", "dirty", "changed_files"}
    assert all(first["phases_s"][p] > 0 for p in ("setup", "train", "eval", "checkpoint"))
    # results.json carries the short form
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["git_commit"] == first["git"]["commit"] and meta["torch"] == env["torch"]

    # continue to 6 iterations: a second session, the first one kept, totals over both
    assert main(["train", "--no-progress", "--resume", str(out), "train.iters=6"]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["sessions"]) == 2
    second = prov["sessions"][1]
    assert second["resumed_from"] == str(out / "last.pth") and second["start_iteration"] == 4 and second["iteration"] == 6
    assert prov["total_phases_s"]["train"] >= first["phases_s"]["train"] + second["phases_s"]["train"] - 0.01
