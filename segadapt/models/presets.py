"""Backbone and decode-head presets: what each named backbone is, as timm's pretrained configs
describe a model -- the segmenter family it serves, its feature levels (channels and strides at
the published width, finest first), the input normalisation its published weights expect,
whether DeepLabV2's auxiliary classifier is on by default, and its default decode head.

`BackbonePreset.resolve` runs when a config loads: it fills the model keys left unset (None)
with the preset's values and checks every model key, so a wrong key fails in one line before
any data is generated or read, and the builders (`segmenter.build_segmenter`) take a resolved
`ModelConfig` and nothing else. `model_config(**keys)` does the same for Python users.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from ..config import ModelConfig, build_dataclass
from ..errors import ConfigError
from ..registry import BACKBONES, DECODE_HEADS

__all__ = ["BackbonePreset", "ARCHS", "NORMALIZATIONS", "model_config", "resolve_model_config"]

ARCHS = ("deeplabv2", "encoder_decoder")
NORMALIZATIONS = ("advent_bgr", "imagenet_rgb")
BN_MODES = ("train", "eval")
RESNET_STYLES = ("caffe", "v1c")
STEMS = ("caffe", "v1c")
MIT_HEADS = (1, 2, 5, 8)  # attention heads per MiT stage (all sizes)
MOBILENET_OUTPUT_STRIDES = (8, 16, 32)


def _bad(key: str, problem: str) -> ConfigError:
    return ConfigError(f"model.{key}: {problem}")


def _positive_ints(m: ModelConfig, key: str) -> None:
    value = getattr(m, key)
    if not value or any(v < 1 for v in value):
        raise _bad(key, f"must be a non-empty list of positive integers, got {value!r}")


def _unused(m: ModelConfig, keys, why: str) -> None:
    for key in keys:
        if getattr(m, key) is not None:
            raise _bad(key, f"does not apply to {m.backbone} ({why}); remove it")


@dataclass(frozen=True)
class BackbonePreset:
    name: str
    family: str  # resnet | mit | dinov2 | mobilenetv2
    channels: Tuple[int, ...]  # feature channels per level at the published width
    strides: Tuple[int, ...]  # their strides in the input
    normalization: str  # the input normalisation of the published weights
    aux: bool  # DeepLabV2's auxiliary classifier on by default
    decode_head: Optional[str]  # the encoder-decoder's default head; None: DeepLabV2's own classifiers
    depth: int = 0  # ResNet depth / ViT blocks

    @property
    def arch(self) -> str:
        return "deeplabv2" if self.family == "resnet" else "encoder_decoder"

    def resolve(self, m: ModelConfig) -> ModelConfig:
        """Fill `m`'s unset keys with this preset's values and check every key (in place)."""
        if m.arch is None:
            m.arch = self.arch
        elif m.arch not in ARCHS:
            raise _bad("arch", f"unknown architecture {m.arch!r}; supported: {', '.join(ARCHS)}")
        elif m.arch != self.arch:
            other = {"resnet": "a ResNet", "mit": "a MiT", "dinov2": "a DINOv2 ViT"}.get(self.family, self.name)
            raise _bad("backbone", f"{m.backbone!r} is {other}: use model.arch={self.arch} (or leave arch unset)")
        if m.num_classes < 1:
            raise _bad("num_classes", f"must be positive, got {m.num_classes}")
        if m.bn_mode not in BN_MODES:
            raise _bad("bn_mode", f"unknown BN mode {m.bn_mode!r}; supported: {', '.join(BN_MODES)}")
        if m.normalization is None:
            m.normalization = self.normalization_for(m)
        elif m.normalization not in NORMALIZATIONS:
            raise _bad("normalization", f"unknown normalization {m.normalization!r}; supported: "
                                        f"{', '.join(NORMALIZATIONS)}")
        _positive_ints(m, "aspp_dilations")
        if m.pretrained == "installed" and self.family != "mobilenetv2":
            raise _bad("pretrained", f"'installed' finds the offline MobileNetV2 weights; give {m.backbone}'s "
                                     "weights by path")
        if m.hrda.enabled and m.aux:
            raise _bad("aux", "true: HRDA trains without the auxiliary classifier, as its reference (set model.aux=false)")
        getattr(self, f"_check_{self.family}")(m)
        if m.aux is None:
            m.aux = False if m.hrda.enabled else self.aux
        if m.hrda.enabled:
            self._check_hrda(m)
        return m

    def output_stride(self, m: ModelConfig) -> int:
        """The stride of the logits: the finest level for the DAFormer and linear heads, the last for
        DeepLabV2's classifier (the ResNets' and the `aspp` head's)."""
        return self.strides[-1] if self.family == "resnet" or m.decode_head == "aspp" else self.strides[0]

    def _check_hrda(self, m: ModelConfig) -> None:
        h = m.hrda
        cell = self.output_stride(m) / h.context_scale  # one context logit, in input pixels
        if not cell.is_integer() or h.crop_divisible % int(cell):
            raise _bad("hrda.crop_divisible", f"{h.crop_divisible} must be a multiple of the output stride / context "
                                              f"scale ({self.output_stride(m)} / {h.context_scale} = {cell:g}) so that "
                                              "the detail crop sits on the context's grid")
        if any(side % h.crop_divisible for side in h.detail_crop):
            raise _bad("hrda.detail_crop", f"{h.detail_crop} must be multiples of model.hrda.crop_divisible "
                                           f"({h.crop_divisible})")

    def normalization_for(self, m: ModelConfig) -> str:
        # mmseg's ResNetV1c (DAFormer, CONFETI) takes ImageNet-normalised RGB like every non-Caffe file
        if self.family == "resnet" and m.resnet_style == "v1c":
            return "imagenet_rgb"
        return self.normalization

    # ------------------------------------------------------------------ families
    def _check_resnet(self, m: ModelConfig) -> None:
        _unused(m, ("decode_head", "embed_dims", "vit_depth", "vit_heads", "out_indices", "drop_path_rate"),
                "DeepLabV2 on a ResNet has its own ASPP classifiers")
        if m.resnet_style not in RESNET_STYLES:
            raise _bad("resnet_style", f"unknown style {m.resnet_style!r}; supported: {', '.join(RESNET_STYLES)}")
        if m.stem is not None and m.stem not in STEMS:
            raise _bad("stem", f"unknown stem {m.stem!r}; supported: {', '.join(STEMS)}")
        if m.resnet_style == "v1c" and m.stem not in (None, "v1c"):
            raise _bad("stem", f"{m.stem!r} does not apply to resnet_style v1c (its stem is always 'v1c')")
        if m.resnet_style == "v1c" and m.stride_in_1x1:
            raise _bad("stride_in_1x1", "true does not apply to resnet_style v1c (it strides in the 3x3 conv)")
        if m.base_width < 2 or m.base_width % 2:
            raise _bad("base_width", f"must be an even integer >= 2, got {m.base_width}")

    def _check_encoder_decoder(self, m: ModelConfig) -> None:
        _unused(m, ("stem", "stride_in_1x1"), "a ResNet stem option")
        if m.bn_mode != "train":
            raise _bad("bn_mode", "applies to arch deeplabv2 only (the encoder-decoder trains its norms as its "
                                  "reference does): set model.bn_mode=train")
        if m.drop_path_rate is not None and not 0.0 <= m.drop_path_rate < 1.0:
            raise _bad("drop_path_rate", f"must be in [0, 1), got {m.drop_path_rate}")
        if m.decode_head is None:
            m.decode_head = self.decode_head
        DECODE_HEADS.get(m.decode_head, "model.decode_head").check(m)
        if m.aux and m.decode_head != "aspp":
            raise _bad("aux", "true: only the DeepLabV2 head (model.decode_head=aspp) has an auxiliary "
                              "classifier (set model.aux=false)")
        if m.embed_dims is not None and any(w < 1 for w in m.embed_dims):
            raise _bad("embed_dims", f"must be positive widths, got {m.embed_dims}")

    def _check_mit(self, m: ModelConfig) -> None:
        self._check_encoder_decoder(m)
        _unused(m, ("vit_depth", "vit_heads", "out_indices"), "ViT options")
        if m.embed_dims is not None:
            if len(m.embed_dims) != len(MIT_HEADS):
                raise _bad("embed_dims", f"{m.backbone} needs {len(MIT_HEADS)} widths (one per stage), "
                                         f"got {m.embed_dims}")
            bad = [i for i, (w, h) in enumerate(zip(m.embed_dims, MIT_HEADS)) if w % h]
            if bad:
                raise _bad("embed_dims", f"{m.embed_dims} must be multiples of the stages' head counts "
                                         f"{MIT_HEADS} (not at stage {bad[0]})")

    def _check_dinov2(self, m: ModelConfig) -> None:
        self._check_encoder_decoder(m)
        if m.embed_dims is not None and len(m.embed_dims) != 1:
            raise _bad("embed_dims", f"for a ViT is one width, got {m.embed_dims}")
        for key in ("vit_depth", "vit_heads"):
            if getattr(m, key) is not None and getattr(m, key) < 1:
                raise _bad(key, f"must be positive, got {getattr(m, key)}")
        from .vit import DINOV2_PRESETS

        dim, depth, heads, _ = DINOV2_PRESETS[self.name[len("dinov2_"):]]
        dim = m.embed_dims[0] if m.embed_dims else dim
        depth = m.vit_depth or depth
        heads = m.vit_heads or heads
        if dim % heads:
            raise _bad("embed_dims", f"ViT width {dim} is not divisible by its {heads} heads (model.vit_heads)")
        idx = m.out_indices
        if idx is not None and (not idx or idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= depth):
            raise _bad("out_indices", f"must be increasing block indices in [0, {depth - 1}], got {idx}")

    def _check_mobilenetv2(self, m: ModelConfig) -> None:
        self._check_encoder_decoder(m)
        _unused(m, ("embed_dims", "vit_depth", "vit_heads", "out_indices"), "the published widths only")
        if m.output_stride not in MOBILENET_OUTPUT_STRIDES:
            raise _bad("output_stride", f"must be 8, 16 or 32, got {m.output_stride}")


@dataclass(frozen=True)
class DecodeHeadPreset:
    name: str

    def check(self, m: ModelConfig) -> None:
        if self.name == "daformer":
            _positive_ints(m, "fusion_dilations")
            if m.head_channels < 1:
                raise _bad("head_channels", f"must be positive, got {m.head_channels}")
            if not 0.0 <= m.head_dropout < 1.0:
                raise _bad("head_dropout", f"must be in [0, 1), got {m.head_dropout}")


def _register_backbones() -> None:
    wide = (64, 128, 320, 512)
    presets = [BackbonePreset(f"resnet{d}", "resnet", tuple(c * (4 if d >= 50 else 1) for c in (64, 128, 256, 512)),
                              (4, 8, 8, 8), "advent_bgr", True, None, d) for d in (18, 34, 50, 101)]
    presets += [BackbonePreset("mit_b0", "mit", (32, 64, 160, 256), (4, 8, 16, 32), "imagenet_rgb", False, "daformer")]
    presets += [BackbonePreset(f"mit_b{i}", "mit", wide, (4, 8, 16, 32), "imagenet_rgb", False, "daformer")
                for i in range(1, 6)]
    presets += [BackbonePreset(f"dinov2_{name}", "dinov2", (dim,) * 4, (14,) * 4, "imagenet_rgb", False, "daformer",
                               depth)
                for name, dim, depth in (("vits14", 384, 12), ("vitb14", 768, 12), ("vitl14", 1024, 24),
                                         ("vitg14", 1536, 40))]
    presets += [BackbonePreset("mobilenetv2", "mobilenetv2", (24, 32, 96, 320), (4, 8, 8, 8), "imagenet_rgb", True,
                               "aspp")]
    for p in presets:
        BACKBONES.register(p.name, family=p.family)(p)
    for head in ("daformer", "linear", "aspp"):
        DECODE_HEADS.register(head)(DecodeHeadPreset(head))


_register_backbones()


def resolve_model_config(m: ModelConfig) -> ModelConfig:
    """Fill the preset's values into `m`'s unset keys and check every key (in place)."""
    return BACKBONES.get(m.backbone, "model.backbone").resolve(m)


def model_config(**keys) -> ModelConfig:
    """A resolved, checked ModelConfig from keyword arguments (the keys of the `model:` section)."""
    return resolve_model_config(build_dataclass(ModelConfig, keys, prefix="model."))


def replace_model_config(m: ModelConfig, **changes) -> ModelConfig:
    """`dataclasses.replace` that resolves the result again."""
    return resolve_model_config(dataclasses.replace(m, **changes))
