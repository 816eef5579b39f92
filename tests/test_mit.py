"""Mix Transformer (MiT-B0..B5): published state-dict layout, output geometry, attention and
drop-path behaviour on hand-computed values, config errors."""
import math

import pytest
import torch

from segadapt.errors import ConfigError
from segadapt.models.mit import (
    MIT_CLASSIFIER_KEYS,
    MIT_PRESETS,
    DropPath,
    EfficientSelfAttention,
    build_mit,
    disable_stochastic_layers,
)

# Published widths / depths (SegFormer paper and mit_b* classes), written out independently of the module.
WIDTHS = {"mit_b0": (32, 64, 160, 256)}
DEPTHS = {"mit_b0": (2, 2, 2, 2), "mit_b1": (2, 2, 2, 2), "mit_b2": (3, 4, 6, 3), "mit_b3": (3, 4, 18, 3),
          "mit_b4": (3, 8, 27, 3), "mit_b5": (3, 6, 40, 3)}
SR = (8, 4, 2, 1)
NARROW = (8, 16, 40, 64)  # multiples of the heads (1, 2, 5, 8)


def published_shapes(name):
    """{key: shape} of mit_bX.pth without its classifier, in the file's order."""
    dims, depths = WIDTHS.get(name, (64, 128, 320, 512)), DEPTHS[name]
    out = {}
    for s, c in enumerate(dims, 1):
        c_in, k = (3, 7) if s == 1 else (dims[s - 2], 3)
        out.update({f"patch_embed{s}.proj.weight": (c, c_in, k, k), f"patch_embed{s}.proj.bias": (c,),
                    f"patch_embed{s}.norm.weight": (c,), f"patch_embed{s}.norm.bias": (c,)})
    for s, (c, d, r) in enumerate(zip(dims, depths, SR), 1):
        for j in range(d):
            p = f"block{s}.{j}."
            out.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                        p + "attn.q.weight": (c, c), p + "attn.q.bias": (c,),
                        p + "attn.kv.weight": (2 * c, c), p + "attn.kv.bias": (2 * c,),
                        p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,)})
            if r > 1:
                out.update({p + "attn.sr.weight": (c, c, r, r), p + "attn.sr.bias": (c,),
                            p + "attn.norm.weight": (c,), p + "attn.norm.bias": (c,)})
            out.update({p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                        p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                        p + "mlp.dwconv.dwconv.weight": (4 * c, 1, 3, 3), p + "mlp.dwconv.dwconv.bias": (4 * c,),
                        p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)})
        out.update({f"norm{s}.weight": (c,), f"norm{s}.bias": (c,)})
    return out


@pytest.mark.parametrize("name", ["mit_b0", "mit_b5"])
def test_state_dict_is_the_published_layout(name):
    with torch.device("meta"):
        model = build_mit(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = published_shapes(name)
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert got == expected
    assert list(got) == list(expected)  # same order as the published file
    assert not set(MIT_CLASSIFIER_KEYS) & set(got)


def test_presets_are_the_published_models():
    assert sorted(MIT_PRESETS) == [f"mit_b{i}" for i in range(6)]
    for name, preset in MIT_PRESETS.items():
        assert tuple(preset["embed_dims"]) == WIDTHS.get(name, (64, 128, 320, 512))
        assert tuple(preset["depths"]) == DEPTHS[name]
        assert tuple(preset["num_heads"]) == (1, 2, 5, 8) and tuple(preset["sr_ratios"]) == SR
        assert tuple(preset["mlp_ratios"]) == (4, 4, 4, 4) and preset["qkv_bias"] is True
    with torch.device("meta"):
        b0 = build_mit("mit_b0")
    assert sum(p.numel() for p in b0.parameters()) == 3_319_392  # + 257,000 for the file's 256 -> 1000 head


def test_layer_norm_eps_as_the_reference():
    model = build_mit("mit_b0", embed_dims=NARROW)
    assert model.patch_embed1.norm.eps == 1e-5 and model.block1[0].attn.norm.eps == 1e-5
    assert model.block1[0].norm1.eps == 1e-6 and model.block4[1].norm2.eps == 1e-6 and model.norm4.eps == 1e-6


@pytest.mark.parametrize("hw, sizes", [((64, 96), [(16, 24), (8, 12), (4, 6), (2, 3)]),
                                       ((65, 97), [(17, 25), (9, 13), (5, 7), (3, 4)])])
def test_b0_output_geometry(hw, sizes):
    torch.manual_seed(0)
    model = build_mit("mit_b0").eval()
    assert model.out_channels == (32, 64, 160, 256) and model.strides == (4, 8, 16, 32)
    with torch.no_grad():
        feats = model(torch.randn(2, 3, *hw))
    assert [tuple(f.shape) for f in feats] == [(2, c, h, w) for c, (h, w) in zip(model.out_channels, sizes)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_narrow_override():
    model = build_mit("mit_b2", embed_dims=NARROW).eval()
    assert model.out_channels == NARROW and model.strides == (4, 8, 16, 32) and model.depths == (3, 4, 6, 3)
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 32))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 8), (1, 16, 8, 4), (1, 40, 4, 2), (1, 64, 2, 1)]


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown MiT backbone 'mit_b6'; choose one of mit_b0, mit_b1, .*mit_b5"):
        build_mit("mit_b6")
    with pytest.raises(ConfigError, match=r"multiples of num_heads \(1, 2, 5, 8\).*stage 3\)"):
        build_mit("mit_b0", embed_dims=(8, 16, 42, 64))
    with pytest.raises(ConfigError, match=r"mit_b0: embed_dims needs 4 widths \(one per stage\), got \(8, 16\)"):
        build_mit("mit_b0", embed_dims=(8, 16))
    with pytest.raises(ConfigError, match=r"depths needs one int >= 1 per stage \(4 stages"):
        build_mit("mit_b0", depths=(2, 2, 2))
    with pytest.raises(ConfigError, match="drop_path_rate must be in"):
        build_mit("mit_b0", drop_path_rate=1.0)
    model = build_mit("mit_b0", embed_dims=NARROW)
    with pytest.raises(ConfigError, match="stage 1 map 4x8 is smaller than its spatial-reduction ratio 8"):
        model(torch.randn(1, 3, 16, 32))


def _attention(dim, heads, sr):
    return EfficientSelfAttention(dim, heads, sr, qkv_bias=True, attn_drop=0.0, proj_drop=0.0,
                                  sr_norm_eps=1e-5).eval()


def test_attention_by_hand_on_two_tokens():
    attn = _attention(2, 1, 1)
    with torch.no_grad():
        for lin in (attn.q, attn.proj):
            lin.weight.copy_(torch.eye(2)), lin.bias.zero_()
        attn.kv.weight.copy_(torch.cat([torch.eye(2), torch.eye(2)])), attn.kv.bias.zero_()
        out = attn(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), 1, 2)
    # scores x x^T / sqrt(2) = diag(0.7071); softmax row: e^0.7071 / (e^0.7071 + 1) = 0.66976
    assert torch.allclose(out, torch.tensor([[[0.66976, 0.33024], [0.33024, 0.66976]]]), atol=1e-5)


def test_sr1_attention_equals_plain_multi_head_softmax_attention():
    torch.manual_seed(0)
    dim, heads, h, w = 6, 2, 2, 3
    attn = _attention(dim, heads, 1)
    x = torch.randn(1, h * w, dim)
    with torch.no_grad():
        out = attn(x, h, w)
        q = x[0] @ attn.q.weight.T + attn.q.bias
        k = x[0] @ attn.kv.weight[:dim].T + attn.kv.bias[:dim]  # first half of kv: keys
        v = x[0] @ attn.kv.weight[dim:].T + attn.kv.bias[dim:]
        per_head = []
        for i in range(heads):
            s = slice(i * 3, (i + 1) * 3)
            p = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(3), dim=-1)
            per_head.append(p @ v[:, s])
        expected = torch.cat(per_head, 1) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_spatial_reduction_to_one_key_gives_every_token_the_same_value():
    torch.manual_seed(0)
    dim = 4
    attn = _attention(dim, 2, 2)
    x = torch.randn(1, 4, dim)  # a 2x2 map: the sr conv leaves one key/value token
    with torch.no_grad():
        out = attn(x, 2, 2)
        reduced = attn.norm(attn.sr(x.transpose(1, 2).reshape(1, dim, 2, 2)).flatten(1))
        v = reduced @ attn.kv.weight[dim:].T + attn.kv.bias[dim:]
        expected = v @ attn.proj.weight.T + attn.proj.bias  # softmax over one key is 1
    assert torch.allclose(out[0], expected.expand(4, dim), atol=1e-6)


def test_drop_path_rates_grow_linearly():
    model = build_mit("mit_b0", embed_dims=NARROW, drop_path_rate=0.35)
    rates = [b.drop_path.drop_prob for s in (1, 2, 3, 4) for b in getattr(model, f"block{s}")]
    assert rates == pytest.approx([0.05 * i for i in range(8)])  # linspace(0, 0.35, 8)
    model = build_mit("mit_b0", embed_dims=NARROW, drop_path_rate=0.0)
    assert all(b.drop_path.drop_prob == 0.0 for b in model.block4)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 2)
    y = drop(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()  # kept samples scaled by 1 / 0.5
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(drop.eval()(x), x)


def test_eval_is_deterministic_and_teacher_mode_keeps_training_flag():
    torch.manual_seed(0)
    model = build_mit("mit_b0", embed_dims=NARROW, drop_path_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.train()
        a, b = model(x), model(x)
        assert not torch.equal(a[3], b[3])  # drop path active
        model.eval()
        assert all(torch.equal(p, q) for p, q in zip(model(x), model(x)))
        model.train()
        disable_stochastic_layers(model)
        assert model.training and model.block1[0].training
        assert all(torch.equal(p, q) for p, q in zip(model(x), model.eval()(x)))


def test_init_as_the_reference():
    torch.manual_seed(0)
    model = build_mit("mit_b0")
    fc1 = model.block4[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02) < 0.001 and fc1.weight.abs().max() <= 2.0
    assert not fc1.bias.any() and not model.block1[0].attn.q.bias.any()
    assert torch.equal(model.norm2.weight, torch.ones(64)) and not model.norm2.bias.any()
    proj = model.patch_embed4.proj  # fan_out 3 * 3 * 256
    assert abs(proj.weight.std().item() / math.sqrt(2 / 2304) - 1) < 0.02 and not proj.bias.any()
    dw = model.block4[0].mlp.dwconv.dwconv  # depthwise: fan_out 3 * 3
    assert abs(dw.weight.std().item() / math.sqrt(2 / 9) - 1) < 0.05


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_mit("mit_b0", embed_dims=NARROW).eval()
    torch.save(model.state_dict(), tmp_path / "mit.pth")
    torch.manual_seed(1)
    other = build_mit("mit_b0", embed_dims=NARROW).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(model(x)[0], other(x)[0])
        other.load_state_dict(torch.load(tmp_path / "mit.pth", weights_only=True))
        assert all(torch.equal(p, q) for p, q in zip(model(x), other(x)))
