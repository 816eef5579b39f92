import math

import pytest
import torch
import torch.nn.functional as nnf
from torch.func import functional_call

from segadapt.config import load_config
from segadapt.engine.trainer import Trainer, move_to
from segadapt.errors import CheckpointError, ConfigError
from segadapt.models.cut import (
    BlurDownsample,
    BlurUpsample,
    CUTModel,
    NLayerDiscriminator,
    PatchSampleMLP,
    ResnetGenerator,
    from_cut_range,
    load_cut_weights,
    lsgan_loss,
    patch_nce_loss,
    save_cut_weights,
    to_cut_range,
)

from .conftest import tiny_overrides


def tiny_cut(**kw):
    torch.manual_seed(0)
    args = dict(ngf=4, ndf=4, num_patches=8, nce_dim=8)
    args.update(kw)
    return CUTModel(**args)


# --------------------------------------------------------------------------- anti-aliasing
def test_blur_filters_are_normalised_binomials():
    down = BlurDownsample(2).filt
    up = BlurUpsample(2).filt
    assert down.shape == (2, 1, 3, 3) and up.shape == (2, 1, 4, 4)
    assert torch.allclose(down[1, 0], torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16)
    row = torch.tensor([1., 3., 3., 1.])
    assert torch.allclose(up[0, 0], torch.outer(row, row) / 64 * 4)


def test_blur_downsample_hand_values():
    # an impulse at (1, 1): the reflected pad folds row/column -1 onto 1, so the
    # first output row weights row 1 by 1/4 + 1/4 and the second by 1/4
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 1, 1] = 1.0
    y = BlurDownsample(1)(x)
    expected = torch.tensor([[1 / 4, 1 / 8, 0], [1 / 8, 1 / 16, 0], [0, 0, 0]])
    assert y.shape == (1, 1, 3, 3)
    assert torch.allclose(y[0, 0], expected)
    assert torch.allclose(BlurDownsample(3)(torch.full((1, 3, 8, 4), 0.7)), torch.full((1, 3, 4, 2), 0.7))


def test_blur_upsample_hand_values_and_bilinear_equivalence():
    x = torch.tensor([[[[0.0, 4.0]]]])
    y = BlurUpsample(1)(x)
    assert y.shape == (1, 1, 2, 4)
    assert torch.allclose(y, torch.tensor([0.0, 1.0, 3.0, 4.0]).expand(1, 1, 2, 4))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    ref = nnf.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(BlurUpsample(3)(x), ref, atol=1e-6)


# --------------------------------------------------------------------------- published layouts
def expected_generator_keys(ngf, n_blocks=9):
    """The published latest_net_G.pth layout, written out from CUT's description."""
    c1, c2, c4 = ngf, 2 * ngf, 4 * ngf
    keys = [("model.1.weight", (c1, 3, 7, 7)), ("model.1.bias", (c1,)),
            ("model.4.weight", (c2, c1, 3, 3)), ("model.4.bias", (c2,)), ("model.7.filt", (c2, 1, 3, 3)),
            ("model.8.weight", (c4, c2, 3, 3)), ("model.8.bias", (c4,)), ("model.11.filt", (c4, 1, 3, 3))]
    for b in range(12, 12 + n_blocks):
        for conv in (1, 5):
            keys += [(f"model.{b}.conv_block.{conv}.weight", (c4, c4, 3, 3)),
                     (f"model.{b}.conv_block.{conv}.bias", (c4,))]
    u = 12 + n_blocks  # 21 for 9 blocks
    keys += [(f"model.{u}.filt", (c4, 1, 4, 4)),
             (f"model.{u + 1}.weight", (c2, c4, 3, 3)), (f"model.{u + 1}.bias", (c2,)),
             (f"model.{u + 4}.filt", (c2, 1, 4, 4)),
             (f"model.{u + 5}.weight", (c1, c2, 3, 3)), (f"model.{u + 5}.bias", (c1,)),
             (f"model.{u + 9}.weight", (3, c1, 7, 7)), (f"model.{u + 9}.bias", (3,))]
    return keys


def expected_discriminator_keys(ndf):
    return [("model.0.weight", (ndf, 3, 4, 4)), ("model.0.bias", (ndf,)), ("model.2.filt", (ndf, 1, 3, 3)),
            ("model.3.weight", (2 * ndf, ndf, 4, 4)), ("model.3.bias", (2 * ndf,)),
            ("model.6.filt", (2 * ndf, 1, 3, 3)),
            ("model.7.weight", (4 * ndf, 2 * ndf, 4, 4)), ("model.7.bias", (4 * ndf,)),
            ("model.10.filt", (4 * ndf, 1, 3, 3)),
            ("model.11.weight", (8 * ndf, 4 * ndf, 4, 4)), ("model.11.bias", (8 * ndf,)),
            ("model.14.weight", (1, 8 * ndf, 4, 4)), ("model.14.bias", (1,))]


def expected_sampler_keys(ngf, dim):
    # NCE layers 0, 4, 8, 12, 16: padded RGB input, conv -> 2 ngf, conv -> 4 ngf, res blocks 1 and 5
    keys = []
    for i, c in enumerate([3, 2 * ngf, 4 * ngf, 4 * ngf, 4 * ngf]):
        keys += [(f"mlp_{i}.0.weight", (dim, c)), (f"mlp_{i}.0.bias", (dim,)),
                 (f"mlp_{i}.2.weight", (dim, dim)), (f"mlp_{i}.2.bias", (dim,))]
    return keys


def layout(net):
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()]


def test_state_dict_layouts_match_published_files():
    m = tiny_cut(nce_dim=8)
    assert layout(m.G) == expected_generator_keys(4)
    assert layout(m.D) == expected_discriminator_keys(4)
    assert layout(m.F) == expected_sampler_keys(4, 8)
    assert layout(ResnetGenerator(ngf=2, n_blocks=6)) == expected_generator_keys(2, 6)
    for n_blocks in (0, 2, 9):  # counted without building (config checks must not draw from the RNG)
        assert ResnetGenerator.num_layers(n_blocks) == len(ResnetGenerator(ngf=1, n_blocks=n_blocks).model)


def test_full_size_parameter_counts_are_cuts():
    # CUT prints these totals for its default networks: 11.378 M, 2.765 M, 0.560 M
    g, d = ResnetGenerator(), NLayerDiscriminator()
    f = PatchSampleMLP(g.layer_channels([0, 4, 8, 12, 16]), 256)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert (count(g), count(d), count(f)) == (11378179, 2764737, 560384)
    assert layout(g) == expected_generator_keys(64)


# --------------------------------------------------------------------------- networks
def test_generator_shapes_and_encoder_features():
    m = tiny_cut()
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    out, feats = m.G.forward_features(x, [0, 4, 8, 12, 16])
    assert out.shape == x.shape and out.abs().max() <= 1
    assert [tuple(f.shape) for f in feats] == [(2, 3, 38, 30), (2, 8, 32, 24), (2, 16, 16, 12), (2, 16, 8, 6),
                                               (2, 16, 8, 6)]
    assert torch.allclose(feats[0][:, :, 3:-3, 3:-3], x)  # layer 0 is the reflection-padded input
    enc = m.G.encode(x, [0, 4, 8, 12, 16])
    assert all(torch.equal(a, b) for a, b in zip(enc, feats))
    assert torch.allclose(m.G(x), out)
    assert m.D(x).shape == (2, 1, 2, 1)
    assert torch.allclose(from_cut_range(to_cut_range(torch.tensor([0.0, 0.25, 1.0]))), torch.tensor([0.0, 0.25, 1.0]))


def test_patch_sampler_uses_the_same_locations_for_every_input():
    torch.manual_seed(0)
    f = PatchSampleMLP([3, 5], dim=6)
    feats = [torch.randn(2, 3, 4, 5), torch.randn(2, 5, 2, 2)]
    ids = f.sample_ids(feats, 7)
    assert [len(i) for i in ids] == [7, 4]  # fewer locations than asked on the 2x2 map
    assert len(set(ids[0].tolist())) == 7 and max(ids[0].tolist()) < 20
    out = f(feats, ids)
    assert out[0].shape == (2, 7, 6) and out[1].shape == (2, 4, 6)
    b, p = 1, 3
    loc = int(ids[0][p])
    direct = f.mlp_0(feats[0][b, :, loc // 5, loc % 5])
    assert torch.allclose(out[0][b, p], direct / direct.norm(), atol=1e-6)
    assert torch.allclose(out[1].norm(dim=-1), torch.ones(2, 4))


# --------------------------------------------------------------------------- losses
def test_patch_nce_hand_computed():
    q = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    k = torch.tensor([[[0.8, 0.6], [0.0, 1.0]]])
    # patch 0: positive 0.8, negative 0; patch 1: positive 0.8, negative 0.96
    expected = (math.log(1 + math.exp(-0.8 / 0.5)) + math.log(1 + math.exp((0.96 - 0.8) / 0.5))) / 2
    assert patch_nce_loss(q, k, temperature=0.5).item() == pytest.approx(expected, rel=1e-5)


def test_patch_nce_matches_direct_loop_with_negatives_from_the_same_image_only():
    torch.manual_seed(0)
    q = nnf.normalize(torch.randn(2, 5, 4), dim=-1)
    k = nnf.normalize(torch.randn(2, 5, 4), dim=-1)
    tau = 0.07
    terms = []
    for b in range(2):
        for i in range(5):
            logits = [q[b, i] @ k[b, i]] + [q[b, i] @ k[b, j] for j in range(5) if j != i]
            logits = torch.stack(logits) / tau
            terms.append(-torch.log_softmax(logits, 0)[0])
    expected = torch.stack(terms).mean()
    assert torch.allclose(patch_nce_loss(q, k, tau), expected, atol=1e-5)
    # the other image's keys play no part
    k2 = k.clone()
    k2[1] = nnf.normalize(torch.randn(5, 4), dim=-1)
    per_image = [patch_nce_loss(q[:1], k[:1], tau), patch_nce_loss(q[1:], k[1:], tau)]
    assert torch.allclose(patch_nce_loss(q, k, tau), torch.stack(per_image).mean(), atol=1e-6)
    assert torch.allclose(patch_nce_loss(q[:1], k2[:1], tau), per_image[0])


def test_patch_nce_keys_are_constants():
    q = nnf.normalize(torch.randn(1, 4, 3), dim=-1).requires_grad_()
    k = nnf.normalize(torch.randn(1, 4, 3), dim=-1).requires_grad_()
    patch_nce_loss(q, k).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad is None


def test_lsgan_and_halved_discriminator_loss():
    assert lsgan_loss(torch.tensor([0.5, 2.0]), True).item() == pytest.approx((0.25 + 1.0) / 2)
    assert lsgan_loss(torch.tensor([0.5, 2.0]), False).item() == pytest.approx((0.25 + 4.0) / 2)
    m = tiny_cut()
    torch.manual_seed(1)
    fake, real = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    d = m.discriminator_loss(fake, real)
    with torch.no_grad():
        pf, pr = m.D(fake), m.D(real)
    assert d["loss_D_fake"].item() == pytest.approx(0.5 * pf.pow(2).mean().item(), rel=1e-5)
    assert d["loss_D_real"].item() == pytest.approx(0.5 * (pr - 1).pow(2).mean().item(), rel=1e-5)


def grads(net):
    return [p.grad for p in net.parameters()]


def test_generator_and_discriminator_losses_reach_only_their_networks():
    m = tiny_cut()
    torch.manual_seed(1)
    x_s, x_t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1

    torch.manual_seed(5)
    g, fake = m.generator_losses(x_s, x_t)
    assert set(g) == {"loss_G_GAN", "loss_NCE", "nce_src", "nce_idt"}
    assert g["loss_NCE"].item() == pytest.approx(0.5 * (g["nce_src"] + g["nce_idt"]).item(), rel=1e-6)
    assert not g["nce_src"].requires_grad
    (g["loss_G_GAN"] + g["loss_NCE"]).backward()
    assert all(x is None for x in grads(m.D))
    assert all(x is not None for x in grads(m.G)) and all(x is not None for x in grads(m.F))
    g_only = [x.clone() for x in grads(m.G)]
    f_only = [x.clone() for x in grads(m.F)]
    m.zero_grad(set_to_none=True)

    d = m.discriminator_loss(fake, x_t)
    (d["loss_D_fake"] + d["loss_D_real"]).backward()
    assert all(x is None for x in grads(m.G)) and all(x is None for x in grads(m.F))
    d_only = [x.clone() for x in grads(m.D)]
    m.zero_grad(set_to_none=True)

    # one backward through everything gives each network exactly its own gradient
    torch.manual_seed(5)  # the same patch locations
    g, fake = m.generator_losses(x_s, x_t)
    total = sum(v for k, v in {**g, **m.discriminator_loss(fake, x_t)}.items() if k.startswith("loss"))
    total.backward()
    for got, ref in ((grads(m.G), g_only), (grads(m.F), f_only), (grads(m.D), d_only)):
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(got, ref))


def test_discriminator_steps_before_the_generator_gan_term(tiny_synth, tmp_path):
    """CUT's order through the trainer: D's loss is a stage of its own, back-propagated and
    followed by D's Adam step; G's GAN term is then computed against the new D."""
    lr = 0.01
    trainer = Trainer(load_config("synthetic/cut", cut_overrides(tiny_synth, tmp_path / "run", **{"method.cut.lr": lr})),
                      progress=False)
    cut = trainer.method.cut
    d0 = {k: p.detach().clone() for k, p in cut.D.named_parameters()}
    seen = {}
    scored = cut.discriminator_loss

    def recording(fake, real):
        seen["fake"], seen["real"] = fake.detach().clone(), real.detach().clone()
        return scored(fake, real)

    cut.discriminator_loss = recording
    batch = {k: move_to(next(s), trainer.device) for k, s in trainer.streams.items()}
    trainer.method.train()
    out, _ = trainer.step(batch, 0)
    trainer.release()
    assert {"loss_D_fake", "loss_D_real", "loss_G_GAN"} <= set(out) and not out["loss_D_fake"].requires_grad
    # D's gradient at its old weights, on that fake: Adam's first step p - lr * g / (|g| + 1e-8)
    old = {k: v.clone().requires_grad_(True) for k, v in d0.items()}
    fake_s, real_d = (functional_call(cut.D, old, (x,)) for x in (seen["fake"], seen["real"]))
    d_loss = 0.5 * (lsgan_loss(fake_s, False) + lsgan_loss(real_d, True))
    grads = dict(zip(old, torch.autograd.grad(d_loss, list(old.values()))))
    for k, p in cut.D.named_parameters():
        assert torch.allclose(p, d0[k] - lr * grads[k] / (grads[k].abs() + 1e-8), atol=1e-7), k
        assert p.grad is None  # stepped once, mid-step; no gradient from G's GAN term
    with torch.no_grad():
        new_gan, old_gan = lsgan_loss(cut.D(seen["fake"]), True), lsgan_loss(functional_call(cut.D, d0, (seen["fake"],)), True)
    assert out["loss_G_GAN"].item() == pytest.approx(new_gan.item(), rel=1e-5)
    assert abs(new_gan.item() - old_gan.item()) > 1e-4  # the updated D, not the old one


# --------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    a, b = tiny_cut(), tiny_cut()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    written = a.save_weights(tmp_path)
    assert sorted(p.name for p in written.values()) == ["latest_net_D.pth", "latest_net_F.pth", "latest_net_G.pth"]
    raw = torch.load(tmp_path / "latest_net_G.pth", weights_only=True)
    assert [(k, tuple(v.shape)) for k, v in raw.items()] == expected_generator_keys(4)
    assert not list(tmp_path.glob("*.tmp"))
    b.load_weights(tmp_path)
    for net in "GDF":
        sa, sb = getattr(a, net).state_dict(), getattr(b, net).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_accepts_dataparallel_prefix_and_files_without_filters(tmp_path):
    a, b = tiny_cut(), tiny_cut(ngf=4)
    sd = {f"module.{k}": v for k, v in a.G.state_dict().items() if not k.endswith(".filt")}
    torch.save(sd, tmp_path / "g.pth")
    with torch.no_grad():
        b.G.model[1].weight.zero_()
    load_cut_weights(G=b.G, g_path=tmp_path / "g.pth")
    assert torch.equal(b.G.model[1].weight, a.G.model[1].weight)
    assert torch.equal(b.G.model[7].filt, a.G.model[7].filt)


def test_wrong_files_raise_one_line_checkpoint_errors(tmp_path):
    m = tiny_cut()
    save_cut_weights(tmp_path, D=m.D)
    d_file = tmp_path / "latest_net_D.pth"
    with pytest.raises(CheckpointError) as e:
        load_cut_weights(G=m.G, g_path=d_file)
    assert str(d_file) in str(e.value) and "missing keys" in str(e.value) and "\n" not in str(e.value)

    wider = tiny_cut(ngf=8)
    save_cut_weights(tmp_path / "wide", G=wider.G)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_cut_weights(G=m.G, g_path=tmp_path / "wide" / "latest_net_G.pth")

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_cut_weights(F=m.F, f_path=junk)
    with pytest.raises(CheckpointError, match="not found"):
        m.load_weights(tmp_path / "nowhere", "G")


# --------------------------------------------------------------------------- the method
def cut_overrides(tiny_synth, out, **extra):
    o = {"method.cut.ngf": 4, "method.cut.ndf": 4, "method.cut.num_patches": 16, "method.cut.nce_dim": 16,
         "source.resize": "[64, 32]", "source.crop": "[32, 32]",
         "target.resize": "[64, 32]", "target.crop": "[32, 32]",
         "train.iters": 3, "train.batch_source": 1, "train.batch_target": 1}
    o.update(extra)
    return tiny_overrides(tiny_synth, out, **o)


def test_method_config_errors_name_the_key(tiny_synth, tmp_path):
    from segadapt.methods import build_method
    from segadapt.models.segmenter import build_segmenter

    # values are checked when the config loads, before any data is read
    with pytest.raises(ConfigError, match=r"^method\.cut\.nce_layers: must be increasing"):
        load_config("synthetic/cut", cut_overrides(tiny_synth, tmp_path, **{"method.cut.nce_layers": "[4, 0]"}))
    with pytest.raises(ConfigError, match=r"^method\.cut\.d_step: 'later' is not one of first, joint"):
        load_config("synthetic/cut", cut_overrides(tiny_synth, tmp_path, **{"method.cut.d_step": "later"}))
    # the old flat keys name their new place
    with pytest.raises(ConfigError, match=r"'method\.ngf'.*renamed to 'method\.cut\.ngf'"):
        load_config("synthetic/cut", ["method.ngf=4"])
    cfg = load_config("synthetic/cut", cut_overrides(tiny_synth, tmp_path, **{"method.cut.init": str(tmp_path / "x")}))
    with pytest.raises(ConfigError, match=r"^method\.cut\.init: .*x does not exist"):
        build_method(cfg, build_segmenter(cfg.model))


def test_joint_d_step_keeps_the_one_backward_variant(tiny_synth, tmp_path):
    trainer = Trainer(load_config("synthetic/cut", cut_overrides(tiny_synth, tmp_path / "run",
                                                                 **{"method.cut.d_step": "joint"})), progress=False)
    assert set(trainer.optimizers) == {"generator", "discriminator", "patch_sampler"}
    batch = {d: {"image": torch.rand(1, 3, 32, 32)} for d in ("source", "target")}
    out = trainer.method(batch, 0)  # no trainer stage needed: D's loss joins the one backward
    assert {"loss_G_GAN", "loss_NCE", "loss_D_fake", "loss_D_real"} <= set(out)


def test_tiny_cut_training_through_the_trainer(tiny_synth, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(load_config("synthetic/cut", cut_overrides(tiny_synth, out)), progress=False)
    assert set(trainer.optimizers) == {"generator", "discriminator", "patch_sampler"}
    method = trainer.method
    g0 = {k: v.clone() for k, v in method.cut.G.state_dict().items()}
    d0 = [p.detach().clone() for p in method.cut.D.parameters()]
    seg0 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.train() is None  # no segmentation evaluation
    g1 = method.cut.G.state_dict()
    assert any(not torch.equal(g0[k], g1[k]) for k in g0 if not k.endswith(".filt"))
    assert all(torch.equal(seg0[k], v) for k, v in trainer.model.state_dict().items())
    assert not (out / "results.json").exists()
    assert any(not torch.equal(a, b) for a, b in zip(d0, method.cut.D.parameters()))
    ckpt = torch.load(out / "final.pth", weights_only=False)
    assert ckpt["iteration"] == 3 and "cut.G.model.1.weight" in ckpt["method"]
    assert ckpt["optimizers"]["discriminator"]["state"]  # D's Adam moments saved

    method.on_train_end(out)  # the trainer's end-of-training hook
    fresh = tiny_cut(nce_dim=16)
    fresh.load_weights(out)
    assert all(torch.equal(v, g1[k]) for k, v in fresh.G.state_dict().items())

    # a new run starts from those files
    trainer2 = Trainer(load_config("synthetic/cut", cut_overrides(tiny_synth, tmp_path / "run2",
                                                                  **{"method.cut.init": str(out)})), progress=False)
    assert all(torch.equal(v, g1[k]) for k, v in trainer2.method.cut.G.state_dict().items())
