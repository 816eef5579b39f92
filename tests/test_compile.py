"""train.compile: the segmenter compiled in place, the same training, a one-line fallback."""
import pytest
import torch

from segadapt.config import load_config
from segadapt.engine import trainer as trainer_mod
from segadapt.engine.trainer import Trainer, compile_unavailable
from segadapt.errors import ConfigError

from .conftest import tiny_overrides


def _run(tiny_synth, out, **extra):
    cfg = load_config("synthetic/source_only", tiny_overrides(tiny_synth, out, **{
        "train.iters": 2, "train.ckpt_every": 2, **extra}))
    t = Trainer(cfg, progress=False)
    t.train()
    return t


def test_compiled_segmenter_trains_like_the_eager_one(tiny_synth, tmp_path):
    # aot_eager traces forward and backward through dynamo and AOTAutograd without a C++ build
    compiled = _run(tiny_synth, tmp_path / "c", **{"train.compile": "true", "train.compile_backend": "aot_eager"})
    eager = _run(tiny_synth, tmp_path / "e")
    assert getattr(compiled.model, "_compiled_call_impl", None) is not None
    assert getattr(eager.model, "_compiled_call_impl", None) is None
    ref, got = eager.model.state_dict(), compiled.model.state_dict()
    assert ref.keys() == got.keys()  # checkpoints stay loadable by uncompiled models
    for k in ref:
        assert torch.allclose(ref[k].float(), got[k].float(), rtol=1e-4, atol=1e-5), k


def test_compile_falls_back_with_one_line(tiny_synth, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer_mod.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in compile_unavailable("inductor", torch.device("cpu"))
    assert compile_unavailable("aot_eager", torch.device("cpu")) is None
    t = _run(tiny_synth, tmp_path / "f", **{"train.compile": "true"})
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "train.compile" in x]
    assert len(lines) == 1 and "training uncompiled" in lines[0]
    assert getattr(t.model, "_compiled_call_impl", None) is None
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="unknown backend 'inductr'"):
        _run(tiny_synth, tmp_path / "g", **{"train.compile": "true", "train.compile_backend": "inductr"})
