import json

import pytest
import torch

from segadapt.config import load_config
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.trainer import Trainer, train_from_config
from segadapt.errors import TrainingError
from segadapt.methods.source_only import SourceOnly

from .conftest import assert_resumed_run_equal, kill_and_resume, tiny_overrides


def cfg_for(tiny_synth, out, name="synthetic/source_only", **extra):
    return load_config(name, tiny_overrides(tiny_synth, out, **extra))


def test_resumed_run_equals_uninterrupted(tiny_synth, tmp_path, monkeypatch):
    train_from_config(cfg_for(tiny_synth, tmp_path / "a"), progress=False)
    ref = torch.load(tmp_path / "a" / "final.pth", weights_only=False)

    # the same run, killed during iteration 5 (after the checkpoint at 3)
    interrupted, got = kill_and_resume(monkeypatch, SourceOnly, cfg_for(tiny_synth, tmp_path / "b"), 4, 3)
    assert interrupted["iteration"] == 3

    assert_resumed_run_equal(ref, got)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_synth, tmp_path, monkeypatch):
    original = SourceOnly.training_step

    def nan_from_4(self, batch, it, ctx):
        out = original(self, batch, it, ctx)
        if it >= 4:
            out["loss_seg_main"] = out["loss_seg_main"] * float("nan")
        return out

    monkeypatch.setattr(SourceOnly, "training_step", nan_from_4)
    cfg = cfg_for(tiny_synth, tmp_path / "run")
    with pytest.raises(TrainingError) as e:
        train_from_config(cfg, progress=False)
    msg = str(e.value)
    assert "non-finite loss (loss_seg_main" in msg and "iteration 3" in msg
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "final.pth").exists()


def test_short_training_improves_miou(tiny_synth, tmp_path):
    cfg = cfg_for(tiny_synth, tmp_path / "run", **{"train.iters": 60, "train.batch_source": 4,
                                                   "train.log_every": 20, "train.ckpt_every": 60,
                                                   "eval.data.kind": "gta5", "eval.data.root": f"{tiny_synth}/source",
                                                   "eval.data.list_file": "val.txt", "optim.lr": 0.02})
    trainer = Trainer(cfg, progress=False)
    before = trainer.evaluate(0).miou
    after = trainer.train().miou
    assert after > before + 0.05, (before, after)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0]
    for ext in ("md", "csv", "json"):
        assert (tmp_path / "run" / f"results.{ext}").is_file()


def test_tensorboard_writes_scalars_and_images(tiny_synth, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = cfg_for(tiny_synth, tmp_path / "run", **{"train.tensorboard": "true", "train.iters": 4,
                                                   "train.eval_every": 2})
    train_from_config(cfg, progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "train/loss_seg_main" in tags["scalars"] and "eval/mIoU" in tags["scalars"]
    assert "eval/input_prediction_label" in tags["images"]


def test_oracle_trains_on_target_labels(tiny_synth, tmp_path):
    cfg = cfg_for(tiny_synth, tmp_path / "run", name="synthetic/oracle", **{"train.iters": 2, "train.ckpt_every": 2})
    trainer = Trainer(cfg, progress=False)
    assert trainer.source_ds.__class__.__name__.lower().startswith("cityscapes")
    assert "target" not in trainer.streams  # source_only needs no unlabelled stream


def test_bf16_autocast_and_channels_last_run(tiny_synth, tmp_path):
    cfg = cfg_for(tiny_synth, tmp_path / "run", **{"train.amp": "bf16", "train.channels_last": "true",
                                                   "train.iters": 2, "train.ckpt_every": 2})
    result = train_from_config(cfg, progress=False)
    assert 0.0 <= result.miou <= 1.0
    assert load_checkpoint(tmp_path / "run")["iteration"] == 2


def test_resume_refuses_a_checkpoint_of_another_model(tiny_synth, tmp_path):
    from segadapt.errors import CheckpointError

    train_from_config(cfg_for(tiny_synth, tmp_path / "a", **{"train.iters": 3}), progress=False)
    cfg = cfg_for(tiny_synth, tmp_path / "b", **{"model.base_width": 16})
    with pytest.raises(CheckpointError, match="does not match"):
        Trainer(cfg, resume=str(tmp_path / "a" / "last.pth"), progress=False)
