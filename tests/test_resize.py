import pytest
import torch
import torch.nn.functional as F

from segadapt.methods.losses import cross_entropy, upsample
from segadapt.methods.losses import weighted_cross_entropy
from segadapt.models.resize import interpolation_matrix, resize_bilinear


def test_interpolation_matrix_hand_cases():
    # half-pixel centres, 2 -> 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (edge)
    half = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(interpolation_matrix(2, 4, align_corners=False), half)
    corners = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(interpolation_matrix(2, 3, align_corners=True), corners)
    # one output pixel with align_corners takes the first input; one input is copied
    assert torch.equal(interpolation_matrix(5, 1, True), torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64))
    assert torch.equal(interpolation_matrix(1, 3, False), torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        interpolation_matrix(0, 3, False)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("in_hw,out_hw", [((17, 33), (128, 256)), ((9, 7), (4, 5)), ((1, 6), (3, 6)),
                                         ((5, 5), (1, 1)), ((6, 4), (6, 4))])
def test_resize_bilinear_equals_interpolate_forward_and_backward(align_corners, in_hw, out_hw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *in_hw, generator=g)
    grad_out = torch.randn(2, 3, *out_hw, generator=g)
    a = x.clone().requires_grad_()
    ref = F.interpolate(a, size=out_hw, mode="bilinear", align_corners=align_corners)
    ref.backward(grad_out)
    b = x.clone().requires_grad_()
    out = resize_bilinear(b, out_hw, align_corners)
    out.backward(grad_out)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-5)


def test_resize_bilinear_channels_last_bf16_and_autocast_give_contiguous_float32():
    x = torch.randn(2, 4, 5, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ref = F.interpolate(x.float(), size=(20, 28), mode="bilinear", align_corners=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = resize_bilinear(x, (20, 28), False)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_training_cross_entropy_matches_interpolate_path():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 19, 9, 17, generator=g)
    labels = torch.randint(0, 19, (2, 64, 128), generator=g)
    labels[:, :5] = 255
    for align_corners in (True, False):
        a = logits.clone().requires_grad_()
        ref = F.cross_entropy(F.interpolate(a, size=(64, 128), mode="bilinear", align_corners=align_corners),
                              labels, ignore_index=255)
        ref.backward()
        b = logits.clone().requires_grad_()
        loss = cross_entropy(b, labels, "valid", align_corners)
        loss.backward()
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b.grad, a.grad, atol=1e-7, rtol=1e-4)
    assert upsample(logits, (9, 17)).data_ptr() == logits.data_ptr()  # same size: no copy


def test_weighted_cross_entropy_is_daformers_pixel_mean():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 19, 5, 9, generator=g).requires_grad_()
    labels = torch.randint(0, 19, (2, 20, 36), generator=g)
    labels[:, :3] = 255
    weights = torch.rand(2, 20, 36, generator=g)
    ref = (F.cross_entropy(F.interpolate(logits, size=(20, 36), mode="bilinear", align_corners=False), labels,
                           ignore_index=255, reduction="none") * weights).mean()
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, weights), ref, atol=1e-6, rtol=1e-6)
