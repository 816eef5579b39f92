"""HRDA: multi-resolution training and inference with a learned scale attention (Hoyer et al.,
ECCV 2022), as the HRDA and MIC reference code runs it, around any backbone and decode head.

Training: the *context* -- the whole input resized by ``context_scale`` (0.5) -- and the
*detail* -- a crop of ``detail_crop`` input pixels at full resolution, placed at random with its
offsets multiples of ``crop_divisible`` -- go through the same encoder and decode head. A second
head of the same kind, the scale attention (the DAFormer head with a 1x1 fusion), predicts from
the context features a sigmoid weight per class and pixel, zero outside the detail crop:

    fused = up((1 - a) * context_logits) + up(a) * detail_logits     (detail put in its place)

The losses (``methods/losses.py``) take ``fused`` against the whole label, times
1 - ``detail_loss_weight``, and the detail logits against the label's crop, times
``detail_loss_weight`` (0.1). Inference, and a teacher's pseudo-labels (``infer``): the detail
scale over the whole input in overlapping detail-crop windows (stride half a crop), averaged,
fused with the whole context the same way.

Layout ``backbone.*``, ``decode_head.head.*``, ``decode_head.scale_attention.*``, the
published HRDA and MIC checkpoints' (their ``model.`` student): they load by path.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import ResNet
from .segmenter import EncoderDecoder

Box = Tuple[int, int, int, int]  # y1, y2, x1, x2 in input pixels


def resize_by(x: Tensor, factor: float) -> Tensor:
    """mmseg's ``resize(scale_factor=...)``: bilinear, align_corners=False."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def random_detail_box(height: int, width: int, crop_hw: Sequence[int], divisible: int) -> Box:
    """A crop of `crop_hw` placed uniformly with offsets multiples of `divisible` (the reference's
    get_crop_bbox), drawn from the global torch generator the trainer checkpoints."""
    ch, cw = crop_hw
    if (height, width) == (ch, cw):
        return 0, height, 0, width
    y1 = int(torch.randint(0, (max(height - ch, 0) + 1) // divisible, ())) * divisible
    x1 = int(torch.randint(0, (max(width - cw, 0) + 1) // divisible, ())) * divisible
    return y1, y1 + ch, x1, x1 + cw


def slide_boxes(height: int, width: int, crop_hw: Sequence[int], overlap: bool) -> List[Box]:
    """The reference's detail windows: stride half a crop (or a whole one), the last window
    of a row or column flush with the border."""
    ch, cw = crop_hw
    sh, sw = (ch // 2, cw // 2) if overlap else (ch, cw)
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def exact_grid(logits: Tensor, input_hw: Sequence[int], stride: int) -> Tensor:
    """The logits on exactly input / stride cells: ADVENT's Caffe ResNet pools in ceil mode,
    which adds one cell at the bottom and the right; that cell is dropped."""
    h, w = input_hw[0] // stride, input_hw[1] // stride
    if logits.shape[-2] < h or logits.shape[-1] < w:
        raise ValueError(f"HRDA: logits {tuple(logits.shape[-2:])} for an input {tuple(input_hw)} at stride {stride}")
    return logits[..., :h, :w]


class HRDAHead(nn.Module):
    """The decode head run at both scales and the scale attention (mmseg's HRDAHead keys)."""

    def __init__(self, head: nn.Module, scale_attention: nn.Module, output_stride: int, context_scale: float):
        super().__init__()
        self.head = head
        self.scale_attention = scale_attention
        self.os = output_stride
        self.context_scale = context_scale

    def attention(self, context_features: List[Tensor]) -> Tensor:
        return torch.sigmoid(self.scale_attention(context_features))

    def fuse(self, context_logits: Tensor, detail_logits: Tensor, attention: Tensor,
             box: Optional[Box] = None) -> Tuple[Tensor, Tensor]:
        """(fused logits at the detail scale, the context logits times 1 - attention). `box`: the
        detail crop in input pixels, or None when the detail covers the whole input."""
        up = 1.0 / self.context_scale
        if box is not None:
            cell = int(self.os / self.context_scale)  # one context logit, in input pixels
            y1, y2, x1, x2 = (v // cell for v in box)
            mask = attention.new_zeros((attention.shape[0], 1, *attention.shape[2:]))
            mask[:, :, y1:y2, x1:x2] = 1
            attention = attention * mask
        context = (1 - attention) * context_logits
        up_context, up_attention = resize_by(context, up), resize_by(attention, up)
        if box is not None:
            y1, y2, x1, x2 = (v // self.os for v in box)
            inserted = torch.zeros_like(up_context)
            inserted[:, :, y1:y2, x1:x2] = detail_logits
        else:
            inserted = detail_logits
        return up_attention * inserted + up_context, context


class HRDAEncoderDecoder(EncoderDecoder):
    """An encoder-decoder trained and run at two scales. ``model(x)`` in training: ``main``
    (fused logits), ``detail`` (the detail crop's logits), ``detail_box``, ``detail_weight``
    (and ``context`` / ``context_weight`` when that loss is on); in eval mode, or with ``infer``:
    ``main`` from the slide inference. ``features`` and ``extract_features`` are the context's."""

    HEAD_PREFIXES: Tuple[str, ...] = ("decode_head.",)

    def __init__(self, backbone: nn.Module, head: nn.Module, scale_attention: nn.Module, num_classes: int,
                 normalization: str, backbone_name: str, hrda, output_stride: int) -> None:
        super().__init__(backbone, HRDAHead(head, scale_attention, output_stride, hrda.context_scale), num_classes,
                         normalization=normalization, backbone_name=backbone_name)
        self.hrda = hrda
        self.output_stride = output_stride
        # features come from the context image: one feature cell covers stride / scale input pixels
        self.feature_stride = int(round(backbone.strides[-1] / hrda.context_scale))
        self.detail_hw = (hrda.detail_crop[1], hrda.detail_crop[0])

    def encode(self, x: Tensor) -> List[Tensor]:
        return EncoderDecoder.extract_features(self, x)

    def extract_features(self, x: Tensor) -> List[Tensor]:
        return self.encode(resize_by(x, self.hrda.context_scale))

    def _context(self, x: Tensor):
        image = resize_by(x, self.hrda.context_scale)
        feats = self.encode(image)
        logits = exact_grid(self.decode_head.head(feats), image.shape[-2:], self.output_stride)
        attention = exact_grid(self.decode_head.attention(feats), image.shape[-2:], self.output_stride)
        return feats, logits, attention

    def _check_input(self, x: Tensor) -> None:
        cell = int(self.output_stride / self.hrda.context_scale)
        if x.shape[-2] % cell or x.shape[-1] % cell or x.shape[-2] < self.detail_hw[0] \
                or x.shape[-1] < self.detail_hw[1]:
            from ..errors import TrainingError

            raise TrainingError(f"HRDA: input {tuple(x.shape[-2:])} (H, W) must hold the detail crop "
                                f"{self.detail_hw} and be a multiple of {cell} (output stride / context scale)")

    def forward(self, x: Tensor, return_features: bool = False) -> Dict[str, Tensor]:
        if not self.training:
            return self.infer(x, return_features)
        self._check_input(x)
        feats, context, attention = self._context(x)
        box = random_detail_box(x.shape[-2], x.shape[-1], self.detail_hw, self.hrda.crop_divisible)
        y1, y2, x1, x2 = box
        detail = exact_grid(self.decode_head.head(self.encode(x[:, :, y1:y2, x1:x2])), (y2 - y1, x2 - x1),
                            self.output_stride)
        fused, weighted_context = self.decode_head.fuse(context, detail, attention, box)
        out = {"main": fused, "detail": detail, "detail_box": box, "detail_weight": self.hrda.detail_loss_weight}
        if self.hrda.context_loss_weight > 0:
            out.update(context=weighted_context, context_weight=self.hrda.context_loss_weight)
        if return_features:
            out["features"] = feats[-1]
        return out

    def detail_logits(self, x: Tensor) -> Tensor:
        """The detail scale over the whole input: overlapping windows averaged (or one pass)."""
        if not self.hrda.slide_inference:
            return exact_grid(self.decode_head.head(self.encode(x)), x.shape[-2:], self.output_stride)
        boxes = slide_boxes(x.shape[-2], x.shape[-1], self.detail_hw, self.hrda.slide_overlap)
        crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
        logits = exact_grid(self.decode_head.head(self.encode(crops)), self.detail_hw, self.output_stride)
        b, s = x.shape[0], self.output_stride
        total = logits.new_zeros((b, logits.shape[1], x.shape[-2] // s, x.shape[-1] // s))
        count = logits.new_zeros((1, 1, *total.shape[-2:]))
        for i, (y1, y2, x1, x2) in enumerate(boxes):
            total[:, :, y1 // s:y2 // s, x1 // s:x2 // s] += logits[i * b:(i + 1) * b]
            count[:, :, y1 // s:y2 // s, x1 // s:x2 // s] += 1
        return total / count

    def infer(self, x: Tensor, return_features: bool = False) -> Dict[str, Tensor]:
        """The full-resolution prediction (slide inference for the detail), in any mode: what
        evaluation and a teacher's pseudo-labels use."""
        self._check_input(x)
        feats, context, attention = self._context(x)
        fused, _ = self.decode_head.fuse(context, self.detail_logits(x), attention)
        out = {"main": fused}
        if return_features:
            out["features"] = feats[-1]
        return out

    def drop_heads(self) -> None:
        self.decode_head = None

    def head_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.decode_head.parameters() if p.requires_grad]


class ResNetBackbone(ResNet):
    """The dilated ResNet trunk as an encoder-decoder backbone (levels layer1..4, strides 4, 8, 8,
    8), for HRDA on DeepLabV2's classifier; the input is normalised by the segmenter."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_channels = tuple(self.stage_channels)
        self.strides = (4, 8, 8, 8)

    def forward(self, x: Tensor) -> List[Tensor]:  # type: ignore[override]
        return self.forward_stages(x)

    def convert_published(self, sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """An ImageNet or DeepLab initialisation file: the trunk's keys (``Scale.`` prefix of the
        DeepLab file removed), classifiers dropped."""
        sd = {k[len("Scale."):] if k.startswith("Scale.") else k: v for k, v in sd.items()}
        return {k: v for k, v in sd.items() if not k.startswith(("fc.", "layer5.", "layer6."))}


def build_hrda(m) -> HRDAEncoderDecoder:
    """HRDA around the backbone and decode head of a resolved ModelConfig `m` (``m.hrda`` on):
    the scale attention is a head of the same kind (DAFormer's with a 1x1 fusion of
    ``attention_channels``, DeepLabV2's classifier, or the linear head), one output per class
    (``attention_classwise``) or one in all. A ResNet becomes an encoder-decoder backbone under
    DeepLabV2's classifier (no auxiliary classifier, as the reference)."""
    from .decode_heads import ASPPSumHead, DAFormerHead, LinearHead
    from .deeplabv2 import BACKBONES as RESNET_DEPTHS
    from .presets import resolve_model_config
    from .segmenter import build_backbone, build_decode_head

    m = resolve_model_config(m)
    h = m.hrda
    outputs = m.num_classes if h.attention_classwise else 1
    if m.arch == "deeplabv2":
        backbone = ResNetBackbone(depth=RESNET_DEPTHS[m.backbone], base_width=m.base_width, stem=m.stem,
                                  bn_mode=m.bn_mode, stride_in_1x1=m.stride_in_1x1, resnet_style=m.resnet_style)
        head = ASPPSumHead(list(backbone.out_channels), m.num_classes, list(m.aspp_dilations), level=-1)
        attention = ASPPSumHead(list(backbone.out_channels), outputs, list(m.aspp_dilations), level=-1)
        stride = backbone.strides[-1]
    else:
        backbone = build_backbone(m)
        head = build_decode_head(m, backbone.out_channels)
        if m.decode_head == "daformer":
            attention = DAFormerHead(list(backbone.out_channels), num_classes=outputs, embed_dims=h.attention_channels,
                                     channels=h.attention_channels, dropout=m.head_dropout, fusion="conv")
        elif m.decode_head == "linear":
            attention = LinearHead(list(backbone.out_channels), outputs)
        else:
            attention = ASPPSumHead(list(backbone.out_channels), outputs, list(m.aspp_dilations), level=-1)
        stride = backbone.strides[-1] if m.decode_head == "aspp" else backbone.strides[0]
    return HRDAEncoderDecoder(backbone, head, attention, m.num_classes, m.normalization, m.backbone, h, stride)


__all__ = ["build_hrda", "HRDAHead", "HRDAEncoderDecoder", "ResNetBackbone", "random_detail_box", "slide_boxes", "exact_grid",
           "resize_by"]
