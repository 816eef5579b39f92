import json
import math

import pytest
import torch
import torch.nn as nn

from segadapt.config import load_config
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.trainer import Trainer, train_from_config
from segadapt.errors import ConfigError, TrainingError
from segadapt.methods.components.augment import (
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    gaussian_kernels,
    hsv_to_rgb,
    random_gaussian_blur,
    rgb_to_hsv,
)
from segadapt.methods.components.classmix import choose_mix_classes, class_mix_mask, mix, present_classes
from segadapt.methods.components.feature_distance import (
    downscale_label_ratio,
    feature_distance_mask,
    masked_feature_distance,
)
from segadapt.methods.components.teacher import MeanTeacher, confidence_weight, ema_alpha, pseudo_weight_map
from segadapt.methods.losses import segmentation_loss, weighted_cross_entropy
from segadapt.methods.self_training import DAFormer

from .conftest import assert_resumed_run_equal, kill_and_resume, tiny_overrides

THINGS = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


# --------------------------------------------------------------------------- mean teacher
def test_ema_alpha_schedule():
    assert ema_alpha(0, 0.999) == 0.0  # t = 0: the teacher is the student
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(3, 0.999) == 0.75
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(999, 0.999) == pytest.approx(0.999)
    assert ema_alpha(5000, 0.999) == 0.999  # capped
    assert ema_alpha(5000, 0.99) == 0.99


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.fc(x)))


def test_mean_teacher_copy_and_hand_computed_updates():
    """norm_mode='running': eval-mode teacher, running statistics averaged like the weights."""
    torch.manual_seed(0)
    student = _Tiny()
    teacher = MeanTeacher(student, alpha=0.9, norm_mode="running")
    # t = 0: an exact, separate, frozen copy in eval mode
    for (n, p), q in zip(student.named_parameters(), teacher.ema.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
        assert not q.requires_grad
    assert not teacher.ema.training
    assert not any(k.startswith("_student") or "student" in k for k in teacher.state_dict())

    with torch.no_grad():
        student.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        teacher.ema.fc.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        student.bn.running_mean.copy_(torch.tensor([2.0, 4.0]))
        teacher.ema.bn.running_mean.zero_()
        student.bn.num_batches_tracked.fill_(7)
    teacher.update(1)  # alpha_1 = 0.5
    assert torch.allclose(teacher.ema.fc.weight, torch.tensor([[0.5, 1.0], [2.0, 2.5]]))
    assert torch.allclose(teacher.ema.bn.running_mean, torch.tensor([1.0, 2.0]))
    assert int(teacher.ema.bn.num_batches_tracked) == 7
    teacher.update(3)  # alpha_3 = 0.75: 0.75 * 0.5 + 0.25 * 1 = 0.625, ...
    assert torch.allclose(teacher.ema.fc.weight, torch.tensor([[0.625, 1.25], [2.25, 2.875]]))
    teacher.update(100)  # capped at alpha = 0.9
    assert torch.allclose(teacher.ema.fc.weight[0, 0], torch.tensor(0.9 * 0.625 + 0.1 * 1.0))

    # the owner's train() must not switch the teacher to training mode (dropout, batch statistics)
    owner = nn.Module()
    owner.student, owner.teacher = student, teacher
    owner.train()
    assert student.training and not teacher.ema.training and not teacher.ema.drop.training
    x = torch.randn(4, 2)
    assert torch.equal(teacher(x), teacher(x))  # deterministic: no dropout
    assert not teacher(x).requires_grad


def test_mean_teacher_batch_norm_mode_is_the_reference():
    """Default (DACS/DAFormer code): only parameters are averaged; the teacher's BatchNorm
    normalises with the batch's statistics and keeps its own running statistics; no dropout."""
    torch.manual_seed(0)
    student = _Tiny()
    teacher = MeanTeacher(student, alpha=0.9)
    assert teacher.norm_mode == "batch"
    owner = nn.Module()
    owner.student, owner.teacher = student, teacher
    owner.train()
    assert teacher.ema.training and teacher.ema.bn.training and not teacher.ema.drop.training
    with torch.no_grad():
        teacher.ema.fc.weight.copy_(torch.eye(2))
        teacher.ema.fc.bias.zero_()
        teacher.ema.bn.weight.fill_(1.0)
        teacher.ema.bn.bias.zero_()
        teacher.ema.bn.running_mean.zero_()
        teacher.ema.bn.running_var.fill_(1.0)
        student.bn.running_mean.fill_(5.0)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    y = teacher(x)
    # batch statistics: column means (2, 4), biased variances (1, 4) -> (x - mean) / sqrt(var + eps)
    expected = torch.tensor([[-1.0, -1.0], [1.0, 1.0]]) / torch.sqrt(torch.tensor(1.0 + 1e-5)) * torch.tensor([1.0, 1.0])
    expected[:, 1] = torch.tensor([-2.0, 2.0]) / math.sqrt(4.0 + 1e-5)
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.equal(teacher(x), y)  # no dropout
    # its own running statistics moved with momentum 0.1 (twice), unbiased variances (2, 8)
    assert torch.allclose(teacher.ema.bn.running_mean, torch.tensor([2.0, 4.0]) * (1 - 0.9 ** 2))
    assert torch.allclose(teacher.ema.bn.running_var, 0.81 + torch.tensor([2.0, 8.0]) * (1 - 0.81))
    before = teacher.ema.bn.running_mean.clone()
    teacher.update(1)  # parameters averaged (alpha 0.5), buffers untouched by the student's 5.0
    assert torch.equal(teacher.ema.bn.running_mean, before)
    assert torch.allclose(teacher.ema.fc.weight, 0.5 * torch.eye(2) + 0.5 * student.fc.weight)
    owner.eval()  # evaluating the teacher: running statistics
    assert not teacher.ema.bn.training


# --------------------------------------------------------------------------- ClassMix
def _labels():
    return torch.tensor([
        [[0, 0, 1, 1], [2, 2, 255, 1]],
        [[3, 3, 3, 3], [5, 5, 0, 0]],
    ])


def test_class_mix_mask_per_image_exact():
    labels = _labels()
    chosen = torch.zeros(2, 19, dtype=torch.bool)
    chosen[0, 1] = True  # image 0 keeps class 1
    chosen[1, [0, 3]] = True  # image 1 keeps classes 0 and 3
    mask = class_mix_mask(labels, chosen)
    assert torch.equal(mask, torch.tensor([
        [[0.0, 0, 1, 1], [0, 0, 0, 1]],
        [[1.0, 1, 1, 1], [0, 0, 1, 1]],
    ]))
    # per image, not per batch: class 0 is pasted in image 1 only
    assert mask[0][labels[0] == 0].sum() == 0 and mask[1][labels[1] == 0].all()

    src = torch.full((2, 3, 2, 4), 1.0)
    tgt = torch.zeros(2, 3, 2, 4)
    assert torch.equal(mix(mask, src, tgt), mask.unsqueeze(1).expand(2, 3, 2, 4))
    pseudo = torch.full((2, 2, 4), 9)
    y = mix(mask, labels, pseudo)
    assert torch.equal(y[0], torch.tensor([[9, 9, 1, 1], [9, 9, 9, 1]]))
    assert torch.equal(y[1], torch.tensor([[3, 3, 3, 3], [9, 9, 0, 0]]))
    w = mix(mask, torch.ones(2, 2, 4), torch.full((2, 2, 4), 0.25))
    assert torch.equal(w[0], torch.tensor([[0.25, 0.25, 1, 1], [0.25, 0.25, 0.25, 1]]))


def test_choose_mix_classes_takes_half_of_each_images_classes():
    labels = _labels()
    present = present_classes(labels, 19)
    assert present[0].nonzero().flatten().tolist() == [0, 1, 2]  # 255 is not a class
    assert present[1].nonzero().flatten().tolist() == [0, 3, 5]
    seen = torch.zeros(2, 19)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        chosen = choose_mix_classes(labels, 19, generator=g)
        assert (chosen & ~present).sum() == 0
        assert chosen.sum(1).tolist() == [2, 2]  # ceil(3 / 2)
        seen += chosen.float()
    # every present class is picked about 2/3 of the time
    assert ((seen[present] / 300 - 2 / 3).abs() < 0.1).all()
    one = torch.tensor([[[4, 4], [255, 4]]])
    assert choose_mix_classes(one, 19).nonzero().tolist() == [[0, 4]]


# --------------------------------------------------------------------------- pseudo-label weight
def test_confidence_weight_and_row_mask():
    # 2 classes, 2x4 pixels; max probabilities 0.99, 0.968, 0.9679, 0.5, 0.97, 0.6, 0.1->0.9, 0.98
    p1 = torch.tensor([[0.99, 0.968, 0.9679, 0.5], [0.97, 0.6, 0.1, 0.02]])
    probs = torch.stack([p1, 1 - p1]).unsqueeze(0)  # (1, 2, 2, 4)
    q = confidence_weight(probs, 0.968)
    assert q.item() == pytest.approx(4 / 8)  # 0.99, 0.968 (>=), 0.97, 0.98

    w = pseudo_weight_map(torch.tensor(0.5), (2, 512, 3), 15, 120)
    assert w.shape == (2, 512, 3)
    assert (w[:, :15] == 0).all() and (w[:, 392:] == 0).all()
    assert (w[:, 15:392] == 0.5).all()
    w = pseudo_weight_map(torch.tensor(0.5), (1, 256, 2), 15, 120)  # literal, as the reference
    assert (w[0, :, 0] == 0).nonzero().flatten().tolist() == list(range(15)) + list(range(136, 256))
    w = pseudo_weight_map(torch.tensor(0.5), (1, 256, 2), 15, 120, scaled=True)  # 7.5 -> 8 rows, 60 rows
    assert (w[0, :, 0] == 0).nonzero().flatten().tolist() == list(range(8)) + list(range(196, 256))
    w = pseudo_weight_map(torch.tensor(0.25), (1, 32, 2), 0, 0)
    assert (w == 0.25).all()


def test_weighted_cross_entropy_hand_computed():
    logits = torch.zeros(1, 2, 1, 4)  # CE = ln 2 everywhere
    labels = torch.tensor([[[0, 1, 255, 0]]])
    weights = torch.tensor([[[1.0, 0.5, 1.0, 0.0]]])
    loss = weighted_cross_entropy(logits, labels, weights)
    assert loss.item() == pytest.approx(math.log(2) * 1.5 / 4)  # mean over all 4 pixels


# --------------------------------------------------------------------------- feature distance
def _fd_label():
    lab = torch.zeros(1, 16, 24, dtype=torch.long)  # 2 x 3 cells of 8 x 8
    c = lab[0]
    c[0:6, 0:8] = 13  # cell (0,0): 48/64 car = 0.75 exactly -> kept
    c[0:5, 8:16] = 13
    c[5, 8:15] = 13  # cell (0,1): 47/64 car -> below 0.75
    c[0:5, 16:24] = 11
    c[5:8, 16:24] = 255  # cell (0,2): 40 person + 24 ignore -> 0.625
    c[8:14, 8:16] = 13
    c[14, 8:10] = 13
    c[14, 10:16] = 255
    c[15, 8:16] = 255  # cell (1,1): 50 car + 14 ignore -> 0.78 -> kept
    c[8:16, 16:24] = 255  # cell (1,2): all ignore
    return lab


def test_feature_distance_mask_ratio_rule_exact():
    lab = _fd_label()
    cells = downscale_label_ratio(lab, (2, 3), 0.75, 19)
    assert cells.tolist() == [[[13, 255, 255], [0, 13, 255]]]
    mask = feature_distance_mask(lab, (2, 3), THINGS, 0.75, 19)
    assert mask.tolist() == [[[True, False, False], [False, True, False]]]  # road (0) is no thing
    # with the network's stride 8, 17 rows give ceil(17 / 8) = 3 cells: the last holds 1 labelled row
    assert downscale_label_ratio(torch.zeros(1, 17, 8, dtype=torch.long), (3, 1), 0.75, 19, stride=8).tolist() == [
        [[0], [0], [255]]]


def test_masked_feature_distance():
    feat = torch.zeros(1, 2, 1, 3, requires_grad=True)
    ref = torch.tensor([[[[3.0, 0.0, 100.0]], [[4.0, 0.0, 100.0]]]])
    mask = torch.tensor([[[True, True, False]]])
    d = masked_feature_distance(feat, ref, mask)
    assert d.item() == pytest.approx(2.5)  # (5 + 0) / 2 cells
    d.backward()
    assert torch.isfinite(feat.grad).all() and feat.grad[0, :, 0, 2].abs().sum() == 0
    empty = masked_feature_distance(feat, ref, torch.zeros_like(mask))
    assert empty.item() == 0.0  # no selected cell: no loss, no NaN


# --------------------------------------------------------------------------- photometric augmentation
def test_color_ops():
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    green = adjust_hue(red, torch.tensor([1 / 3]))
    assert torch.allclose(green, torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2), atol=1e-5)
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    gray = adjust_saturation(x, torch.zeros(2))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    assert torch.equal(color_jitter(x, 0.2, 0.0), x)  # p = 0
    torch.manual_seed(0)
    y = color_jitter(x, 0.2, 1.0)
    assert not torch.equal(y, x) and y.min() >= 0 and y.max() <= 1


def test_blur_kernel_and_gaussian():
    assert [blur_kernel_size(s) for s in (512, 256, 128, 64, 32, 8)] == [51, 25, 13, 7, 3, 1]
    sigma = torch.tensor([0.8])
    k = gaussian_kernels(sigma, 5)[0]
    g = torch.exp(-torch.tensor([4.0, 1, 0, 1, 4]) / (2 * 0.64))
    assert torch.allclose(k, g / g.sum())
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    out = gaussian_blur(impulse, sigma, (5, 5))
    assert torch.allclose(out[0, 0, 2:7, 2:7], torch.outer(k, k), atol=1e-7)
    assert out.sum().item() == pytest.approx(1.0)
    x = torch.rand(3, 3, 32, 64)
    assert torch.equal(random_gaussian_blur(x, 0.0, (0.15, 1.15)), x)
    torch.manual_seed(0)
    y = random_gaussian_blur(x, 1.0, (0.15, 1.15))
    assert y.shape == x.shape and not torch.equal(y, x)


def test_jitter_and_blur_apply_decision_once_per_batch():
    """The reference draws u ~ U(0, 1) once per batch: jitter all images if u > 0.2 (p = 0.8),
    blur all if u > 0.5; per image only with aug_apply_per='image'."""
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # blur kernel 3
    g = torch.Generator().manual_seed(0)
    first = torch.rand(1, generator=g).item()  # the decision draw comes first
    for fn in (lambda t, gen: color_jitter(t, 0.2, 0.8, generator=gen),
               lambda t, gen: random_gaussian_blur(t, 0.8, (0.15, 1.15), generator=gen)):
        changed = []
        for seed in range(40):
            gen = torch.Generator().manual_seed(seed)
            y = fn(x, gen)
            per_image = [not torch.equal(y[i], x[i]) for i in range(6)]
            assert len(set(per_image)) == 1  # all images or none
            changed.append(per_image[0])
        assert 24 <= sum(changed) <= 39  # ~80% of the batches
    gen = torch.Generator().manual_seed(0)
    y = color_jitter(x, 0.2, 0.8, generator=gen)
    assert (first < 0.8) == (not torch.equal(y, x))
    # per image: mixed decisions within one batch for some seed
    mixed = False
    for seed in range(20):
        y = color_jitter(x, 0.2, 0.5, generator=torch.Generator().manual_seed(seed), per="image")
        mixed |= len({torch.equal(y[i], x[i]) for i in range(6)}) == 2
    assert mixed
    with pytest.raises(ValueError, match="apply-per"):
        color_jitter(x, 0.2, 0.5, per="pixel")


def test_source_ce_mean_over_all_pixels_and_align_corners():
    """mmseg 0.x: mean over all pixels with ignored ones counting 0; ADVENT: mean over valid pixels."""
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([[[0, 1], [255, 255]]])
    ce0 = math.log(1 + math.exp(-2.0))  # pixel (0, 0), class 0 with logits (2, 0)
    ce1 = math.log(2.0)  # pixel (0, 1), logits (0, 0)
    out = {"main": logits}
    valid = segmentation_loss(out, labels, 0.0, mean="valid")["loss_seg_main"]
    every = segmentation_loss(out, labels, 0.0, mean="all")["loss_seg_main"]
    assert valid.item() == pytest.approx((ce0 + ce1) / 2)
    assert every.item() == pytest.approx((ce0 + ce1) / 4)
    # upsampling 2 -> 4 columns: class-0 logit 0 and 4 at the two input columns, class 1 logit 0
    small = torch.zeros(1, 2, 1, 2)
    small[0, 0, 0, 1] = 4.0
    lab = torch.zeros(1, 1, 4, dtype=torch.long)

    def ce(z):
        return math.log(1 + math.exp(-z))
    t = segmentation_loss({"main": small}, lab, 0.0, align_corners=True)["loss_seg_main"].item()
    f = segmentation_loss({"main": small}, lab, 0.0, align_corners=False)["loss_seg_main"].item()
    # True: columns at 0, 1/3, 2/3, 1 of the input -> 0, 4/3, 8/3, 4
    assert t == pytest.approx(sum(ce(z) for z in (0.0, 4 / 3, 8 / 3, 4.0)) / 4)
    # False: centres at -0.25, 0.25, 0.75, 1.25 (clamped) -> 0, 1, 3, 4
    assert f == pytest.approx(sum(ce(z) for z in (0.0, 1.0, 3.0, 4.0)) / 4)


# --------------------------------------------------------------------------- through the trainer
def _cfg(tiny_synth, out, name, **extra):
    if "daformer" in name:
        extra.setdefault("method.rcs.min_pixels", 8)
    return load_config(name, tiny_overrides(tiny_synth, out, **extra))


@pytest.mark.parametrize("name", ["synthetic/dacs", "synthetic/daformer"])
def test_tiny_run(tiny_synth, tmp_path, name):
    cfg = _cfg(tiny_synth, tmp_path / "run", name, **{"train.iters": 4, "train.ckpt_every": 4})
    trainer = Trainer(cfg, progress=False)
    method = trainer.method
    trained = {id(p) for o in trainer.optimizers.values() for g in o.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in method.teacher.parameters())
    frozen = None
    if isinstance(method, DAFormer):
        assert trainer.streams["source"].sampler_cls.__name__ == "RareClassSampler"
        assert (tiny_synth / "source" / "segadapt_class_stats.json").is_file()
        frozen = {k: v.clone() for k, v in method.fd.imagenet.state_dict().items()}
        assert not any(id(p) in trained for p in method.fd.imagenet.parameters())
    trainer.train()
    assert method.teacher.ema.training == method.training  # batch-statistics teacher follows the method
    student, teacher = dict(method.model.named_parameters()), dict(method.teacher.ema.named_parameters())
    assert not torch.equal(student["layer6.conv2d_list.0.weight"], teacher["layer6.conv2d_list.0.weight"])
    if frozen is not None:
        assert all(torch.equal(v, method.fd.imagenet.state_dict()[k]) for k, v in frozen.items())
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert {"loss_src_main", "loss_mix_main", "pseudo_weight"} <= keys
    assert ("loss_fd" in keys) == isinstance(method, DAFormer)
    ckpt = load_checkpoint(tmp_path / "run")
    assert any(k.startswith("teacher.ema.layer6") for k in ckpt["method"])
    assert method.eval_model() is method.model


def test_eval_teacher_and_bad_batches(tiny_synth, tmp_path):
    cfg = _cfg(tiny_synth, tmp_path / "a", "synthetic/dacs", **{"method.eval_teacher": "true"})
    trainer = Trainer(cfg, progress=False)
    assert trainer.method.eval_model() is trainer.method.teacher.ema
    with pytest.raises(ConfigError, match="batch_source .* must equal train.batch_target"):
        Trainer(_cfg(tiny_synth, tmp_path / "b", "synthetic/dacs", **{"train.batch_target": 1}), progress=False)
    batch = {"source": {"image": torch.rand(2, 3, 32, 64), "label": torch.zeros(2, 32, 64, dtype=torch.long)},
             "target": {"image": torch.rand(2, 3, 32, 32)}}
    with pytest.raises(TrainingError, match="source.crop and target.crop"):
        trainer.method(batch, 0)


def test_resumed_daformer_run_equals_uninterrupted(tiny_synth, tmp_path, monkeypatch):
    train_from_config(_cfg(tiny_synth, tmp_path / "a", "synthetic/daformer"), progress=False)
    ref = torch.load(tmp_path / "a" / "final.pth", weights_only=False)

    cfg = _cfg(tiny_synth, tmp_path / "b", "synthetic/daformer")
    interrupted, got = kill_and_resume(monkeypatch, DAFormer, cfg, 4, 3)
    assert interrupted["iteration"] == 3

    assert any(k.startswith("teacher.") for k in ref["method"])
    assert_resumed_run_equal(ref, got)  # teacher and frozen backbone included
