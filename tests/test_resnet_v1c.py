"""mmseg ResNetV1c trunk (resnet_style='v1c', DAFormer / CONFETI DeepLabV2) and its checkpoints.

The expected state dicts are written out below from the architecture
description (mmseg ResNetV1c + DLV2Head), not derived from the model code.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segadapt.config import load_config
from segadapt.engine.predictor import load_segmenter
from segadapt.errors import CheckpointError, ConfigError
from segadapt.methods.components.feature_distance import FrozenBackbone
from segadapt.models.checkpoints import extract_state_dict, load_pretrained, load_state_dict_checked
from segadapt.models.deeplabv2 import DeepLabV2
from segadapt.models import model_config
from segadapt.models.segmenter import build_segmenter
from segadapt.models.resnet import ResNet

BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


# ---------------------------------------------------------------------------
# Independent key/shape lists
# ---------------------------------------------------------------------------
def mmseg_backbone_keys(depth=101, w=64):
    """mmseg ResNetV1c(depth) state dict: key -> shape (num_batches_tracked: shape ())."""
    out = {}

    def conv(name, cout, cin, k):
        out[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{s}"] = (c,)
        out[f"{name}.num_batches_tracked"] = ()

    # deep stem: conv-bn-relu x 3 in one Sequential (indices 0..8), w/2, w/2, w
    conv("stem.0", w // 2, 3, 3)
    bn("stem.1", w // 2)
    conv("stem.3", w // 2, w // 2, 3)
    bn("stem.4", w // 2)
    conv("stem.6", w, w // 2, 3)
    bn("stem.7", w)
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    inplanes = w
    for li, n in enumerate(BLOCKS[depth]):
        planes = w * 2**li
        cout = planes * expansion
        stride = 2 if li == 1 else 1
        for b in range(n):
            pre = f"layer{li + 1}.{b}"
            cin = inplanes if b == 0 else cout
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
            # ResLayer: a projection only when the stride or the channel count changes
            if b == 0 and (stride != 1 or inplanes != cout):
                conv(f"{pre}.downsample.0", cout, inplanes, 1)
                bn(f"{pre}.downsample.1", cout)
        inplanes = cout
    return out


def dlv2_head_keys(num_classes=19, in_channels=2048, n_dilations=4):
    """DLV2Head: ASPPModule of ConvModules (conv with bias, no norm / act)."""
    out = {}
    for i in range(n_dilations):
        out[f"aspp_modules.{i}.conv.weight"] = (num_classes, in_channels, 3, 3)
        out[f"aspp_modules.{i}.conv.bias"] = (num_classes,)
    return out


def mmseg_segmentor_keys(depth=101, w=64, num_classes=19, n_dilations=4):
    keys = {f"backbone.{k}": s for k, s in mmseg_backbone_keys(depth, w).items()}
    feat = 8 * w * (4 if depth >= 50 else 1)
    keys.update({f"decode_head.{k}": s for k, s in dlv2_head_keys(num_classes, feat, n_dilations).items()})
    return keys


def tensors(shapes, seed=0, device=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if device == "meta":
            out[k] = torch.empty(s, device="meta", dtype=torch.long if k.endswith("tracked") else None)
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = torch.rand(s, generator=g) + 0.5
        else:
            out[k] = torch.randn(s, generator=g)
    return out


def v1c(depth=50, w=8, **kw):
    torch.manual_seed(0)
    kw.setdefault("num_classes", 5)
    kw.setdefault("aux", False)
    return DeepLabV2(depth=depth, base_width=w, resnet_style="v1c", normalization="imagenet_rgb", **kw)


# ---------------------------------------------------------------------------
# Full-width ResNet-101: keys and shapes (meta device, no memory)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r101_meta():
    with torch.device("meta"):
        return DeepLabV2(num_classes=19, depth=101, resnet_style="v1c", aux=False, normalization="imagenet_rgb")


def test_r101_v1c_keys_match_mmseg_resnetv1c(r101_meta):
    got = {k: tuple(v.shape) for k, v in r101_meta.state_dict().items() if not k.startswith("layer6.")}
    want = mmseg_backbone_keys(101, 64)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want
    assert len([k for k in want if k.endswith(".weight") and len(want[k]) == 4]) == 3 + 33 * 3 + 4  # convs
    head = {k: tuple(v.shape) for k, v in r101_meta.state_dict().items() if k.startswith("layer6.")}
    assert head == {f"layer6.conv2d_list.{i}.{p}": s for i in range(4)
                    for p, s in (("weight", (19, 2048, 3, 3)), ("bias", (19,)))}


def test_r101_mmseg_checkpoint_maps_without_missing_or_unexpected(r101_meta):
    sd = tensors(mmseg_segmentor_keys(101, 64), device="meta")
    raw, fmt = extract_state_dict({"meta": {"iter": 40000}, "state_dict": sd}, "r101.pth")
    assert fmt == "mmseg" and set(raw) == set(sd)
    mapped, _ = r101_meta.adapt_checkpoint(raw, fmt)
    assert set(mapped) == set(r101_meta.state_dict())
    rep = load_state_dict_checked(r101_meta, raw, fmt, path="r101.pth", strict_head=True)
    assert rep.missing == [] and rep.skipped == [] and len(rep.loaded) == len(sd)


def test_r101_imagenet_v1c_file_keys(r101_meta):
    sd = tensors(mmseg_backbone_keys(101, 64), device="meta")
    sd["fc.weight"] = torch.empty(1000, 2048, device="meta")
    sd["fc.bias"] = torch.empty(1000, device="meta")
    mapped, fmt = extract_state_dict({"state_dict": sd, "meta": {}}, "resnet101_v1c.pth")
    assert fmt == "classification"
    rep = load_state_dict_checked(r101_meta, mapped, fmt, path="resnet101_v1c.pth")
    assert sorted(rep.skipped) == ["fc.bias", "fc.weight"]
    assert sorted(rep.missing) == sorted(k for k in r101_meta.state_dict() if k.startswith("layer6."))


# ---------------------------------------------------------------------------
# Loading files by path (small widths)
# ---------------------------------------------------------------------------
def test_imagenet_v1c_file_through_model_pretrained(tmp_path):
    sd = tensors(mmseg_backbone_keys(101, 4), seed=1)
    sd["fc.weight"] = torch.randn(1000, 128)
    sd["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet101_v1c-e67eebb6.pth"
    torch.save({"meta": {"epoch": 120}, "state_dict": sd}, path)
    m = build_segmenter(model_config(**dict(backbone="resnet101", base_width=4, resnet_style="v1c", aux=False,
                             normalization="imagenet_rgb", pretrained=str(path))))
    msd = m.state_dict()
    for k in ("stem.0.weight", "stem.7.running_var", "layer3.22.conv2.weight", "layer4.0.downsample.1.bias"):
        assert torch.equal(msd[k], sd[k]), k
    assert msd["stem.1.num_batches_tracked"] == 7


def test_mmseg_segmentor_checkpoint_by_path(tmp_path):
    sd = tensors(mmseg_segmentor_keys(50, 8, num_classes=5), seed=2)
    path = tmp_path / "iter_40000.pth"
    torch.save({"meta": {"CLASSES": ["a", "b"]}, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
               path)
    m = v1c(50, 8)
    rep = load_pretrained(m, path, strict_head=True)
    assert rep.format == "mmseg" and rep.missing == []
    msd = m.state_dict()
    assert torch.equal(msd["layer6.conv2d_list.3.bias"], sd["decode_head.aspp_modules.3.conv.bias"])
    assert torch.equal(msd["layer2.0.conv2.weight"], sd["backbone.layer2.0.conv2.weight"])


def _uda_checkpoint(n_dilations, num_classes=19, depth=50, w=8):
    """DAFormer / CONFETI UDA layout: student, EMA teacher, ImageNet copy, extra heads."""
    seg = mmseg_segmentor_keys(depth, w, num_classes, n_dilations)
    sd = {f"model.{k}": v for k, v in tensors(seg, seed=3).items()}
    sd.update({f"ema_model.{k}": v for k, v in tensors(seg, seed=4).items()})
    sd.update({f"imnet_model.{k}": v for k, v in tensors(seg, seed=5).items()})
    sd.update({"aux_heads.0.conv_seg.weight": torch.randn(num_classes, 8 * w * 4, 1, 1),
               "tgt_proto.protos": torch.randn(num_classes, 16), "reg_proj.weight": torch.randn(16, 16, 1, 1)})
    return {"meta": {"iter": 40000}, "state_dict": sd}


def test_daformer_uda_checkpoint_loads_the_student_through_packaged_config(tmp_path):
    ckpt = _uda_checkpoint(n_dilations=2)
    path = tmp_path / "daformer_dlv2.pth"
    torch.save(ckpt, path)
    m, cfg = load_segmenter(path, "gta5_cityscapes/daformer", ["model.backbone=resnet50", "model.base_width=8"])
    assert cfg.model.resnet_style == "v1c" and m.aspp_dilations == (6, 12) and len(m.layer6.conv2d_list) == 2
    msd, sd = m.state_dict(), ckpt["state_dict"]
    assert torch.equal(msd["stem.0.weight"], sd["model.backbone.stem.0.weight"])  # student, not EMA
    assert torch.equal(msd["layer6.conv2d_list.1.weight"], sd["model.decode_head.aspp_modules.1.conv.weight"])


def test_confeti_checkpoint_loads_with_four_dilations(tmp_path):
    path = tmp_path / "confeti.pth"
    torch.save(_uda_checkpoint(n_dilations=4), path)
    m, _ = load_segmenter(path, "gta5_cityscapes/confeti_stage1", ["model.backbone=resnet50", "model.base_width=8"])
    assert m.aspp_dilations == (6, 12, 18, 24)
    # a 4-branch checkpoint into DAFormer's 2-branch head: one clear line
    with pytest.raises(CheckpointError) as e:
        load_segmenter(path, "gta5_cityscapes/daformer", ["model.backbone=resnet50", "model.base_width=8"])
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "unexpected keys (e.g. layer6.conv2d_list.2" in msg


def test_wrong_model_checkpoints_give_one_line(tmp_path):
    # an ADVENT (caffe) checkpoint into the V1c network
    advent = ResNet(depth=50, base_width=8)
    path = tmp_path / "advent.pth"
    torch.save(advent.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(v1c(50, 8), path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    # stem: 3 convs + 3 BNs x 4 tensors missing; conv1 + bn1 x 4 unexpected
    assert "15 missing keys (e.g. stem.0.weight" in msg and "5 unexpected keys (e.g. conv1.weight" in msg
    # an mmseg V1c checkpoint into the caffe trunk with the three-conv stem: same keys, other network
    path = tmp_path / "mmseg.pth"
    torch.save({"state_dict": tensors(mmseg_segmentor_keys(50, 8, num_classes=5))}, path)
    hybrid = DeepLabV2(num_classes=5, depth=50, base_width=8, stem="v1c", aux=False)
    with pytest.raises(CheckpointError, match="set model.resnet_style=v1c") as e:
        load_pretrained(hybrid, path)
    assert "\n" not in str(e.value)
    # another depth
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_pretrained(v1c(101, 8), path)


# ---------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------
def test_contracted_dilation_and_stride_on_3x3():
    m = v1c(101, 4)
    assert m.layer2[0].conv1.stride == (1, 1) and m.layer2[0].conv2.stride == (2, 2)
    assert [b.conv2.dilation[0] for b in m.layer3] == [1] + [2] * 22
    assert [b.conv2.dilation[0] for b in m.layer4] == [2, 4, 4]
    assert [b.conv2.padding[0] for b in m.layer4] == [2, 4, 4]
    assert all(b.conv2.dilation == (1, 1) for b in list(m.layer1) + list(m.layer2))
    # caffe style unchanged: every block of a dilated layer has the full dilation
    c = ResNet(depth=50, base_width=8)
    assert [b.conv2.dilation[0] for b in c.layer4] == [4, 4, 4] and c.layer2[0].conv1.stride == (2, 2)


def test_basic_block_v1c_dilates_only_its_first_conv():
    r = ResNet(depth=18, base_width=8, resnet_style="v1c")
    assert r.layer1[0].downsample is None and r.layer2[0].downsample is not None
    assert r.layer4[0].conv1.dilation == (2, 2) and r.layer4[1].conv1.dilation == (4, 4)
    assert r.layer4[1].conv2.dilation == (1, 1) and r.layer4[1].conv2.padding == (1, 1)
    # a dilation change alone adds no projection (mmseg ResLayer); ADVENT's trunk adds one
    kw = dict(depth=18, base_width=8, dilations=(2, 1, 2, 4))
    assert ResNet(resnet_style="v1c", **kw).layer1[0].downsample is None
    assert ResNet(resnet_style="caffe", **kw).layer1[0].downsample is not None


def test_maxpool_without_ceil_mode_and_output_stride_8():
    m = v1c(50, 8)
    assert m.maxpool.ceil_mode is False and m.output_stride == 8
    x = torch.rand(1, 3, 31, 64)
    # 31 -> stem 16 -> pool 8 -> layer2 4; 64 -> 32 -> 16 -> 8 (ceil mode would give 9 and 5)
    stages = m.forward_stages(m.normalize(x))
    assert [tuple(s.shape[2:]) for s in stages] == [(8, 16), (4, 8), (4, 8), (4, 8)]
    out = m(torch.rand(2, 3, 40, 72), return_features=True)
    assert out["main"].shape == (2, 5, 5, 9) and out["features"].shape == (2, 256, 5, 9)
    caffe = DeepLabV2(num_classes=5, depth=50, base_width=8, aux=False)
    assert caffe(x)["main"].shape == (1, 5, 5, 9)


def test_bn_affine_trained_and_bn_mode():
    m = v1c(50, 8)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 3 + 16 * 3 + 4
    assert all(b.weight.requires_grad and b.bias.requires_grad for b in bns)
    groups = m.param_groups()
    assert len(groups["backbone"]) == sum(1 for p in m.parameters()) - 2 * 4
    assert any(p is m.stem[1].weight for p in groups["backbone"])
    caffe = DeepLabV2(num_classes=5, depth=50, base_width=8, stem="v1c", aux=False)
    assert not any(mod.weight.requires_grad for mod in caffe.modules() if isinstance(mod, nn.BatchNorm2d))
    m.train()
    assert m.stem[1].training  # norm_eval off: batch statistics in training
    e = v1c(50, 8, bn_mode="eval").train()
    assert not e.stem[1].training and e.stem[1].weight.requires_grad


def test_bn_affine_gets_gradients():
    m = v1c(18, 8).train()
    m(torch.rand(2, 3, 24, 24))["main"].sum().backward()
    assert m.stem[1].weight.grad is not None and m.layer4[1].bn2.bias.grad is not None


def test_features_and_frozen_backbone_on_v1c():
    m = v1c(50, 8).eval()
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        feats = m(x, return_features=True)["features"]
    fb = FrozenBackbone(m)
    assert torch.allclose(fb(x), feats)
    assert fb.trunk.resnet_style == "v1c" and fb.trunk.layer6 is None


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------
def test_config_validation():
    base = dict(backbone="resnet18", base_width=8, num_classes=3, aux=False)
    m = build_segmenter(model_config(**{**base, "resnet_style": "v1c"}))
    assert m.resnet_style == "v1c" and m.stem_type == "v1c" and m.stride_in_1x1 is False
    assert build_segmenter(model_config(**{**base, "resnet_style": "v1c", "stem": "v1c", "stride_in_1x1": False})).maxpool.ceil_mode is False
    # a caffe trunk with the three-conv stem keeps building (older stored configs)
    h = build_segmenter(model_config(**{**base, "stem": "v1c"}))
    assert h.resnet_style == "caffe" and h.stem is not None and h.maxpool.ceil_mode is True
    for bad, field in ((dict(resnet_style="v1b"), "model.resnet_style"), (dict(resnet_style="v1c", stem="caffe"), "model.stem"),
                       (dict(resnet_style="v1c", stride_in_1x1=True), "model.stride_in_1x1"),
                       (dict(aspp_dilations=[]), "model.aspp_dilations"), (dict(aspp_dilations=[6, 0]), "model.aspp_dilations")):
        with pytest.raises(ConfigError, match=field):
            build_segmenter(model_config(**{**base, **bad}))


@pytest.mark.parametrize("name,dilations", [
    ("gta5_cityscapes/dacs", [6, 12]), ("synthia_cityscapes/daformer", [6, 12]),
    ("gta5_cityscapes/confeti_stage2", [6, 12, 18, 24]), ("synthia_cityscapes/confeti_single", [6, 12, 18, 24]),
])
def test_packaged_self_training_configs_use_v1c(name, dilations):
    cfg = load_config(name)
    assert cfg.model.resnet_style == "v1c" and cfg.model.aspp_dilations == dilations
    assert cfg.model.backbone == "resnet101" and cfg.model.aux is False and cfg.model.stem is None


@pytest.mark.parametrize("name", ["synthetic/daformer", "synthetic/confeti_stage1", "gta5_cityscapes/advent"])
def test_other_configs_keep_the_caffe_trunk(name):
    m = load_config(name).model
    assert m.resnet_style == "caffe" and m.aspp_dilations == [6, 12, 18, 24]
