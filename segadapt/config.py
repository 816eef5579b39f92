"""Typed configuration: YAML files with `_base_` inheritance, `${a.b}` references
and `a.b=value` command-line overrides, validated against dataclasses.

Every key has a documented default; an unknown or mistyped key is an error that
names the key and the file (or the command line) it came from.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import yaml

from .errors import ConfigError
from .registry import BACKBONES, METHODS

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"


# --------------------------------------------------------------------------- schema
@dataclass
class DatasetConfig:
    # a registered reader: gta5 | cityscapes | synthia | folder | acdc | dark_zurich | custom | a plugin's
    kind: str = "cityscapes"
    root: str = ""
    split: str = "train"  # cityscapes/acdc/dark_zurich: train/val/test; gta5/synthia: all (or use list_file)
    list_file: Optional[str] = None  # names of the samples to use, relative to root
    resize: Optional[list[int]] = None  # [W, H]
    # mmseg's Resize(keep_ratio=True): one factor, long side to the long side of `resize`, short
    # to short (GTA5's 1914x1052 at [1280, 720] becomes 1280x704)
    resize_keep_ratio: bool = False
    # bicubic (Pillow's, as ADVENT) | bilinear (mmcv's: OpenCV's INTER_LINEAR without antialiasing,
    # labels INTER_NEAREST; bit-exact) | pil_bilinear (Pillow's antialiased bilinear, older versions')
    resize_interpolation: str = "bicubic"
    crop: Optional[list[int]] = None  # [W, H]
    # mmseg RandomCrop: re-draw (up to 10 times) while one class covers >= this share of the
    # crop's labelled pixels or it holds a single class; 1.0 = off
    cat_max_ratio: float = 1.0
    flip: bool = False
    labels: bool = True  # unlabelled target training: false
    keep_label_size: bool = False  # evaluation: resize the image only
    size_mismatch: str = "resize"  # resize | skip | error
    # keep each decoded (and resized) image and label map in memory after its first read, in
    # every data worker: for small datasets (the synthetic benchmark's 600 source images take
    # about 80 MB per worker, its 400 target images 40 MB), not for GTA5 or Cityscapes
    cache: bool = False
    # acdc: fog | night | rain | snow | all (default all); dark_zurich: day | night | twilight (default night)
    condition: Optional[str] = None
    # the dataset's own classes: a YAML class map (names, label id -> train id, ignore ids, palette;
    # docs/datasets.md) or the same mapping inline; none = the 19 Cityscapes classes
    class_map: Optional[Union[str, dict]] = None
    # custom: images and labels under root, matched by name ({split} is replaced by the split)
    image_dir: Optional[str] = None  # default images/{split}
    label_dir: Optional[str] = None  # default labels/{split}
    image_suffix: Optional[str] = None  # default: any of .png .jpg .jpeg .bmp
    label_suffix: Optional[str] = None  # default .png
    options: dict = field(default_factory=dict)  # a plugin reader's own options
    # [top, bottom, left, right]: pixels of each image as read whose pseudo-labels get no weight
    # (an unlabelled target's; HRDA's crop_pseudo_margins [30, 240, 30, 30] for Cityscapes: the
    # rectification border and the ego car). Masked before resize and crop, so a crop away from
    # the border keeps all its pseudo-labels.
    pseudo_margins: Optional[list[int]] = None


@dataclass
class HRDAConfig:
    """HRDA's multi-resolution training and inference (Hoyer et al., ECCV 2022; HRDA/MIC
    reference configs): a context crop at `context_scale` of the whole input, a detail crop of
    `detail_crop` input pixels at full resolution, fused by a learned scale attention. Feature-
    level losses (FD, prototypes) see the context's features, as the reference's feature_scale."""

    enabled: bool = False
    context_scale: float = 0.5  # the low-resolution context: the input resized by this factor
    detail_crop: list[int] = field(default_factory=lambda: [512, 512])  # [W, H] of the detail crop (hr_crop_size)
    detail_loss_weight: float = 0.1  # lambda_d (hr_loss_weight); the fused loss gets 1 - this - context_loss_weight
    context_loss_weight: float = 0.0  # lr_loss_weight
    attention_classwise: bool = True  # one attention channel per class
    attention_channels: int = 256  # attention_embed_dim of the DAFormer-style attention head
    crop_divisible: int = 8  # detail-crop offsets are multiples of this (output stride / context scale)
    slide_inference: bool = True  # inference: the detail scale in overlapping detail-crop windows
    slide_overlap: bool = True  # windows at half a crop's stride (false: side by side)

    def __post_init__(self):
        if not 0.0 < self.context_scale < 1.0:
            raise ConfigError(f"model.hrda.context_scale must be in (0, 1), got {self.context_scale}")
        if len(self.detail_crop) != 2 or min(self.detail_crop) <= 0:
            raise ConfigError(f"model.hrda.detail_crop: expected [W, H] with positive sizes, got {self.detail_crop}")
        if self.detail_loss_weight < 0 or self.context_loss_weight < 0 \
                or self.detail_loss_weight + self.context_loss_weight >= 1:
            raise ConfigError("model.hrda.detail_loss_weight and context_loss_weight must be >= 0 with a sum below 1")
        if self.crop_divisible < 1 or self.attention_channels < 1:
            raise ConfigError("model.hrda.crop_divisible and attention_channels must be positive")


@dataclass
class ModelConfig:
    """The segmenter. Keys left None take the backbone preset's value when the config loads
    (`segadapt.models.presets`: normalization, aux, decode head, arch), so a loaded config
    always holds concrete values and every key is checked before any data is read."""

    # deeplabv2: ResNet + ASPP classifiers (ADVENT) | encoder_decoder: MiT / DINOv2 ViT + decode
    # head; None = the backbone's
    arch: Optional[str] = None
    # deeplabv2: resnet18/34/50/101; encoder_decoder: mit_b0..mit_b5, dinov2_vits14/vitb14/vitl14,
    # mobilenetv2 (with decode_head aspp: DeepLabV2's classifier, aux on the previous level)
    backbone: str = "resnet101"
    base_width: int = 64  # 64 = standard widths; 16/32 for CPU work
    # caffe: ADVENT's Caffe ResNet (frozen BN affine, ceil-mode pool, stride in the 1x1);
    # v1c: mmseg ResNetV1c as DAFormer/CONFETI use it (three-conv stem, stride in the 3x3,
    # contracted first dilation, trained BN affine; loads resnet101_v1c / mmseg checkpoints)
    resnet_style: str = "caffe"
    stem: Optional[str] = None  # None = the style's; caffe style: caffe (7x7) | v1c (three 3x3)
    # None = the style's (caffe: true, v1c: false). ADVENT/Caffe ResNets stride in the first
    # 1x1 conv; torchvision-style ImageNet weights stride in the 3x3 conv (same shapes)
    stride_in_1x1: Optional[bool] = None
    num_classes: int = 19
    aux: Optional[bool] = None  # DeepLabV2's layer5 on layer3; None = the preset's (ResNet, MobileNetV2: on)
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18, 24])  # layer5/layer6 branches
    aux_weight: float = 0.1
    # advent_bgr | imagenet_rgb; None = the preset's (Caffe ResNet: advent_bgr, all others imagenet_rgb)
    normalization: Optional[str] = None
    # ADVENT keeps BN affine frozen but uses batch statistics ("train"); "eval"
    # freezes running statistics too, better for batch size 1.
    bn_mode: str = "train"
    pretrained: Optional[str] = None
    # encoder_decoder only -------------------------------------------------------------
    # daformer (DAFormer's context-aware fusion) | linear | aspp (DeepLabV2); None = the preset's
    decode_head: Optional[str] = None
    head_channels: int = 256  # DAFormer head: embedding and fusion width (both 256 in DAFormer)
    head_dropout: float = 0.1
    fusion_dilations: list[int] = field(default_factory=lambda: [1, 6, 12, 18])  # DAFormer head ASPP
    drop_path_rate: Optional[float] = None  # None = the backbone's (MiT 0.1)
    embed_dims: Optional[list[int]] = None  # width override: MiT 4 stage widths, ViT one width
    vit_depth: Optional[int] = None  # ViT overrides for narrow models
    vit_heads: Optional[int] = None
    out_indices: Optional[list[int]] = None  # ViT blocks feeding the head (None = the preset's four)
    output_stride: int = 8  # mobilenetv2: 8 | 16 | 32 (strides replaced by dilations, DeepLab-style)
    hrda: HRDAConfig = field(default_factory=HRDAConfig)  # multi-resolution training (any backbone)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 2.5e-4
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 5e-4
    head_lr_mult: float = 10.0  # classifier (and projection heads) learning-rate factor
    no_decay_norm: bool = False  # AdamW family: no weight decay on norm parameters
    # mmcv's paramwise custom_keys decay_mult 0: no weight decay on parameters whose name contains
    # one of these (DAFormer's MiT configs: [norm, pos_block]); None = the no_decay_norm rule
    no_decay_keys: Optional[list[str]] = None
    layer_decay: Optional[float] = None  # ViT layer-wise lr decay (lr * decay^(depth + 1 - layer))
    poly_power: float = 0.9
    poly_iters: Optional[int] = None  # poly horizon; None = train.iters (ADVENT: 250000)
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6  # warm-up starts at lr * warmup_ratio
    grad_clip: Optional[float] = None
    # unique: each tensor once. advent_repeated: ADVENT's backbone list, where its
    # module walk repeats every tensor but conv1 (3x in a block, 4x a downsample conv) and SGD
    # steps it once per repeat, momentum included: the published ADVENT/CFContra numbers
    # were trained so (several times the nominal backbone lr). SGD only.
    param_list: str = "unique"  # unique | advent_repeated
    # advent_repeated: add the weight decay into .grad in place as torch 0.4's SGD did
    # (ADVENT ran torch 0.4.1), so a later repeat decays by the earlier repeats' weights too;
    # false: into a copy, as CFContra's torch 1.7.0 did
    decay_into_grad: bool = False

    def __post_init__(self):
        _choice(self.param_list, list(PARAM_LISTS), "optim.param_list")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay!r}")
        if self.no_decay_keys is not None and (self.no_decay_norm or self.param_list != "unique"):
            raise ConfigError("optim.no_decay_keys replaces optim.no_decay_norm (set it false) and needs "
                              "optim.param_list=unique")
        if self.param_list == "advent_repeated" and (self.name != "sgd" or self.no_decay_norm):
            raise ConfigError("optim.param_list=advent_repeated reproduces ADVENT's SGD: it needs "
                              "optim.name=sgd and optim.no_decay_norm=false")
        if self.decay_into_grad and self.param_list != "advent_repeated":
            raise ConfigError("optim.decay_into_grad only applies with optim.param_list=advent_repeated")


PARAM_LISTS = ("unique", "advent_repeated")


@dataclass
class TrainConfig:
    iters: int = 120000
    batch_source: int = 1
    batch_target: int = 1
    seed: int = 1234
    num_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    # torch.compile of the segmenter (falls back to eager, with one line, where the backend
    # cannot run: no C++ compiler on CPU, no Triton on CUDA)
    compile: bool = False
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (debugging) | ...
    # backward after each stage of a method's step (source, target, ...): one stage's activations
    # are freed before the next forward; false = one backward on the sum of all losses
    staged_backward: bool = True
    log_every: int = 50
    eval_every: int = 2000  # 0 = only at the end
    ckpt_every: int = 2000
    tensorboard: bool = False  # the same as listing tensorboard in `loggers`
    # where scalars (and image grids) go besides metrics.jsonl: csv (metrics.csv) | tensorboard |
    # wandb | mlflow (the last two need their package; see docs/logging.md)
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    # every N iterations a grid of the step's inputs, labels, pseudo-labels, mixed/masked/translated
    # images and predictions goes to debug/iter_<N>.png (and the image loggers); 0 = never
    debug_every: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    init_from: Optional[str] = None  # segmenter weights to start from (any loadable format)
    # CPU threads of the training loop: auto = the usable cores (affinity, cgroup quota), fewer
    # while other work keeps cores busy; OMP_NUM_THREADS in the environment wins over auto.
    # N = exactly N (see segadapt/utils/threads.py)
    threads: Union[int, str] = "auto"

    def __post_init__(self):
        if self.threads != "auto" and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                       or self.threads < 1):
            raise ConfigError(f"train.threads must be auto or a positive number of threads, got {self.threads!r}")


@dataclass
class EvalConfig:
    data: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="val", keep_label_size=True))
    mode: str = "whole"  # whole | slide
    crop: Optional[list[int]] = None  # slide window [W, H]
    stride: Optional[list[int]] = None
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    batch_size: int = 1
    subsets: str = "auto"  # auto (16/13 for a SYNTHIA source) | none | synthia
    max_images: Optional[int] = None
    # bilinear resizes at test time; true = ADVENT's evaluation (nn.Upsample(..., align_corners=True))
    align_corners: bool = False


@dataclass
class SyntheticConfig:
    """The built-in benchmark; generated on first use when `auto` is on."""

    auto: bool = False
    out: str = "data/synthetic"
    seed: int = 0
    size: list[int] = field(default_factory=lambda: [256, 128])
    num_source: int = 600
    num_source_val: int = 100
    num_target_train: int = 400
    num_target_val: int = 100
    gap: float = 1.0
    synthia: bool = False
    workers: int = 2
    condition: Optional[str] = None  # target domain in fog | night | rain (docs/datasets.md); none: daytime


@dataclass
class MethodConfig:
    """Base of every method's config. The `method:` section is built as the config class of the
    method it names (registered with `segadapt.registry.METHODS`); methods add their keys and
    their components' sections by subclassing."""

    REGISTRY: ClassVar = METHODS
    # old key -> new dotted key (relative to `method.`), for configs stored in older checkpoints
    RENAMED: ClassVar[dict] = {}
    # dotted key -> the value it had before its default changed (checkpoint format < 3), for
    # stored configs that lack the key: an older run resumes as it started
    OLD_DEFAULTS: ClassVar[dict] = {}

    name: str = "source_only"

    def check(self, cfg: "Config") -> None:
        """Checks that need other sections (batch sizes, class count); called at config load."""


@dataclass
class Config:
    # modules (dotted names or .py files, relative to the config file that names them) imported
    # before the config is checked: they register methods, dataset readers or models of their own
    imports: list[str] = field(default_factory=list)
    name: str = "run"
    out_dir: str = "runs/${name}/seed${train.seed}"
    method: MethodConfig = field(default_factory=MethodConfig)
    source: DatasetConfig = field(default_factory=DatasetConfig)
    target: DatasetConfig = field(default_factory=lambda: DatasetConfig(labels=False))
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading
class _Origins(dict):
    """Dotted key -> where it was set (file path or 'command line')."""

    def where(self, key: str) -> str:
        parts = key.split(".")
        while parts:
            k = ".".join(parts)
            if k in self:
                return self[k]
            parts.pop()
        return "defaults"


def packaged_config_names(runnable_only: bool = True) -> list[str]:
    """Names of the packaged configs (`synthetic/source_only`, ...), sorted; ``runnable_only``
    drops the `base` files and `_`-prefixed fragments that only other configs include."""
    names = sorted(q.relative_to(PACKAGE_CONFIG_DIR).with_suffix("").as_posix()
                   for q in PACKAGE_CONFIG_DIR.rglob("*.yaml"))
    if runnable_only:
        names = [n for n in names if Path(n).name != "base" and not Path(n).name.startswith("_")]
    return names


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or a packaged config name such as `synthetic/source_only`."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (PACKAGE_CONFIG_DIR / name_or_path, PACKAGE_CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    known = packaged_config_names(runnable_only=False)
    close = difflib.get_close_matches(name_or_path, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else f"; packaged configs: {', '.join(known)}"
    raise ConfigError(f"config not found: {name_or_path}{hint}")


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                          f"offset {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in {path}{loc}: {getattr(e, 'problem', e)}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return data


def _as_section(value, other):
    """`true`/`false` where a mapping meets it is a section's `enabled` switch (`mic: true`)."""
    return {"enabled": value} if isinstance(value, bool) and isinstance(other, dict) else value


def _merge(dst: dict, src: dict, origin: Optional[str], origins: _Origins, prefix: str = "") -> None:
    """`src` into `dst`; a mapping holding `_replace_: true` replaces the inherited section instead
    of merging into it (e.g. a source-only config built on a self-training one's network)."""
    for k, v in src.items():
        key = f"{prefix}{k}"
        if k in dst:
            dst[k], v = _as_section(dst[k], v), _as_section(v, dst[k])
        if isinstance(v, dict) and v.get("_replace_") is True:
            v = {kk: vv for kk, vv in v.items() if kk != "_replace_"}
            dst[k] = {}
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, origin, origins, key + ".")
        else:
            dst[k] = v
            if origin is None:  # already recorded by the loader of that file
                continue
            origins[key] = origin
            if isinstance(v, dict):
                for sub in _flatten(v):
                    origins[f"{key}.{sub}"] = origin


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))  # inline mappings (a class map's ids) have number keys
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
    return out


def _load_tree(path: Path, origins: _Origins, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"circular _base_ in {path}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    tree: dict = {}
    for b in bases:
        bpath = (path.parent / b) if not Path(b).is_absolute() else Path(b)
        if not bpath.is_file():
            raise ConfigError(f"_base_ file {b} not found (referenced from {path})")
        _merge(tree, _load_tree(bpath, origins, seen + (path,)), None, origins)
    _merge(tree, data, str(path), origins)
    return tree


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=1 c=[1,2]` -> nested dict; values parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node.get(p), bool):  # `mic=true mic.block_size=32`: the switch of that section
                node[p] = {"enabled": node[p]}
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        if isinstance(node.get(parts[-1]), dict) and isinstance(value, bool):
            node[parts[-1]]["enabled"] = value
        else:
            node[parts[-1]] = value
    return tree


_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _lookup(tree: dict, dotted: str):
    node: Any = tree
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            raise KeyError(dotted)
        node = node[p]
    return node


def _interpolate(tree: dict, root: dict, origins: _Origins, prefix: str = "", _chain: Optional[list] = None) -> None:
    """Replace every `${a.b}` in string values by the (itself resolved) value at `a.b`.

    A reference to itself, directly or through others, is an error naming the cycle.
    """
    chain = [] if _chain is None else _chain  # keys being resolved, outermost first

    def resolve(key: str, value: str) -> str:
        if key in chain:
            cycle = " -> ".join(f"${{{k}}}" for k in chain[chain.index(key):] + [key])
            raise ConfigError(f"{key}: reference cycle {cycle} (in {origins.where(key)})")
        chain.append(key)

        def sub(m):
            ref = m.group(1)
            try:
                target = _lookup(root, ref)
            except KeyError:
                raise ConfigError(f"{key}: unknown reference ${{{ref}}} (in {origins.where(key)})") from None
            if isinstance(target, dict):
                raise ConfigError(f"{key}: ${{{ref}}} is a section, not a value (in {origins.where(key)})")
            if isinstance(target, str) and "${" in target:
                target = resolve(ref, target)
            return str(target)

        out = _REF.sub(sub, value)
        chain.pop()
        return out

    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _interpolate(v, root, origins, key + ".", chain)
        elif isinstance(v, str) and "${" in v:
            tree[k] = resolve(key, v)


def _coerce(value, tp, key: str, origins: _Origins):
    """Check `value` against the annotation `tp`; allow int->float and list->tuple."""
    where = origins.where(key)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, origins)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r} (in {where})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, bool) and "enabled" in {f.name for f in dataclasses.fields(tp)}:
            value = {"enabled": value}  # `mic: true` is short for `mic: {enabled: true}`
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} (in {where})")
        registry = getattr(tp, "REGISTRY", None)
        if registry is not None:  # a section whose class depends on its `name` (the method)
            tp = registry.get(str(value.get("name")), f"{key}.name").Config
            # given keys over the class's own defaults (a method's default sections differ from
            # their dataclasses' defaults, e.g. DAFormer's rcs is on)
            defaults = dataclasses.asdict(tp())
            _merge(defaults, value, None, origins)
            value = defaults
        return build_dataclass(tp, value, origins, key + ".")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} (in {where})")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} (in {where})")
        return value
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads 1e-4 (no dot) as a string
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r} (in {where})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r} (in {where})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r} (in {where})")
        return value
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r} (in {where})")
        return str(value)
    return value


def build_dataclass(cls, data: dict, origins: Optional[_Origins] = None, prefix: str = ""):
    """Instantiate dataclass `cls` from a dict, rejecting unknown keys."""
    origins = origins if origins is not None else _Origins()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(_unknown_key(cls, str(k), names, prefix, origins, data.get("name")))
    kwargs = {k: _coerce(v, hints[k], prefix + k, origins) for k, v in data.items()}
    return cls(**kwargs)


def _unknown_key(cls, k: str, names: list, prefix: str, origins: _Origins, method=None) -> str:
    """The one line for an unknown key: where it was set, a close name, and for a method section
    the key's new name (if renamed) or the methods that have it."""
    where = origins.where(prefix + k)
    msg = f"unknown config key '{prefix}{k}' in {where}"
    registry = getattr(cls, "REGISTRY", None)
    if registry is not None:
        for entry_name, entry in registry.items():
            if k in entry.Config.RENAMED:
                new = entry.Config.RENAMED[k]
                return f"{msg}: renamed to '{prefix}{new if isinstance(new, str) else new[0]}'"
        owners = [n for n, entry in registry.items() if k in {f.name for f in dataclasses.fields(entry.Config)}]
        if owners:
            return f"{msg}: method {method} has no '{k}'; methods with it: {', '.join(owners)}"
    close = difflib.get_close_matches(k, names, n=1)
    return msg + (f" (did you mean '{prefix}{close[0]}'?)" if close else "")


def migrate_renamed_keys(method: dict) -> dict:
    """A `method:` section written by an older version (a checkpoint's config) with its renamed
    keys moved to their new places (`RENAMED` of the method's config class)."""
    cls = METHODS.get(str(method.get("name")), "method.name").Config
    out: dict = {}
    for k, v in method.items():
        rule = cls.RENAMED.get(k)
        new_key, value = (k, v) if rule is None else (rule, v) if isinstance(rule, str) else (rule[0], rule[1](v))
        node = out
        *parents, leaf = new_key.split(".")
        for part in parents:
            node[part] = _as_section(node.get(part, {}), {})
            node = node[part]
        if leaf in node:
            node[leaf], value = _as_section(node[leaf], value), _as_section(value, node[leaf])
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return out


# checkpoint format of the configs this version writes (engine.checkpoint.VERSION follows it)
CONFIG_FORMAT = 3


def _migrate_stored_config(base: dict, version: int) -> dict:
    """A config stored by an older version (checkpoint format `version`): renamed method keys
    moved; before format 3 the keys whose defaults changed get their old values where the stored
    config lacks them, and mmcv-style `bilinear` resizing meant Pillow's (`pil_bilinear`); the
    unused decode-head default older versions recorded for DeepLabV2 models is dropped."""
    base = dict(base)
    if isinstance(base.get("method"), dict):
        base["method"] = migrate_renamed_keys(base["method"])
        if version < 3:
            base["method"] = _with_old_defaults(base["method"])
    if version < 3:
        for key in ("source", "target"):
            base[key] = _pil_bilinear(base.get(key))
        if isinstance(base.get("eval"), dict):
            base["eval"] = {**base["eval"], "data": _pil_bilinear(base["eval"].get("data"))}
    model = base.get("model")
    if isinstance(model, dict) and model.get("arch") == "deeplabv2" and model.get("decode_head") == "daformer":
        base["model"] = {k: v for k, v in model.items() if k != "decode_head"}
    return base


def _pil_bilinear(section):
    if isinstance(section, dict) and section.get("resize_interpolation") == "bilinear":
        return {**section, "resize_interpolation": "pil_bilinear"}
    return section


def _with_old_defaults(method: dict) -> dict:
    cls = METHODS.get(str(method.get("name")), "method.name").Config
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in method.items()}
    for dotted, value in cls.OLD_DEFAULTS.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node[part] = _as_section(node.get(part, {}), {})
            node = node[part]
        node.setdefault(leaf, value)
    return out


def load_config(
    path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict] = None,
    base_version: int = CONFIG_FORMAT, origins_out: Optional[dict] = None,
) -> Config:
    """Load a config (file path or packaged name), apply overrides, validate.

    `base` (a plain dict, e.g. the config stored in a checkpoint of format `base_version`,
    possibly older) is used instead of a file when given. `origins_out` receives, per dotted
    key set by a file or the command line, where it was set, and under `("ref", key)` the
    `${...}` text a value was resolved from (`segadapt config show`).
    """
    origins = _Origins()
    tree = _deep_defaults()
    if base is not None:
        _merge(tree, _migrate_stored_config(base, base_version), "checkpoint config", origins)
    if path is not None:
        _merge(tree, _load_tree(resolve_config_path(path), origins), None, origins)
    if overrides:
        _merge(tree, parse_overrides(overrides), "command line", origins)
    if origins_out is not None:
        origins_out.update(origins)
        origins_out.update({("ref", k): v for k, v in flatten_items(tree).items()
                            if isinstance(v, str) and "${" in v})
    _interpolate(tree, tree, origins)
    imports = tree.get("imports") or []
    if not isinstance(imports, list) or not all(isinstance(e, str) for e in imports):
        raise ConfigError(f"imports: expected a list of module names or .py files, got {imports!r} "
                          f"(in {origins.where('imports')})")
    # before the sections are built: a plugin may register the method or dataset they name
    tree["imports"] = _plugin_paths(imports, origins)
    if tree["imports"]:
        from .registry import import_plugins

        import_plugins(tree["imports"])
    cfg = build_dataclass(Config, tree, origins)
    validate(cfg)
    return cfg


def _plugin_paths(entries: list[str], origins: _Origins) -> list[str]:
    """`.py` entries of `imports` relative to the config file that names them, made absolute
    (a checkpoint's stored config then finds them from any working folder)."""
    where = origins.where("imports")
    base = Path(where).parent if where not in ("defaults", "command line", "checkpoint config") else None
    out = []
    for e in entries:
        p = Path(e).expanduser()
        if e.endswith(".py") and not p.is_absolute():
            beside = base / p if base is not None else None
            p = beside if beside is not None and beside.is_file() else p
            e = str(p.resolve()) if p.is_file() else e
        out.append(e)
    return out


def flatten_items(tree: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted key: leaf value} (an empty mapping is a leaf)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_file_values(path: str) -> dict:
    """The dotted keys that config file `path` (with its `_base_` files) sets, with their values
    as written (references unresolved; lists and the method's options flattened by key).
    `train --resume -c FILE` compares them with those recorded at the run's start: what differs
    is the file's change."""
    return flatten_items(_load_tree(resolve_config_path(path), _Origins()))


def _deep_defaults() -> dict:
    # the method section's keys come from the method it names, once files and overrides are in
    return {**dataclasses.asdict(Config()), "method": {"name": MethodConfig.name}}


def _choice(value, allowed, key):
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}{hint}")


def validate(cfg: Config) -> None:
    from .registry import DATASETS

    for key, ds in (("source", cfg.source), ("target", cfg.target), ("eval.data", cfg.eval.data)):
        reader = DATASETS.get(ds.kind, f"{key}.kind")
        _choice(ds.size_mismatch, ["resize", "skip", "error"], f"{key}.size_mismatch")
        # the reader's own option checks; with a class map, its number of classes
        check = getattr(reader, "check_config", None)
        n = check(ds, key) if check is not None else None
        if n is not None and n != cfg.model.num_classes:
            shown = "(inline)" if isinstance(ds.class_map, dict) else ds.class_map
            raise ConfigError(f"{key}.class_map {shown} has {n} classes but model.num_classes is "
                              f"{cfg.model.num_classes}: set model.num_classes={n}")
        for sub in ("resize", "crop"):
            v = getattr(ds, sub)
            if v is not None and (len(v) != 2 or min(v) <= 0):
                raise ConfigError(f"{key}.{sub}: expected [W, H] with positive sizes, got {v}")
        if ds.pseudo_margins is not None:
            if len(ds.pseudo_margins) != 4 or min(ds.pseudo_margins) < 0:
                raise ConfigError(f"{key}.pseudo_margins: expected [top, bottom, left, right] >= 0, got "
                                  f"{ds.pseudo_margins}")
            if ds.labels:
                raise ConfigError(f"{key}.pseudo_margins applies to an unlabelled target ({key}.labels: false)")
    # fills the preset's values into the unset model keys and checks every model key
    preset = BACKBONES.get(cfg.model.backbone, "model.backbone")
    preset.resolve(cfg.model)
    if cfg.model.hrda.enabled:
        _check_hrda_crops(cfg, preset.output_stride(cfg.model))
    _choice(cfg.optim.name, ["sgd", "adamw"], "optim.name")
    _choice(cfg.train.amp, ["none", "bf16", "fp16"], "train.amp")
    _check_loggers(cfg.train.loggers)
    _choice(cfg.eval.mode, ["whole", "slide"], "eval.mode")
    _choice(cfg.eval.subsets, ["auto", "none", "synthia"], "eval.subsets")
    if cfg.eval.mode == "slide" and not cfg.eval.crop:
        raise ConfigError("eval.crop is required for eval.mode=slide")
    for k in ("iters", "batch_source", "batch_target", "log_every", "ckpt_every"):
        if getattr(cfg.train, k) <= 0:
            raise ConfigError(f"train.{k} must be positive")
    _counts(cfg)
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr must be positive")
    cfg.method.check(cfg)


LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")


def _check_loggers(names) -> None:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"train.loggers: expected a list of names ({', '.join(LOGGERS)}), got {names!r}")
    for n in names:
        _choice(n, list(LOGGERS), "train.loggers")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"train.loggers lists {', '.join(twice)} more than once")


def _check_hrda_crops(cfg: Config, stride: int) -> None:
    """The training inputs HRDA splits: a detail crop no larger than them, a context scale that
    maps them onto whole logits."""
    h = cfg.model.hrda
    for key in ("source", "target"):
        ds = getattr(cfg, key)
        size = ds.crop or (None if ds.resize_keep_ratio else ds.resize)
        if size is None and cfg.synthetic.auto:
            size = cfg.synthetic.size
        if size is None:
            continue  # known only when the images are read; checked at the first step
        if h.detail_crop[0] > size[0] or h.detail_crop[1] > size[1]:
            raise ConfigError(f"model.hrda.detail_crop {h.detail_crop} is larger than the {key} training crop "
                              f"{list(size)} (the context crop): make it smaller or the crop larger")
        scaled = [side * h.context_scale for side in size]
        if any(not v.is_integer() or v % stride for v in scaled):
            raise ConfigError(f"model.hrda.context_scale {h.context_scale} does not divide the {key} training crop "
                              f"{list(size)}: the context ({scaled[0]:g} x {scaled[1]:g}) must be whole multiples of "
                              f"the output stride {stride}")


def _counts(cfg: Config) -> None:
    """Counts and sizes: `> 0` where zero means nothing to do, `>= 0` where zero is a setting."""
    at_least = [  # (key, value, minimum); None values are unset options
        ("train.num_workers", cfg.train.num_workers, 0), ("train.eval_every", cfg.train.eval_every, 0),
        ("train.debug_every", cfg.train.debug_every, 0),
        ("optim.warmup_iters", cfg.optim.warmup_iters, 0), ("optim.poly_iters", cfg.optim.poly_iters, 1),
        ("optim.weight_decay", cfg.optim.weight_decay, 0), ("optim.momentum", cfg.optim.momentum, 0),
        ("optim.warmup_ratio", cfg.optim.warmup_ratio, 0), ("optim.head_lr_mult", cfg.optim.head_lr_mult, 0),
        ("model.aux_weight", cfg.model.aux_weight, 0),
        ("eval.batch_size", cfg.eval.batch_size, 1), ("eval.max_images", cfg.eval.max_images, 1),
        ("synthetic.num_source", cfg.synthetic.num_source, 1),
        ("synthetic.num_source_val", cfg.synthetic.num_source_val, 0),
        ("synthetic.num_target_train", cfg.synthetic.num_target_train, 1),
        ("synthetic.num_target_val", cfg.synthetic.num_target_val, 1),
        ("synthetic.workers", cfg.synthetic.workers, 1), ("synthetic.gap", cfg.synthetic.gap, 0),
    ]
    for key, value, minimum in at_least:
        if value is not None and value < minimum:
            need = "positive" if minimum == 1 else ">= 0"
            raise ConfigError(f"{key} must be {need}, got {value}")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip must be positive (or null for none), got {cfg.optim.grad_clip}")
    if not cfg.eval.scales or min(cfg.eval.scales) <= 0:
        raise ConfigError(f"eval.scales must be positive factors, got {cfg.eval.scales}")
    for key, v in (("eval.crop", cfg.eval.crop), ("eval.stride", cfg.eval.stride), ("synthetic.size", cfg.synthetic.size)):
        if v is not None and (len(v) != 2 or min(v) <= 0):
            raise ConfigError(f"{key}: expected [W, H] with positive sizes, got {v}")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
