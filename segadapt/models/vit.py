"""DINOv2 Vision Transformer backbones (Oquab et al., 2023): ViT-S/14, ViT-B/14, ViT-L/14
and ViT-g/14, in plain PyTorch, in the state-dict layout of the published
``dinov2_vit{s,b,l,g}14_pretrain.pth`` files (``cls_token``, ``pos_embed``, ``mask_token``,
``patch_embed.proj.*``, ``blocks.<i>.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}.*``,
``norm.*``), so those files load by path with nothing renamed.

As a segmentation backbone it returns, for the selected blocks, the patch tokens after the
final ``norm`` (DINOv2's ``get_intermediate_layers(norm=True)``) as stride-14 maps.
Layer-wise learning-rate decay helpers (:func:`vit_layer_id`, :func:`layer_decay_scale`)
follow DINOv2's ``get_vit_lr_decay_rate``.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segadapt.errors import CheckpointError, ConfigError

__all__ = ["DINOV2_PRESETS", "DEFAULT_OUT_INDICES", "DinoVisionTransformer", "build_dinov2",
           "dinov2_state_dict", "interpolate_pos_embed", "vit_layer_id", "layer_decay_scale"]

PATCH_SIZE = 14
PRETRAIN_IMG_SIZE = 518  # the published files' pos_embed covers a 37 x 37 grid + cls
LN_EPS = 1e-6
MLP_RATIO = 4
# name -> (embed_dim, depth, num_heads, ffn); ViT-g/14 uses a SwiGLU FFN (keys mlp.w12 / mlp.w3)
DINOV2_PRESETS: Dict[str, Tuple[int, int, int, str]] = {
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}
# The last four blocks, as DINOv2's own 4-level ("ms", multi-scale) ADE20K segmentation
# configs take them (out_indices [8, 9, 10, 11] for ViT-S/B). Its depth heads use evenly
# spaced blocks ([2, 5, 8, 11], [4, 11, 17, 23]) instead.
DEFAULT_OUT_INDICES: Dict[str, Tuple[int, ...]] = {
    "vits14": (8, 9, 10, 11),
    "vitb14": (8, 9, 10, 11),
    "vitl14": (20, 21, 22, 23),
    "vitg14": (36, 37, 38, 39),
}
# hub default: the published backbones are built without stochastic depth
DEFAULT_DROP_PATH_RATE = 0.0
# DINOv2's training init for LayerScale; the published files overwrite it
DEFAULT_LAYERSCALE_INIT = 1e-5
# DINOv2's interpolate_pos_encoding: scale factor (grid + 0.1) / 37, no antialiasing
DEFAULT_INTERPOLATE_OFFSET = 0.1
DEFAULT_INTERPOLATE_ANTIALIAS = False


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``rate``
    and rescale the kept ones by 1 / (1 - rate)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """``drop_path`` as a module, so an EMA teacher can switch stochastic depth off by type
    (``teacher.py``) while its other layers stay in training mode."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)


class PatchEmbed(nn.Module):
    """Non-overlapping 14 x 14 patches -> ``embed_dim`` channels (B, C, H/14, W/14)."""

    def __init__(self, embed_dim: int, patch_size: int = PATCH_SIZE, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (with bias)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        # (3, B, heads, N, head_dim)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """ViT-g/14's FFN: silu(x W1) * (x W2) -> W3, W1 and W2 fused in ``w12``; the hidden
    width is 2/3 of the MLP's, rounded up to a multiple of 8 (4096 for ViT-g)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))),
    each residual branch dropped per sample with ``drop_path_rate`` while training."""

    def __init__(self, dim: int, num_heads: int, drop_path_rate: float, layerscale_init: float,
                 ffn: str = "mlp") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = (SwiGLUFFN if ffn == "swiglu" else Mlp)(dim, dim * MLP_RATIO)
        self.ls2 = LayerScale(dim, layerscale_init)
        self.drop_path_rate = drop_path_rate
        self.drop_path1, self.drop_path2 = DropPath(drop_path_rate), DropPath(drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def interpolate_pos_embed(pos_embed: Tensor, grid: Tuple[int, int],
                          offset: float = DEFAULT_INTERPOLATE_OFFSET,
                          antialias: bool = DEFAULT_INTERPOLATE_ANTIALIAS) -> Tensor:
    """``pos_embed`` (1, 1 + M*M, C) resized to a (h, w) patch grid -> (1, 1 + h*w, C).

    As DINOv2's ``interpolate_pos_encoding``: the stored embedding is returned as is on its
    own grid; otherwise the M x M patch part is resized bicubically (in float32) with the
    scale factor (h + offset) / M, (w + offset) / M, which sets the sampling positions
    (offset 0.1 in the published models; with offset 0 the output size is given instead).
    The cls entry is kept.
    """
    # plain ints: under torch.jit.trace the grid arrives as 0-dim tensors, which neither the
    # comparison below nor F.interpolate's scale factors accept (export fixes the size anyway)
    h, w = int(grid[0]), int(grid[1])
    n = pos_embed.shape[1] - 1
    m = int(math.isqrt(n))
    if (h, w) == (m, m):
        return pos_embed
    patch = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        size_kw = {"scale_factor": ((h + offset) / m, (w + offset) / m)}
    else:
        size_kw = {"size": (h, w)}
    patch = F.interpolate(patch, mode="bicubic", antialias=antialias, **size_kw)
    if tuple(patch.shape[-2:]) != (h, w):  # the offset keeps floor(m * scale) == h
        raise ValueError(f"position embedding resized to {tuple(patch.shape[-2:])}, expected {(h, w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([pos_embed[:, :1].float(), patch], dim=1).to(pos_embed.dtype)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT as a segmentation backbone.

    ``forward(x)`` takes the normalised image (B, 3, H, W) and returns one (B, C, ceil(H/14),
    ceil(W/14)) map per entry of ``out_indices``: that block's patch tokens after the final
    ``norm``. Sides that are not multiples of 14 are zero-padded at the right / bottom to the
    next multiple (DINOv2's segmentation notebook pads centred instead), so the output cell
    (i, j) covers pixels [14i, 14i + 14) x [14j, 14j + 14). Blocks after the last selected
    one are not run (their parameters get no gradient).
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, out_indices: Sequence[int],
                 drop_path_rate: float = DEFAULT_DROP_PATH_RATE,
                 layerscale_init: float = DEFAULT_LAYERSCALE_INIT, ffn: str = "mlp",
                 img_size: int = PRETRAIN_IMG_SIZE, patch_size: int = PATCH_SIZE,
                 interpolate_offset: float = DEFAULT_INTERPOLATE_OFFSET,
                 interpolate_antialias: bool = DEFAULT_INTERPOLATE_ANTIALIAS) -> None:
        super().__init__()
        self.embed_dim, self.depth, self.patch_size = embed_dim, depth, patch_size
        self.out_indices = tuple(out_indices)
        self.out_channels: Tuple[int, ...] = (embed_dim,) * len(self.out_indices)
        self.strides: Tuple[int, ...] = (patch_size,) * len(self.out_indices)
        self.interpolate_offset, self.interpolate_antialias = interpolate_offset, interpolate_antialias
        grid = img_size // patch_size

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        # unused here (masked-image pre-training), kept so the published files load strictly
        # in the published files (iBOT masking in pre-training); unused here, so never trained (and
        # no unused-parameter error under DDP)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        # linearly rising with depth (DINOv2's linspace(0, rate, depth)); plain floats so the
        # model also builds under torch.device("meta")
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, rates[i], layerscale_init, ffn) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        # DINOv2's from-scratch init; the published weights replace it
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def tokens(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Padded image -> (B, 1 + h*w, C) tokens with position embeddings, and (h, w)."""
        pad_h, pad_w = (-x.shape[2]) % self.patch_size, (-x.shape[3]) % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        patches = self.patch_embed(x)
        grid = (patches.shape[2], patches.shape[3])
        patches = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        pos = interpolate_pos_embed(self.pos_embed, grid, self.interpolate_offset, self.interpolate_antialias)
        return tokens + pos.to(tokens.dtype), grid

    def forward(self, x: Tensor) -> List[Tensor]:
        tokens, (h, w) = self.tokens(x)
        wanted = set(self.out_indices)
        features: List[Tensor] = []
        for i, block in enumerate(self.blocks[: max(self.out_indices) + 1]):
            tokens = block(tokens)
            if i in wanted:
                patches = self.norm(tokens)[:, 1:]
                features.append(patches.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w))
        return features

    def convert_published(self, sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """A published or DINOv2-training state dict in this layout (chunked blocks unchunked)."""
        return dinov2_state_dict(sd)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"DINOv2 {name} must be a positive integer, got {value!r}")
    return value


def build_dinov2(name: str, out_indices: Optional[Sequence[int]] = None,
                 drop_path_rate: float = DEFAULT_DROP_PATH_RATE, embed_dim: Optional[int] = None,
                 depth: Optional[int] = None, num_heads: Optional[int] = None,
                 layerscale_init: float = DEFAULT_LAYERSCALE_INIT,
                 interpolate_offset: float = DEFAULT_INTERPOLATE_OFFSET,
                 interpolate_antialias: bool = DEFAULT_INTERPOLATE_ANTIALIAS) -> DinoVisionTransformer:
    """A DINOv2 backbone by preset name (vits14, vitb14, vitl14, vitg14); ``embed_dim``,
    ``depth``, ``num_heads`` override the preset (tiny models for tests). ``out_indices``
    defaults to :data:`DEFAULT_OUT_INDICES`, or the last four blocks when depth is overridden.
    Build under ``torch.device("meta")`` to inspect shapes without allocating."""
    if name not in DINOV2_PRESETS:
        raise ConfigError(f"unknown DINOv2 backbone {name!r}; choose one of {', '.join(DINOV2_PRESETS)}")
    preset_dim, preset_depth, preset_heads, ffn = DINOV2_PRESETS[name]
    dim = _positive_int("embed_dim", preset_dim if embed_dim is None else embed_dim)
    n_blocks = _positive_int("depth", preset_depth if depth is None else depth)
    heads = _positive_int("num_heads", preset_heads if num_heads is None else num_heads)
    if dim % heads:
        raise ConfigError(f"DINOv2 embed_dim {dim} is not divisible by num_heads {heads}")
    if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) \
            or not 0.0 <= drop_path_rate < 1.0:
        raise ConfigError(f"DINOv2 drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    if out_indices is None:
        out_indices = DEFAULT_OUT_INDICES[name] if n_blocks == preset_depth \
            else tuple(range(max(0, n_blocks - 4), n_blocks))
    indices = tuple(out_indices)
    if (not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices)
            or list(indices) != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= n_blocks):
        raise ConfigError(f"DINOv2 out_indices must be increasing block indices in [0, {n_blocks - 1}], "
                          f"got {list(out_indices)}")
    return DinoVisionTransformer(dim, n_blocks, heads, indices, float(drop_path_rate), layerscale_init, ffn,
                                 interpolate_offset=interpolate_offset,
                                 interpolate_antialias=interpolate_antialias)


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")


def dinov2_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """A DINOv2 state dict in this module's layout.

    The published ``*_pretrain.pth`` files are unchunked already (``blocks.<i>.*``). DINOv2's
    training checkpoints wrap the blocks in FSDP chunks as ``blocks.<chunk>.<i>.*``, where i
    is the global block index (chunks are padded with empty slots); those become
    ``blocks.<i>.*``.
    """
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        match = _CHUNKED_BLOCK.match(key)
        new_key = f"blocks.{match.group(1)}.{match.group(2)}" if match else key
        if new_key in out:
            raise CheckpointError(f"DINOv2 state dict holds {new_key!r} twice (chunked and unchunked)")
        out[new_key] = value
    return out


_EMBEDDING_NAMES = frozenset({"patch_embed", "cls_token", "pos_embed", "mask_token", "register_tokens"})


def vit_layer_id(param_name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: 0 for the patch embedding and the cls / position /
    mask tokens, i + 1 for ``blocks.i`` (also chunked ``blocks.c.i``), depth + 1 for the rest
    (final norm, decode head). A prefix such as ``backbone.`` is allowed."""
    parts = param_name.split(".")
    if _EMBEDDING_NAMES.intersection(parts):
        return 0
    for j, part in enumerate(parts[:-1]):
        if part == "blocks" and parts[j + 1].isdigit():
            index = parts[j + 2] if j + 2 < len(parts) and parts[j + 2].isdigit() else parts[j + 1]
            return int(index) + 1
    return depth + 1


def layer_decay_scale(layer_id: int, depth: int, decay: float) -> float:
    """Learning-rate multiplier decay ** (depth + 1 - layer_id): 1 for the head, decay for
    the last block, decay ** (depth + 1) for the embeddings."""
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"layer-wise lr decay must be in (0, 1], got {decay!r}")
    if not 0 <= layer_id <= depth + 1:
        raise ConfigError(f"layer id {layer_id} outside [0, {depth + 1}]")
    return decay ** (depth + 1 - layer_id)
