"""optim.param_list=advent_repeated: ADVENT's backbone list (tensors repeated) stepped per repeat."""
import collections
import warnings

import pytest
import torch

from segadapt.config import OptimConfig, load_config
from segadapt.optim import RepeatedSGD, build_optimizer
from segadapt.errors import ConfigError
from segadapt.methods import build_method
from segadapt.methods.source_only import SourceOnly
from segadapt.models.segmenter import build_segmenter

from .conftest import assert_resumed_run_equal, kill_and_resume, tiny_overrides

R101_BLOCKS = (3, 4, 23, 3)


def published_advent_sequence() -> list[str]:
    """The names ADVENT's get_1x_lr_params_no_scale yields for its ResNet-101, written out from the
    published structure: conv1 (bn1 frozen), then per layer its modules in pre-order (the layer, each
    Bottleneck: conv1 bn1 conv2 bn2 conv3 bn3 relu downsample(conv, bn)), each yielding all its
    trainable parameters (no BN: ADVENT freezes their affine parameters)."""
    seq = ["conv1.weight"]
    for li, n in enumerate(R101_BLOCKS, 1):
        down = f"layer{li}.0.downsample.0.weight"

        def convs(b):
            return [f"layer{li}.{b}.conv{c}.weight" for c in (1, 2, 3)]

        seq += [name for b in range(n) for name in convs(b) + ([down] if b == 0 else [])]  # the layer
        for b in range(n):
            seq += convs(b) + ([down] if b == 0 else [])  # the block
            seq += convs(b)  # each conv
            if b == 0:
                seq += [down, down]  # the downsample Sequential, then its conv
    return seq


def r101_config(*extra):
    return load_config("gta5_cityscapes/minent", ["model.base_width=8", *extra])


def test_backbone_multiplicities_and_order_are_advents():
    expected = published_advent_sequence()
    counts = collections.Counter(expected)
    # the published counts: conv1 once, block convs 3x, the 4 downsample convs 4x
    assert counts["conv1.weight"] == 1 and counts["layer3.22.conv2.weight"] == 3
    assert counts["layer4.0.downsample.0.weight"] == 4 and len(counts) == 1 + 3 * sum(R101_BLOCKS) + 4
    cfg = r101_config("optim.param_list=advent_repeated")
    model = build_segmenter(cfg.model)
    method = build_method(cfg, model)
    backbone, head = method.segmenter_param_groups()
    assert [n for n, _ in backbone["params"]] == expected
    assert len({id(p) for _, p in head["params"]}) == len(head["params"]) == 16  # layer5 + layer6, once each

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no duplicate-parameter warning
        opt = method.build_optimizers()["segmenter"].optimizer
    assert isinstance(opt, RepeatedSGD)
    group = opt.param_groups[0]
    assert len({id(p) for p in group["params"]}) == len(group["params"]) == len(counts)  # each tensor once
    names = {id(p): n for n, p in model.named_parameters()}
    stepped = [names[id(group["params"][i])] for i in opt.visits[0]]
    assert stepped == expected


def test_default_list_is_one_entry_per_tensor_and_plain_sgd():
    cfg = r101_config("optim.param_list=unique", "optim.decay_into_grad=false")  # OptimConfig's defaults
    model = build_segmenter(cfg.model)
    opt = build_method(cfg, model).build_optimizers()["segmenter"].optimizer
    assert type(opt) is torch.optim.SGD
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len({id(p) for p in listed}) == len(listed) == sum(p.requires_grad for p in model.parameters())


def scalar_run(decay_into_grad: bool, visits, steps=1):
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = RepeatedSGD([{"params": [p]}], [visits], lr=0.1, momentum=0.9, weight_decay=0.1,
                      decay_into_grad=decay_into_grad)
    for _ in range(steps):
        opt.zero_grad()
        p.sum().backward()  # grad 1
        opt.step()
    return p.item()


def test_repeats_step_in_sequence_hand_values():
    # lr 0.1, momentum 0.9, wd 0.1, grad 1, p0 = 1, the tensor listed twice.
    # repeat 1: d = 1 + 0.1*1 = 1.1, buf = 1.1, p = 1 - 0.11 = 0.89
    # repeat 2 (copy):     d = 1 + 0.1*0.89 = 1.089, buf = 0.99 + 1.089 = 2.079, p = 0.89 - 0.2079
    # repeat 2 (in .grad): d = 1.1 + 0.089 = 1.189,  buf = 0.99 + 1.189 = 2.179, p = 0.89 - 0.2179
    assert scalar_run(False, [0, 0]) == pytest.approx(0.6821, abs=1e-12)
    assert scalar_run(True, [0, 0]) == pytest.approx(0.6721, abs=1e-12)
    # modern torch's SGD would start a fresh buffer for each repeat at step 1: 0.89 - 0.1089
    assert scalar_run(False, [0]) == pytest.approx(0.89, abs=1e-12)


def hand_loop(values, grad_fn, groups, steps, lr, momentum, wd, decay_into_grad):
    """Independent reference: tensors as plain values, each listed entry stepped in turn."""
    values = {k: v.clone() for k, v in values.items()}
    bufs = {}
    for _ in range(steps):
        grads = grad_fn(values)
        for names, lr_mult in groups:
            for k in names:
                if decay_into_grad:
                    grads[k] = grads[k] + wd * values[k]
                    d = grads[k]
                else:
                    d = grads[k] + wd * values[k]
                bufs[k] = d.clone() if k not in bufs else momentum * bufs[k] + d
                values[k] = values[k] - lr * lr_mult * bufs[k]
    return values


@pytest.mark.parametrize("decay_into_grad", [False, True])
def test_few_steps_equal_a_hand_loop_over_the_repeats(decay_into_grad):
    g = torch.Generator().manual_seed(0)
    init = {k: torch.randn(3, 2, generator=g, dtype=torch.float64) for k in "abc"}
    target = torch.randn(3, 2, generator=g, dtype=torch.float64)

    def loss_of(v):  # gradients depend on the weights, so every repeat's write matters
        return ((v["a"] * v["b"] - target) ** 2).sum() + (v["c"] ** 3).sum()

    def grad_fn(v):
        leaves = {k: x.clone().requires_grad_(True) for k, x in v.items()}
        gs = torch.autograd.grad(loss_of(leaves), [leaves[k] for k in "abc"])
        return dict(zip("abc", gs))

    layout = [(["a", "b", "a", "a", "b"], 1.0), (["c"], 10.0)]
    want = hand_loop(init, grad_fn, layout, 3, lr=0.01, momentum=0.9, wd=5e-4, decay_into_grad=decay_into_grad)

    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    cfg = OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, param_list="advent_repeated",
                      decay_into_grad=decay_into_grad, poly_power=0.0)
    sched = build_optimizer(cfg, [{"params": [(k, params[k]) for k in names], "lr_mult": m} for names, m in layout], 3)
    for it in range(3):
        sched.set_iteration(it)
        sched.optimizer.zero_grad(set_to_none=True)
        loss_of(params).backward()
        sched.optimizer.step()
    for k in "abc":
        torch.testing.assert_close(params[k].detach(), want[k], rtol=1e-12, atol=1e-14)
    # the repeats matter: plain SGD on the same start ends elsewhere
    plain = hand_loop(init, grad_fn, [(["a", "b"], 1.0), (["c"], 10.0)], 3, 0.01, 0.9, 5e-4, decay_into_grad)
    assert not torch.allclose(plain["a"], want["a"], rtol=1e-6, atol=0)


def test_without_repeats_it_is_torch_sgd():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ours = RepeatedSGD([{"params": list(a.parameters())}], [[0, 1]], lr=0.05, momentum=0.9, weight_decay=5e-4)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=False)
    x = torch.randn(8, 4)
    for _ in range(3):
        for m, o in ((a, ours), (b, ref)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_switch_needs_sgd():
    with pytest.raises(ConfigError, match="needs optim.name=sgd"):
        load_config("gta5_cityscapes/dacs", ["optim.param_list=advent_repeated"])
    with pytest.raises(ConfigError, match="decay_into_grad only applies"):
        load_config("gta5_cityscapes/dacs", ["optim.decay_into_grad=true"])


@pytest.mark.parametrize("bench", ["gta5_cityscapes", "synthia_cityscapes"])
def test_reference_configs_turn_it_on(bench):
    for name, in_grad in (("source_only", True), ("minent", True), ("advent", True), ("cfcontra", False)):
        o = load_config(f"{bench}/{name}").optim
        assert (o.param_list, o.decay_into_grad) == ("advent_repeated", in_grad), name
    for name in ("dacs", "daformer", "oracle"):
        assert load_config(f"{bench}/{name}").optim.param_list == "unique", name


def test_resume_with_repeats_equals_uninterrupted(tiny_synth, tmp_path, monkeypatch):
    def cfg(out):
        return load_config("synthetic/source_only", tiny_overrides(
            tiny_synth, out, **{"optim.name": "sgd", "optim.lr": 0.01, "optim.param_list": "advent_repeated",
                                "optim.decay_into_grad": "true"}))

    from segadapt.engine.trainer import train_from_config

    train_from_config(cfg(tmp_path / "a"), progress=False)
    ref = torch.load(tmp_path / "a" / "final.pth", weights_only=False)
    assert ref["optimizers"]["segmenter"]["state"]  # momentum buffers were saved
    interrupted, got = kill_and_resume(monkeypatch, SourceOnly, cfg(tmp_path / "b"), 4, 3)
    assert interrupted["iteration"] == 3
    assert_resumed_run_equal(ref, got)


def test_state_dict_loads_into_either_optimizer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    ours = RepeatedSGD([{"params": list(lin.parameters())}], [[0, 0, 1]], lr=0.1, momentum=0.9, weight_decay=5e-4)
    lin(torch.randn(4, 3)).sum().backward()
    ours.step()
    plain = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict(ours.state_dict())
    plain.step()  # the groups carry every key torch's SGD reads
    back = RepeatedSGD([{"params": list(lin.parameters())}], [[0, 0, 1]], lr=0.1, momentum=0.9, weight_decay=5e-4)
    back.load_state_dict(plain.state_dict())
    assert back.visits == [[0, 0, 1]]
    assert torch.equal(back.state[lin.weight]["momentum_buffer"], plain.state[lin.weight]["momentum_buffer"])
