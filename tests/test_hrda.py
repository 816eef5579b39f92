"""HRDA: the fusion, crops, slide inference and losses on hand-made tensors, the model around
every backbone, published-layout checkpoints, the pseudo-label margins, and training through the
trainer with an exact resume. (The fusion, the slide inference and the crop offsets were also
checked against the HRDA reference's own HRDAHead / HRDAEncoderDecoder code on identical tensors:
equal to 3e-8, docs/methods.md.)"""
import json
import math

import numpy as np
import pytest
import torch

from segadapt.config import load_config
from segadapt.errors import CheckpointError, ConfigError
from segadapt.methods.losses import pseudo_label_losses, segmentation_loss
from segadapt.models import model_config
from segadapt.models.hrda import HRDAEncoderDecoder, exact_grid, random_detail_box, slide_boxes
from segadapt.models.segmenter import build_segmenter

from .conftest import tiny_overrides

TINY_MIT = dict(backbone="mit_b0", embed_dims=[8, 16, 40, 64], head_channels=16)
HRDA = {"enabled": True, "detail_crop": [32, 32], "attention_channels": 16}


def tiny_hrda(**kw):
    return build_segmenter(model_config(**{**TINY_MIT, "hrda": HRDA, **kw}))


# --------------------------------------------------------------------------- pieces by hand
def test_fusion_by_hand():
    """Context logits at stride 8 of a 16x16 input (2x2), detail at stride 4 of an 8x8 crop at
    (8, 16, 0, 8) (2x2 logits), attention 0.25 everywhere, zero outside the crop."""
    head = tiny_hrda().decode_head
    head.os, head.context_scale = 4, 0.5
    context = torch.full((1, 1, 2, 2), 4.0)
    detail = torch.full((1, 1, 2, 2), 8.0)
    att = torch.full((1, 1, 2, 2), 0.25)
    fused, ctx = head.fuse(context, detail, att, box=(8, 16, 0, 8))
    # attention kept only at context cell (1, 0) (the crop covers input rows 8..15, columns 0..7)
    assert ctx.flatten().tolist() == [4.0, 4.0, 3.0, 4.0]
    # upsampled x2 (bilinear, align_corners False); the detail enters the bottom-left 2x2 quarter
    up_ctx = torch.nn.functional.interpolate(ctx, scale_factor=2, mode="bilinear", align_corners=False)
    up_att = torch.nn.functional.interpolate(att * torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]]]), scale_factor=2,
                                             mode="bilinear", align_corners=False)
    inserted = torch.zeros(1, 1, 4, 4)
    inserted[:, :, 2:4, 0:2] = 8.0
    assert torch.allclose(fused, up_att * inserted + up_ctx)
    assert fused[0, 0, 3, 0] == pytest.approx(0.25 * 8 + 3.0)  # inside: attention-weighted detail + context
    assert fused[0, 0, 0, 3] == pytest.approx(4.0)  # far outside: the context alone


def test_detail_boxes_and_slide_windows():
    torch.manual_seed(0)
    boxes = {random_detail_box(64, 96, (32, 32), 8) for _ in range(2000)}
    # offsets k * 8 for k < (margin + 1) // 8, as the reference's get_crop_bbox (the far edge, 32
    # and 64 here, is not reached when the margin is a multiple of 8)
    assert {b[0] for b in boxes} == {0, 8, 16, 24} and {b[2] for b in boxes} == set(range(0, 57, 8))
    assert all(b[1] - b[0] == 32 and b[3] - b[2] == 32 for b in boxes)
    assert random_detail_box(32, 32, (32, 32), 8) == (0, 32, 0, 32)
    # stride half a window; the last window flush with the border
    assert slide_boxes(64, 96, (32, 32), overlap=True) == [
        (y, y + 32, x, x + 32) for y in (0, 16, 32) for x in (0, 16, 32, 48, 64)]
    assert slide_boxes(40, 32, (32, 32), overlap=False) == [(0, 32, 0, 32), (8, 40, 0, 32)]


def test_exact_grid_drops_the_ceil_mode_cell():
    logits = torch.zeros(1, 1, 9, 17)  # ADVENT's Caffe ResNet on 64x128: one cell too many
    assert exact_grid(logits, (64, 128), 8).shape[-2:] == (8, 16)
    with pytest.raises(ValueError):
        exact_grid(torch.zeros(1, 1, 7, 16), (64, 128), 8)


def test_losses_split_fused_and_detail_by_hand():
    """Fused logits on the whole 2x4 label times 0.9, detail logits on its (0, 2, 2, 4) crop times 0.1."""
    labels = torch.tensor([[[0, 1, 0, 1], [1, 1, 0, 0]]])
    fused = torch.zeros(1, 2, 2, 4)  # uniform: CE ln 2 everywhere
    detail = torch.tensor([[[[math.log(3.0), 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, math.log(3.0)]]]])
    out = {"main": fused, "detail": detail, "detail_box": (0, 2, 2, 4), "detail_weight": 0.1}
    losses = segmentation_loss(out, labels, 0.1, align_corners=False)
    assert losses["loss_seg_main"].item() == pytest.approx(0.9 * math.log(2))
    # crop labels [[0, 1], [0, 0]]: pixel (0,0) class 0 with logits (ln3, 0) -> ln(4/3); (0,1) class 1,
    # logits (0, 0) -> ln 2; (1,0) class 0 (0, 0) -> ln 2; (1,1) class 0, logits (0, ln3) -> ln 4
    detail_ce = (math.log(4 / 3) + 2 * math.log(2) + math.log(4)) / 4
    assert losses["loss_seg_detail"].item() == pytest.approx(0.1 * detail_ce)
    # pixel weights are cropped the same way
    weights = torch.tensor([[[1.0, 1.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]]])
    w = pseudo_label_losses(out, labels, weights, 0.1, "loss_mix_main", "loss_mix_aux")
    weighted = (0 * math.log(4 / 3) + 2 * math.log(2) + math.log(2) + math.log(4)) / 4
    assert w["loss_mix_detail"].item() == pytest.approx(0.1 * weighted)
    assert w["loss_mix_main"].item() == pytest.approx(0.9 * math.log(2) * weights.mean().item())


# --------------------------------------------------------------------------- the model
@pytest.mark.parametrize("kw", [dict(TINY_MIT), dict(backbone="resnet18", base_width=8),
                                dict(backbone="resnet18", base_width=8, resnet_style="v1c"),
                                dict(backbone="dinov2_vits14", embed_dims=[24], vit_depth=4, vit_heads=2,
                                     head_channels=16)])
def test_every_backbone_trains_and_infers_at_two_resolutions(kw):
    divisible = 28 if kw["backbone"].startswith("dinov2") else (16 if kw["backbone"].startswith("resnet") else 8)
    crop = [56, 56] if divisible == 28 else [32, 32]
    model = build_segmenter(model_config(**{**kw, "hrda": {**HRDA, "detail_crop": crop,
                                                              "crop_divisible": divisible}}))
    assert isinstance(model, HRDAEncoderDecoder)
    h, w = (112, 168) if divisible == 28 else (64, 96)
    x = torch.rand(2, 3, h, w)
    model.train()
    out = model(x, return_features=True)
    s = model.output_stride
    assert out["main"].shape == (2, 19, h // s, w // s)
    assert out["detail"].shape == (2, 19, crop[1] // s, crop[0] // s)
    y1, y2, x1, x2 = out["detail_box"]
    assert (y2 - y1, x2 - x1) == (crop[1], crop[0]) and y1 % divisible == 0 and x1 % divisible == 0
    assert out["features"].shape[1] == model.feature_channels
    assert model.feature_stride == round(model.backbone.strides[-1] / 0.5)  # the context's features
    model.eval()
    assert model(x)["main"].shape == (2, 19, h // s, w // s)
    # a teacher in training mode (stochastic layers off, as MeanTeacher keeps them) predicts with the
    # slide inference, not a random crop
    from segadapt.methods.components.teacher import is_stochastic_layer

    model.train()
    for layer in model.modules():
        if is_stochastic_layer(layer):
            layer.eval()
    torch.manual_seed(1)
    a = model.infer(x)["main"]
    torch.manual_seed(2)
    assert torch.equal(a, model.infer(x)["main"])


def test_published_layout_loads_by_path_and_other_layouts_are_named(tmp_path):
    from segadapt.models.checkpoints import load_pretrained

    m = tiny_hrda()
    keys = set(m.state_dict())
    assert any(k.startswith("decode_head.head.fuse_layer.aspp_modules.") for k in keys)
    assert {"decode_head.scale_attention.fuse_layer.conv.weight", "decode_head.scale_attention.fuse_layer.bn.weight",
            "decode_head.scale_attention.conv_seg.weight"} <= keys  # the 1x1 fusion of HRDA's attention head
    # a MIC/HRDA UDA checkpoint: its `model.` student loads, ema/imnet copies ignored
    sd = {k: (v + 1 if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    uda = {"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, **{f"ema_model.{k}": v for k, v in sd.items()}}}
    torch.save(uda, tmp_path / "mic.pth")
    fresh = tiny_hrda()
    load_pretrained(fresh, tmp_path / "mic.pth", strict_head=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    # an HRDA checkpoint evaluated as a plain DAFormer (and the reverse): one line naming the switch
    from segadapt.models.checkpoints import extract_state_dict, load_state_dict_checked

    plain = build_segmenter(model_config(**TINY_MIT))
    file_sd, fmt = extract_state_dict(uda, "mic.pth")
    with pytest.raises(CheckpointError, match="an HRDA checkpoint: set model.hrda.enabled=true") as e:
        load_state_dict_checked(plain, file_sd, fmt, path="mic.pth", strict_head=True, trained=True)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="single-resolution checkpoint"):
        load_state_dict_checked(tiny_hrda(), {f"{k}": v for k, v in plain.state_dict().items()}, "segadapt",
                                path="plain.pth", strict_head=True, trained=True)


@pytest.mark.parametrize("overrides, needle", [
    (["model.hrda.detail_crop=[512,256]"], "larger than the source training crop"),
    (["source.crop=[200,100]"], "does not divide the source training crop"),
    (["model.hrda.crop_divisible=8"], "must be a multiple of the output stride / context scale (8 / 0.5 = 16)"),
    (["model.hrda.detail_crop=[120,64]"], "multiples of model.hrda.crop_divisible"),
    (["model.aux=true"], "HRDA trains without the auxiliary classifier"),
    (["model.hrda.detail_loss_weight=1.0"], "sum below 1"),
])
def test_bad_hrda_settings_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("synthetic/hrda_daformer", overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- pseudo-label margins
def test_pseudo_margins_follow_resize_crop_and_flip(tiny_synth):
    from segadapt.config import DatasetConfig
    from segadapt.data.datasets import build_dataset

    cfg = DatasetConfig(kind="cityscapes", root=str(tiny_synth / "target"), split="train", labels=False,
                        pseudo_margins=[2, 8, 4, 4])
    ds = build_dataset(cfg)
    mask = ds[0]["valid_pseudo_mask"]  # 64x32 image, no resize or crop
    assert mask.shape == (32, 64) and "label" not in ds[0]
    assert mask[:2].sum() == 0 and mask[-8:].sum() == 0 and mask[:, :4].sum() == 0 and mask[:, -4:].sum() == 0
    assert mask[2:24, 4:60].min() == 1
    # resized x2 then cropped: the margins scale with the image and move with the crop
    ds = build_dataset(DatasetConfig(kind="cityscapes", root=str(tiny_synth / "target"), split="train", labels=False,
                                     pseudo_margins=[2, 8, 4, 4], resize=[128, 64], resize_interpolation="bilinear",
                                     crop=[32, 32]))
    for seed in range(8):
        item = ds[(0, seed)]
        m = item["valid_pseudo_mask"]
        assert m.shape == (32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ConfigError, match="unlabelled target"):
        load_config("synthetic/daformer", ["source.pseudo_margins=[1,1,1,1]"])


def test_margins_zero_the_pseudo_label_weights():
    from segadapt.methods.components.teacher import TeacherConfig, pseudo_labels

    model = build_segmenter(model_config(**TINY_MIT)).eval()
    images = torch.rand(1, 3, 64, 64)
    valid = torch.ones(1, 64, 64)
    valid[:, :10] = 0
    p = pseudo_labels(model, images, TeacherConfig(pseudo_threshold=0.0), False, valid)
    assert (p.weights[:, :10] == 0).all() and (p.weights[:, 10:] == 1).all()


# --------------------------------------------------------------------------- through the trainer
def _cfg(tiny_synth, out, name="synthetic/hrda_daformer", **extra):
    base = {"model.hrda.detail_crop": "[32, 16]", "method.rcs.min_pixels": 8, "train.iters": 4, "train.ckpt_every": 3}
    return load_config(name, tiny_overrides(tiny_synth, out, **{**base, **extra}))


def test_hrda_daformer_trains_logs_the_detail_loss_and_resumes_exactly(tiny_synth, tmp_path, monkeypatch):
    from segadapt.engine.trainer import train_from_config
    from segadapt.methods.self_training import DAFormer

    from .conftest import assert_resumed_run_equal, kill_and_resume

    extra = {"method.mic": "true", "method.mic.block_size": 8, "method.teacher.pseudo_threshold": 0.0}
    train_from_config(_cfg(tiny_synth, tmp_path / "a", **extra), progress=False)
    logged = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert {"loss_src_main", "loss_src_detail", "loss_mix_detail", "loss_mic_detail"} <= keys
    assert "loss_src_aux" not in keys
    ref = torch.load(tmp_path / "a" / "final.pth", weights_only=False)
    assert any(k.startswith("decode_head.scale_attention.") for k in ref["model"])
    interrupted, got = kill_and_resume(monkeypatch, DAFormer, _cfg(tiny_synth, tmp_path / "b", **extra), 3, 3)
    assert_resumed_run_equal(ref, got)  # the detail crops come from the checkpointed generator
