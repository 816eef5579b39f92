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
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError

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
    resize_interpolation: str = "bicubic"  # bicubic | bilinear (mmcv's default)
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


@dataclass
class ModelConfig:
    # deeplabv2: ResNet + ASPP classifiers (ADVENT) | encoder_decoder: MiT / DINOv2 ViT + decode head
    arch: str = "deeplabv2"
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
    aux: bool = True  # layer5 on layer3
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18, 24])  # layer5/layer6 branches
    aux_weight: float = 0.1
    normalization: str = "advent_bgr"  # advent_bgr | imagenet_rgb
    # ADVENT keeps BN affine frozen but uses batch statistics ("train"); "eval"
    # freezes running statistics too, better for batch size 1.
    bn_mode: str = "train"
    pretrained: Optional[str] = None
    # encoder_decoder only -------------------------------------------------------------
    decode_head: str = "daformer"  # daformer (DAFormer's context-aware fusion) | linear | aspp (DeepLabV2)
    head_channels: int = 256  # DAFormer head: embedding and fusion width (both 256 in DAFormer)
    head_dropout: float = 0.1
    fusion_dilations: list[int] = field(default_factory=lambda: [1, 6, 12, 18])  # DAFormer head ASPP
    drop_path_rate: Optional[float] = None  # None = the backbone's (MiT 0.1)
    embed_dims: Optional[list[int]] = None  # width override: MiT 4 stage widths, ViT one width
    vit_depth: Optional[int] = None  # ViT overrides for narrow models
    vit_heads: Optional[int] = None
    out_indices: Optional[list[int]] = None  # ViT blocks feeding the head (None = the preset's four)
    output_stride: int = 8  # mobilenetv2: 8 | 16 | 32 (strides replaced by dilations, DeepLab-style)


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
    tensorboard: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms
    init_from: Optional[str] = None  # segmenter weights to start from (any loadable format)


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
class Config:
    # modules (dotted names or .py files, relative to the config file that names them) imported
    # before the config is checked: they register methods, dataset readers or models of their own
    imports: list[str] = field(default_factory=list)
    name: str = "run"
    out_dir: str = "runs/${name}/seed${train.seed}"
    method: dict = field(default_factory=lambda: {"name": "source_only"})
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


def _merge(dst: dict, src: dict, origin: Optional[str], origins: _Origins, prefix: str = "") -> None:
    for k, v in src.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "_replace_":
            if v.pop("_replace_", False):
                dst[k] = {}
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
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
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


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


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
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} (in {where})")
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
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{k}' in {origins.where(prefix + str(k))}{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k, origins) for k, v in data.items()}
    return cls(**kwargs)


def load_config(
    path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict] = None
) -> Config:
    """Load a config (file path or packaged name), apply overrides, validate.

    `base` (a plain dict, e.g. the config stored in a checkpoint) is used
    instead of a file when given.
    """
    origins = _Origins()
    tree = _deep_defaults()
    if base is not None:
        _merge(tree, base, "checkpoint config", origins)
    if path is not None:
        _merge(tree, _load_tree(resolve_config_path(path), origins), None, origins)
    if overrides:
        _merge(tree, parse_overrides(overrides), "command line", origins)
    _interpolate(tree, tree, origins)
    cfg = build_dataclass(Config, tree, origins)
    cfg.imports = _plugin_paths(cfg.imports, origins)
    if cfg.imports:
        from .registry import import_plugins

        import_plugins(cfg.imports)
    validate(cfg)
    from .methods import method_config  # the registry lives with the methods

    cfg.method = dataclasses.asdict(method_config(cfg.method, origins))
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


def _deep_defaults() -> dict:
    return dataclasses.asdict(Config())


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
    _choice(cfg.model.normalization, ["advent_bgr", "imagenet_rgb"], "model.normalization")
    _choice(cfg.model.bn_mode, ["train", "eval"], "model.bn_mode")
    _choice(cfg.optim.name, ["sgd", "adamw"], "optim.name")
    _choice(cfg.train.amp, ["none", "bf16", "fp16"], "train.amp")
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
    if not isinstance(cfg.method, dict) or "name" not in cfg.method:
        raise ConfigError("method.name is required")


def _counts(cfg: Config) -> None:
    """Counts and sizes: `> 0` where zero means nothing to do, `>= 0` where zero is a setting."""
    at_least = [  # (key, value, minimum); None values are unset options
        ("train.num_workers", cfg.train.num_workers, 0), ("train.eval_every", cfg.train.eval_every, 0),
        ("optim.warmup_iters", cfg.optim.warmup_iters, 0), ("optim.poly_iters", cfg.optim.poly_iters, 1),
        ("optim.weight_decay", cfg.optim.weight_decay, 0), ("optim.momentum", cfg.optim.momentum, 0),
        ("optim.warmup_ratio", cfg.optim.warmup_ratio, 0), ("optim.head_lr_mult", cfg.optim.head_lr_mult, 0),
        ("model.base_width", cfg.model.base_width, 1), ("model.num_classes", cfg.model.num_classes, 1),
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
