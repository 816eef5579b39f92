"""eval.align_corners: ADVENT's evaluation upsamples the prediction with align_corners=True."""
import pytest
import torch
from torch import nn

from segadapt.config import load_config
from segadapt.engine.evaluator import evaluate, inference_options


class FixedLogits(nn.Module):
    """Logits (class 0 - class 1) = 3 at x = 0 and -7 at x = 1 of a 1x2 map: the difference
    crosses zero at x = 0.3 of the way."""

    def forward(self, x):
        s0 = torch.tensor([3.0, -7.0]).view(1, 1, 1, 2)
        return {"main": torch.cat([s0, torch.zeros_like(s0)], 1).expand(x.shape[0], -1, -1, -1)}


def run(align_corners: bool):
    cfg = load_config("synthetic/source_only", [f"eval.align_corners={str(align_corners).lower()}"])
    batch = {"image": torch.zeros(1, 3, 1, 2), "label": torch.tensor([[[0, 0, 1, 1]]])}
    return evaluate(FixedLogits(), [batch], num_classes=2, infer=inference_options(cfg.eval), progress=False)


def test_align_corners_through_the_evaluator():
    # upsampled to width 4, the output pixels sample the 1x2 map at
    #   align_corners=True:  x = 0, 1/3, 2/3, 1      -> 3, -1/3, ... -> prediction 0, 1, 1, 1
    #   align_corners=False: x = 0, 1/4, 3/4, 1 (clamped) -> 3, 0.5, ... -> prediction 0, 0, 1, 1
    exact = run(False)
    assert exact.per_class_iou == pytest.approx([1.0, 1.0]) and exact.miou == pytest.approx(1.0)
    advent = run(True)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3
    assert advent.per_class_iou == pytest.approx([0.5, 2 / 3]) and advent.miou == pytest.approx(7 / 12)
    assert advent.meta["inference"]["align_corners"] is True


def test_default_and_advent_family_configs():
    assert inference_options(load_config("synthetic/source_only").eval)["align_corners"] is False
    assert load_config("gta5_cityscapes/dacs").eval.align_corners is False
    for bench in ("gta5_cityscapes", "synthia_cityscapes"):
        for name in ("source_only", "minent", "advent", "cfcontra"):
            assert load_config(f"{bench}/{name}").eval.align_corners is True, f"{bench}/{name}"
