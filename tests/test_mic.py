"""Masked image consistency (MIC), a component every method composes: with the teacher of a
self-training method (DACS, DAFormer, CONFETI) or with a teacher of its own (source-only, MinEnt,
AdvEnt, CFContra)."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segadapt.config import load_config
from segadapt.engine.trainer import Trainer
from segadapt.errors import ConfigError
from segadapt.methods import StepContext
from segadapt.methods.components.mic import block_mask, mask_image, normalization_mean_rgb
from segadapt.methods.components.teacher import MeanTeacher, PseudoLabels
from segadapt.models.deeplabv2 import normalize_input

from .conftest import tiny_overrides
from .test_confeti import TINY as CONFETI_TINY


# --------------------------------------------------------------------------- block mask
def _cells(mask: torch.Tensor, rows: int, cols: int) -> list:
    """The distinct values inside each cell of the nearest-resize grid of one (H, W) mask."""
    h, w = mask.shape[-2:]
    r = torch.arange(h) * rows // h
    c = torch.arange(w) * cols // w
    return [mask[r == i][:, c == j].unique() for i in range(rows) for j in range(cols)]


def test_block_mask_blocks_are_constant_and_binary():
    torch.manual_seed(0)
    m = block_mask(3, 32, 48, 8, 0.5)
    assert m.shape == (3, 1, 32, 48) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    # 4 x 6 cells of exactly 8 x 8 pixels
    blocks = m.view(3, 1, 4, 8, 6, 8)
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))
    assert 0 < m.mean() < 1


def test_block_mask_keep_fraction_is_one_minus_ratio():
    torch.manual_seed(0)
    m = block_mask(400, 16, 16, 4, 0.7)  # 400 x 16 cells
    assert m.mean().item() == pytest.approx(0.3, abs=0.02)
    assert torch.equal(block_mask(5, 16, 24, 4, 0.0), torch.ones(5, 1, 16, 24))


def test_block_mask_side_not_divisible_is_a_nearest_resize_of_rounded_grid():
    torch.manual_seed(0)
    m = block_mask(2, 20, 30, 8, 0.5)  # round(2.5) = 2 rows (Python rounds halves to even), round(3.75) = 4 cols
    assert m.shape == (2, 1, 20, 30)
    assert all(v.numel() == 1 for b in range(2) for v in _cells(m[b, 0], 2, 4))
    # the same as the reference's nearest resize of the cell grid
    torch.manual_seed(0)
    cells = (torch.rand(2, 1, 2, 4) > 0.5).float()
    assert torch.equal(m, F.interpolate(cells, size=(20, 30), mode="nearest"))
    # a block larger than the image: one cell per side, not an empty grid
    assert block_mask(1, 5, 5, 64, 0.5).unique().numel() == 1


@pytest.mark.parametrize("kind", ["advent_bgr", "imagenet_rgb"])
def test_masked_pixels_normalise_to_zero(kind):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    mask = block_mask(2, 8, 8, 4, 0.5)
    fill = torch.tensor(normalization_mean_rgb(kind))
    y = mask_image(x, mask, fill)
    keep = mask.bool().expand_as(x)
    assert torch.equal(y[keep], x[keep])
    net_in = normalize_input(y, kind)
    scale = 255.0 if kind == "advent_bgr" else 1.0  # float32 rounding of mean / 255 * 255
    assert net_in[~keep].abs().max() < 1e-5 * scale
    assert net_in[keep].abs().min() > 0  # the kept pixels are not the mean


def test_normalization_mean_rgb_values():
    r, g, b = normalization_mean_rgb("advent_bgr")
    assert (r, g, b) == pytest.approx((122.67891434 / 255, 116.66876762 / 255, 104.00698793 / 255))
    assert normalization_mean_rgb("imagenet_rgb") == pytest.approx((0.485, 0.456, 0.406))


# --------------------------------------------------------------------------- methods
def _cfg(tiny_synth, out, name, **extra):
    extra = {"method.mic.block_size": 8, **extra}
    if "confeti" in name:
        extra = {**CONFETI_TINY, **extra}
    elif "daformer" in name:
        extra.setdefault("method.rcs.min_pixels", 8)
    return load_config(name, tiny_overrides(tiny_synth, out, **extra))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 19, (2, 32, 64), generator=g)
    return {"source": {"image": torch.rand(2, 3, 32, 64, generator=g), "label": label},
            "target": {"image": torch.rand(2, 3, 32, 64, generator=g)}}


class _Fixed(nn.Module):
    """A stand-in segmenter that returns given logits."""

    def __init__(self, main, aux):
        super().__init__()
        self.main, self.aux = main, aux

    def forward(self, x):
        return {"main": self.main, "aux": self.aux}


def test_mic_loss_hand_computed(tiny_synth, tmp_path):
    cfg = _cfg(tiny_synth, tmp_path / "run", "synthetic/dacs",
               **{"method.mic": "true", "method.mic.weight": 2.0, "method.mic.augment": "false"})
    method = Trainer(cfg, progress=False).method
    assert cfg.model.aux_weight == pytest.approx(0.1)
    # 1 x 3 pixels: [0, 0] label 0 weight 0.5 -> ln 2; [ln 3, 0] label 1 weight 1 -> ln 4; ignored -> 0
    logits = torch.tensor([[0.0, math.log(3.0), 5.0], [0.0, 0.0, 0.0]]).view(1, 2, 1, 3)
    pseudo = PseudoLabels(torch.tensor([[[0, 1, 255]]]), torch.tensor([[[0.5, 1.0, 1.0]]]), torch.tensor(0.5))
    got = method.mic.losses(_Fixed(logits, 2 * logits), torch.rand(1, 3, 1, 3), pseudo)
    assert got["loss_mic"].item() == pytest.approx(2.0 * (0.5 * math.log(2) + math.log(4)) / 3)
    # aux logits doubled: [0, 0] -> ln 2 again; [2 ln 3, 0] label 1 -> ln 10
    assert got["loss_mic_aux"].item() == pytest.approx(2.0 * 0.1 * (0.5 * math.log(2) + math.log(10)) / 3)


def test_mic_config_checks_and_fill_follows_the_model(tiny_synth, tmp_path):
    # checked when the config loads; the old flat keys name their new place
    for key, value in (("mask_ratio", 1.0), ("block_size", 0), ("weight", -1)):
        with pytest.raises(ConfigError, match=f"method.mic.{key}"):
            _cfg(tiny_synth, tmp_path / key, "synthetic/dacs", **{f"method.mic.{key}": value})
    with pytest.raises(ConfigError, match="'method.mic_weight'.*renamed to 'method.mic.weight'"):
        _cfg(tiny_synth, tmp_path / "old", "synthetic/dacs", **{"method.mic_weight": 2})
    for kind in ("advent_bgr", "imagenet_rgb"):
        method = Trainer(_cfg(tiny_synth, tmp_path / kind, "synthetic/dacs",
                              **{"model.normalization": kind, "method.mic": "true"}), progress=False).method
        assert method.mic.fill.tolist() == pytest.approx(normalization_mean_rgb(kind))
        assert "mic.fill" not in method.state_dict()
        assert method.mic.teacher is None  # DACS shares its own teacher's pseudo-labels


class _RecordingContext(StepContext):
    def __init__(self, events, run_stage):
        super().__init__(run_stage)
        self.events = events

    def end_stage(self, losses, step=()):
        self.events.append(("stage", sorted(k for k, v in losses.items() if k.startswith("loss") and v.requires_grad)))
        return super().end_stage(losses, step)


def _record(trainer, monkeypatch, teacher=None):
    """Wrap the teacher, the MIC input and loss; returns the event log and a recording step context
    that runs the trainer's staged backward."""
    method = trainer.method
    events = []
    teacher = teacher if teacher is not None else method.teacher_model()
    orig_teacher_forward = teacher.forward

    def teacher_forward(x, *a, **k):
        out = orig_teacher_forward(x, *a, **k)
        events.append(("teacher", x.clone(), out["main"].detach().clone()))
        return out

    monkeypatch.setattr(teacher, "forward", teacher_forward)
    orig_images, orig_losses = method.mic.images, method.mic.losses

    def mic_images(x):
        events.append(("mic_rng", torch.get_rng_state()))
        y = orig_images(x)
        events.append(("mic_input", y.clone()))
        return y

    def mic_losses(model, x, pseudo=None, valid=None, ctx=None):
        events.append(("mic_args", x.clone(), pseudo))
        out = orig_losses(model, x, pseudo, valid, ctx=ctx)
        events.append(("mic_losses", sorted(out)))
        return out

    monkeypatch.setattr(method.mic, "images", mic_images)
    monkeypatch.setattr(method.mic, "losses", mic_losses)
    return events, _RecordingContext(events, trainer._run_stage)


@pytest.mark.parametrize("name", ["synthetic/dacs", "synthetic/confeti_stage1"])
def test_mic_labels_come_from_the_unmasked_target(tiny_synth, tmp_path, monkeypatch, name):
    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run", name, **{"method.mic": "true"}), progress=False)
    method = trainer.method
    method.train()
    events, ctx = _record(trainer, monkeypatch)
    batch = _batch()
    torch.manual_seed(1)
    method(batch, 2, ctx)
    kinds = [e[0] for e in events]
    teacher_calls = [e for e in events if e[0] == "teacher"]
    # the first call gives the pseudo-labels (CONFETI's prototype update calls it on x_mix after)
    assert torch.equal(teacher_calls[0][1], batch["target"]["image"])
    assert kinds.index("teacher") < kinds.index("mic_rng")
    _, x, pseudo = next(e for e in events if e[0] == "mic_args")
    assert torch.equal(x, batch["target"]["image"])
    logits = F.interpolate(teacher_calls[0][2], size=(32, 64), mode="bilinear", align_corners=False)
    assert torch.equal(pseudo.labels, logits.argmax(1))
    assert torch.equal(pseudo.weights, method.pseudo_labels(batch["target"]["image"]).weights)  # q, rows not mixed
    # the student's masked input: whole 8 x 8 blocks at the fill colour, the rest not
    y = next(e for e in events if e[0] == "mic_input")[1]
    assert not any(torch.equal(y, e[1]) for e in teacher_calls)  # the teacher never sees the masked image
    at_fill = (y == method.mic.fill.view(1, 3, 1, 1)).all(1)
    blocks = at_fill.view(2, 4, 8, 8, 8)
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4))) and 0 < at_fill.float().mean() < 1
    # every stage of the method had its backward before the masked forward; MIC's loss is the last stage
    assert max(i for i, k in enumerate(kinds) if k == "stage") < kinds.index("mic_rng")
    assert any(e[0] == "stage" and "loss_mix_main" in e[1] for e in events)
    assert next(e for e in events if e[0] == "mic_losses")[1] == ["loss_mic", "loss_mic_aux"]


def test_mic_off_changes_nothing(tiny_synth, tmp_path, monkeypatch):
    def step(mic):
        cfg = _cfg(tiny_synth, tmp_path / f"run_{mic}", "synthetic/daformer", **{"method.mic": mic})
        trainer = Trainer(cfg, progress=False)
        method = trainer.method
        method.train()
        events = _record(trainer, monkeypatch)[0] if method.mic is not None else []
        torch.manual_seed(1)
        out = method(_batch(), 2)
        return out, events, torch.get_rng_state()

    off, off_events, off_rng = step("false")
    on, on_events, _ = step("true")
    assert not any(k.startswith("loss_mic") for k in off)
    assert not off_events
    assert {"loss_mic", "loss_mic_aux"} <= set(on)
    # every other loss equal, and MIC draws only after everything the step drew without it
    assert set(on) - {"loss_mic", "loss_mic_aux"} == set(off)
    for k, v in off.items():
        assert torch.equal(v, on[k]), k
    assert torch.equal(off_rng, next(e for e in on_events if e[0] == "mic_rng")[1])


@pytest.mark.parametrize("name", ["synthetic/dacs", "synthetic/daformer", "synthetic/confeti_stage1"])
def test_training_with_mic_logs_loss_mic(tiny_synth, tmp_path, name):
    out = tmp_path / "run"
    # threshold 0: q = 1, so that an untrained teacher's labels weigh and the MIC loss is not 0
    cfg = _cfg(tiny_synth, out, name, **{"method.mic": "true", "method.teacher.pseudo_threshold": 0.0,
                                         "train.iters": 2, "train.log_every": 2, "train.ckpt_every": 2})
    Trainer(cfg, progress=False).train()
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert {"loss_mic", "loss_mic_aux", "loss_mix_main"} <= keys
    assert all(math.isfinite(r["loss_mic"]) and r["loss_mic"] > 0 for r in logged if "loss_mic" in r)


# --------------------------------------------------------------------------- MIC on methods without a teacher
@pytest.mark.parametrize("name", ["synthetic/source_only", "synthetic/minent", "synthetic/advent",
                                  "synthetic/cfcontra"])
def test_mic_on_every_method_trains_with_its_own_teacher(tiny_synth, tmp_path, name):
    out = tmp_path / "run"
    extra = {"method.mic": "true", "method.teacher.pseudo_threshold": 0.0, "train.iters": 2, "train.log_every": 1,
             "train.ckpt_every": 2}
    if "cfcontra" in name:
        extra.update({"method.contrast.start_iter": 0, "method.contrast.init_source_batches": 1,
                      "method.contrast.init_target_batches": 1})
    trainer = Trainer(_cfg(tiny_synth, out, name, **extra), progress=False)
    method = trainer.method
    assert method.uses_target and isinstance(method.mic.teacher, MeanTeacher)
    trained = {id(p) for o in trainer.optimizers.values() for g in o.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in method.mic.teacher.parameters())
    student0 = {k: v.clone() for k, v in method.model.state_dict().items()}
    trainer.train()
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_mic"] > 0 and r["mic_pseudo_weight"] == 1.0 for r in logged if "loss" in r)
    # the teacher follows the student: after two updates it is neither the start nor the student
    ema = method.mic.teacher.ema.state_dict()
    key = "layer6.conv2d_list.0.weight"
    assert not torch.equal(ema[key], student0[key]) and not torch.equal(ema[key], method.model.state_dict()[key])
    assert any(k.startswith("mic.teacher.ema.") for k in torch.load(out / "final.pth", weights_only=False)["method"])


def test_minent_mic_teacher_settings_and_pseudo_labels(tiny_synth, tmp_path, monkeypatch):
    """MinEnt's MIC teacher: MIC's MinEnt defaults (alpha 0.999, threshold 0.968, no ignored rows),
    labels of the clean target; its EMA step is MeanTeacher's after every optimizer step."""
    cfg = _cfg(tiny_synth, tmp_path / "run", "synthetic/minent", **{"method.mic": "true"})
    assert (cfg.method.teacher.alpha, cfg.method.teacher.pseudo_threshold, cfg.method.teacher.ignore_top,
            cfg.method.teacher.ignore_bottom) == (0.999, 0.968, 0, 0)
    trainer = Trainer(cfg, progress=False)
    method = trainer.method
    method.train()
    events, ctx = _record(trainer, monkeypatch, teacher=method.mic.teacher.ema)
    batch = _batch()
    torch.manual_seed(1)
    out = method(batch, 0, ctx)
    teacher_calls = [e for e in events if e[0] == "teacher"]
    assert len(teacher_calls) == 1 and torch.equal(teacher_calls[0][1], batch["target"]["image"])
    probs = torch.softmax(F.interpolate(teacher_calls[0][2], size=(32, 64), mode="bilinear", align_corners=True), 1)
    q = (probs.max(1).values >= 0.968).float().mean()
    assert out["mic_pseudo_weight"] == q
    # MinEnt's stages (source CE, then entropy) both had their backward before the masked forward
    assert [e[1] for e in events if e[0] == "stage"] == [["loss_seg_aux", "loss_seg_main"],
                                                          ["loss_ent_aux", "loss_ent_main"]]
    before = method.mic.teacher.ema.state_dict()["layer6.conv2d_list.0.weight"].clone()
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    method.after_step(0)  # update 1: alpha_1 = min(1 - 1/2, 0.999) = 0.5
    w = method.model.state_dict()["layer6.conv2d_list.0.weight"]
    assert torch.allclose(method.mic.teacher.ema.state_dict()["layer6.conv2d_list.0.weight"], 0.5 * before + 0.5 * w)


def test_resumed_minent_mic_run_equals_uninterrupted(tiny_synth, tmp_path, monkeypatch):
    from segadapt.engine.trainer import train_from_config
    from segadapt.methods.minent import MinEnt

    from .conftest import assert_resumed_run_equal, kill_and_resume

    extra = {"method.mic": "true", "method.teacher.pseudo_threshold": 0.0}
    train_from_config(_cfg(tiny_synth, tmp_path / "a", "synthetic/minent", **extra), progress=False)
    ref = torch.load(tmp_path / "a" / "final.pth", weights_only=False)
    interrupted, got = kill_and_resume(monkeypatch, MinEnt, _cfg(tiny_synth, tmp_path / "b", "synthetic/minent",
                                                                 **extra), 4, 3)
    assert interrupted["iteration"] == 3
    assert_resumed_run_equal(ref, got)  # MIC's teacher included
