"""Tests for the DeepLabV2 (ADVENT variant) segmenter, its ResNet trunk and checkpoint loading."""

from __future__ import annotations

import argparse
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segadapt.errors import CheckpointError, ConfigError
from segadapt.models.checkpoints import load_pretrained
from segadapt.models.deeplabv2 import ClassifierModule, DeepLabV2, normalize_input
from segadapt.models import model_config
from segadapt.models.segmenter import build_segmenter
from segadapt.models.resnet import ResNet

H, W = 33, 65  # odd sizes: output stride 8 with ceil -> 5 x 9


# ---------------------------------------------------------------------------
# Independent description of ADVENT's ResNetMulti state dict (not derived from
# the model): name -> shape. BN entries are listed with num_batches_tracked
# separately because ADVENT files (old PyTorch) lack them.
# ---------------------------------------------------------------------------
def advent_expected(blocks=(3, 4, 23, 3), w=64, num_classes=19, aux=True, bottleneck=True):
    params, nbt = {}, set()

    def conv(name, cout, cin, k):
        params[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            params[f"{name}.{s}"] = (c,)
        nbt.add(f"{name}.num_batches_tracked")

    conv("conv1", w, 3, 7)
    bn("bn1", w)
    cin_layer = w
    expansion = 4 if bottleneck else 1
    for li, n in enumerate(blocks):
        planes = w * 2**li
        cout = planes * expansion
        for b in range(n):
            pre = f"layer{li + 1}.{b}"
            cin = cin_layer if b == 0 else cout
            if bottleneck:
                conv(f"{pre}.conv1", planes, cin, 1)
                bn(f"{pre}.bn1", planes)
                conv(f"{pre}.conv2", planes, planes, 3)
                bn(f"{pre}.bn2", planes)
                conv(f"{pre}.conv3", cout, planes, 1)
                bn(f"{pre}.bn3", cout)
            else:
                conv(f"{pre}.conv1", planes, cin, 3)
                bn(f"{pre}.bn1", planes)
                conv(f"{pre}.conv2", planes, planes, 3)
                bn(f"{pre}.bn2", planes)
            # projection in the first block of each layer (basic blocks: not
            # in layer1, where nothing changes)
            if b == 0 and (bottleneck or li > 0):
                conv(f"{pre}.downsample.0", cout, cin, 1)
                bn(f"{pre}.downsample.1", cout)
        cin_layer = cout
    heads = [("layer6", 8 * w * expansion)]
    if aux:
        heads.insert(0, ("layer5", 4 * w * expansion))
    for name, cin in heads:
        for i in range(4):
            params[f"{name}.conv2d_list.{i}.weight"] = (num_classes, cin, 3, 3)
            params[f"{name}.conv2d_list.{i}.bias"] = (num_classes,)
    return params, nbt


def synthetic_sd(shapes, seed=0, prefix=""):
    g = torch.Generator().manual_seed(seed)
    return {prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}


def small(depth=18, w=8, **kw):
    torch.manual_seed(0)
    return DeepLabV2(depth=depth, base_width=w, **kw)


@pytest.fixture(scope="module")
def r101_full():
    torch.manual_seed(0)
    return DeepLabV2(num_classes=19, depth=101, base_width=64)


# ---------------------------------------------------------------------------
# Shapes / output stride
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "depth,w,stem,feat",
    [(18, 8, "caffe", 64), (50, 8, "caffe", 256), (50, 8, "v1c", 256), (101, 16, "caffe", 512)],
)
def test_output_shapes_and_stride(depth, w, stem, feat):
    m = small(depth, w, stem=stem, num_classes=5)
    assert m.feature_channels == feat and m.num_classes == 5
    out = m(torch.rand(2, 3, H, W), return_features=True)
    assert set(out) == {"main", "aux", "features"}
    assert out["main"].shape == (2, 5, math.ceil(H / 8), math.ceil(W / 8)) == (2, 5, 5, 9)
    assert out["aux"].shape == (2, 5, 5, 9)
    assert out["features"].shape == (2, feat, 5, 9)
    assert (out["features"] >= 0).all()  # after the final ReLU
    # ceil-mode max-pool: a multiple of 8 gains one cell (ADVENT: 512x1024 -> 65x129)
    out = m(torch.rand(1, 3, 32, 64))
    assert set(out) == {"main", "aux"} and out["main"].shape == (1, 5, 5, 9)


def test_advent_resolution_gives_65x129():
    with torch.no_grad():
        out = small(18, 4, aux=False).eval()(torch.rand(1, 3, 512, 1024))
    assert out["main"].shape == (1, 19, 65, 129)


def test_no_aux_drops_layer5():
    m = small(aux=False)
    assert m.layer5 is None
    assert not any(k.startswith("layer5.") for k in m.state_dict())
    assert set(m(torch.rand(1, 3, H, W))) == {"main"}


def test_v1c_stem_layout():
    m = small(50, 8, stem="v1c")
    sd = m.state_dict()
    assert "conv1.weight" not in sd and "bn1.weight" not in sd
    assert sd["stem.0.weight"].shape == (4, 3, 3, 3)
    assert sd["stem.3.weight"].shape == (4, 4, 3, 3)
    assert sd["stem.6.weight"].shape == (8, 4, 3, 3)
    assert sd["stem.7.running_mean"].shape == (8,)


def test_resnet_trunk_stages():
    torch.manual_seed(0)
    r = ResNet(depth=34, base_width=8)
    stages = r.forward_stages(torch.rand(1, 3, H, W))
    assert [s.shape[1] for s in stages] == [8, 16, 32, 64]
    assert [tuple(s.shape[2:]) for s in stages] == [(9, 17), (5, 9), (5, 9), (5, 9)]
    assert r.output_stride == 8
    # Caffe-style bottleneck: stride in the first 1x1 conv
    b = ResNet(depth=50, base_width=8).layer2[0]
    assert b.conv1.stride == (2, 2) and b.conv2.stride == (1, 1)
    b = ResNet(depth=50, base_width=8, stride_in_1x1=False).layer2[0]
    assert b.conv1.stride == (1, 1) and b.conv2.stride == (2, 2)
    l4 = ResNet(depth=50, base_width=8).layer4
    assert l4[0].conv2.dilation == (4, 4) and l4[2].conv2.padding == (4, 4)


# ---------------------------------------------------------------------------
# ADVENT state-dict compatibility (full width ResNet-101)
# ---------------------------------------------------------------------------
def test_full_r101_keys_and_shapes_match_advent(r101_full):
    params, nbt = advent_expected()
    sd = r101_full.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert set(got) == set(params), (sorted(set(got) - set(params))[:5], sorted(set(params) - set(got))[:5])
    assert got == params
    assert {k for k in sd if k.endswith("num_batches_tracked")} == nbt
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
              "layer3.22.conv3.weight", "layer4.0.downsample.1.running_var",
              "layer5.conv2d_list.0.weight", "layer6.conv2d_list.3.bias"):
        assert k in sd
    assert sd["layer5.conv2d_list.0.weight"].shape == (19, 1024, 3, 3)
    assert sd["layer6.conv2d_list.0.weight"].shape == (19, 2048, 3, 3)
    n = sum(p.numel() for p in r101_full.parameters())
    assert 44_000_000 < n < 45_000_000
    # ASPP init: weights ~ N(0, 0.01)
    w6 = torch.cat([c.weight.flatten() for c in r101_full.layer6.conv2d_list])
    assert abs(w6.std().item() - 0.01) < 2e-4 and abs(w6.mean().item()) < 1e-4


def test_full_r101_loads_synthetic_advent_checkpoint(r101_full, tmp_path):
    params, _ = advent_expected()
    # cheap distinct values (randn on 44M entries is slow on 2 cores)
    sd = {k: torch.full(s, 0.001 * (i % 997) + 0.5) for i, (k, s) in enumerate(params.items())}
    sd["layer3.22.conv3.weight"] = torch.randn(params["layer3.22.conv3.weight"])
    path = tmp_path / "GTA2Cityscapes_advent.pth"
    torch.save(sd, path)
    del sd
    rep = load_pretrained(r101_full, path)
    assert rep.format == "advent"
    assert rep.missing == [] and rep.skipped == []
    assert len(rep.loaded) == len(params)
    ref = torch.load(path, weights_only=True)
    msd = r101_full.state_dict()
    for k in ("conv1.weight", "bn1.running_var", "layer3.22.conv3.weight", "layer5.conv2d_list.2.bias",
              "layer6.conv2d_list.3.weight"):
        assert torch.equal(msd[k], ref[k]), k


# ---------------------------------------------------------------------------
# Checkpoint formats (small widths)
# ---------------------------------------------------------------------------
def test_scale_prefixed_imagenet_init_skips_layer5(tmp_path):
    w = 16
    trunk, _ = advent_expected(w=w, aux=False)
    trunk = {k: s for k, s in trunk.items() if not k.startswith("layer6.")}
    sd = synthetic_sd(trunk, seed=1, prefix="Scale.")
    for i in range(4):  # the init file's own 1000-class classifier
        sd[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.randn(1000, 8 * w * 4, 3, 3)
        sd[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.randn(1000)
    path = tmp_path / "DeepLab_resnet_pretrained_imagenet.pth"
    torch.save(sd, path)

    m = small(101, w, num_classes=19)
    head_before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("layer5", "layer6"))}
    rep = load_pretrained(m, path)
    assert rep.format == "imagenet_init"
    assert sorted(rep.skipped) == sorted(k[len("Scale."):] for k in sd if k.startswith("Scale.layer5."))
    assert set(rep.loaded) == set(trunk)
    assert set(rep.missing) == set(head_before)
    msd = m.state_dict()
    for k in trunk:
        assert torch.equal(msd[k], sd["Scale." + k]), k
    for k, v in head_before.items():
        assert torch.equal(msd[k], v), k


def test_init_file_with_other_class_count_head_is_skipped_with_warning(tmp_path):
    w = 8
    shapes, _ = advent_expected(blocks=(2, 2, 2, 2), w=w, num_classes=21, bottleneck=False)
    sd = synthetic_sd(shapes, seed=2, prefix="Scale.")
    path = tmp_path / "init21.pth"
    torch.save(sd, path)
    m = small(18, w, num_classes=19)
    with pytest.warns(UserWarning, match="classifier"):
        rep = load_pretrained(m, path)
    assert all(k.startswith("layer5.") or k.startswith("layer6.") for k in rep.skipped)
    assert "layer6.conv2d_list.0.weight" in rep.skipped
    assert torch.equal(m.state_dict()["layer4.1.conv2.weight"], sd["Scale.layer4.1.conv2.weight"])


def test_segadapt_and_wrapped_formats_roundtrip(tmp_path):
    src = small(18, 8)
    src_sd = src.state_dict()
    variants = {
        "segadapt.pth": {"format": "segadapt", "model": src_sd, "iteration": 7},
        "ddp.pth": {"state_dict": {"module." + k: v for k, v in src_sd.items()}},
        "compiled.pth": {"model": {"_orig_mod." + k: v for k, v in src_sd.items()}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        torch.manual_seed(123)
        dst = DeepLabV2(depth=18, base_width=8)
        rep = load_pretrained(dst, tmp_path / name)
        assert rep.missing == [], name
        for k, v in dst.state_dict().items():
            assert torch.equal(v, src_sd[k]), (name, k)
    assert load_pretrained(small(18, 8), tmp_path / "segadapt.pth").format == "segadapt"


def test_legacy_pickle_falls_back_with_warning(tmp_path):
    src = small(18, 8)
    path = tmp_path / "legacy.pth"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        load_pretrained(small(18, 8), path)


def _assert_one_line_error(excinfo, path):
    msg = str(excinfo.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_wrong_depth_checkpoint_raises(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(small(50, 8).state_dict(), path)
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(small(101, 8), path)
    msg = _assert_one_line_error(ei, path)
    assert "missing keys" in msg and "layer3.6." in msg and "unexpected" not in msg


def test_wrong_width_checkpoint_raises(tmp_path):
    path = tmp_path / "w16.pth"
    torch.save({"model": small(18, 16).state_dict()}, path)
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(small(18, 8), path)
    msg = _assert_one_line_error(ei, path)
    assert "shape mismatch" in msg and "conv1.weight file (16, 3, 7, 7) vs model (8, 3, 7, 7)" in msg


def test_wrong_block_type_checkpoint_raises(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(small(34, 8).state_dict(), path)
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(small(50, 8), path)
    msg = _assert_one_line_error(ei, path)
    assert "missing keys" in msg and "conv3" in msg


def test_full_checkpoint_head_mismatch_respects_strict_head(tmp_path):
    path = tmp_path / "c16.pth"
    src = small(18, 8, num_classes=16)
    torch.save(src.state_dict(), path)
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(small(18, 8, num_classes=19), path, strict_head=True)
    assert "layer" in _assert_one_line_error(ei, path)
    dst = small(18, 8, num_classes=19)
    with pytest.warns(UserWarning, match="classifier"):
        rep = load_pretrained(dst, path)
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert len(rep.skipped) == 16  # 2 heads x 4 convs x (weight, bias)


def test_missing_and_non_torch_files_raise(tmp_path):
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(small(), tmp_path / "nope.pth")
    assert "not found" in _assert_one_line_error(ei, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_text("this is not a checkpoint\nsecond line\n")
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(small(), bad)
    _assert_one_line_error(ei, bad)
    notsd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notsd)
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(small(), notsd)
    _assert_one_line_error(ei, notsd)


# ---------------------------------------------------------------------------
# BatchNorm behaviour, parameter groups
# ---------------------------------------------------------------------------
def test_bn_affine_frozen_and_param_groups():
    m = small(50, 8)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert bns and all(not b.weight.requires_grad and not b.bias.requires_grad for b in bns)
    groups = m.param_groups()
    bn_ids = {id(p) for b in bns for p in (b.weight, b.bias)}
    all_ids = [id(p) for g in groups.values() for p in g]
    assert not bn_ids & set(all_ids)
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in groups["head"]} == {id(p) for p in [*m.layer5.parameters(), *m.layer6.parameters()]}
    assert len(groups["head"]) == 16
    out = m(torch.rand(2, 3, H, W))
    (out["main"].mean() + 0.1 * out["aux"].mean()).backward()
    assert all(b.weight.grad is None for b in bns)
    assert m.conv1.weight.grad is not None and m.layer6.conv2d_list[0].bias.grad is not None


def test_bn_mode_eval_keeps_running_stats_in_train_mode():
    m = small(18, 8, bn_mode="eval")
    m.train()
    assert m.training and all(not b.training for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    x = torch.rand(2, 3, H, W)
    y_train = m(x)["main"]
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    m.eval()  # (training leaves padding-only ASPP taps out: equal up to float rounding)
    assert torch.allclose(m(x)["main"], y_train, atol=1e-5)

    t = small(18, 8, bn_mode="train").train()
    before = t.bn1.running_mean.clone()
    t(x)
    assert not torch.equal(t.bn1.running_mean, before)


# ---------------------------------------------------------------------------
# Normalisation and classifier
# ---------------------------------------------------------------------------
PIXEL = (0.2, 0.4, 0.6)  # R, G, B
# hand computed: BGR*255 = (153, 102, 51) minus (104.00698793, 116.66876762, 122.67891434)
ADVENT_PIXEL = (48.99301207, -14.66876762, -71.67891434)
# ((0.2-0.485)/0.229, (0.4-0.456)/0.224, (0.6-0.406)/0.225)
IMAGENET_PIXEL = (-1.2445414847, -0.25, 0.8622222222)


@pytest.mark.parametrize("kind,expected", [("advent_bgr", ADVENT_PIXEL), ("imagenet_rgb", IMAGENET_PIXEL)])
def test_normalisation_hand_computed_pixel(kind, expected):
    x = torch.tensor(PIXEL).view(1, 3, 1, 1).expand(1, 3, H, W).contiguous()
    exp = torch.tensor(expected).view(1, 3, 1, 1)
    assert torch.allclose(normalize_input(x, kind)[:, :, :1, :1], exp, atol=1e-4)
    # the model applies it as its first step
    m = small(18, 8, normalization=kind).eval()
    seen = {}
    m.conv1.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0].detach().clone()))
    m(x)
    assert torch.allclose(seen["x"][:, :, 3:4, 7:8], exp, atol=1e-4)
    assert "normalize.mean" not in m.state_dict()


def test_aspp_is_sum_of_four_dilated_branches():
    torch.manual_seed(0)
    head = ClassifierModule(6, 3)
    for c in head.conv2d_list:
        nn.init.normal_(c.bias)
    x = torch.randn(2, 6, 11, 13)
    ref = sum(
        F.conv2d(x, c.weight, c.bias, padding=d, dilation=d) for c, d in zip(head.conv2d_list, (6, 12, 18, 24))
    )
    y = head(x)
    assert y.shape == (2, 3, 11, 13)
    assert torch.allclose(y, ref, atol=1e-5)
    first = head.conv2d_list[0]
    assert not torch.allclose(y, F.conv2d(x, first.weight, first.bias, padding=6, dilation=6))


# ---------------------------------------------------------------------------
# Execution modes
# ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_channels_last_autocast_and_jit():
    m = small(18, 8).eval()
    x = torch.rand(1, 3, H, W)
    with torch.no_grad():
        ref = m(x)["main"]
        cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
        y = cl(x.contiguous(memory_format=torch.channels_last))["main"]
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = m(x)["main"]
        assert yb.shape == ref.shape and torch.isfinite(yb).all()
        assert (yb.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
        traced = torch.jit.trace(m, (x,), strict=False)
        assert torch.allclose(traced(x)["main"], ref, atol=1e-5)
        assert traced(torch.rand(1, 3, H, W))["main"].shape == ref.shape
        scripted = torch.jit.script(m)
        assert torch.allclose(scripted(x)["main"], ref, atol=1e-5)
        assert set(scripted(x, True)) == {"main", "aux", "features"}


# ---------------------------------------------------------------------------
# build_segmenter
# ---------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(arch="deeplabv2", backbone="resnet18", base_width=8, stem="caffe", num_classes=7, aux=True,
                normalization="advent_bgr", bn_mode="train", pretrained=None)
    base.update(kw)
    return model_config(**base)


def test_build_segmenter(tmp_path):
    m = build_segmenter(_cfg())
    assert isinstance(m, DeepLabV2) and m.num_classes == 7 and m.depth == 18 and m.base_width == 8
    m2 = build_segmenter(_cfg(backbone="resnet50", stem="v1c", aux=False, normalization="imagenet_rgb",
                              bn_mode="eval"))
    assert m2.depth == 50 and m2.layer5 is None and m2.stem is not None and m2.bn_mode == "eval"
    assert m2.normalize.kind == "imagenet_rgb"
    path = tmp_path / "m.pth"
    torch.save({"model": m.state_dict(), "format": "segadapt"}, path)
    m3 = build_segmenter(_cfg(pretrained=str(path)))
    assert torch.equal(m3.layer6.conv2d_list[1].weight, m.layer6.conv2d_list[1].weight)
    for bad in (dict(arch="pspnet"), dict(backbone="resnet152"), dict(stem="deep"),
                dict(normalization="none"), dict(bn_mode="sync"), dict(base_width=7), dict(num_classes=0)):
        with pytest.raises(ConfigError):
            build_segmenter(_cfg(**bad))
    with pytest.raises(CheckpointError):
        build_segmenter(_cfg(pretrained=str(tmp_path / "missing.pth")))


@pytest.mark.parametrize("hw", [(17, 33), (5, 40), (30, 7), (3, 3), (64, 64)])
def test_aspp_branches_skip_padding_only_taps_exactly(hw):
    """Kernel rows/columns that only see zero padding (dilation >= map size) are left out:
    same output and gradients as the plain convs, zero gradient for the skipped weights."""
    from segadapt.models.deeplabv2 import ClassifierModule

    torch.manual_seed(0)
    module = ClassifierModule(8, 5, (6, 12, 18, 24)).double()
    for conv in module.conv2d_list:
        torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 8, *hw, dtype=torch.float64, requires_grad=True)
    out = module(x)
    ref = sum(conv(x) for conv in module.conv2d_list)  # nn.Conv2d's own forward
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *module.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *module.parameters()], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    w24 = grads[1 + 2 * 3]  # conv2d_list.3.weight: dilation 24
    if hw[0] <= 24:
        assert w24[:, :, 0].abs().max() == 0 and w24[:, :, 2].abs().max() == 0
    module.eval()  # evaluation uses every tap: bit-identical to the plain convs
    with torch.no_grad():
        assert torch.equal(module(x), sum(conv(x) for conv in module.conv2d_list))
