import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# the real Cityscapes frame beside the checkout (../shared), or where the workplace keeps it
CITYSCAPES_SAMPLE = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "data" / "cityscapes_sample",
                                      Path("/work/shared/data/cityscapes_sample")) if p.is_dir()),
                         Path("/work/shared/data/cityscapes_sample"))

# a tiny benchmark and a tiny model: every training test runs in seconds
TINY_SYNTH = dict(seed=0, size=(64, 32), num_source=16, num_source_val=4, num_target_train=8, num_target_val=4)


def tiny_overrides(synth_dir, out_dir, **extra) -> list[str]:
    o = {
        "synthetic.out": str(synth_dir),
        "synthetic.size": "[64, 32]",
        "synthetic.num_source": 16,
        "synthetic.num_source_val": 4,
        "synthetic.num_target_train": 8,
        "synthetic.num_target_val": 4,
        "synthetic.workers": 1,
        "out_dir": str(out_dir),
        "model.base_width": 8,
        "train.iters": 6,
        "train.batch_source": 2,
        "train.batch_target": 2,
        "train.num_workers": 0,
        "train.log_every": 2,
        "train.ckpt_every": 3,
        "train.eval_every": 0,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    from segadapt.data.synthetic import SynthParams, generate

    out = tmp_path_factory.mktemp("synth") / "bench"
    generate(out, SynthParams(**TINY_SYNTH, workers=1))
    return out


def assert_optimizer_states_equal(a: dict, b: dict) -> None:
    """Every tensor of every parameter's optimizer state (momentum, Adam moments, step) is equal."""
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for name, v in a[i].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b[i][name]), (i, name)
            else:
                assert v == b[i][name], (i, name)


def assert_resumed_run_equal(ref: dict, got: dict) -> None:
    """A resumed run's final checkpoint equals the uninterrupted run's: segmenter and method state
    (same keys, equal tensors), every optimizer's state, data stream positions, final mIoU."""
    for part in ("model", "method"):
        assert ref[part].keys() == got[part].keys(), part
        for k, v in ref[part].items():
            assert torch.equal(v, got[part][k]), (part, k)
    assert ref["optimizers"].keys() == got["optimizers"].keys()
    for name in ref["optimizers"]:
        assert_optimizer_states_equal(ref["optimizers"][name]["state"], got["optimizers"][name]["state"])
    assert ref["streams"] == got["streams"]
    assert ref["history"][-1]["mIoU"] == got["history"][-1]["mIoU"]


@pytest.fixture(scope="session")
def tiny_run(tiny_synth, tmp_path_factory):
    """A 2-iteration source-only run on the tiny benchmark (read-only for the tests using it)."""
    from segadapt.config import load_config
    from segadapt.engine.trainer import train_from_config

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = load_config("synthetic/source_only", tiny_overrides(tiny_synth, out, **{"train.iters": 2,
                                                                                  "train.ckpt_every": 2}))
    train_from_config(cfg, progress=False)
    return out


def load_eager_segmenter(run_dir):
    """The run's final segmenter, built directly from its checkpoint (independent of predictor/export code)."""
    from segadapt.config import load_config
    from segadapt.models.segmenter import build_segmenter

    ckpt = torch.load(Path(run_dir) / "final.pth", map_location="cpu", weights_only=False)
    model = build_segmenter(load_config(None, base=ckpt["config"], base_version=ckpt["version"]).model)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def kill_and_resume(monkeypatch, method_cls, cfg, kill_at: int, last_ckpt: int):
    """Run `cfg`, killed (KeyboardInterrupt) during iteration `kill_at`; check the run names its last
    checkpoint at `last_ckpt`; resume it to the end. Returns (interrupted checkpoint, final checkpoint)."""
    from segadapt.engine.checkpoint import load_checkpoint
    from segadapt.engine.trainer import train_from_config
    from segadapt.errors import TrainingError

    original = method_cls.training_step

    def dies(self, batch, it, ctx):
        if it == kill_at:
            raise KeyboardInterrupt
        return original(self, batch, it, ctx)

    monkeypatch.setattr(method_cls, "training_step", dies)
    with pytest.raises(TrainingError, match=f"interrupted; last checkpoint.*iteration {last_ckpt}"):
        train_from_config(cfg, progress=False)
    interrupted = load_checkpoint(cfg.out_dir)
    monkeypatch.setattr(method_cls, "training_step", original)
    train_from_config(cfg, resume=str(Path(cfg.out_dir) / "last.pth"), progress=False)
    return interrupted, torch.load(Path(cfg.out_dir) / "final.pth", weights_only=False)
