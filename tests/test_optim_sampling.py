import itertools

import pytest
import torch

from segadapt.config import OptimConfig
from segadapt.data.sampling import StreamSampler
from segadapt.optim import build_optimizer, poly_warmup_factor


def test_poly_and_warmup_values():
    assert poly_warmup_factor(0, 100, 0.9) == 1.0
    assert poly_warmup_factor(50, 100, 0.9) == pytest.approx(0.5 ** 0.9)
    assert poly_warmup_factor(100, 100, 0.9) == 0.0
    # DAFormer: linear warm-up from 1e-6 over 1500 iterations, then poly 1.0
    assert poly_warmup_factor(0, 40000, 1.0, 1500, 1e-6) == pytest.approx(1e-6)
    assert poly_warmup_factor(1500, 40000, 1.0, 1500, 1e-6) == pytest.approx(1 - 1500 / 40000)


def test_warmup_multiplies_the_poly_factor_as_mmcv():
    # mmcv: lr_t = poly_t * (1 - (1 - t/W) * (1 - r)) for t < W. W=10, r=0.1, total=20, power 1:
    # t=5: poly 0.75, warm-up 1 - 0.5*0.9 = 0.55 -> 0.4125
    assert poly_warmup_factor(5, 20, 1.0, 10, 0.1) == pytest.approx(0.4125, abs=1e-12)
    # t=9: poly 0.55, warm-up 1 - 0.1*0.9 = 0.91 -> 0.5005; t=10: poly alone, 0.5
    assert poly_warmup_factor(9, 20, 1.0, 10, 0.1) == pytest.approx(0.5005, abs=1e-12)
    assert poly_warmup_factor(10, 20, 1.0, 10, 0.1) == pytest.approx(0.5, abs=1e-12)
    # power 2, t=4 of total 8, W=8, r=0.5: poly 0.25, warm-up 1 - 0.5*0.5 = 0.75 -> 0.1875
    assert poly_warmup_factor(4, 8, 2.0, 8, 0.5) == pytest.approx(0.1875, abs=1e-12)


def test_sgd_head_multiplier_and_schedule():
    back, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    cfg = OptimConfig(name="sgd", lr=0.1, head_lr_mult=10.0, poly_power=1.0, poly_iters=10)
    opt = build_optimizer(cfg, [{"params": list(back.named_parameters()), "lr_mult": 1.0},
                                {"params": list(head.named_parameters()), "lr_mult": 10.0}], total_iters=5)
    opt.set_iteration(5)
    assert [g["lr"] for g in opt.optimizer.param_groups] == pytest.approx([0.05, 0.5])  # horizon = poly_iters


def test_adamw_no_decay_on_norm():
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    named = [(n.replace("1.", "bn."), p) for n, p in m.named_parameters()]
    cfg = OptimConfig(name="adamw", lr=6e-5, weight_decay=0.01, no_decay_norm=True)
    opt = build_optimizer(cfg, [{"params": named, "lr_mult": 1.0}], 100).optimizer
    assert isinstance(opt, torch.optim.AdamW)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.01]
    assert sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] == 0) == 2  # bn weight + bias


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_stream_is_a_function_of_the_draw_index():
    full = take(StreamSampler(7, seed=3), 30)
    resumed = take(StreamSampler(7, seed=3, start=12), 18)
    assert resumed == full[12:]
    # every epoch is a permutation of the dataset
    for e in range(4):
        assert sorted(i for i, _ in full[e * 7:(e + 1) * 7]) == list(range(7))
    assert len({s for _, s in full}) == 30  # distinct augmentation seeds
    assert take(StreamSampler(7, seed=4), 30) != full


def test_ranks_take_disjoint_interleaved_draws():
    full = take(StreamSampler(10, seed=1), 20)
    r0 = take(StreamSampler(10, seed=1, rank=0, world_size=2), 10)
    r1 = take(StreamSampler(10, seed=1, rank=1, world_size=2), 10)
    assert r0 == full[0::2] and r1 == full[1::2]
