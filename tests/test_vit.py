"""DINOv2 ViT backbone: published state-dict layout, position-embedding resizing, output
maps, one block by hand, layer-wise lr decay, chunked-checkpoint remap, config errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from segadapt.errors import CheckpointError, ConfigError
from segadapt.models.vit import (
    build_dinov2,
    dinov2_state_dict,
    drop_path,
    interpolate_pos_embed,
    layer_decay_scale,
    vit_layer_id,
)

TINY = dict(embed_dim=32, depth=4, num_heads=2)


def published_shapes(dim: int, depth: int) -> dict:
    """Keys and shapes of dinov2_vit*14_pretrain.pth, written out from the published dims
    (patch 14, 518 px pre-training grid, MLP ratio 4), independently of the module."""
    grid = 518 // 14
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid * grid, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "ls1.gamma": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
            b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
            b + "ls2.gamma": (dim,),
        })
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


@pytest.mark.parametrize("name,dim,depth,params", [
    ("vits14", 384, 12, 22_056_576),
    ("vitl14", 1024, 24, 304_368_640),
])
def test_state_dict_matches_published_layout(name, dim, depth, params):
    with torch.device("meta"):
        model = build_dinov2(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == published_shapes(dim, depth)
    assert sum(math.prod(s) for s in got.values()) == params
    assert model.out_channels == (dim,) * 4 and model.strides == (14,) * 4


def test_presets_base_and_giant():
    with torch.device("meta"):
        base, giant = build_dinov2("vitb14"), build_dinov2("vitg14")
    assert {k: tuple(v.shape) for k, v in base.state_dict().items()} == published_shapes(768, 12)
    sd = giant.state_dict()
    # ViT-g/14: 40 blocks of width 1536, SwiGLU FFN of hidden width 4096
    assert "blocks.39.ls2.gamma" in sd and "blocks.40.ls2.gamma" not in sd
    assert tuple(sd["blocks.0.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(sd["blocks.0.mlp.w3.weight"].shape) == (1536, 4096)
    assert base.out_indices == (8, 9, 10, 11) and giant.out_indices == (36, 37, 38, 39)


def test_default_out_indices_are_the_last_four_blocks():
    with torch.device("meta"):
        assert build_dinov2("vits14").out_indices == (8, 9, 10, 11)
        assert build_dinov2("vitl14").out_indices == (20, 21, 22, 23)
        assert build_dinov2("vits14", depth=6).out_indices == (2, 3, 4, 5)
        assert build_dinov2("vits14", depth=2).out_indices == (0, 1)


def test_pos_embed_on_its_own_grid_is_returned_unchanged():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert interpolate_pos_embed(pos, (37, 37)) is pos


def test_pos_embed_resized_keeps_cls_constants_and_axes():
    cls = torch.randn(1, 1, 4)
    const = torch.cat([cls, torch.full((1, 37 * 37, 4), 0.75)], dim=1)
    out = interpolate_pos_embed(const, (5, 9))
    assert out.shape == (1, 1 + 5 * 9, 4)
    assert torch.equal(out[:, :1], cls)
    assert torch.allclose(out[:, 1:], torch.full_like(out[:, 1:], 0.75), atol=1e-6)
    # values that vary only along the width stay constant along the height: h and w not swapped
    cols = torch.linspace(-1, 1, 37).view(1, 37, 1).expand(37, 37, 4).reshape(1, 37 * 37, 4)
    grid = interpolate_pos_embed(torch.cat([cls, cols], dim=1), (5, 9))[0, 1:].reshape(5, 9, 4)
    assert torch.allclose(grid, grid[:1].expand_as(grid), atol=1e-6)
    assert grid[0, 0, 0] < grid[0, 4, 0] < grid[0, 8, 0]


def test_pos_embed_larger_grid():
    pos = torch.randn(1, 1 + 37 * 37, 3)
    assert interpolate_pos_embed(pos, (40, 74)).shape == (1, 1 + 40 * 74, 3)
    assert interpolate_pos_embed(pos, (40, 74), offset=0.0).shape == (1, 1 + 40 * 74, 3)


def _tiny(**kw):
    torch.manual_seed(0)
    return build_dinov2("vits14", **{**TINY, **kw}).eval()


def test_output_maps_shapes_and_padding():
    model = _tiny()
    assert model.out_channels == (32,) * 4 and model.strides == (14,) * 4
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 56, 84))
        assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 6)] * 4
        x = torch.randn(1, 3, 60, 90)
        padded_feats = model(x)
        # 60 x 90 is zero-padded at the right / bottom to 70 x 98: a 5 x 7 grid
        reference = model(F.pad(x, (0, 8, 0, 10)))
    assert [tuple(f.shape) for f in padded_feats] == [(1, 32, 5, 7)] * 4
    for got, want in zip(padded_feats, reference):
        assert torch.equal(got, want)


def test_outputs_are_normed_patch_tokens_of_the_selected_blocks():
    model = _tiny(out_indices=(1, 3))
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        feats = model(x)
        tokens, (h, w) = model.tokens(x)
        for block in model.blocks[:2]:
            tokens = block(tokens)
        want = model.norm(tokens)[0, 1:].T.reshape(32, h, w)
    assert len(feats) == 2
    assert torch.allclose(feats[0][0], want, atol=1e-6)
    # final norm applied: each token's channels have mean beta and variance gamma**2 (1, 0 here)
    assert torch.allclose(feats[1].mean(dim=1), torch.zeros(1, h, w), atol=1e-5)


def test_later_block_does_not_change_earlier_outputs():
    model = _tiny()
    x = torch.randn(1, 3, 42, 28)
    with torch.no_grad():
        before = model(x)
        # a per-channel change (a constant one would vanish in the final LayerNorm)
        model.blocks[3].ls2.gamma.copy_(torch.linspace(-1, 1, 32))
        after = model(x)
    for i in range(3):
        assert torch.equal(before[i], after[i])
    assert not torch.allclose(before[3], after[3])


def test_block_by_hand():
    model = _tiny()
    block = model.blocks[0]
    torch.manual_seed(1)
    with torch.no_grad():
        block.ls1.gamma.copy_(torch.rand(32) + 0.5)
        block.ls2.gamma.copy_(torch.rand(32) - 0.5)
        block.norm1.weight.copy_(torch.rand(32) + 0.5)
    x = torch.randn(2, 5, 32)
    heads, d = 2, 16
    with torch.no_grad():
        y = F.layer_norm(x, (32,), block.norm1.weight, block.norm1.bias, eps=1e-6)
        qkv = y @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, v = qkv[..., :32], qkv[..., 32:64], qkv[..., 64:]
        heads_out = []
        for hd in range(heads):
            sl = slice(hd * d, (hd + 1) * d)
            att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
            heads_out.append(att @ v[..., sl])
        attn = torch.cat(heads_out, dim=-1) @ block.attn.proj.weight.T + block.attn.proj.bias
        x1 = x + block.ls1.gamma * attn
        z = F.layer_norm(x1, (32,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        hidden = F.gelu(z @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        want = x1 + block.ls2.gamma * (hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)
        got = block(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_drop_path():
    x = torch.ones(1000, 3)
    assert drop_path(x, 0.5, training=False) is x
    torch.manual_seed(0)
    out = drop_path(x, 0.5, training=True)
    assert set(out[:, 0].tolist()) == {0.0, 2.0}  # kept samples rescaled by 1 / (1 - rate)
    assert 430 < int((out[:, 0] == 0).sum()) < 570
    assert torch.equal(out, out[:, :1].expand_as(out))  # whole samples dropped
    # rates rise linearly from 0 at the first block to drop_path_rate at the last
    model = build_dinov2("vits14", drop_path_rate=0.3, **TINY)
    assert [b.drop_path_rate for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_layer_ids():
    depth = 12
    assert vit_layer_id("cls_token", depth) == 0
    assert vit_layer_id("pos_embed", depth) == 0
    assert vit_layer_id("mask_token", depth) == 0
    assert vit_layer_id("patch_embed.proj.weight", depth) == 0
    assert vit_layer_id("blocks.0.attn.qkv.weight", depth) == 1
    assert vit_layer_id("blocks.11.ls2.gamma", depth) == 12
    assert vit_layer_id("backbone.blocks.3.norm1.weight", depth) == 4
    assert vit_layer_id("blocks.1.7.mlp.fc1.weight", depth) == 8  # chunked: global index 7
    assert vit_layer_id("norm.weight", depth) == 13
    assert vit_layer_id("decode_head.conv_seg.weight", depth) == 13


def test_layer_decay_scale():
    assert layer_decay_scale(13, 12, 0.9) == 1.0
    assert layer_decay_scale(12, 12, 0.9) == pytest.approx(0.9)
    assert layer_decay_scale(0, 12, 0.9) == pytest.approx(0.2541865828)  # 0.9 ** 13
    assert layer_decay_scale(0, 12, 1.0) == 1.0
    with pytest.raises(ConfigError):
        layer_decay_scale(0, 12, 0.0)
    with pytest.raises(ConfigError):
        layer_decay_scale(14, 12, 0.9)


def test_chunked_state_dict_remap():
    t = torch.zeros(1)
    sd = {"cls_token": t, "blocks.0.0.norm1.weight": t, "blocks.1.2.norm1.weight": t, "norm.weight": t}
    assert list(dinov2_state_dict(sd)) == ["cls_token", "blocks.0.norm1.weight", "blocks.2.norm1.weight",
                                           "norm.weight"]
    flat = {"blocks.3.attn.qkv.weight": t, "pos_embed": t}
    assert dinov2_state_dict(flat) == flat
    with pytest.raises(CheckpointError):
        dinov2_state_dict({"blocks.0.norm1.weight": t, "blocks.0.0.norm1.weight": t})


def test_chunked_checkpoint_loads_strictly():
    source, target = _tiny(), build_dinov2("vits14", **TINY)
    # two chunks of two blocks: blocks.<i // 2>.<i>.*
    chunked = {}
    for key, value in source.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            key = ".".join(["blocks", str(int(parts[1]) // 2)] + parts[1:])
        chunked[key] = value
    assert "blocks.1.3.ls1.gamma" in chunked
    target.load_state_dict(dinov2_state_dict(chunked), strict=True)
    assert torch.equal(target.blocks[3].ls1.gamma, source.blocks[3].ls1.gamma)


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="vitx14"), "unknown DINOv2 backbone 'vitx14'"),
    (dict(name="vits14", embed_dim=30, num_heads=4, depth=2), "not divisible by num_heads"),
    (dict(name="vits14", depth=0), "depth must be a positive integer"),
    (dict(name="vits14", out_indices=(9, 8)), "out_indices must be increasing"),
    (dict(name="vits14", out_indices=(8, 12)), "[0, 11]"),
    (dict(name="vits14", out_indices=()), "out_indices"),
    (dict(name="vits14", drop_path_rate=1.0), "drop_path_rate must be in [0, 1)"),
])
def test_bad_config(kwargs, message):
    with torch.device("meta"), pytest.raises(ConfigError) as err:
        build_dinov2(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
