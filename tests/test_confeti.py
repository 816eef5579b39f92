import json
import math

import pytest
import torch
import torch.nn.functional as F

from segadapt.cli import main
from segadapt.config import load_config
from segadapt.engine.trainer import Trainer, train_from_config
from segadapt.errors import ConfigError
from segadapt.methods.confeti import (
    Confeti,
    ContrastiveHead,
    bilinear_at,
    cam_loss,
    cam_weights,
    contrast_terms,
    prototype_candidates,
    prototype_contrast_loss,
    prototype_regulariser,
    sample_pixels,
    top_pixels_per_class,
    update_prototypes_,
    weighted_class_means,
)
from segadapt.models.cut import from_cut_range, load_cut_weights, to_cut_range

from .conftest import assert_optimizer_states_equal, assert_resumed_run_equal, kill_and_resume, tiny_overrides

# tiny CUT, thresholds inside a 6-iteration run so that every term is exercised
TINY = {"method.cut.init": "null", "method.cut.ngf": 4, "method.cut.ndf": 4, "method.cut.n_blocks": 2,
        "method.cut.nce_layers": "[0, 4]", "method.cut.num_patches": 16, "method.cut.nce_dim": 8,
        "method.cam_mix_start": 1, "method.contrast_start": 1, "method.cross_domain_start": 2,
        "method.rcs.min_pixels": 8}


def _cfg(tiny_synth, out, name="synthetic/confeti_stage1", **extra):
    return load_config(name, tiny_overrides(tiny_synth, out, **{**TINY, **extra}))


# --------------------------------------------------------------------------- losses on hand-made tensors
def test_cam_loss_is_bce_of_pooled_logits_against_present_classes():
    logits = torch.tensor([[[[1.0, 3.0], [-1.0, 1.0]], [[0.0, 0.0], [2.0, -2.0]], [[-4.0, 0.0], [0.0, 0.0]]]])
    labels = torch.tensor([[[0, 0], [2, 255]]])
    pooled = torch.tensor([1.0, 0.0, -1.0])  # spatial means of the three maps
    present = torch.tensor([1.0, 0.0, 1.0])
    expected = -(present * torch.log(torch.sigmoid(pooled)) + (1 - present) * torch.log(1 - torch.sigmoid(pooled)))
    assert cam_loss(logits, labels).item() == pytest.approx(expected.mean().item(), rel=1e-6)


def test_sample_pixels_draws_labelled_pixels_only():
    feats = torch.arange(8.0).view(1, 2, 2, 2)
    labels = torch.tensor([[[0, 255], [1, 2]]])
    torch.manual_seed(0)
    v, y, keep = sample_pixels(feats, labels, num_pixels=3, num_classes=19)
    assert keep.all()  # three labelled pixels, three drawn
    assert sorted(y.tolist()) == [0, 1, 2]
    for vi, yi in zip(v, y):  # each row is the feature of a pixel with that label
        pos = {0: 0, 1: 2, 2: 3}[int(yi)]
        assert torch.equal(vi, feats[0, :, pos // 2, pos % 2])
    v, y, keep = sample_pixels(feats, labels, num_pixels=10, num_classes=19)
    assert len(y) == 4 and keep.sum() == 3 and (y[~keep] == 255).all()
    # many pixels: a uniform draw, not the first ones
    big = torch.zeros(1, 400, 400, dtype=torch.long)
    _, y, keep = sample_pixels(torch.arange(160000.0).view(1, 1, 400, 400), big, 50, 19)
    assert keep.all() and len(y) == 50


def test_prototype_contrast_loss_is_cross_entropy_over_prototype_similarities():
    v = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]), dim=1)
    protos = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]), dim=1)
    y = torch.tensor([0, 1, 2])
    keep = torch.tensor([True, True, False])
    tau = 0.1
    terms = []
    for i in range(2):
        s = [float(v[i] @ protos[k]) / tau for k in range(3)]
        terms.append(-(s[int(y[i])] - math.log(sum(math.exp(x) for x in s))))
    got = prototype_contrast_loss(v, y, keep, protos, tau)
    assert got.item() == pytest.approx(sum(terms) / 2, rel=1e-5)


def test_prototype_regulariser_sign_as_specified():
    protos = torch.eye(3)
    keep = torch.ones(2, dtype=torch.bool)
    # mean feature equally similar to every prototype: log(1/3) * 3 / (3 ln 3) = -1
    even = torch.full((2, 3), 1.0 / math.sqrt(3))
    assert prototype_regulariser(even, keep, protos, 0.1).item() == pytest.approx(-1.0, rel=1e-6)
    # mean feature (1, 0, 0): logits (10, 0, 0)
    peaked = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    lse = math.log(math.exp(10) + 2)
    expected = (10 - 3 * lse) / (3 * math.log(3))
    assert prototype_regulariser(peaked, keep, protos, 0.1).item() == pytest.approx(expected, rel=1e-5)
    # what it does: minimising it favours one prototype (lower than -1), and gradient descent on
    # the features moves their mean away from the uniform point
    assert expected < -1.0
    x = torch.tensor([[0.6, 0.55, 0.58]], requires_grad=True)
    prototype_regulariser(x, torch.ones(1, dtype=torch.bool), protos, 0.1).backward()
    stepped = x.detach() - 0.01 * x.grad
    assert (stepped[0, 0] - stepped[0, 1]) > (x[0, 0] - x[0, 1]).item()
    # unlabelled rows do not count
    mixed = torch.cat([peaked[:1], even[:1]])
    assert prototype_regulariser(mixed, torch.tensor([True, False]), protos, 0.1).item() == pytest.approx(expected,
                                                                                                         rel=1e-5)


def candidates(v, labels, w, rank, valid, num_classes, topk):
    idx, chosen = top_pixels_per_class(labels, rank, valid, num_classes, topk)
    return weighted_class_means(v[idx], w[idx], chosen)


def test_prototype_candidates_weighted_top_k_per_class():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0], [1.0, 0.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 255])
    w = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 1.0])
    valid = labels != 255
    f, present = candidates(v, labels, w, w, valid, num_classes=3, topk=2)
    assert present.tolist() == [True, True, False]
    # class 0: pixels 1 and 2 (weights 0.9, 0.5); class 1: both its pixels
    assert torch.allclose(f[0], F.normalize(0.9 * v[1] + 0.5 * v[2], dim=0), atol=1e-6)
    assert torch.allclose(f[1], F.normalize(0.2 * v[3] + 0.3 * v[4], dim=0), atol=1e-6)


def test_uniform_weights_pick_random_source_pixels():
    n = 80
    v = torch.eye(n)  # each pixel's feature says which pixel it is
    labels = torch.zeros(n, dtype=torch.long)
    source = torch.arange(n) < 60  # 60 source pixels of class 0, 20 target pixels
    picks = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        f, present = candidates(v, labels, torch.ones(n), torch.rand(n, generator=g), source, 1, 32)
        chosen = f[0] > 0
        assert present[0] and chosen.sum() == 32 and not chosen[60:].any()  # 32 source pixels, equal weights
        assert torch.allclose(f[0][chosen], torch.full((32,), 1 / math.sqrt(32)))
        picks.append(chosen)
    assert not torch.equal(picks[0], picks[1])  # random among ties, not the first 32


def test_bilinear_at_equals_upsampling_then_reading_the_pixels():
    torch.manual_seed(0)
    feats = torch.randn(3, 5, 4, 7)
    size = (13, 29)
    full = F.interpolate(feats, size=size, mode="bilinear", align_corners=True).permute(0, 2, 3, 1).reshape(-1, 5)
    idx = torch.randint(0, 3 * 13 * 29, (19, 6))
    idx[0, 0], idx[0, 1] = 0, 3 * 13 * 29 - 1  # corners of the first and last image
    assert torch.allclose(bilinear_at(feats, idx, size), full[idx], atol=1e-5)


def test_prototype_update_first_copy_then_ema_and_renormalised():
    protos = torch.zeros(3, 2)
    seen = torch.zeros(3, dtype=torch.bool)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    update_prototypes_(protos, seen, f, torch.tensor([True, False, True]), momentum=0.999)
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.6, 0.8]]))  # a = 1, absent untouched
    assert seen.tolist() == [True, False, True]
    update_prototypes_(protos, seen, torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]),
                       torch.tensor([True, True, False]), momentum=0.999)
    expected0 = F.normalize(torch.tensor([0.999, 0.001]), dim=0)
    assert torch.allclose(protos[0], expected0, atol=1e-7)
    assert torch.equal(protos[1], torch.tensor([0.0, 1.0]))  # its first update: a copy
    assert torch.equal(protos[2], torch.tensor([0.6, 0.8]))
    assert torch.allclose(protos.norm(dim=1), torch.ones(3))


def test_contrastive_head_outputs_the_raw_projection():
    head = ContrastiveHead(2, 2)
    with torch.no_grad():
        head.proj.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]).view(2, 2, 1, 1))
    assert torch.equal(head(torch.ones(1, 2, 1, 1)).flatten(), torch.tensor([2.0, 3.0]))  # not (0.55, 0.83)


def test_cam_weights_are_the_relu_cam_upsampled_at_each_pixels_class():
    cam = torch.tensor([[[[-1.0, 2.0]], [[3.0, -2.0]]]])  # (1, 2 classes, 1, 2)
    labels = torch.tensor([[[1, 0, 1]]])  # width 2 -> 3, align_corners=True: positions 0, 0.5, 1
    # ReLU then upsample: class 0 (0, 1, 2), class 1 (3, 1.5, 0); a sigmoid would give no zero,
    # upsampling before the ReLU 0.5 at the middle of class 0
    assert torch.equal(cam_weights(cam, labels), torch.tensor([3.0, 1.0, 0.0]))
    assert torch.equal(cam_weights(cam, torch.tensor([[[255, 0, 255]]])), torch.tensor([0.0, 1.0, 0.0]))


def test_prototype_candidates_from_raw_projection_and_relu_cam():
    proj = torch.tensor([[3.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)  # pixels (3,0), (0,1), (1,1)
    labels = torch.zeros(1, 1, 3, dtype=torch.long)
    cam = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0]]).view(1, 2, 1, 3)
    # CAM phase, top 2: weights 2 and 1 on the raw vectors (normalised ones would give (2, 1))
    f, present = prototype_candidates(proj, cam, labels, torch.ones_like(labels), num_classes=2, topk=2)
    assert present.tolist() == [True, False]
    assert torch.allclose(f[0], F.normalize(torch.tensor([6.0, 1.0]), dim=0), atol=1e-6)
    # source phase: equal weights on the source pixels only
    f, present = prototype_candidates(proj, None, labels, torch.tensor([[[1, 0, 1]]]), num_classes=2, topk=32)
    assert present.tolist() == [True, False]
    assert torch.allclose(f[0], F.normalize(torch.tensor([4.0, 1.0]), dim=0), atol=1e-6)
    # a class whose chosen pixels all have a zero ReLU'd CAM is not updated
    cam0 = torch.tensor([[-1.0, -2.0, -3.0], [0.0, 0.0, 0.0]]).view(1, 2, 1, 3)
    _, present = prototype_candidates(proj, cam0, labels, torch.ones_like(labels), num_classes=2, topk=2)
    assert present.tolist() == [False, False]


def test_contrast_normalises_and_regulariser_means_every_labelled_pixel():
    proj = torch.tensor([[2.0, 0.0, 1.0], [0.0, 5.0, 1.0]]).view(1, 2, 1, 3)  # raw (2,0), (0,5), (1,1)
    labels = torch.tensor([[[0, 1, 255]]])
    protos = torch.eye(2)
    for seed in range(3):  # one pixel sampled: either labelled pixel, normalised, gives logits (1, 0)
        torch.manual_seed(seed)  # on its class (raw: 2 or 5)
        terms = contrast_terms(proj, labels, protos, num_pixels=1, temperature=1.0, num_classes=2)
        assert terms["contrast"].item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-5)
        # mean of the two unit vectors (0.5, 0.5): equal logits, 2 log(1/2) / (2 ln 2) = -1; the
        # sampled pixel alone would give (1 - 2 lse(1, 0)) / (2 ln 2) ~ -1.17
        assert terms["reg"].item() == pytest.approx(-1.0, rel=1e-6)
    assert "reg" not in contrast_terms(proj, labels, protos, 1, 1.0, 2, with_reg=False)


# --------------------------------------------------------------------------- the method
def test_consistency_compares_raw_projections(tiny_synth, tmp_path):
    method = Trainer(_cfg(tiny_synth, tmp_path / "run"), progress=False).method
    method.train()
    d = method.prototypes.shape[1]
    protos = torch.zeros_like(method.prototypes)
    protos[0, 0] = protos[1, 1] = 1.0
    method.prototypes.copy_(protos)
    with torch.no_grad():
        method.reg_proj.weight.copy_(2.0 * torch.eye(d).view(d, d, 1, 1))
        method.reg_proj.bias.zero_()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 64)
    # x_s2t = x_s: b = 2 a, so the loss is mean((a . P^T)^2) with a the raw projection
    with torch.no_grad():
        a = F.conv2d(method._frozen_student_features(x), method.proj.proj.weight)
        expected = (torch.einsum("bdhw,cd->bchw", a, protos) ** 2).mean()
        unit = (torch.einsum("bdhw,cd->bchw", F.normalize(a, dim=1), protos) ** 2).mean()
        got = method.consistency_loss(x, x)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    assert abs(expected.item() - unit.item()) > 0.1 * unit.item()  # the test tells raw from normalised


@pytest.mark.parametrize("config", ["synthetic/confeti_stage1", "synthetic/confeti_single"])
def test_consistency_reaches_only_generator_and_reg_proj(tiny_synth, tmp_path, config):
    # consistency_bn frozen: the running statistics too stay untouched (the reference updates them)
    method = Trainer(_cfg(tiny_synth, tmp_path / "run", config, **{"method.consistency_bn": "frozen"}),
                     progress=False).method
    method.train()
    torch.manual_seed(0)
    method.prototypes.copy_(F.normalize(torch.randn_like(method.prototypes), dim=1))
    buffers = {k: v.clone() for k, v in method.named_buffers()}
    x_s = torch.rand(2, 3, 32, 64)
    x_s2t = from_cut_range(method.cut.G(to_cut_range(x_s)))
    loss = method.consistency_loss(x_s, x_s2t)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in method.cut.G.parameters())
    assert any(p.grad.abs().sum() > 0 for p in method.cut.G.parameters())
    assert all(p.grad is not None for p in method.reg_proj.parameters())
    frozen = [method.model, method.proj, method.cam, method.teacher, method.cut.D, method.cut.F]
    assert all(p.grad is None for m in frozen for p in m.parameters())
    for k, v in method.named_buffers():  # the student's BatchNorm running statistics untouched
        # (ema mode runs the teacher, whose BatchNorm follows its own norm mode)
        if not (config.endswith("single") and k.startswith("teacher.")):
            assert torch.equal(v, buffers[k]), k


def test_stage1_then_stage2_from_its_run_folder(tiny_synth, tmp_path):
    stage1 = tmp_path / "stage1"
    trainer = Trainer(_cfg(tiny_synth, stage1), progress=False)
    method = trainer.method
    # D is stepped mid-step by the trainer (CUT's order), with the other optimizers
    assert set(trainer.optimizers) == {"segmenter", "generator", "discriminator", "patch_sampler"}
    assert method.mcfg.cut.d_step == "first"  # CUT's order by default
    g0 = {k: v.clone() for k, v in method.cut.G.state_dict().items()}
    trainer.train()
    keys = set().union(*(json.loads(x) for x in (stage1 / "metrics.jsonl").read_text().splitlines()))
    assert {"loss_consistency", "loss_contrast_src", "loss_contrast_mix", "loss_contrast_tgt", "loss_reg_src",
            "loss_cam_src", "loss_cam_mix", "loss_G_GAN", "loss_NCE", "loss_D_real", "loss_fd"} <= keys
    assert method.prototype_seen.any()
    seen = method.prototype_seen
    assert torch.allclose(method.prototypes[seen].norm(dim=1), torch.ones(int(seen.sum())))
    assert {"model", "cam", "proj"} == set(method.teacher.ema.keys())
    assert (stage1 / "latest_net_G.pth").is_file() and (stage1 / "latest_net_D.pth").is_file()
    assert any(not torch.equal(v, method.cut.G.state_dict()[k]) for k, v in g0.items())  # G trained jointly

    stage2 = tmp_path / "stage2"
    t2 = Trainer(_cfg(tiny_synth, stage2, "synthetic/confeti_stage2", **{"method.cut.init": str(stage1)}),
                 progress=False)
    m2 = t2.method
    assert set(t2.optimizers) == {"segmenter"} and not m2.trains_stylizer and m2.reg_proj is None
    assert {n for n, _ in m2.cut.named_children()} == {"G"}  # no D, no F in stage 2
    for k, v in method.cut.G.state_dict().items():  # stage 1's generator, not retrained
        assert torch.equal(v, m2.cut.G.state_dict()[k])
    trained = {id(p) for o in t2.optimizers.values() for g in o.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in m2.cut.G.parameters())
    t2.train()
    assert not m2.cut.G.training
    for k, v in method.cut.G.state_dict().items():
        assert torch.equal(v, m2.cut.G.state_dict()[k])
    keys = set().union(*(json.loads(x) for x in (stage2 / "metrics.jsonl").read_text().splitlines()))
    assert "loss_contrast_mix" in keys and "loss_consistency" not in keys and "loss_contrast_tgt" not in keys
    assert not (stage2 / "latest_net_G.pth").exists()
    # a G file works as well as the folder
    G = type(m2.cut.G)(4, 2)
    load_cut_weights(G=G, g_path=stage1 / "latest_net_G.pth")


def test_stage2_refuses_a_run_without_a_generator(tiny_synth, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no latest_net_G.pth"):
        Trainer(_cfg(tiny_synth, tmp_path / "a", "synthetic/confeti_stage2", **{"method.cut.init": str(empty)}),
                progress=False)
    with pytest.raises(ConfigError, match="needs the stage-1 run folder"):
        Trainer(_cfg(tiny_synth, tmp_path / "b", "synthetic/confeti_stage2"), progress=False)
    args = tiny_overrides(tiny_synth, tmp_path / "c", **{**TINY, "method.cut.init": str(tmp_path / "nowhere")})
    assert main(["train", "--no-progress", "-c", "synthetic/confeti_stage2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere does not exist" in err[0]
    with pytest.raises(ConfigError, match="stage 2 freezes G"):
        _cfg(tiny_synth, tmp_path / "d", "synthetic/confeti_stage2", **{"method.consistency": "frozen_student",
                                                                       "method.cut.init": str(empty)})
    with pytest.raises(ConfigError, match="method.consistency"):
        _cfg(tiny_synth, tmp_path / "e", **{"method.consistency": "sometimes"})


def test_resumed_stage1_run_equals_uninterrupted(tiny_synth, tmp_path, monkeypatch):
    train_from_config(_cfg(tiny_synth, tmp_path / "a"), progress=False)
    ref = torch.load(tmp_path / "a" / "final.pth", weights_only=False)
    interrupted, got = kill_and_resume(monkeypatch, Confeti, _cfg(tiny_synth, tmp_path / "b"), 4, 3)
    assert interrupted["iteration"] == 3
    assert {"prototypes", "prototype_seen"} <= set(ref["method"])
    assert_resumed_run_equal(ref, got)  # teacher, heads, CUT networks and their optimizers, prototypes
    assert ref["optimizers"]["discriminator"]["state"]  # D stepped mid-step, checkpointed with the rest
    assert_optimizer_states_equal(ref["optimizers"]["discriminator"]["state"], got["optimizers"]["discriminator"]["state"])


def test_single_stage_stylizer_optimiser_and_heads(tiny_synth, tmp_path):
    t = Trainer(_cfg(tiny_synth, tmp_path / "run", "synthetic/confeti_single"), progress=False)
    m, o = t.method, t.optimizers["generator"]
    assert isinstance(o.optimizer, torch.optim.AdamW)
    g = o.optimizer.param_groups[0]
    assert g["initial_lr"] == 6e-5 and g["betas"] == (0.5, 0.999) and g["weight_decay"] == 0.01
    o.set_iteration(3)  # half of 6 iterations, poly power 0.9
    assert g["lr"] == pytest.approx(6e-5 * 0.5 ** 0.9)
    assert len(m.proj.proj) == 3 and m.prototype_seen.all()  # MLP head; random unit prototypes
    assert torch.allclose(m.prototypes.norm(dim=1), torch.ones(19))
    # stage 1: CUT's Adam at a constant rate
    t1 = Trainer(_cfg(tiny_synth, tmp_path / "s1"), progress=False)
    o1 = t1.optimizers["generator"]
    assert type(o1.optimizer) is torch.optim.Adam
    o1.set_iteration(3)
    assert o1.optimizer.param_groups[0]["lr"] == 2e-4
    assert not t1.method.prototype_seen.any() and not t1.method.prototypes.any()
