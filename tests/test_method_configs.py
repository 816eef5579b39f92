"""Typed method and model configs: the method section is the method's own dataclass from YAML to
the method, with its components' sections; keys are checked when the config loads, unknown
keys name the methods that have them, renamed keys their new place; model keys are resolved
against the backbone presets at load; configs and states stored by older checkpoints migrate."""
import dataclasses

import pytest
import torch

from segadapt.cli import main
from segadapt.config import load_config, migrate_renamed_keys, packaged_config_names
from segadapt.errors import ConfigError
from segadapt.methods import get_method_class, method_names
from segadapt.methods.components.augment import AugmentConfig
from segadapt.methods.components.classmix import MixConfig
from segadapt.methods.components.feature_distance import FDConfig
from segadapt.methods.components.mic import MICConfig
from segadapt.methods.components.rcs import RCSConfig
from segadapt.methods.components.teacher import TeacherConfig
from segadapt.models import model_config
from segadapt.models.presets import BackbonePreset
from segadapt.registry import BACKBONES

from .conftest import tiny_overrides


def test_every_method_config_is_one_dataclass_family():
    for name in method_names():
        cls = get_method_class(name).Config
        assert dataclasses.is_dataclass(cls) and cls.__name__.endswith("Config"), name
        assert cls().name == name  # the default instance names its method


def test_component_sections_and_their_method_defaults():
    dacs, daformer = load_config("gta5_cityscapes/dacs").method, load_config("gta5_cityscapes/daformer").method
    assert isinstance(dacs.teacher, TeacherConfig) and isinstance(dacs.mix, MixConfig)
    assert (dacs.rcs.enabled, dacs.fd.enabled) == (False, False)  # the same composition, off
    assert (daformer.rcs.enabled, daformer.fd.enabled) == (True, True)
    assert (daformer.teacher.ignore_top, daformer.teacher.ignore_bottom) == (15, 120)
    minent = load_config("gta5_cityscapes/minent").method
    assert (minent.teacher.ignore_top, minent.teacher.ignore_bottom, minent.mic.enabled) == (0, 0, False)
    # a partial section keeps the method's own defaults for the rest (DAFormer's rcs stays on)
    cfg = load_config("synthetic/daformer", ["method.rcs.temperature=0.5"])
    assert cfg.method.rcs == RCSConfig(enabled=True, temperature=0.5, min_pixels=50)


def test_section_switch_shorthand_merges_with_its_settings(tmp_path):
    cfg = load_config("gta5_cityscapes/mic_daformer_mitb5", ["method.mic.block_size=32"])
    assert cfg.method.mic == MICConfig(enabled=True, block_size=32)
    for order in (["method.mic=true", "method.mic.block_size=8"], ["method.mic.block_size=8", "method.mic=true"]):
        assert load_config("synthetic/minent", order).method.mic == MICConfig(enabled=True, block_size=8)
    child = tmp_path / "child.yaml"
    child.write_text("_base_: {}\nmethod: {{mic: {{weight: 0.5}}}}\n".format(
        load_config.__globals__["resolve_config_path"]("gta5_cityscapes/mic_daformer_mitb5")))
    assert load_config(str(child)).method.mic == MICConfig(enabled=True, weight=0.5, block_size=32)
    assert load_config("synthetic/daformer", ["method.fd=false"]).method.fd == FDConfig(enabled=False)


@pytest.mark.parametrize("override, needles", [
    ("method.rcs.enabled=true", None),  # valid
    ("method.rcs=true", None),
    ("method.contrast.margin=0.1", ("method minent has no 'contrast'", "methods with it: cfcontra")),
    ("method.stage=2", ("method minent has no 'stage'", "confeti")),
    ("method.rcs_temperature=0.1", ("renamed to 'method.rcs.temperature'",)),
    ("method.ema_alpha=0.9", ("renamed to 'method.teacher.alpha'",)),
    ("method.entropy_weight_mian=1", ("did you mean 'method.entropy_weight_main'",)),
    ("method.teacher.alpah=0.9", ("did you mean 'method.teacher.alpha'",)),
    ("method.mic.block_size=0", ("method.mic.block_size must be >= 1",)),
    ("method.teacher.norm=sometimes", ("method.teacher.norm must be one of batch, running",)),
    ("method.augment.apply_per=pixel", ("method.augment.apply_per",)),
])
def test_misplaced_unknown_and_bad_method_keys(override, needles):
    base = "synthetic/daformer" if override.startswith("method.rcs") else "synthetic/minent"
    if needles is None:
        load_config(base, [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config(base, [override])
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_component_configs_check_their_values():
    for cls, bad, match in [
        (TeacherConfig, {"alpha": 1.0}, "teacher.alpha"), (TeacherConfig, {"ignore_top": -1}, "ignore_top"),
        (AugmentConfig, {"jitter_p": 2.0}, "jitter_p"), (AugmentConfig, {"blur_sigma": [1.0, 0.5]}, "blur_sigma"),
        (MixConfig, {"classes": "all"}, "mix.classes"), (RCSConfig, {"temperature": 0}, "rcs.temperature"),
        (RCSConfig, {"min_pixels": 0}, "min_pixels"), (FDConfig, {"weight": -1}, "fd.weight"),
        (MICConfig, {"mask_ratio": 1.0}, "mic.mask_ratio"),
    ]:
        with pytest.raises(ConfigError, match=match):
            cls(**bad)
    with pytest.raises(ConfigError, match=r"fd.classes: \[19\]"):
        load_config("synthetic/daformer", ["method.fd.classes=[5, 19]"])
    with pytest.raises(ConfigError, match="ClassMix pairs source i with target i"):
        load_config("synthetic/dacs", ["train.batch_target=1"])
    with pytest.raises(ConfigError, match="discriminator_aux is set but the model has no aux"):
        load_config("synthetic/advent", ["model.aux=false", "method.discriminator_aux=d.pth"])


# --------------------------------------------------------------------------- model presets
def test_presets_carry_their_defaults():
    assert {n for n in BACKBONES} >= {"resnet18", "resnet101", "mit_b0", "mit_b5", "dinov2_vitl14", "mobilenetv2"}
    for name, arch, norm, aux, head in [("resnet101", "deeplabv2", "advent_bgr", True, None),
                                        ("mit_b5", "encoder_decoder", "imagenet_rgb", False, "daformer"),
                                        ("dinov2_vits14", "encoder_decoder", "imagenet_rgb", False, "daformer"),
                                        ("mobilenetv2", "encoder_decoder", "imagenet_rgb", True, "aspp")]:
        m = model_config(backbone=name)
        assert (m.arch, m.normalization, m.aux, m.decode_head) == (arch, norm, aux, head), name
    # the same MiT-B0 from the command line and from Python: the preset's normalization both times
    cli = load_config("synthetic/source_only", ["model.backbone=mit_b0", "model.arch=null", "model.aux=null",
                                                "model.normalization=null"]).model
    assert cli == model_config(backbone="mit_b0", base_width=16, aux_weight=0.1)
    assert model_config(backbone="resnet50", resnet_style="v1c").normalization == "imagenet_rgb"  # mmseg's


@pytest.mark.parametrize("name", ["resnet18", "resnet101", "mit_b0", "mit_b5", "mobilenetv2"])
def test_preset_levels_match_the_built_backbone(name):
    from segadapt.models.segmenter import build_segmenter

    preset: BackbonePreset = BACKBONES.get(name)
    with torch.device("meta"):
        model = build_segmenter(model_config(backbone=name))
    feats = model.extract_features(torch.empty(1, 3, 64, 64, device="meta"))
    assert tuple(f.shape[1] for f in feats) == preset.channels
    # (ADVENT's Caffe ResNet pools in ceil mode: one cell more where the stride does not divide)
    assert all(0 <= f.shape[-1] - 64 // s <= 1 for f, s in zip(feats, preset.strides))


def test_a_bad_model_key_fails_at_load_before_any_data(tmp_path, capsys):
    synth = tmp_path / "synthetic"
    code = main(["train", "--no-progress", "model.backbone=resnet152", f"synthetic.out={synth}",
                 f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.backbone: unknown backbone 'resnet152'" in err and "Traceback" not in err
    assert not synth.exists()  # refused before the benchmark was generated
    with pytest.raises(ConfigError, match="model.embed_dims: does not apply to resnet18"):
        load_config("synthetic/source_only", ["model.embed_dims=[8,16,24,32]"])


def test_builders_take_the_dataclass_only():
    from segadapt.models.segmenter import build_segmenter

    with pytest.raises(TypeError, match="takes a ModelConfig"):
        build_segmenter({"backbone": "resnet18"})


# --------------------------------------------------------------------------- older checkpoints
OLD_DAFORMER_METHOD = {  # the method section of a checkpoint written before the components
    "name": "daformer", "ema_alpha": 0.99, "teacher_norm": "batch", "pseudo_threshold": 0.9, "ignore_top": 15,
    "ignore_bottom": 120, "jitter_strength": 0.2, "jitter_p": 0.8, "blur_p": 0.5, "blur_sigma": [0.15, 1.15],
    "blur_kernel_ratio": 0.1, "aug_apply_per": "batch", "source_ce_mean": "all", "align_corners": False,
    "eval_teacher": False, "mic": True, "mic_weight": 1.0, "mic_mask_ratio": 0.7, "mic_block_size": 16,
    "mic_augment": True, "rcs": True, "rcs_temperature": 0.01, "rcs_min_pixels": 50, "rcs_min_crop_ratio": 0.5,
    "rcs_crop_attempts": 10, "rcs_stats": None, "fd_lambda": 0.0, "fd_classes": [6, 7], "fd_min_ratio": 0.75,
}


def test_old_checkpoint_configs_migrate():
    m = migrate_renamed_keys(OLD_DAFORMER_METHOD)
    assert m["teacher"] == {"alpha": 0.99, "norm": "batch", "pseudo_threshold": 0.9, "ignore_top": 15,
                            "ignore_bottom": 120}
    assert m["mic"] == {"enabled": True, "weight": 1.0, "mask_ratio": 0.7, "block_size": 16, "augment": True}
    old = load_config("synthetic/daformer").to_dict()
    old["method"] = OLD_DAFORMER_METHOD
    old["model"]["decode_head"] = "daformer"  # older versions recorded the unused default for ResNets
    cfg = load_config(None, base=old, base_version=1)
    assert cfg.method.fd == FDConfig(enabled=False, weight=0.0, classes=[6, 7])
    assert cfg.method.rcs.min_pixels == 50 and cfg.method.mic.block_size == 16 and cfg.method.teacher.alpha == 0.99
    assert cfg.model.decode_head is None
    # and a CUT pre-training section written flat
    cut = load_config("synthetic/cut").to_dict()
    cut["method"] = {"name": "cut", "ngf": 8, "init_from": None, "d_step": "joint"}
    got = load_config(None, base=cut, base_version=1).method.cut
    assert (got.ngf, got.init, got.d_step) == (8, None, "joint")


def test_version_1_checkpoint_resumes_with_renamed_state(tiny_synth, tmp_path):
    """A DAFormer run checkpointed by the previous version (method state `imagenet.*`, flat method
    keys) resumes into today's layout (`fd.imagenet.*`) and finishes."""
    from segadapt.engine.trainer import train_from_config

    out = tmp_path / "daformer"
    cfg = load_config("synthetic/daformer", tiny_overrides(tiny_synth, out, **{"method.rcs.min_pixels": 8,
                                                                               "train.iters": 3,
                                                                               "train.ckpt_every": 3}))
    train_from_config(cfg, progress=False)
    ckpt = torch.load(out / "last.pth", weights_only=False)
    frozen = {k: v for k, v in ckpt["method"].items() if k.startswith("fd.imagenet.")}
    assert frozen
    ckpt["version"] = 1
    ckpt["method"] = {("imagenet." + k[len("fd.imagenet."):] if k in frozen else k): v
                      for k, v in ckpt["method"].items()}
    ckpt["config"]["method"] = dict(OLD_DAFORMER_METHOD, fd_lambda=0.005, fd_classes=cfg.method.fd.classes,
                                    mic=False, pseudo_threshold=0.968, ema_alpha=0.999, rcs_min_pixels=8,
                                    mic_block_size=64)
    torch.save(ckpt, out / "last.pth")
    assert main(["train", "--no-progress", "--resume", str(out), "train.iters=4"]) == 0
    final = torch.load(out / "final.pth", weights_only=False)
    assert final["iteration"] == 4 and final["version"] == 3
    # a format-1 run continues with the defaults it started with (those that changed since)
    method = final["config"]["method"]
    assert method["mix"]["classes"] == "image" and method["augment"]["jitter"] == "kornia_0.6"
    assert method["teacher"]["scale_ignored_rows"] is True
    # the frozen ImageNet copy came back under its new keys (and, frozen, is unchanged)
    assert all(torch.equal(final["method"][k], v) for k, v in frozen.items())
    assert final["config"]["method"]["fd"]["enabled"] is True


def test_no_packaged_config_uses_a_renamed_key():
    for name in packaged_config_names():
        cfg = load_config(name)
        assert not set(dataclasses.asdict(cfg.method)) & set(type(cfg.method).RENAMED), name


# --------------------------------------------------------------------------- a new method plugs in
def test_a_new_method_plugs_in_with_its_config_and_mic(tiny_synth, tmp_path):
    """The README's recipe: a config dataclass, a step with one stage, registered by name; the
    config loader validates its keys, and MIC works on it like on the built-in methods."""
    from dataclasses import dataclass

    from segadapt.engine.trainer import train_from_config
    from segadapt.methods import register_method
    from segadapt.methods.base import SegmentationMethodConfig, UDAMethod
    from segadapt.methods.losses import entropy_loss, segmentation_loss, upsample
    from segadapt.registry import METHODS

    @dataclass
    class TinyEntropyConfig(SegmentationMethodConfig):
        name: str = "tiny_entropy"
        weight: float = 0.01

    @register_method("tiny_entropy")
    class TinyEntropy(UDAMethod):
        Config = TinyEntropyConfig

        def training_step(self, batch, it, ctx):
            src, tgt = batch["source"], batch["target"]
            losses = ctx.end_stage(segmentation_loss(self.model(src["image"]), src["label"],
                                                     self.cfg.model.aux_weight))
            out = self.model(tgt["image"])["main"]
            losses["loss_ent"] = self.mcfg.weight * entropy_loss(upsample(out, tgt["image"].shape[-2:]))
            return losses

    try:
        with pytest.raises(ConfigError, match="did you mean 'method.weight'"):
            load_config("synthetic/source_only", ["method.name=tiny_entropy", "method.wieght=1"])
        out = tmp_path / "run"
        cfg = load_config("synthetic/source_only", tiny_overrides(tiny_synth, out, **{
            "method.name": "tiny_entropy", "method.weight": 0.5, "method.mic": "true", "method.mic.block_size": 8,
            "train.iters": 2, "train.log_every": 1, "train.ckpt_every": 2}))
        assert type(cfg.method) is TinyEntropyConfig and cfg.method.weight == 0.5
        train_from_config(cfg, progress=False)
        logged = (out / "metrics.jsonl").read_text()
        assert "loss_ent" in logged and "loss_mic" in logged
    finally:
        METHODS._entries.pop("tiny_entropy", None)
