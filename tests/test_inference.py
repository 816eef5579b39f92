import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from segadapt.engine.evaluator import evaluate
from segadapt.engine.inference import predict, predict_logits

C = 5


class PointwiseModel(nn.Module):
    """1x1 conv segmenter at stride 1 (flip-equivariant, translation-equivariant)."""

    def __init__(self, pool: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, C, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(C, 3, 1, 1, generator=g))
            self.conv.bias.copy_(torch.randn(C, generator=g))
        self.pool = pool
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        out = self.conv(x)
        if self.pool > 1:
            out = F.avg_pool2d(out, self.pool)
        return {"main": out, "aux": out * 0}


class RampModel(PointwiseModel):
    """Not flip-equivariant: adds a left-to-right ramp to class 0."""

    def forward(self, x):
        out = super().forward(x)["main"].clone()
        ramp = torch.linspace(-2.0, 2.0, out.shape[-1])
        out[:, 0] += ramp
        return {"main": out}


def _images(b=2, h=8, w=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


@pytest.mark.parametrize("out_size", [(8, 11), (16, 21)])
def test_slide_equals_whole_for_pointwise_model(out_size):
    model = PointwiseModel().eval()
    x = _images()
    whole = predict_logits(model, x, out_size)
    assert whole.shape == (2, C, *out_size)
    # overlapping windows (crop W=5,H=4, stride 3,2), batched 4 at a time
    slide = predict_logits(model, x, out_size, mode="slide", crop=(5, 4), stride=(3, 2),
                           window_batch=4)
    assert slide.shape == whole.shape
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)
    # windows larger than the image: padded, then cropped back
    padded = predict_logits(model, x, out_size, mode="slide", crop=(16, 12))
    torch.testing.assert_close(padded, whole, atol=1e-5, rtol=1e-5)


def test_slide_single_full_cover_window_with_strided_model():
    model = PointwiseModel(pool=2).eval()
    x = _images(b=1, h=8, w=12)
    whole = predict_logits(model, x, (8, 12))
    slide = predict_logits(model, x, (8, 12), mode="slide", crop=(12, 8), stride=(12, 8))
    torch.testing.assert_close(slide, whole)
    # reduced-resolution logits are upsampled to any requested size
    assert predict_logits(model, x, (17, 30)).shape == (1, C, 17, 30)


def test_windows_are_batched_and_cover_the_image():
    model = PointwiseModel().eval()
    x = _images(b=2, h=8, w=11)
    model.batch_sizes.clear()
    predict_logits(model, x, (8, 11), mode="slide", crop=(5, 4), stride=(3, 2), window_batch=4)
    # x starts 0,3,6 (last flush at 11-5=6); y starts 0,2,4 -> 9 windows x 2 images = 18
    assert sum(model.batch_sizes) == 18
    assert max(model.batch_sizes) == 4
    with pytest.raises(ValueError):
        predict_logits(model, x, (8, 11), mode="slide")  # crop missing


def test_flip():
    x = _images()
    eq = PointwiseModel().eval()
    plain = predict_logits(eq, x, (8, 11), probs=True)
    flipped = predict_logits(eq, x, (8, 11), flip=True)
    torch.testing.assert_close(flipped, plain)
    torch.testing.assert_close(plain.sum(1), torch.ones(2, 8, 11))

    # a model that is not flip-equivariant: the flipped view is flipped back
    ramp = RampModel().eval()
    p = predict_logits(ramp, x, (8, 11), flip=True)
    a = ramp(x)["main"].softmax(1)
    b = ramp(x.flip(-1))["main"].softmax(1).flip(-1)
    torch.testing.assert_close(p, (a + b) / 2)
    assert not torch.allclose(p, a)


def test_multiscale_averages_probabilities():
    model = PointwiseModel().eval()
    x = _images(h=8, w=12)
    p = predict_logits(model, x, (8, 12), scales=(1.0, 0.5))
    half = F.interpolate(x, size=(4, 6), mode="bilinear", align_corners=False)
    up = F.interpolate(model(half)["main"], size=(8, 12), mode="bilinear", align_corners=False)
    expected = (model(x)["main"].softmax(1) + up.softmax(1)) / 2
    torch.testing.assert_close(p, expected)
    # slide + multi-scale + flip together keeps the shape
    q = predict_logits(model, x, (16, 24), mode="slide", crop=6, scales=(0.75, 1.0), flip=True)
    assert q.shape == (2, C, 16, 24)


def test_predict_labels_and_checks():
    model = PointwiseModel().eval()
    x = _images()
    labels = predict(model, x, (9, 13))
    assert labels.dtype == torch.int64 and labels.shape == (2, 9, 13)
    assert torch.equal(labels, predict_logits(model, x, (9, 13)).argmax(1))
    with pytest.raises(ValueError):
        predict_logits(model, x, (8, 11), num_classes=C + 1)
    assert not predict_logits(model, x, (8, 11)).requires_grad


# --------------------------------------------------------------------------- #
# evaluate()
# --------------------------------------------------------------------------- #
class ConstModel(nn.Module):
    """Predicts, for each image, the class encoded in pixel (0, 0) of channel 0
    (value k / 10), at half resolution; records the mode it ran in."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(3)
        self.frozen = nn.BatchNorm2d(3)
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        k = (x[:, 0, 0, 0] * 10).round().long()
        logits = F.one_hot(k, self.num_classes).float()[:, :, None, None]
        return {"main": logits.expand(-1, -1, x.shape[2] // 2, x.shape[3] // 2)}


def _img(k, h=4, w=4):
    return torch.full((3, h, w), k / 10.0)


def _loader():
    lab0 = torch.zeros(8, 8, dtype=torch.long)
    lab0[4:] = 1                                  # 32 px gt 0, 32 px gt 1; pred 0
    lab1 = torch.ones(8, 8, dtype=torch.long)
    lab1[0] = 255                                 # 56 px gt 1 (8 ignored); pred 1
    lab2 = torch.zeros(8, 8, dtype=torch.long)    # 64 px gt 0; pred 0
    return [
        {"image": torch.stack([_img(0), _img(1)]), "label": torch.stack([lab0, lab1])},
        {"image": _img(0).unsqueeze(0), "label": lab2.unsqueeze(0)},
    ]


def test_evaluate_expected_miou_and_mode_restored():
    model = ConstModel()
    model.train()
    model.frozen.eval()  # a submodule deliberately kept in eval inside a training model
    res = evaluate(model, _loader(), num_classes=3, class_names=["a", "b", "c"],
                   subsets={"ab": [0, 1]}, progress=False, meta={"dataset": "fake"})
    # confusion: gt0 -> [96, 0, 0]; gt1 -> [32, 56, 0]; gt2 absent
    assert res.confusion == [[96, 0, 0], [32, 56, 0], [0, 0, 0]]
    assert res.per_class_iou[0] == pytest.approx(96 / 128)
    assert res.per_class_iou[1] == pytest.approx(56 / 88)
    assert math.isnan(res.per_class_iou[2])
    assert res.miou == pytest.approx((96 / 128 + 56 / 88) / 2)
    assert res.subset_mious["ab"] == pytest.approx(res.miou)
    assert res.pixel_accuracy == pytest.approx(152 / 184)
    assert res.meta["dataset"] == "fake" and res.meta["num_images"] == 3

    assert model.seen_training == [False, False]  # ran in eval mode
    assert model.training and model.bn.training    # restored ...
    assert not model.frozen.training               # ... per submodule

    model.eval()
    res1 = evaluate(model, _loader(), num_classes=3, progress=True, max_batches=1)
    assert res1.confusion == [[32, 0, 0], [32, 56, 0], [0, 0, 0]]
    assert res1.miou == pytest.approx((32 / 64 + 56 / 88) / 2)
    assert res1.meta["num_images"] == 2
    assert not model.training


def test_evaluate_with_sliding_window_options():
    model = ConstModel()
    res = evaluate(model, _loader(), num_classes=3, progress=False,
                   infer={"mode": "slide", "crop": (2, 2), "stride": 1, "flip": True})
    assert res.confusion == [[96, 0, 0], [32, 56, 0], [0, 0, 0]]
    assert res.meta["inference"]["mode"] == "slide"
