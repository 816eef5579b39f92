"""The encoder-decoder segmenter (MiT / DINOv2 ViT + DAFormer or linear head) behind the same
interface as DeepLabV2: building from configs, features by level, checkpoints by path,
optimizer groups, the EMA teacher, and one training step of each self-training method."""
import json

import pytest
import torch

from segadapt.config import OptimConfig, load_config
from segadapt.optim import build_optimizer, layer_decay_groups
from segadapt.engine.trainer import Trainer
from segadapt.errors import CheckpointError, ConfigError
from segadapt.methods.components.feature_distance import FrozenBackbone
from segadapt.methods.components.teacher import MeanTeacher
from segadapt.models.checkpoints import load_pretrained
from segadapt.models.mit import build_mit
from segadapt.models import model_config
from segadapt.models.segmenter import EncoderDecoder, build_segmenter
from segadapt.models.vit import build_dinov2

from .conftest import tiny_overrides

TINY_MIT = dict(arch="encoder_decoder", backbone="mit_b0", embed_dims=[8, 16, 40, 64], head_channels=16, aux=False,
                normalization="imagenet_rgb", num_classes=5)
TINY_VIT = dict(arch="encoder_decoder", backbone="dinov2_vits14", embed_dims=[32], vit_depth=4, vit_heads=2,
                head_channels=16, aux=False, normalization="imagenet_rgb", num_classes=5)


def _mit(**kw):
    torch.manual_seed(0)
    return build_segmenter(model_config(**{**TINY_MIT, **kw}))


def _vit(**kw):
    torch.manual_seed(0)
    return build_segmenter(model_config(**{**TINY_VIT, **kw}))


# --------------------------------------------------------------------------- interface
def test_mit_segmenter_outputs_and_levels():
    m = _mit().eval()
    x = torch.rand(2, 3, 64, 96)
    out = m(x, return_features=True)
    assert set(out) == {"main", "features"}
    assert out["main"].shape == (2, 5, 16, 24)  # DAFormer head: stride 4 (the finest level)
    assert out["features"].shape == (2, 64, 2, 3) and m.feature_channels == 64 and m.feature_stride == 32
    levels = m.extract_features(x)
    assert [tuple(f.shape[1:]) for f in levels] == [(8, 16, 24), (16, 8, 12), (40, 4, 6), (64, 2, 3)]
    assert torch.equal(levels[-1], out["features"])
    assert set(m.state_dict()) == {f"backbone.{k}" for k in m.backbone.state_dict()} | \
        {f"decode_head.{k}" for k in m.decode_head.state_dict()}


def test_vit_segmenter_outputs_and_linear_head():
    m = _vit().eval()
    out = m(torch.rand(1, 3, 56, 84), return_features=True)
    assert out["main"].shape == (1, 5, 4, 6) and out["features"].shape == (1, 32, 4, 6)
    lin = _vit(decode_head="linear").eval()
    assert set(lin.decode_head.state_dict()) >= {"conv_seg.weight", "bn.running_mean"}
    assert lin(torch.rand(1, 3, 56, 84))["main"].shape == (1, 5, 4, 6)


def test_bad_model_configs_are_one_line_errors():
    for cfg, msg in [
        ({**TINY_MIT, "backbone": "resnet18"}, "is a ResNet: use model.arch=deeplabv2"),
        ({**TINY_MIT, "aux": True}, "only the DeepLabV2 head"),
        ({**TINY_MIT, "backbone": "mobilenetv2", "embed_dims": [8]}, "does not apply to mobilenetv2"),
        ({**TINY_MIT, "backbone": "mobilenetv2", "embed_dims": None, "output_stride": 4}, "8, 16 or 32"),
        ({**TINY_MIT, "backbone": "mit_b9"}, "unknown backbone 'mit_b9'"),
        ({**TINY_MIT, "decode_head": "uper"}, "unknown decode head 'uper'"),
        ({**TINY_MIT, "embed_dims": [8, 16, 41, 64]}, "multiple"),
        ({**TINY_MIT, "arch": "segformer"}, "unknown architecture"),
        ({"arch": "deeplabv2", "backbone": "mit_b0"}, "is a MiT: use model.arch=encoder_decoder"),
        ({**TINY_VIT, "embed_dims": [32, 64]}, "one width"),
    ]:
        with pytest.raises(ConfigError, match=msg) as e:
            build_segmenter(model_config(**cfg))
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- checkpoints
def test_published_mit_file_loads_into_the_backbone(tmp_path):
    torch.manual_seed(1)
    published = build_mit("mit_b0", embed_dims=[8, 16, 40, 64]).state_dict()  # independent instance
    published = {**published, "head.weight": torch.randn(1000, 64), "head.bias": torch.randn(1000)}
    torch.save(published, tmp_path / "mit_b0.pth")
    m = _mit(pretrained=str(tmp_path / "mit_b0.pth"))
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, published[k]), k
    fresh = _mit()
    assert all(torch.equal(v, fresh.decode_head.state_dict()[k]) for k, v in m.decode_head.state_dict().items())


def test_mmseg_segmentor_and_uda_checkpoints_load_exactly(tmp_path):
    torch.manual_seed(2)
    src = _mit()
    for p in src.parameters():
        p.data.normal_()
    sd = src.state_dict()
    torch.save({"meta": {"iter": 40000}, "state_dict": sd}, tmp_path / "daformer.pth")
    uda = {f"model.{k}": v for k, v in sd.items()}
    uda.update({f"ema_model.{k}": torch.zeros_like(v) for k, v in sd.items()})
    uda.update({f"imnet_model.{k}": torch.zeros_like(v) for k, v in sd.items() if k.startswith("backbone.")})
    torch.save({"state_dict": uda}, tmp_path / "uda.pth")
    for name in ("daformer.pth", "uda.pth"):
        m = _mit()
        rep = load_pretrained(m, tmp_path / name, strict_head=True)
        assert rep.format == "mmseg" and rep.missing == []
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_published_dinov2_file_loads(tmp_path):
    torch.manual_seed(3)
    published = build_dinov2("vits14", embed_dim=32, depth=4, num_heads=2).state_dict()
    torch.save(published, tmp_path / "dinov2_vits14_pretrain.pth")
    m = _vit(pretrained=str(tmp_path / "dinov2_vits14_pretrain.pth"))
    assert all(torch.equal(v, published[k]) for k, v in m.backbone.state_dict().items())


def test_wrong_files_are_refused(tmp_path):
    resnet = build_segmenter(model_config(**{"arch": "deeplabv2", "backbone": "resnet18", "base_width": 8, "num_classes": 5}))
    torch.save(resnet.state_dict(), tmp_path / "advent.pth")
    with pytest.raises(CheckpointError, match="advent.pth .* does not match the model"):
        load_pretrained(_mit(), tmp_path / "advent.pth")
    torch.save(_vit().state_dict(), tmp_path / "vit_segmentor.pth")
    with pytest.raises(CheckpointError, match="vit_segmentor.pth"):
        load_pretrained(_mit(), tmp_path / "vit_segmentor.pth")
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in build_mit("mit_b0").state_dict().items()}},
               tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="file .* vs model"):
        load_pretrained(_mit(), tmp_path / "wide.pth")


# --------------------------------------------------------------------------- method-facing parts
def test_frozen_backbone_copy_returns_last_level_and_drops_the_head():
    m = _mit().eval()
    frozen = FrozenBackbone(m)
    assert frozen.trunk.decode_head is None and not any(p.requires_grad for p in frozen.parameters())
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(frozen(x), m(x, return_features=True)["features"])


@pytest.mark.parametrize("build", [_mit, _vit])
def test_teacher_switches_stochastic_layers_off_only(build):
    student = build(drop_path_rate=0.5).train()
    teacher = MeanTeacher(student, norm_mode="batch")
    mods = list(teacher.ema.modules())
    stochastic = [m for m in mods if type(m).__name__ in ("DropPath", "Dropout2d")]
    assert stochastic and not any(m.training for m in stochastic)
    bns = [m for m in mods if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)  # the head's BN still on batch statistics
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(teacher.ema(x)["main"], teacher.ema(x)["main"])  # deterministic


def test_layer_decay_groups_for_a_vit():
    m = _vit()
    named = [(n, p) for n, p in m.named_parameters() if n.startswith("backbone.")]
    groups = layer_decay_groups(m, named, 0.5)
    mult = {n: g["lr_mult"] for g in groups for n, _ in g["params"]}
    depth = 4
    assert mult["backbone.patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    assert mult["backbone.cls_token"] == 0.5 ** (depth + 1)
    assert mult["backbone.blocks.0.attn.qkv.weight"] == 0.5 ** depth
    assert mult["backbone.blocks.3.mlp.fc2.weight"] == 0.5
    assert mult["backbone.norm.weight"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(named)
    with pytest.raises(ConfigError, match="numbered layers"):
        layer_decay_groups(_mit(), [(n, p) for n, p in _mit().named_parameters()], 0.5)


def test_no_decay_keys_follow_mmcv_custom_keys():
    m = _mit()
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01, no_decay_keys=["norm", "pos_block"])
    named = list(m.named_parameters())
    opt = build_optimizer(cfg, [{"params": named, "lr_mult": 1.0}], 10).optimizer
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for n, p in named:
        assert by_id[id(p)] == (0.0 if "norm" in n else 0.01), n
    # the DAFormer head's BatchNorm is named `bn`: decayed, as mmcv's 'norm' key does not match it
    assert by_id[id(m.decode_head.fuse_layer.bottleneck.bn.weight)] == 0.01
    with pytest.raises(ConfigError, match="no_decay_keys replaces"):
        OptimConfig(name="adamw", no_decay_keys=["norm"], no_decay_norm=True)


# --------------------------------------------------------------------------- through the trainer
@pytest.mark.parametrize("name", ["synthetic/source_only", "synthetic/daformer", "synthetic/dacs"])
def test_tiny_run_on_a_mit(tiny_synth, tmp_path, name):
    extra = {"model.arch": "encoder_decoder", "model.backbone": "mit_b0", "model.embed_dims": "[8, 16, 40, 64]",
             "model.head_channels": 16, "model.aux": "false", "train.iters": 2, "train.ckpt_every": 2}
    if "daformer" in name:
        extra.update({"method.rcs.min_pixels": 8, "method.mic": "true", "method.mic.block_size": 8})
    cfg = load_config(name, tiny_overrides(tiny_synth, tmp_path / "run", **extra))
    trainer = Trainer(cfg, progress=False)
    assert isinstance(trainer.method.model, EncoderDecoder)
    trainer.train()
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert ("loss_fd" in keys) == ("daformer" in name)
    assert ("loss_mic" in keys) == ("daformer" in name)
    assert (tmp_path / "run" / "final.pth").is_file()


@pytest.mark.parametrize("bench", ["gta5_cityscapes", "synthia_cityscapes"])
def test_published_configs_build_the_published_networks(bench):
    with torch.device("meta"):
        daformer = build_segmenter(load_config(f"{bench}/daformer_mitb5").model)
        vitl = build_segmenter(load_config(f"{bench}/daformer_dinov2_vitl").model)
    n = sum(p.numel() for p in daformer.parameters())
    assert round(n / 1e6, 1) == 85.2  # DAFormer paper, Table 6: MiT-B5 + DAFormer head, 85.2M
    assert len(daformer.backbone.block3) == 40 and daformer.backbone.drop_path_rates[-1] == pytest.approx(0.1)
    assert vitl.backbone.depth == 24 and vitl.feature_channels == 1024 and vitl.num_layers == 24
    for name in ("confeti_mitb5", "mic_daformer_mitb5"):
        cfg = load_config(f"{bench}/{name}")
        assert cfg.model.backbone == "mit_b5" and cfg.optim.no_decay_keys == ["norm", "pos_block"]
    assert load_config(f"{bench}/mic_daformer_mitb5").method.mic.enabled is True


MIT_OVERRIDES = {"model.arch": "encoder_decoder", "model.backbone": "mit_b0", "model.embed_dims": "[8, 16, 40, 64]",
                 "model.head_channels": 16, "model.aux": "false", "model.drop_path_rate": 0.2,
                 "method.rcs.min_pixels": 8, "method.mic": "true", "method.mic.block_size": 8}


def test_resumed_mit_daformer_mic_run_equals_uninterrupted(tiny_synth, tmp_path, monkeypatch):
    from segadapt.engine.trainer import train_from_config
    from segadapt.methods.self_training import DAFormer

    from .conftest import assert_resumed_run_equal, kill_and_resume

    def cfg(out):
        return load_config("synthetic/daformer", tiny_overrides(tiny_synth, out, **MIT_OVERRIDES))

    train_from_config(cfg(tmp_path / "a"), progress=False)  # drop path, MIC masks: all from checkpointed RNG
    ref = torch.load(tmp_path / "a" / "final.pth", weights_only=False)
    _, got = kill_and_resume(monkeypatch, DAFormer, cfg(tmp_path / "b"), 4, 3)
    assert_resumed_run_equal(ref, got)


def test_mit_run_through_test_and_export_commands(tiny_synth, tmp_path):
    from segadapt.cli import main

    run = tmp_path / "run"
    cfg = load_config("synthetic/source_only", tiny_overrides(tiny_synth, run, **{
        k: v for k, v in MIT_OVERRIDES.items() if k.startswith("model.")}, **{"train.iters": 2}))
    Trainer(cfg, progress=False).train()
    assert main(["test", str(run), "--out", str(tmp_path / "test")]) == 0
    result = json.loads((tmp_path / "test" / "results.json").read_text())
    assert 0.0 <= result["miou"] <= 100.0
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "mit.pt"),
                 "--size", "64", "32"]) == 0
    assert (tmp_path / "mit.pt").is_file()


MOBILENETV2 = {"model.backbone": "mobilenetv2", "model.decode_head": "aspp", "model.aux": "true"}
BACKBONES = {
    "mit": {"model.backbone": "mit_b0", "model.embed_dims": "[8, 16, 40, 64]", "model.head_channels": 16,
            "model.aux": "false"},
    "vit": {"model.backbone": "dinov2_vits14", "model.embed_dims": "[16]", "model.vit_depth": 2,
            "model.vit_heads": 2, "model.decode_head": "linear", "model.aux": "false"},
    "mobilenetv2": MOBILENETV2,
    # the pretrained track trains channels-last: every method's reshapes must accept that layout
    "mobilenetv2_channels_last": {**MOBILENETV2, "train.channels_last": "true"},
}
METHODS = {
    "synthetic/minent": {},
    "synthetic/advent": {"method.disc_width": 8},
    "synthetic/cfcontra": {"method.contrast.init_source_batches": 1, "method.contrast.init_target_batches": 1,
                           "method.contrast.start_iter": 0},
    "synthetic/confeti_stage1": {"method.cut.init": "null", "method.cut.ngf": 4, "method.cut.ndf": 4,
                                 "method.cut.n_blocks": 2, "method.cut.nce_layers": "[0, 4]",
                                 "method.cut.num_patches": 16, "method.cut.nce_dim": 8, "method.cam_mix_start": 0,
                                 "method.contrast_start": 0, "method.cross_domain_start": 0,
                                 "method.rcs.min_pixels": 8, "method.mic": "true", "method.mic.block_size": 8},
}


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_on_every_backbone(tiny_synth, tmp_path, name, backbone):
    extra = {"model.arch": "encoder_decoder", **BACKBONES[backbone], **METHODS[name], "train.iters": 1,
             "train.ckpt_every": 1}
    cfg = load_config(name, tiny_overrides(tiny_synth, tmp_path / "run", **extra))
    trainer = Trainer(cfg, progress=False)
    before = {k: v.clone() for k, v in trainer.method.model.state_dict().items()}
    trainer.train()
    after = trainer.method.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(v == v for row in logged for k, v in row.items() if k.startswith("loss"))  # finite


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_daformer_mitb5_checkpoint_from_an_independent_key_list_loads_exactly():
    """A DAFormer UDA checkpoint's layout written from the published configs (test_mit's and
    test_decode_heads' generators, not our modules) loads into the daformer_mitb5 config's network
    with nothing missing, unexpected or reshaped; so does the mit_b5.pth ImageNet file."""
    from segadapt.models.checkpoints import extract_state_dict, load_state_dict_checked

    from .test_decode_heads import _daformer_published_shapes
    from .test_mit import published_shapes

    segmentor = {f"backbone.{k}": s for k, s in published_shapes("mit_b5").items()}
    segmentor.update({f"decode_head.{k}": s for k, s in _daformer_published_shapes().items()})
    uda = {f"{w}.{k}": torch.empty(s, device="meta") for w in ("model", "ema_model") for k, s in segmentor.items()}
    uda.update({f"imnet_model.{k}": torch.empty(s, device="meta") for k, s in segmentor.items()
                if k.startswith("backbone.")})
    with torch.device("meta"):
        model = build_segmenter(load_config("gta5_cityscapes/daformer_mitb5").model)
    sd, fmt = extract_state_dict({"state_dict": uda, "meta": {"iter": 40000}}, "daformer.pth")
    rep = load_state_dict_checked(model, sd, fmt, path="daformer.pth", strict_head=True)
    assert fmt == "mmseg" and rep.missing == [] and rep.skipped == []
    assert len(rep.loaded) == len(segmentor) == len(model.state_dict())

    imagenet = {k: torch.empty(s, device="meta") for k, s in published_shapes("mit_b5").items()}
    imagenet.update({"head.weight": torch.empty(1000, 512, device="meta"), "head.bias": torch.empty(1000, device="meta")})
    sd, fmt = extract_state_dict(imagenet, "mit_b5.pth")
    rep = load_state_dict_checked(model, sd, fmt, path="mit_b5.pth")
    assert rep.format == "pretrained_backbone" and sorted(rep.skipped) == [] and \
        {k for k in rep.loaded} == {f"backbone.{k}" for k in published_shapes("mit_b5")}


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_dinov2_vitl_file_from_an_independent_key_list_loads_into_its_config():
    from segadapt.models.checkpoints import extract_state_dict, load_state_dict_checked

    from .test_vit import published_shapes

    published = {k: torch.empty(s, device="meta") for k, s in published_shapes(1024, 24).items()}
    with torch.device("meta"):
        model = build_segmenter(load_config("gta5_cityscapes/daformer_dinov2_vitl").model)
    sd, fmt = extract_state_dict(published, "dinov2_vitl14_pretrain.pth")
    rep = load_state_dict_checked(model, sd, fmt, path="dinov2_vitl14_pretrain.pth")
    assert rep.format == "pretrained_backbone" and set(rep.loaded) == {f"backbone.{k}" for k in published}
    assert set(rep.missing) == {k for k in model.state_dict() if k.startswith("decode_head.")
                                and not k.endswith("num_batches_tracked")}


def test_backbone_only_files_are_refused_as_trained_segmenters(tmp_path):
    from segadapt.engine.predictor import load_segmenter

    torch.save(build_mit("mit_b0", embed_dims=[8, 16, 40, 64]).state_dict(), tmp_path / "mit_b0.pth")
    cfg = tmp_path / "model.yaml"
    cfg.write_text("_base_: " + str(__import__("segadapt.config", fromlist=["x"]).resolve_config_path(
        "synthetic/source_only")) + "\nmodel: {arch: encoder_decoder, backbone: mit_b0, embed_dims: [8, 16, 40, 64], "
        "head_channels: 16, aux: false}\n")
    with pytest.raises(CheckpointError, match="mit_b0.pth is an initialisation file .*not a trained segmenter"):
        load_segmenter(tmp_path / "mit_b0.pth", str(cfg))
    m = _mit()
    assert m.output_stride == 4 and _vit().output_stride == 14
    assert build_segmenter(model_config(**{**TINY_MIT, "backbone": "mobilenetv2", "embed_dims": None, "decode_head": "aspp",
                            "output_stride": 16})).output_stride == 16
    for bad, msg in [({"pretrained": "installed"}, "offline MobileNetV2 weights"),
                     ({"bn_mode": "eval"}, "bn_mode: applies to arch deeplabv2 only")]:
        with pytest.raises(ConfigError, match=msg):
            _mit(**bad)


def test_confeti_frozen_student_target_is_deterministic_on_a_transformer(tiny_synth, tmp_path):
    cfg = load_config("synthetic/confeti_stage1", tiny_overrides(tiny_synth, tmp_path / "run", **{
        "model.arch": "encoder_decoder", **BACKBONES["mit"], "model.drop_path_rate": 0.5,
        **METHODS["synthetic/confeti_stage1"]}))
    method = Trainer(cfg, progress=False).method.train()
    x = torch.rand(2, 3, 32, 64)
    a, b = method._frozen_student_features(x), method._frozen_student_features(x)
    assert torch.equal(a, b) and a.shape == (2, 64, 1, 2)
    assert all(m.training for m in method.model.modules())  # switched back afterwards
