"""Mix Transformer (MiT-B0..B5), the SegFormer encoder (Xie et al., 2021), in plain PyTorch.

Four stages, each an overlapping patch embedding (strided conv + LayerNorm), a stack of
blocks (efficient self-attention whose keys/values come from a map shrunk by a strided conv,
and a Mix-FFN with a depthwise 3x3 conv in place of positional encodings), and a LayerNorm.

State-dict keys and shapes are those of the published ImageNet files ``mit_b0.pth`` ..
``mit_b5.pth`` less their classifier (:data:`MIT_CLASSIFIER_KEYS`), so those files, and the
``backbone.*`` keys of an mmseg / DAFormer segmentor checkpoint with the prefix stripped,
load with nothing renamed.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segadapt.errors import ConfigError

__all__ = ["MIT_PRESETS", "MIT_CLASSIFIER_KEYS", "MixVisionTransformer", "build_mit", "DropPath",
           "EfficientSelfAttention", "disable_stochastic_layers"]

# The classifier of the published ImageNet files: not part of the backbone.
MIT_CLASSIFIER_KEYS: Tuple[str, ...] = ("head.weight", "head.bias")

_WIDE = (64, 128, 320, 512)
_SHARED = dict(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4), qkv_bias=True)
# Constructor keyword arguments of the published models (SegFormer, Table 6 / mit_b* classes).
MIT_PRESETS: Dict[str, Dict[str, object]] = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), **_SHARED),
    "mit_b1": dict(embed_dims=_WIDE, depths=(2, 2, 2, 2), **_SHARED),
    "mit_b2": dict(embed_dims=_WIDE, depths=(3, 4, 6, 3), **_SHARED),
    "mit_b3": dict(embed_dims=_WIDE, depths=(3, 4, 18, 3), **_SHARED),
    "mit_b4": dict(embed_dims=_WIDE, depths=(3, 8, 27, 3), **_SHARED),
    "mit_b5": dict(embed_dims=_WIDE, depths=(3, 6, 40, 3), **_SHARED),
}


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes a whole sample's residual branch with
    probability ``drop_prob`` and scales the kept ones by 1 / (1 - drop_prob)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4g}"


def disable_stochastic_layers(model: nn.Module) -> None:
    """Put dropout and drop-path layers in eval mode and leave every other layer as it is
    (an EMA teacher: no stochastic depth, yet BatchNorm keeps batch statistics)."""
    for m in model.modules():
        if isinstance(m, (DropPath, nn.Dropout)):
            m.eval()


class OverlapPatchEmbed(nn.Module):
    """Conv with kernel > stride (neighbouring patches overlap), then LayerNorm per token."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, stride: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: Tensor) -> Tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from the token map shrunk by a conv with
    kernel = stride = ``sr_ratio`` (+ LayerNorm); ``sr_ratio`` 1 is plain self-attention.
    ``kv`` holds the key projection in its first ``dim`` rows, the value projection after."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool, attn_drop: float,
                 proj_drop: float, sr_norm_eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=sr_norm_eps)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            src = self.norm(src)
        k, v = self.kv(src).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        # default scale head_dim ** -0.5, as the reference
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class _DepthwiseConv(nn.Module):
    """Wrapper that gives the published key ``mlp.dwconv.dwconv.weight``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv -> GELU -> fc2 (the conv leaks position information)."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = _DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), h, w)))
        return self.drop(self.fc2(x))


class MiTBlock(nn.Module):
    """Pre-norm transformer block; both residual branches share one drop-path rate."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: float, norm_eps: float, sr_norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop, sr_norm_eps)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


def _init_weights(m: nn.Module) -> None:
    # the reference's init: ViT-style Linear/LayerNorm, He (fan-out) normal for convs
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _as_tuple(name: str, values: Sequence, n: int, kind: type, minimum: float) -> tuple:
    try:
        out = tuple(kind(v) for v in values)
        ok = len(out) == n and all(v == orig for v, orig in zip(out, values)) and all(v >= minimum for v in out)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"MiT: {name} needs one {kind.__name__} >= {minimum} per stage "
                          f"({n} stages, as embed_dims), got {values!r}")
    return out


class MixVisionTransformer(nn.Module):
    """MiT encoder. ``forward(x)`` takes the normalised image (B, in_channels, H, W) and returns one
    (B, embed_dims[i], ceil(H / strides[i]), ceil(W / strides[i])) map per stage.

    Defaults are MiT-B0's. LayerNorm eps follows the reference: 1e-6 in the blocks and after each
    stage, PyTorch's 1e-5 in the patch embeddings and the spatial-reduction norms.
    """

    def __init__(self, embed_dims: Sequence[int] = (32, 64, 160, 256), depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (1, 2, 5, 8), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), patch_sizes: Sequence[int] = (7, 3, 3, 3),
                 patch_strides: Sequence[int] = (4, 2, 2, 2), in_channels: int = 3, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 norm_eps: float = 1e-6, patch_norm_eps: float = 1e-5, sr_norm_eps: float = 1e-5) -> None:
        super().__init__()
        n = len(embed_dims)
        if n < 1:
            raise ConfigError("MiT: embed_dims needs at least one stage")
        embed_dims = _as_tuple("embed_dims", embed_dims, n, int, 1)
        depths = _as_tuple("depths", depths, n, int, 1)
        num_heads = _as_tuple("num_heads", num_heads, n, int, 1)
        sr_ratios = _as_tuple("sr_ratios", sr_ratios, n, int, 1)
        mlp_ratios = _as_tuple("mlp_ratios", mlp_ratios, n, float, 0)
        patch_sizes = _as_tuple("patch_sizes", patch_sizes, n, int, 1)
        patch_strides = _as_tuple("patch_strides", patch_strides, n, int, 1)
        bad = [i + 1 for i in range(n) if embed_dims[i] % num_heads[i]]
        if bad:
            raise ConfigError(f"MiT: embed_dims {embed_dims} must be multiples of num_heads {num_heads} "
                              f"stage by stage (not at stage {', '.join(map(str, bad))})")
        for name, p in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                        ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"MiT: {name} must be in [0, 1), got {p}")

        self.out_channels: Tuple[int, ...] = embed_dims
        self.strides: Tuple[int, ...] = tuple(math.prod(patch_strides[:i + 1]) for i in range(n))
        self.depths = depths
        self.sr_ratios = sr_ratios
        # stochastic depth grows linearly from 0 (first block) to drop_path_rate (last block)
        self.drop_path_rates: Tuple[float, ...] = tuple(
            torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist())

        # registration order as the reference: all patch embeddings, then blocks and norm per stage
        for i in range(n):
            c_in = in_channels if i == 0 else embed_dims[i - 1]
            self.add_module(f"patch_embed{i + 1}", OverlapPatchEmbed(
                c_in, embed_dims[i], patch_sizes[i], patch_strides[i], patch_norm_eps))
        first = 0
        for i in range(n):
            blocks = [MiTBlock(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], qkv_bias, drop_rate,
                               attn_drop_rate, self.drop_path_rates[first + j], norm_eps, sr_norm_eps)
                      for j in range(depths[i])]
            first += depths[i]
            self.add_module(f"block{i + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=norm_eps))
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> List[Tensor]:
        image_hw = tuple(x.shape[-2:])
        feats: List[Tensor] = []
        for i in range(len(self.out_channels)):
            tokens, h, w = getattr(self, f"patch_embed{i + 1}")(x)
            if h < self.sr_ratios[i] or w < self.sr_ratios[i]:
                raise ConfigError(f"MiT: a {image_hw[0]}x{image_hw[1]} image is too small: stage {i + 1} map "
                                  f"{h}x{w} is smaller than its spatial-reduction ratio {self.sr_ratios[i]}")
            for block in getattr(self, f"block{i + 1}"):
                tokens = block(tokens, h, w)
            tokens = getattr(self, f"norm{i + 1}")(tokens)
            x = tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            feats.append(x)
        return feats

    def convert_published(self, sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """A published ``mit_b*.pth`` state dict less its ImageNet classifier."""
        return {k: v for k, v in sd.items() if k not in MIT_CLASSIFIER_KEYS}


def build_mit(name: str, drop_path_rate: float = 0.1, embed_dims: Optional[Sequence[int]] = None,
              **overrides) -> MixVisionTransformer:
    """The published MiT ``name`` (mit_b0 .. mit_b5); ``embed_dims`` narrows or widens it (each
    width must stay a multiple of the stage's head count 1, 2, 5, 8); other keyword arguments
    override any other constructor argument."""
    if name not in MIT_PRESETS:
        raise ConfigError(f"unknown MiT backbone {name!r}; choose one of {', '.join(MIT_PRESETS)}")
    kwargs = dict(MIT_PRESETS[name])
    kwargs.update(overrides, drop_path_rate=drop_path_rate)
    if embed_dims is not None:
        n = len(kwargs["depths"])
        if len(embed_dims) != n:
            raise ConfigError(f"{name}: embed_dims needs {n} widths (one per stage), got {tuple(embed_dims)}")
        kwargs["embed_dims"] = embed_dims
    return MixVisionTransformer(**kwargs)
