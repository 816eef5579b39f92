"""Faults around run folders, through the command line: nothing lost, nothing silent.

Run folders are never overwritten or shared, no command writes over its input or a
checkpoint, a non-finite state is never checkpointed, and a resume does what it records.
"""
import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from segadapt.cli import main
from segadapt.config import PACKAGE_CONFIG_DIR
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.methods.source_only import SourceOnly

from .conftest import tiny_overrides


def train(tiny_synth, out, *args, **extra):
    return main(["train", "--no-progress", *args, *tiny_overrides(tiny_synth, out, **extra)])


def error_line(capsys, code, *needles) -> str:
    """The run failed with exit 2 and exactly one `segadapt ...: error:` line holding every needle."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("segadapt")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def iterations(run) -> list:
    return [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def all_finite(ckpt: dict) -> bool:
    tensors = [v for part in ("model", "method") for v in ckpt[part].values()]
    tensors += [v for o in ckpt["optimizers"].values() for slots in o["state"].values() for v in slots.values()]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.fixture()
def run2(tiny_synth, tmp_path):
    """A finished 2-iteration run of our own (tests may try to damage it)."""
    out = tmp_path / "run"
    assert train(tiny_synth, out, **{"train.iters": 2, "train.ckpt_every": 2}) == 0
    return out


# ------------------------------------------------------------------ 1. run folders
def test_fresh_train_into_a_run_refuses_and_overwrite_replaces_it(tiny_synth, run2, capsys):
    before = {n: (run2 / n).read_bytes() for n in ("last.pth", "final.pth", "metrics.jsonl", "config.yaml")}
    capsys.readouterr()
    error_line(capsys, train(tiny_synth, run2, **{"train.iters": 2}), str(run2), "--resume", "--overwrite")
    assert {n: (run2 / n).read_bytes() for n in before} == before
    # --overwrite starts afresh: one run's records, not two appended
    assert train(tiny_synth, run2, "--overwrite", **{"train.iters": 4, "train.ckpt_every": 4}) == 0
    assert iterations(run2) == [2, 4, 4]  # train records at 2 and 4, the final eval at 4
    assert load_checkpoint(run2)["iteration"] == 4
    capsys.readouterr()
    error_line(capsys, main(["train", "--resume", str(run2), "--overwrite"]), "--resume", "--overwrite")


def test_a_second_process_cannot_share_a_run_folder(tiny_synth, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # another training process holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        error_line(capsys, train(tiny_synth, out, **{"train.iters": 2}), "in use", str(out))
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pth").exists()
    # a holder that died (killed) leaves no stuck lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert train(tiny_synth, out, **{"train.iters": 2, "train.ckpt_every": 2}) == 0


def test_orphan_temporary_checkpoints_are_removed_when_a_run_restarts(tiny_synth, run2):
    orphan = run2 / ".last.pth.k1ll3d_x.tmp"  # what atomic_save leaves when killed mid-write
    orphan.write_bytes(b"half a checkpoint")
    other = run2 / ".notes.tmp"  # not an atomic-write name: not ours to remove
    other.write_text("user file")
    assert main(["train", "--no-progress", "--resume", str(run2), "train.iters=3"]) == 0
    assert not orphan.exists() and other.exists()


def test_metrics_jsonl_has_no_repeated_iterations_after_resume(tiny_synth, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = SourceOnly.training_step

    def killed_in_5th(self, batch, it, ctx):
        if it == 4:
            raise KeyboardInterrupt
        return original(self, batch, it, ctx)

    monkeypatch.setattr(SourceOnly, "training_step", killed_in_5th)
    error_line(capsys, train(tiny_synth, out), "interrupted", "iteration 3")
    assert iterations(out) == [2, 3, 4]  # logged at 2 and 4, checkpoint at 3
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "loss": 0.')  # a line torn by the kill
    monkeypatch.setattr(SourceOnly, "training_step", original)
    assert main(["train", "--no-progress", "--resume", str(out)]) == 0
    # 4 came after the checkpoint at 3: it is logged once, by the resumed run
    assert iterations(out) == [2, 3, 4, 6, 6]  # 6: the last train record and the final eval
    assert [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/mIoU" in r]


# ------------------------------------------------------------------ 1. outputs never over inputs
def test_no_command_writes_over_its_input_or_a_checkpoint(tiny_synth, run2, tmp_path, capsys):
    last, final = (run2 / "last.pth").read_bytes(), (run2 / "final.pth").read_bytes()
    results = (run2 / "results.json").read_bytes()
    capsys.readouterr()
    cases = [
        (["export", str(run2 / "last.pth"), "--format", "torchscript", "--out", str(run2 / "last.pth")], "would write over"),
        # the folder resolves to final.pth; last.pth is the run's checkpoint all the same
        (["export", str(run2), "--format", "torchscript", "--out", str(run2 / "last.pth")], "run file"),
        (["test", str(run2), "--out", str(run2)], "run file"),
        (["test", str(run2 / "final.pth"), "--out", str(run2 / "final.pth")], "would write over"),
        (["report", str(run2), "--out", str(run2)], "would write over"),
        (["adain-train", "--content-root", str(tiny_synth), "--style-root", str(tiny_synth),
          "--vgg", str(run2 / "final.pth"), "--out", str(run2 / "final.pth")], "final.pth"),
    ]
    for argv, needle in cases:
        error_line(capsys, main(argv), "--out", needle)
    assert (run2 / "last.pth").read_bytes() == last and (run2 / "final.pth").read_bytes() == final
    assert (run2 / "results.json").read_bytes() == results

    images = tmp_path / "photos"
    images.mkdir()
    src = sorted((tiny_synth / "target").rglob("*.png"))[0]
    shutil.copy(src, images / "a.png")
    shutil.copy(src, images / "a_color.png")  # a's colour output would replace this input
    error_line(capsys, main(["predict", str(images), "--checkpoint", str(run2), "--out", str(images / "preds")]),
               "inside input folder")
    error_line(capsys, main(["predict", str(images / "a.png"), str(images / "a_color.png"), "--checkpoint", str(run2),
                             "--out", str(images), "--no-progress"]), "would write over input", "a_color.png")
    # an output beside its input that replaces nothing is fine
    assert main(["predict", str(images / "a.png"), "--checkpoint", str(run2), "--out", str(images),
                 "--no-progress"]) == 0
    assert (images / "a_trainid.png").is_file() and (images / "a_color.png").read_bytes() != src.read_bytes()


# ------------------------------------------------------------------ 3. non-finite state
def test_non_finite_buffers_stop_the_run_and_keep_the_last_good_checkpoint(tiny_synth, tmp_path, capsys):
    out = tmp_path / "run"
    # an absurd learning rate: weights explode, BatchNorm's running variance overflows while the losses
    # logged so far are still finite
    code = train(tiny_synth, out, **{"optim.lr": 1e10, "train.ckpt_every": 1, "train.log_every": 1})
    error_line(capsys, code, "non-finite model.bn1.running_var at iteration 3", "last.pth (iteration 2)")
    ckpt = load_checkpoint(out)
    assert ckpt["iteration"] == 2 and all_finite(ckpt)
    assert not (out / "final.pth").exists() and not (out / "results.json").exists()


def test_non_finite_optimizer_state_is_never_checkpointed(tiny_synth, tmp_path, capsys):
    out = tmp_path / "run"
    # an absurd loss weight: the loss stays finite, Adam's squared-gradient average does not
    code = train(tiny_synth, out, "-c", "synthetic/minent", **{"method.entropy_weight_main": 1e37})
    error_line(capsys, code, "non-finite optimizer 'segmenter' exp_avg_sq of model.", "at iteration 3",
               "no checkpoint was written yet")
    assert not (out / "last.pth").exists() and not (out / "final.pth").exists()


# ------------------------------------------------------------------ 4. resume records what it does
def test_resume_overrides_take_effect_or_are_refused(tiny_synth, run2, capsys):
    recorded = (run2 / "config.yaml").read_text()
    capsys.readouterr()
    # a key that changes the trajectory: refused, naming it with both values; nothing recorded
    error_line(capsys, main(["train", "--resume", str(run2), "optim.lr=0.5"]),
               "optim.lr", "0.001", "0.5")
    error_line(capsys, main(["train", "--resume", str(run2), "--seed", "7"]), "train.seed", "was 0", "7 given")
    assert (run2 / "config.yaml").read_text() == recorded
    # `--resume KEY=VALUE` is an override (with the config's own out_dir), not a checkpoint path
    error_line(capsys, main(["train", "--resume", "optim.lr=0.5", f"out_dir={run2}"]), "optim.lr")
    error_line(capsys, main(["train", "--resume", str(run2), "train.iters=1"]), "train.iters=1", "iteration 2")
    # cadence and an extension take effect and are recorded
    assert main(["train", "--no-progress", "--resume", "train.iters=4", "train.log_every=1", f"out_dir={run2}"]) == 0
    cfg = yaml.safe_load((run2 / "config.yaml").read_text())
    assert cfg["train"]["iters"] == 4 and cfg["train"]["log_every"] == 1 and cfg["optim"]["lr"] == 0.001
    assert load_checkpoint(run2 / "final.pth")["iteration"] == 4
    # log_every=1 took effect; the first run's final evaluation at 2 came after its checkpoint: done again at 4
    assert iterations(run2) == [2, 3, 4, 4]
    assert [h["iteration"] for h in json.loads((run2 / "history.json").read_text())] == [4]
    # resuming an ended run (from either checkpoint) repeats its final evaluation, not the records
    for ckpt in ("last.pth", "final.pth"):
        assert main(["train", "--no-progress", "--resume", str(run2 / ckpt)]) == 0
        assert iterations(run2) == [2, 3, 4, 4]
        assert [h["iteration"] for h in json.loads((run2 / "history.json").read_text())] == [4]


def test_resume_with_a_config_of_another_method_is_refused(tiny_synth, run2, capsys):
    capsys.readouterr()
    error_line(capsys, main(["train", "-c", "synthetic/minent", "--resume", str(run2)]),
               "source_only", "minent", "-c synthetic/minent")
    # the same method under another config name continues with the checkpoint's config, said once
    assert main(["train", "--no-progress", "-c", "synthetic/oracle", "--resume", str(run2), "train.iters=3"]) == 0
    assert "warning: --resume continues with the checkpoint's config" in capsys.readouterr().err


def test_a_run_folder_is_never_a_data_root_and_overwrite_keeps_its_inputs(tiny_synth, run2, tmp_path, capsys):
    capsys.readouterr()
    error_line(capsys, train(tiny_synth, tiny_synth / "target", **{"train.iters": 2}),
               "out_dir", "would write over target.root")
    # --overwrite would clear the weights the new run starts from
    error_line(capsys, train(tiny_synth, run2, "--overwrite", "--pretrained", str(run2 / "final.pth")),
               "--overwrite would delete model.pretrained", "final.pth")
    assert (run2 / "final.pth").is_file() and (run2 / "last.pth").is_file()


def test_prepare_never_writes_its_statistics_over_another_file(tiny_synth, tmp_path, capsys):
    root = tmp_path / "target"
    shutil.copytree(tiny_synth / "target", root)
    label = sorted(root.rglob("*_gtFine_labelIds.png"))[0]
    before = label.read_bytes()
    capsys.readouterr()
    error_line(capsys, main(["prepare", "--kind", "cityscapes", "--root", str(root), "--split", "train",
                             "--out", str(label), "--no-progress", "--workers", "0"]),
               "exists and is not a class-statistics file")
    error_line(capsys, main(["prepare", "--kind", "cityscapes", "--root", str(root), "--out", str(root)]),
               "would write over --root")
    assert label.read_bytes() == before
    assert main(["prepare", "--kind", "cityscapes", "--root", str(root), "--split", "train",
                 "--out", str(tmp_path / "stats.json"), "--no-progress", "--workers", "0"]) == 0


def test_resume_continues_in_the_folder_its_checkpoint_is_in(tiny_synth, run2, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(run2, moved)
    before = (run2 / "final.pth").read_bytes()
    assert main(["train", "--no-progress", "--resume", str(moved / "last.pth"), "train.iters=3"]) == 0
    assert load_checkpoint(moved / "final.pth")["iteration"] == 3
    assert yaml.safe_load((moved / "config.yaml").read_text())["out_dir"] == str(moved.resolve())
    assert (run2 / "final.pth").read_bytes() == before  # the recorded out_dir was not written
    # a run killed before its first checkpoint: nothing to resume, --overwrite is the way
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.yaml").write_text("name: run\n")
    capsys.readouterr()
    error_line(capsys, train(tiny_synth, early, **{"train.iters": 2}), "wrote no checkpoint", "--overwrite")


# ------------------------------------------------------------------ 4b. resume against an edited -c file
def _tiny_yaml(path, tiny_synth, out, **changes):
    """A config file holding the tiny run's settings (what `-c` names), with `changes` (dotted keys)."""
    tree: dict = {"_base_": str(Path(PACKAGE_CONFIG_DIR) / "synthetic" / "source_only.yaml")}
    for item in tiny_overrides(tiny_synth, out, **{"train.iters": 2, "train.ckpt_every": 2, **changes}):
        key, value = item.split("=", 1)
        node = tree
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


def test_resume_against_an_edited_config_file(tiny_synth, tmp_path, capsys):
    out = tmp_path / "run"
    cfg_file = _tiny_yaml(tmp_path / "same.yaml", tiny_synth, out)
    assert main(["train", "--no-progress", "-c", str(cfg_file)]) == 0
    recorded, last = (out / "config.yaml").read_text(), (out / "last.pth").read_bytes()
    capsys.readouterr()
    # a trajectory key changed in the file: refused like the same override, naming the file
    _tiny_yaml(cfg_file, tiny_synth, out, **{"optim.lr": 0.01})
    error_line(capsys, main(["train", "--no-progress", "--resume", "-c", str(cfg_file)]),
               "optim.lr was 0.001 in the checkpoint, 0.01 in -c", "same.yaml")
    assert (out / "config.yaml").read_text() == recorded and (out / "last.pth").read_bytes() == last
    # ... and the command line still wins over the file
    assert main(["train", "--no-progress", "--resume", "-c", str(cfg_file), "optim.lr=0.001"]) == 0
    capsys.readouterr()
    # an allowed key changed in the file takes effect, is said and recorded
    _tiny_yaml(cfg_file, tiny_synth, out, **{"train.iters": 3})
    assert main(["train", "--no-progress", "--resume", "-c", str(cfg_file)]) == 0
    assert "train.iters 2 -> 3 (changed in -c" in capsys.readouterr().err
    assert load_checkpoint(out / "final.pth")["iteration"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["iters"] == 3
    # the file as it is now was recorded: resuming with it again changes nothing
    assert main(["train", "--no-progress", "--resume", "-c", str(cfg_file)]) == 0
    assert "changed in -c" not in capsys.readouterr().err
    assert load_checkpoint(out / "final.pth")["iteration"] == 3
    # started with an override the file does not hold: an unchanged file is no change
    other = tmp_path / "other"
    cfg2 = _tiny_yaml(tmp_path / "two.yaml", tiny_synth, other)
    assert main(["train", "--no-progress", "-c", str(cfg2), "optim.lr=0.002"]) == 0
    assert main(["train", "--no-progress", "--resume", "-c", str(cfg2), "train.iters=3"]) == 0
    assert load_checkpoint(other / "final.pth")["config"]["optim"]["lr"] == 0.002


def test_resume_checks_method_keys_against_the_run(tiny_synth, tmp_path, capsys):
    out = tmp_path / "advent"
    assert train(tiny_synth, out, "-c", "synthetic/advent", **{"train.iters": 2, "train.ckpt_every": 2}) == 0
    capsys.readouterr()
    # no -c: the key is the AdvEnt run's, not unknown to the default config
    error_line(capsys, main(["train", "--no-progress", "--resume", "method.adv_weight_main=0.5", f"out_dir={out}"]),
               "method.adv_weight_main was 0.001 in the checkpoint, 0.5 given")
    # the run's own value is a no-op
    assert main(["train", "--no-progress", "--resume", "method.adv_weight_main=0.001", f"out_dir={out}",
                 "train.iters=3"]) == 0
    assert load_checkpoint(out / "final.pth")["iteration"] == 3
    error_line(capsys, main(["train", "--resume", str(out), "method.no_such_key=1"]), "method.no_such_key")


@pytest.mark.parametrize("damage, needles", [
    (lambda ck: {"state_dict": ck["model"]}, ["is not a segadapt training checkpoint"]),
    (lambda ck: {k: v for k, v in ck.items() if k != "config"}, ["lacks 'config'", "cannot resume"]),
    (lambda ck: {k: v for k, v in ck.items() if k not in ("streams", "rng")}, ["lacks 'rng', 'streams'"]),
    (lambda ck: {**ck, "streams": {}}, ["data-stream or RNG state is unusable", "no entry 'source'"]),
], ids=["plain-state-dict", "no-config", "no-rng-streams", "empty-streams"])
def test_resume_from_a_cut_down_checkpoint_is_one_line(damage, needles, run2, tmp_path, capsys):
    path = tmp_path / "cut.pth"
    torch.save(damage(torch.load(run2 / "last.pth", weights_only=False)), path)
    before = {p.name: p.read_bytes() for p in run2.iterdir() if p.is_file()}
    capsys.readouterr()
    error_line(capsys, main(["train", "--no-progress", "--resume", str(path), f"out_dir={tmp_path / 'r'}"]),
               str(path), *needles)
    assert {p.name: p.read_bytes() for p in run2.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------ 1b. refused runs leave nothing
def test_a_run_refused_before_it_starts_leaves_no_folder(tiny_synth, tmp_path, capsys):
    new = tmp_path / "runs" / "a" / "seed0"
    error_line(capsys, train(tiny_synth, new, "model.backbone=resnet999"), "model.backbone", "resnet999")
    assert not (tmp_path / "runs").exists()  # nothing was written: no folder holding only .lock
    empty = tmp_path / "mine"
    empty.mkdir()  # the user's own (empty) folder stays, empty
    error_line(capsys, train(tiny_synth, empty, "model.backbone=resnet999"), "resnet999")
    assert empty.is_dir() and list(empty.iterdir()) == []


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_into_a_held_run_folder_is_one_line(tiny_synth, run2, tmp_path):
    import os

    before = {p.name: p.read_bytes() for p in run2.iterdir() if p.is_file() and p.name != ".lock"}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    with open(run2 / ".lock", "a") as held:  # the first run is still training
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "segadapt", "train", "--no-progress", "--overwrite",
                            *tiny_overrides(tiny_synth, run2, **{"train.iters": 2, "train.device": "cpu"})],
                           capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0
    ours = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("segadapt train")]
    assert len(ours) == 1 and "is in use by" in ours[0] and str(run2) in ours[0], p.stderr[-3000:]
    # no rank prints a traceback (what remains is torchrun's own summary of the failed launch)
    assert not [ln for ln in p.stderr.splitlines() if ln.startswith("[rank")], p.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in run2.iterdir() if p.is_file() and p.name != ".lock"} == before


# ------------------------------------------------------------------ 5. train.compile that cannot compile
def _compile_lines(err: str) -> list:
    return [ln for ln in err.splitlines() if ln.strip()]


def test_compile_with_a_compiler_that_does_not_run_is_one_line(tiny_synth, tmp_path, monkeypatch, capsys):
    cxx = tmp_path / "g++"
    cxx.write_text("#!/bin/sh\necho 'cc1plus: fatal error: broken install' >&2\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    assert train(tiny_synth, tmp_path / "run", "train.compile=true", **{"train.iters": 2}) == 0
    lines = _compile_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "train.compile" in lines[0] and "does not run" in lines[0], lines
    assert "broken install" in lines[0] and "training uncompiled" in lines[0]


def test_compile_that_fails_on_the_graph_gives_up_with_one_line(tiny_synth, tmp_path, capsys):
    import torch._dynamo

    @torch._dynamo.register_backend(name="segadapt_test_failing")
    def failing(gm, example_inputs):  # what a broken toolchain does, on every graph
        raise RuntimeError("compiler exploded\nsee the log for details")

    disable_before = torch._dynamo.config.disable
    assert train(tiny_synth, tmp_path / "run", "train.compile=true", "train.compile_backend=segadapt_test_failing",
                 **{"train.iters": 3, "train.log_every": 1}) == 0
    lines = _compile_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines[:20]
    assert "train.compile: compiling failed" in lines[0] and "compiler exploded" in lines[0]
    assert "given up" in lines[0] and "WON'T CONVERT" not in lines[0]
    assert torch._dynamo.config.disable == disable_before  # the process is left as it was
    assert load_checkpoint(tmp_path / "run" / "final.pth")["iteration"] == 3


@pytest.mark.parametrize("damage, needles", [
    (lambda ck: {**ck, "config": "oops"}, ["damaged segadapt training checkpoint", "'config' is a str"]),
    (lambda ck: {**ck, "config": {**ck["config"], "train": {**ck["config"]["train"], "warp_speed": 9}}},
     ["its config does not load in this segadapt version", "train.warp_speed"]),
], ids=["config-not-a-mapping", "config-of-a-newer-version"])
def test_resume_from_a_checkpoint_with_a_bad_config_is_one_line(damage, needles, run2, tmp_path, capsys):
    path = tmp_path / "bad.pth"
    torch.save(damage(torch.load(run2 / "last.pth", weights_only=False)), path)
    capsys.readouterr()
    error_line(capsys, main(["train", "--no-progress", "--resume", str(path), f"out_dir={tmp_path / 'r'}"]),
               str(path), *needles)
    assert not (tmp_path / "r").exists()
