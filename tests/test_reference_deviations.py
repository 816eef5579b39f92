"""The last deviations from the reference code, now the reference's behaviour by default with a
switch for our earlier variant: literal ignored rows, ClassMix classes drawn from the whole batch
(255 included), kornia's ColorJitter per version with a random order of its four operations,
mmcv's (OpenCV's) training resize, and CONFETI's CAM bias, start iterations and consistency
BatchNorm. Hand-computed cases; the values were also checked against kornia 0.5.8 / 0.6.7 and
OpenCV 4.8 / 5.1 on identical tensors (docs/methods.md)."""
import itertools

import numpy as np
import pytest
import torch

from segadapt.config import load_config
from segadapt.data.transforms import resize_cv2_linear, resize_image, resize_label, resize_label_cv2_nearest
from segadapt.methods.components.augment import (JITTER_OPS, AugmentConfig, StrongAugment, brightness_additive,
                                                  color_jitter, contrast_scale, saturation_hsv)
from segadapt.methods.components.classmix import ClassMix, MixConfig, batch_mix_classes, class_mix_mask
from segadapt.methods.components.teacher import PseudoLabels, pseudo_weight_map

from .conftest import tiny_overrides


# --------------------------------------------------------------------------- ignored rows
def test_ignored_rows_are_literal_row_counts():
    w = pseudo_weight_map(torch.tensor(0.5), (1, 200, 3), 15, 120)
    rows = w[0, :, 0]
    assert (rows[:15] == 0).all() and (rows[15:80] == 0.5).all() and (rows[80:] == 0).all()
    # the earlier variant: counts for 512-pixel crops scaled by H / 512 (15 * 0.5 = 7.5 -> 8, 60)
    s = pseudo_weight_map(torch.tensor(0.5), (1, 256, 3), 15, 120, scaled=True)[0, :, 0]
    assert (s[:8] == 0).all() and (s[8:196] == 0.5).all() and (s[196:] == 0).all()
    assert load_config("gta5_cityscapes/daformer").method.teacher.scale_ignored_rows is False


# --------------------------------------------------------------------------- ClassMix
def test_classmix_draws_half_the_batch_values_255_included():
    labels = torch.tensor([[[0, 0, 1, 255]], [[2, 2, 2, 2]]])  # the batch holds 0, 1, 2 and 255
    seen = {0: set(), 1: set()}
    img1_pasted = 0
    draws = 600
    g = torch.Generator().manual_seed(0)
    for _ in range(draws):
        chosen = batch_mix_classes(labels, 19, generator=g)
        assert chosen.shape == (2, 20) and chosen.sum(1).tolist() == [2, 2]  # ceil(4 / 2) per image
        for i in range(2):
            picked = {c if c < 19 else 255 for c in chosen[i].nonzero().flatten().tolist()}
            assert picked <= {0, 1, 2, 255}
            seen[i].add(tuple(sorted(picked)))
        mask = class_mix_mask(labels, chosen, 19)
        chosen0 = {c if c < 19 else 255 for c in chosen[0].nonzero().flatten().tolist()}
        assert mask[0, 0].tolist() == [float(v in chosen0) for v in (0, 0, 1, 255)]  # 255 pixels pasted too
        img1_pasted += int(mask[1].all())
    # every pair of the four values is drawn, for each image (uniform halves of the batch's values)
    assert seen[0] == seen[1] == set(itertools.combinations([0, 1, 2, 255], 2))
    assert abs(img1_pasted / draws - 0.5) < 0.08  # class 2 is in 3 of the 6 pairs
    # the earlier variant draws from each image's own classes, without 255
    assert load_config("gta5_cityscapes/daformer").method.mix.classes == "batch"


def test_classmix_mixes_labels_and_weights_with_the_batch_mask():
    mix = ClassMix(MixConfig(), StrongAugment(AugmentConfig(jitter_p=0.0, blur_p=0.0)), 19)
    src = torch.tensor([[[3, 255]]])
    pseudo = PseudoLabels(torch.tensor([[[7, 7]]]), torch.tensor([[[0.25, 0.25]]]), torch.tensor(0.25))
    torch.manual_seed(0)
    out = mix(torch.ones(1, 3, 1, 2), src, torch.zeros(1, 3, 1, 2), pseudo)
    m = out.mask[0, 0].tolist()
    assert sorted(m) in ([0.0, 1.0],)  # one of the two batch values (3, 255) pasted
    assert out.labels[0, 0].tolist() == [3 if m[0] else 7, 255 if m[1] else 7]
    assert out.weights[0, 0].tolist() == [1.0 if m[0] else 0.25, 1.0 if m[1] else 0.25]


# --------------------------------------------------------------------------- colour jitter
def test_kornia_05_operations_by_hand():
    x = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1)  # HSV (0, 0.5, 0.5)
    assert brightness_additive(x, torch.tensor([1.1])).flatten().tolist() == pytest.approx([0.6, 0.35, 0.35])
    assert contrast_scale(x, torch.tensor([0.8])).flatten().tolist() == pytest.approx([0.4, 0.2, 0.2])
    assert saturation_hsv(x, torch.tensor([0.5])).flatten().tolist() == pytest.approx([0.5, 0.375, 0.375])
    # kornia 0.6 (torchvision's): multiplicative brightness, contrast around the grey mean
    b06, c06 = JITTER_OPS["kornia_0.6"][:2]
    assert b06(x, torch.tensor([1.1])).flatten().tolist() == pytest.approx([0.55, 0.275, 0.275])
    gray = 0.299 * 0.5 + 0.587 * 0.25 + 0.114 * 0.25
    assert c06(x, torch.tensor([0.8])).flatten().tolist() == pytest.approx(
        [0.8 * v + 0.2 * gray for v in (0.5, 0.25, 0.25)])


def _replay(images, shared, order):
    """color_jitter's output and, from the same draws, each image composed in its drawn order."""
    torch.manual_seed(3)
    out = color_jitter(images, 0.2, 1.0, kind="kornia_0.5", order=order, shared_order=shared)
    torch.manual_seed(3)
    b = images.shape[0]
    torch.rand(1)  # whether to jitter (once per batch)
    u = [torch.rand(b) for _ in range(4)]
    factors = (0.8 + 0.4 * u[0], 0.8 + 0.4 * u[1], 0.8 + 0.4 * u[2], -0.2 + 0.4 * u[3])
    perms = torch.rand(1 if shared else b, 4).argsort(1).tolist()
    expected = []
    for i in range(b):
        y = images[i:i + 1]
        for k in perms[0 if shared else i]:
            y = JITTER_OPS["kornia_0.5"][k](y, factors[k][i:i + 1])
        expected.append(y)
    return out, torch.cat(expected), perms


def test_jitter_order_is_random_per_image_or_shared_by_the_batch():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 4, 5) * 0.8 + 0.1
    out, expected, perms = _replay(images, shared=False, order="random")
    assert torch.allclose(out, expected, atol=1e-6) and len({tuple(p) for p in perms}) > 1
    out, expected, perms = _replay(images, shared=True, order="random")  # MIC: one order for the batch
    assert torch.allclose(out, expected, atol=1e-6) and len(perms) == 1
    fixed = _replay(images, shared=False, order="fixed")[0]
    assert not torch.allclose(fixed, _replay(images, shared=False, order="random")[0])


def test_method_defaults_name_their_kornia():
    assert load_config("gta5_cityscapes/daformer").method.augment == AugmentConfig()  # kornia 0.5, random
    assert load_config("synthetic/minent_mic").method.augment.jitter == "kornia_0.5"  # MIC's kornia
    c = load_config("gta5_cityscapes/confeti_stage1").method.augment
    assert (c.jitter, c.jitter_order) == ("kornia_0.6", "random")


# --------------------------------------------------------------------------- resize
def test_opencv_linear_resize_by_hand():
    row = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    # 4 -> 2: half-pixel centres at 0.5 and 2.5; (0 + 100) / 2 = 50, (200 + 255) / 2 = 227.5 -> 228
    assert resize_cv2_linear(row, 2, 1).tolist() == [[50, 228]]
    # an exact halving is OpenCV's INTER_AREA: (1 + 2 + 3 + 5 + 2) >> 2 = 3
    assert resize_cv2_linear(np.array([[1, 2], [3, 5]], dtype=np.uint8), 1, 1).tolist() == [[3]]
    # upscaling does not antialias and keeps the border pixels
    up = resize_cv2_linear(np.array([[0, 200]], dtype=np.uint8), 4, 1)
    assert up.tolist() == [[0, 50, 150, 200]]
    # labels: OpenCV's nearest takes floor(x * W_in / W_out), not the pixel centre
    lab = np.arange(5, dtype=np.uint8)[None]
    assert resize_label_cv2_nearest(lab, (2, 1)).tolist() == [[0, 2]]
    assert resize_label(lab, (2, 1)).tolist() == [[1, 3]]


def test_bilinear_is_mmcv_and_pil_bilinear_is_the_earlier_variant():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ours = resize_image(img, (24, 16), "bilinear")
    assert np.array_equal(ours, resize_cv2_linear(img, 24, 16))
    pil = resize_image(img, (24, 16), "pil_bilinear")
    assert not np.array_equal(ours, pil)  # Pillow antialiases a downscale
    # a downscale without antialiasing keeps more high frequencies: higher variance
    assert ours.astype(float).std() > pil.astype(float).std()


# --------------------------------------------------------------------------- CONFETI
def _confeti(tiny_synth, tmp_path, name="synthetic/confeti_stage1", **extra):
    from segadapt.engine.trainer import Trainer

    from .test_confeti import TINY

    cfg = load_config(name, tiny_overrides(tiny_synth, tmp_path, **{**TINY, **extra}))
    return Trainer(cfg, progress=False)


def test_confeti_cam_has_no_bias_unless_asked(tiny_synth, tmp_path):
    t = _confeti(tiny_synth, tmp_path / "a")
    assert t.method.cam.bias is None and "cam.bias" not in t.method.state_dict()
    t2 = _confeti(tiny_synth, tmp_path / "b", **{"method.cam_bias": "true"})
    assert t2.method.cam.bias is not None  # older checkpoints (their configs get it from OLD_DEFAULTS)


def test_confeti_start_iterations_and_consistency_batchnorm(tiny_synth, tmp_path):
    from segadapt.methods import StepContext
    from segadapt.engine.trainer import move_to

    t = _confeti(tiny_synth, tmp_path / "a", **{"method.contrast_start": 5, "method.cam_mix_start": 0,
                                                 "method.cross_domain_start": 0})
    batch = {k: move_to(next(s), t.device) for k, s in t.streams.items()}
    t.method.train()
    bn = next(m for m in t.method.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    out = t.method(batch, 5, StepContext(t._run_stage))
    assert "loss_contrast_mix" in out and "loss_contrast_src" not in out  # mix from t >= 5, the rest t > 5
    assert "loss_consistency" in out
    # consistency from t = 0 (start 0), and its forward moves BatchNorm running statistics
    t.method.mcfg.consistency_bn = "update"
    before = bn.running_mean.clone()
    t.method.consistency_loss(batch["source"]["image"], batch["source"]["image"].clone().requires_grad_())
    assert not torch.equal(before, bn.running_mean)
    t.method.mcfg.consistency_bn = "frozen"
    before = bn.running_mean.clone()
    t.method.consistency_loss(batch["source"]["image"], batch["source"]["image"].clone().requires_grad_())
    assert torch.equal(before, bn.running_mean)
    out0 = t.method(batch, 0, StepContext(t._run_stage))
    assert "loss_consistency" in out0
