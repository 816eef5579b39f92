"""DAFormer's decode head and the DINOv2-style linear head: checkpoint layout and hand-computed forwards."""
import pytest
import torch
import torch.nn.functional as F

from segadapt.errors import ConfigError
from segadapt.models.decode_heads import DAFormerHead, LinearHead, TokenEmbedding

MIT_B5_CHANNELS = (64, 128, 320, 512)


def _daformer_published_shapes(in_channels=MIT_B5_CHANNELS, embed=256, channels=256, dilations=(1, 6, 12, 18),
                               num_classes=19):
    """Keys after ``decode_head.`` for configs/_base_/models/daformer_sepaspp_mitb5.py, written from the config."""
    shapes = {}

    def conv_module(prefix, cin, cout, k, groups=1):  # mmcv ConvModule with BN: bias-free conv + bn
        shapes[prefix + "conv.weight"] = (cout, cin // groups, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}bn.{name}"] = (cout,)
        shapes[prefix + "bn.num_batches_tracked"] = ()

    for i, c in enumerate(in_channels):  # embed_cfg / embed_neck_cfg: mlp = SegFormer MLP (nn.Linear "proj")
        shapes[f"embed_layers.{i}.proj.weight"] = (embed, c)
        shapes[f"embed_layers.{i}.proj.bias"] = (embed,)
    fused = embed * len(in_channels)
    for j, d in enumerate(dilations):  # sep=True: mmseg replaces only the dilation > 1 branches
        p = f"fuse_layer.aspp_modules.{j}."
        if d == 1:
            conv_module(p, fused, channels, 1)
        else:
            conv_module(p + "depthwise_conv.", fused, fused, 3, groups=fused)
            conv_module(p + "pointwise_conv.", fused, channels, 1)
    conv_module("fuse_layer.bottleneck.", len(dilations) * channels, channels, 3)  # pool=False: no image_pool
    shapes["conv_seg.weight"] = (num_classes, channels, 1, 1)
    shapes["conv_seg.bias"] = (num_classes,)
    return shapes


@pytest.fixture(scope="module")
def mit_b5_head():
    torch.manual_seed(0)
    return DAFormerHead(MIT_B5_CHANNELS, num_classes=19)


def test_daformer_keys_and_shapes_match_the_published_config(mit_b5_head):
    got = {k: tuple(v.shape) for k, v in mit_b5_head.state_dict().items()}
    assert got == _daformer_published_shapes()
    # spot values written out by hand
    assert got["embed_layers.3.proj.weight"] == (256, 512)
    assert got["fuse_layer.aspp_modules.0.conv.weight"] == (256, 1024, 1, 1)
    assert got["fuse_layer.aspp_modules.2.depthwise_conv.conv.weight"] == (1024, 1, 3, 3)
    assert got["fuse_layer.bottleneck.conv.weight"] == (256, 1024, 3, 3)
    # 263,168 embed + 262,656 1x1 branch + 3 x 273,920 separable branches + 2,359,808 bottleneck + 4,883 conv_seg
    assert sum(p.numel() for p in mit_b5_head.parameters()) == 3_712_275


def test_daformer_loads_a_checkpoint_in_its_layout_strictly(mit_b5_head):
    g = torch.Generator().manual_seed(1)
    sd = {k: (torch.tensor(5) if not shape else torch.randn(shape, generator=g))
          for k, shape in _daformer_published_shapes().items()}
    head = DAFormerHead(MIT_B5_CHANNELS)
    head.load_state_dict(sd, strict=True)
    assert torch.equal(head.fuse_layer.aspp_modules[3].pointwise_conv.bn.running_mean,
                       sd["fuse_layer.aspp_modules.3.pointwise_conv.bn.running_mean"])


def test_daformer_init_follows_mmseg(mit_b5_head):
    h = mit_b5_head
    assert torch.count_nonzero(h.conv_seg.bias) == 0
    assert 0.009 < h.conv_seg.weight.std().item() < 0.011
    # mmcv kaiming_init: normal, fan_out, ReLU gain: std = sqrt(2 / (256 * 9)) = 0.02946
    assert h.fuse_layer.bottleneck.conv.weight.std().item() == pytest.approx(0.02946, rel=0.01)
    bn = h.fuse_layer.aspp_modules[1].depthwise_conv.bn
    assert torch.equal(bn.weight, torch.ones(1024)) and torch.equal(bn.bias, torch.zeros(1024))
    # the embeddings keep nn.Linear's default: uniform within 1 / sqrt(fan_in)
    assert h.embed_layers["0"].proj.weight.abs().max().item() <= 1 / 8


def test_daformer_output_at_first_level_for_mit_strides(mit_b5_head):
    head = mit_b5_head.eval()
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(1, c, 64 // s, 64 // s, generator=g) for c, s in zip(MIT_B5_CHANNELS, (4, 8, 16, 32))]
    with torch.no_grad():
        out = head(feats)
        fused = head.forward_features(feats)
    assert out.shape == (1, 19, 16, 16)
    assert fused.shape == (1, 256, 16, 16)


def test_daformer_equal_size_levels_vit():
    torch.manual_seed(0)
    head = DAFormerHead([384] * 4, num_classes=19, embed_dims=32, channels=32).eval()
    feats = [torch.randn(2, 384, 4, 4) for _ in range(4)]  # ViT/14 on a 56x56 image: every level 4x4
    with torch.no_grad():
        assert head(feats).shape == (2, 19, 4, 4)


def test_embedding_is_a_per_pixel_linear_map():
    torch.manual_seed(0)
    emb = TokenEmbedding(5, 3)
    x = torch.randn(2, 5, 3, 4)
    expected = torch.einsum("oc,bchw->bohw", emb.proj.weight, x) + emb.proj.bias[None, :, None, None]
    torch.testing.assert_close(emb(x), expected)
    # pixel (1, 2) of image 1 by an explicit matrix-vector product
    torch.testing.assert_close(emb(x)[1, :, 1, 2], emb.proj.weight @ x[1, :, 1, 2] + emb.proj.bias)


def _randomise_bn(module, seed):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def _bn_eval(x, bn):
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def _conv_bn_relu(x, module, padding=0, dilation=1, groups=1):
    y = F.conv2d(x, module.conv.weight, None, padding=padding, dilation=dilation, groups=groups)
    return torch.relu(_bn_eval(y, module.bn))


def _tiny_head(dropout=0.1):
    torch.manual_seed(0)
    head = DAFormerHead([3, 5], num_classes=4, embed_dims=[6, 2], channels=7, fusion_dilations=(1, 2),
                        dropout=dropout)
    _randomise_bn(head, 1)
    return head


def test_separable_branch_is_depthwise_then_pointwise():
    head = _tiny_head().eval()
    branch = head.fuse_layer.aspp_modules[1]
    x = torch.randn(2, 8, 6, 5)
    dw = _conv_bn_relu(x, branch.depthwise_conv, padding=2, dilation=2, groups=8)
    expected = _conv_bn_relu(dw, branch.pointwise_conv)
    with torch.no_grad():
        torch.testing.assert_close(branch(x), expected)
    assert branch.depthwise_conv.conv.weight.shape == (8, 1, 3, 3)  # one 3x3 filter per channel
    assert branch.depthwise_conv.conv.bias is None and branch.pointwise_conv.conv.bias is None


def test_daformer_forward_by_hand():
    head = _tiny_head().eval()
    g = torch.Generator().manual_seed(3)
    f0, f1 = torch.randn(2, 3, 6, 8, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    e0 = torch.einsum("oc,bchw->bohw", head.embed_layers["0"].proj.weight, f0) \
        + head.embed_layers["0"].proj.bias.view(1, -1, 1, 1)
    e1 = torch.einsum("oc,bchw->bohw", head.embed_layers["1"].proj.weight, f1) \
        + head.embed_layers["1"].proj.bias.view(1, -1, 1, 1)
    e1 = F.interpolate(e1, size=(6, 8), mode="bilinear", align_corners=False)
    x = torch.cat([e0, e1], 1)  # 8 channels, level order
    fuse = head.fuse_layer
    b0 = _conv_bn_relu(x, fuse.aspp_modules[0])
    b1 = _conv_bn_relu(_conv_bn_relu(x, fuse.aspp_modules[1].depthwise_conv, 2, 2, 8),
                       fuse.aspp_modules[1].pointwise_conv)
    fused = _conv_bn_relu(torch.cat([b0, b1], 1), fuse.bottleneck, padding=1)
    logits = F.conv2d(fused, head.conv_seg.weight, head.conv_seg.bias)
    with torch.no_grad():
        torch.testing.assert_close(head.forward_features([f0, f1]), fused)
        torch.testing.assert_close(head([f0, f1]), logits)
    assert logits.shape == (2, 4, 6, 8)


def test_daformer_eval_deterministic_dropout_only_in_train():
    head = _tiny_head(dropout=0.5)  # high, so that some of the 28 channel maps surely drop
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 5, 2, 2, generator=g)]
    with torch.no_grad():
        head.eval()
        a, b = head(feats), head(feats)
        assert torch.equal(a, b)
        assert torch.equal(a, head.conv_seg(head.forward_features(feats)))
        head.train()
        torch.manual_seed(5)
        t = head(feats)
        torch.manual_seed(5)
        f = head.forward_features(feats)
        mask_input = F.dropout2d(f, 0.5, training=True)
        torch.testing.assert_close(t, head.conv_seg(mask_input))
        # whole channels were dropped (Dropout2d), so training output differs from the undropped one
        dropped = (mask_input == 0).flatten(2).all(-1) & ~(f == 0).flatten(2).all(-1)
        assert dropped.any()
        assert not torch.allclose(t, head.conv_seg(f))
    assert DAFormerHead([3], num_classes=2, dropout=0.0).dropout is None


def _linear_head():
    torch.manual_seed(0)
    head = LinearHead([3, 2], num_classes=5)
    _randomise_bn(head, 2)
    return head


def test_linear_head_keys_and_shapes():
    head = _linear_head()
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "bn.weight": (5,), "bn.bias": (5,), "bn.running_mean": (5,), "bn.running_var": (5,),
        "bn.num_batches_tracked": (), "conv_seg.weight": (5, 5, 1, 1), "conv_seg.bias": (5,)}
    assert list(LinearHead([3, 2], 5, batch_norm=False).state_dict()) == ["conv_seg.weight", "conv_seg.bias"]
    feats = [torch.randn(2, 3, 8, 6), torch.randn(2, 2, 4, 3)]
    assert head.eval()(feats).shape == (2, 5, 8, 6)


def test_linear_head_equals_explicit_bn_and_conv():
    head = _linear_head().eval()
    g = torch.Generator().manual_seed(6)
    f0, f1 = torch.randn(2, 3, 8, 6, generator=g), torch.randn(2, 2, 4, 3, generator=g)
    x = torch.cat([f0, F.interpolate(f1, size=(8, 6), mode="bilinear", align_corners=False)], 1)
    expected = F.conv2d(_bn_eval(x, head.bn), head.conv_seg.weight, head.conv_seg.bias)
    with torch.no_grad():
        torch.testing.assert_close(head([f0, f1]), expected)
        # a (B, C) class token is broadcast over the map
        token = torch.randn(2, 2, generator=g)
        x_tok = torch.cat([f0, token[:, :, None, None].expand(2, 2, 8, 6)], 1)
        torch.testing.assert_close(
            head([f0, token]), F.conv2d(_bn_eval(x_tok, head.bn), head.conv_seg.weight, head.conv_seg.bias))
    plain = LinearHead([3], 2, batch_norm=False)
    torch.testing.assert_close(plain([f0]), F.conv2d(f0, plain.conv_seg.weight, plain.conv_seg.bias))


def test_linear_head_without_resize_needs_equal_sizes():
    head = LinearHead([3, 2], 5, resize_to_first=False).eval()
    assert head([torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)]).shape == (1, 5, 4, 4)
    with pytest.raises(ValueError, match="resize_to_first=False"):
        head([torch.randn(1, 3, 4, 4), torch.randn(1, 2, 2, 2)])


@pytest.mark.parametrize("build, words", [
    (lambda: DAFormerHead([64, 128], embed_dims=[256, 256, 256]), "embed_dims"),
    (lambda: DAFormerHead([64, 128], num_classes=0), "num_classes"),
    (lambda: DAFormerHead([64, -1]), "in_channels"),
    (lambda: DAFormerHead([]), "in_channels"),
    (lambda: DAFormerHead([64], fusion_dilations=()), "fusion_dilations"),
    (lambda: DAFormerHead([64], dropout=1.0), "dropout"),
    (lambda: LinearHead([384, 384], num_classes=-2), "num_classes"),
    (lambda: LinearHead(384, num_classes=5), "in_channels"),
])
def test_bad_arguments_raise_one_line_config_error(build, words):
    with pytest.raises(ConfigError, match=words) as info:
        build()
    assert "\n" not in str(info.value)


def test_wrong_number_of_levels_is_a_clear_error():
    head = DAFormerHead([3, 5], num_classes=2, embed_dims=4, channels=4)
    with pytest.raises(ValueError, match="list of 2 feature maps, got 1"):
        head([torch.randn(1, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"level 1 must be \(B, 5, H, W\)"):
        head([torch.randn(1, 3, 4, 4), torch.randn(1, 4, 2, 2)])
