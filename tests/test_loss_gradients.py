"""benchmarks/loss_gradients.py: per-loss gradient norms equal a backward of that loss alone."""
import importlib.util
from pathlib import Path

import pytest
import torch

from segadapt.config import load_config
from segadapt.engine import trainer as trainer_mod
from .conftest import tiny_overrides

_spec = importlib.util.spec_from_file_location(
    "loss_gradients", Path(__file__).resolve().parents[1] / "benchmarks" / "loss_gradients.py")
loss_gradients = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loss_gradients)


def _norm(params):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def test_per_loss_gradient_norms_match_a_single_backward(tiny_synth, tmp_path):
    cfg = load_config("synthetic/minent", tiny_overrides(
        tiny_synth, tmp_path / "run", **{"method.entropy_weight_main": 0.5, "method.entropy_weight_aux": 0.0}))
    t = trainer_mod.Trainer(cfg, progress=False)
    t.method.train()
    batch = {k: next(s) for k, s in t.streams.items()}
    rows = loss_gradients.loss_gradient_norms(t.method, batch, it=0)
    assert set(rows) == {"loss_seg_main", "loss_seg_aux", "loss_ent_main"}
    groups = loss_gradients.parameter_groups(t.method)
    assert groups["method"] == []  # MinEnt has no modules of its own
    for name, row in rows.items():
        t.method.zero_grad(set_to_none=True)
        loss = t.method(batch, 0)[name]  # no step context: the losses keep their graphs
        loss.backward()
        assert row["value"] == pytest.approx(float(loss.detach()), rel=1e-5)
        assert row["backbone"] == pytest.approx(_norm(groups["backbone"]), rel=1e-4)
        assert row["classifier"] == pytest.approx(_norm(groups["classifier"]), rel=1e-4)
        assert row["method"] == 0.0


def test_weight_scales_the_gradient(tiny_synth, tmp_path):
    got = {}
    for w in (0.5, 1.0):
        cfg = load_config("synthetic/minent", tiny_overrides(
            tiny_synth, tmp_path / f"run{w}", **{"method.entropy_weight_main": w}))
        t = trainer_mod.Trainer(cfg, progress=False)
        t.method.train()
        batch = {k: next(s) for k, s in t.streams.items()}
        got[w] = loss_gradients.loss_gradient_norms(t.method, batch, it=0)["loss_ent_main"]["backbone"]
    assert got[1.0] == pytest.approx(2 * got[0.5], rel=1e-4)
