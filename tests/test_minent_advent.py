import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segadapt.config import load_config
from segadapt.errors import CheckpointError, ConfigError
from segadapt.engine.trainer import train_from_config
from segadapt.methods import build_method
from segadapt.methods.advent import SOURCE_LABEL, TARGET_LABEL, AdvEnt
from segadapt.methods.losses import segmentation_loss, upsample
from segadapt.methods.losses import entropy_loss, entropy_map, self_information
from segadapt.methods.minent import MinEnt
from segadapt.models.segmenter import build_segmenter
from segadapt.models.discriminator import FCDiscriminator

from .conftest import tiny_overrides

TINY_MODEL = ["model.base_width=8", "model.backbone=resnet18"]


def h2(p: float) -> float:
    """Binary entropy / log 2, by hand."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)


def test_normalised_entropy_hand_values():
    assert torch.allclose(entropy_map(torch.zeros(1, 19, 2, 3)), torch.ones(1, 2, 3), atol=1e-6)
    one_hot = torch.full((1, 19, 1, 1), -50.0)
    one_hot[0, 7] = 50.0
    assert entropy_map(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    # two classes, p = (0.25, 0.75): per-class terms 0.5 and 0.311278, sum 0.811278
    logits = torch.tensor([math.log(0.25), math.log(0.75)]).view(1, 2, 1, 1)
    info = self_information(logits).flatten()
    assert info.tolist() == pytest.approx([0.5, 0.75 * math.log(4 / 3) / math.log(2)], abs=1e-6)
    assert entropy_map(logits).item() == pytest.approx(0.811278, abs=1e-6)
    both = torch.cat([logits, torch.zeros(1, 2, 1, 1)], dim=3)  # a uniform pixel next to it
    assert entropy_loss(both).item() == pytest.approx((0.811278 + 1.0) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        entropy_map(torch.zeros(1, 1, 2, 2))


class FixedLogits(nn.Module):
    """A 'segmenter' whose main and aux logits are fixed: 2 classes on a 1x2 grid."""

    feature_channels = 2

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x, return_features=False):
        out = self.logits.expand(x.shape[0], -1, -1, -1)
        return {"main": out, "aux": out}

    def param_groups(self):
        return {"backbone": [], "head": [self.logits]}


def test_minent_entropy_on_logits_upsampled_align_corners():
    cfg = load_config("synthetic/minent")
    # pixel logits (0, 0) and (ln 3, 0); upsampled to width 4 with align_corners=True the
    # logits are (t ln 3, 0) at t = 0, 1/3, 2/3, 1, so p_0 = 3^t / (3^t + 1)
    model = FixedLogits(torch.tensor([[0.0, math.log(3)], [0.0, 0.0]]).view(1, 2, 1, 2))
    method = build_method(cfg, model)
    assert isinstance(method, MinEnt)
    batch = {"source": {"image": torch.zeros(1, 3, 1, 4), "label": torch.zeros(1, 1, 4, dtype=torch.long)},
             "target": {"image": torch.zeros(1, 3, 1, 4)}}
    losses = method(batch, 0)
    expected = sum(h2(3**t / (3**t + 1)) for t in (0, 1 / 3, 2 / 3, 1)) / 4
    assert losses["loss_ent_main"].item() == pytest.approx(0.001 * expected, rel=1e-5)
    assert losses["loss_ent_aux"].item() == pytest.approx(0.0002 * expected, rel=1e-5)
    # the source term is ADVENT's CE: main + 0.1 aux on the same upsampled logits
    ce = -sum(math.log(3**t / (3**t + 1)) for t in (0, 1 / 3, 2 / 3, 1)) / 4
    assert losses["loss_seg_main"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["loss_seg_aux"].item() == pytest.approx(0.1 * ce, rel=1e-5)


def test_discriminator_architecture():
    d = FCDiscriminator(19)
    convs = [d.conv1, d.conv2, d.conv3, d.conv4, d.classifier]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(19, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in d.modules())
    assert d(torch.zeros(2, 19, 64, 96)).shape == (2, 1, 2, 3)


def advent_discriminator_file_shapes(num_classes, ndf=64):
    """ADVENT's get_fc_discriminator: one nn.Sequential, convs at 0, 2, 4, 6, 8 (LeakyReLU between)."""
    chans = [num_classes, ndf, 2 * ndf, 4 * ndf, 8 * ndf, 1]
    shapes = {}
    for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
        shapes[f"{2 * i}.weight"], shapes[f"{2 * i}.bias"] = (cout, cin, 4, 4), (cout,)
    return shapes


def test_discriminator_file_shapes_as_written_by_hand():
    assert advent_discriminator_file_shapes(19) == {
        "0.weight": (64, 19, 4, 4), "0.bias": (64,), "2.weight": (128, 64, 4, 4), "2.bias": (128,),
        "4.weight": (256, 128, 4, 4), "4.bias": (256,), "6.weight": (512, 256, 4, 4), "6.bias": (512,),
        "8.weight": (1, 512, 4, 4), "8.bias": (1,)}


def test_loads_advent_published_discriminators(tmp_path):
    g = torch.Generator().manual_seed(0)
    files = {}
    for level in ("main", "aux"):
        files[level] = {k: torch.randn(shape, generator=g) * 0.05
                        for k, shape in advent_discriminator_file_shapes(19).items()}
        torch.save(files[level], tmp_path / f"model_120000_D_{level}.pth")
    method = tiny_advent(**{"method.disc_width": 64,
                            "method.discriminator_main": tmp_path / "model_120000_D_main.pth",
                            "method.discriminator_aux": tmp_path / "model_120000_D_aux.pth"})
    x = torch.rand(1, 19, 64, 64, generator=g)
    for level, disc in (("main", method.disc_main), ("aux", method.disc_aux)):
        # the same network as an nn.Sequential, as ADVENT builds it, with the file loaded strictly
        layers = []
        for i in range(5):
            w = files[level][f"{2 * i}.weight"]
            layers += [nn.Conv2d(w.shape[1], w.shape[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        reference = nn.Sequential(*layers[:-1])
        reference.load_state_dict(files[level])
        assert torch.equal(disc.conv1.weight, files[level]["0.weight"])
        assert torch.allclose(disc(x), reference(x), atol=1e-6)

    wrong = {k: v for k, v in files["main"].items() if not k.startswith("8.")}
    wrong["0.weight"] = wrong["0.weight"][:, :16]
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError) as err:
        tiny_advent(**{"method.disc_width": 64, "method.discriminator_main": tmp_path / "wrong.pth"})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("method.discriminator_main: ") and "2 missing keys" in msg
    assert "0.weight: (64, 16, 4, 4) in the file, (64, 19, 4, 4) expected" in msg
    with pytest.raises(ConfigError, match="disc_width 16"):  # the synthetic configs' quarter width
        tiny_advent(**{"method.discriminator_main": tmp_path / "model_120000_D_main.pth"})
    ours = {f"disc_main.{k}": v for k, v in method.disc_main.state_dict().items()}
    torch.save(ours, tmp_path / "ours.pth")
    with pytest.raises(ConfigError, match="10 missing keys"):
        tiny_advent(**{"method.disc_width": 64, "method.discriminator_main": tmp_path / "ours.pth"})
    with pytest.raises(CheckpointError, match="file not found"):
        tiny_advent(**{"method.discriminator_main": tmp_path / "absent.pth"})
    with pytest.raises(ConfigError, match="no aux output"):
        tiny_advent(**{"model.aux": "false", "method.discriminator_aux": tmp_path / "model_120000_D_aux.pth"})


def tiny_advent(**overrides):
    cfg = load_config("synthetic/advent", TINY_MODEL + [f"{k}={v}" for k, v in overrides.items()])
    return build_method(cfg, build_segmenter(cfg.model))


def tiny_batch(seed=0, size=(32, 32)):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    label = torch.randint(0, 19, (1, h, w), generator=g)
    label[:, :4] = 255
    return {"source": {"image": torch.rand(1, 3, h, w, generator=g), "label": label},
            "target": {"image": torch.rand(1, 3, h, w, generator=g)}}


def test_advent_label_conventions():
    assert (SOURCE_LABEL, TARGET_LABEL) == (0.0, 1.0)
    torch.manual_seed(0)
    method = tiny_advent()
    assert isinstance(method, AdvEnt)
    c = 2.0  # discriminators that answer the logit c everywhere
    for d in (method.disc_main, method.disc_aux):
        for p in d.parameters():
            nn.init.zeros_(p)
        nn.init.constant_(d.classifier.bias, c)
    losses = method(tiny_batch(), 0)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  BCE-with-logits(x, 0) = softplus(x)
    # segmenter: target maps judged against the SOURCE label 0
    assert losses["loss_adv_main"].item() == pytest.approx(0.001 * softplus(c), rel=1e-5)
    assert losses["loss_adv_aux"].item() == pytest.approx(0.0002 * softplus(c), rel=1e-5)
    # discriminator: source -> 0 (softplus(c)), target -> 1 (softplus(-c)), each halved
    for level in ("main", "aux"):
        assert losses[f"loss_disc_{level}"].item() == pytest.approx(0.5 * (softplus(c) + softplus(-c)), rel=1e-5)
        assert losses[f"disc_{level}_p_target_on_source"].item() == pytest.approx(1 / (1 + math.exp(-c)), rel=1e-5)


def test_advent_one_backward_equals_two_phase_update():
    torch.manual_seed(0)
    method = tiny_advent()
    reference = copy.deepcopy(method)
    batch = tiny_batch(seed=1)
    seg_params = [p for p in method.model.parameters() if p.requires_grad]
    disc_params = list(method.disc_main.parameters()) + list(method.disc_aux.parameters())

    losses = method(batch, 0)
    adv = losses["loss_adv_main"] + losses["loss_adv_aux"]
    disc = losses["loss_disc_main"] + losses["loss_disc_aux"]
    # the discriminator loss does not reach the segmenter, the adversarial loss not D
    assert all(g is None for g in torch.autograd.grad(disc, seg_params, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(adv, disc_params, retain_graph=True, allow_unused=True))
    g_adv = torch.autograd.grad(adv, method.model.layer6.conv2d_list[0].weight, retain_graph=True)[0]
    assert g_adv.abs().sum() > 0
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()

    # ADVENT's two phases on an identical copy
    ref = reference
    xs, ys, xt = batch["source"]["image"], batch["source"]["label"], batch["target"]["image"]
    discs = {"main": ref.disc_main, "aux": ref.disc_aux}
    weights = {"main": 0.001, "aux": 0.0002}
    for d in discs.values():
        d.requires_grad_(False)
    out_s, out_t = ref.model(xs), ref.model(xt)
    loss = sum(segmentation_loss(out_s, ys, 0.1).values())
    for level, d in discs.items():
        pred_t = self_information(upsample(out_t[level], xt.shape[-2:]))
        loss = loss + weights[level] * F.binary_cross_entropy_with_logits(d(pred_t), torch.zeros(1, 1, 1, 1))
    loss.backward()
    for d in discs.values():
        d.requires_grad_(True)
    loss_d = 0
    for level, d in discs.items():
        d_s = d(self_information(upsample(out_s[level], xs.shape[-2:])).detach())
        d_t = d(self_information(upsample(out_t[level], xt.shape[-2:])).detach())
        loss_d = loss_d + F.binary_cross_entropy_with_logits(d_s, torch.zeros_like(d_s)) / 2
        loss_d = loss_d + F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t)) / 2
    loss_d.backward()

    got = dict(method.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            assert got[name].grad is not None, name
            assert torch.allclose(got[name].grad, p.grad, rtol=1e-4, atol=1e-8), name


def test_advent_discriminator_optimizer():
    method = tiny_advent(**{"train.iters": 100})
    opts = method.build_optimizers()
    adam = opts["discriminator"].optimizer
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.9, 0.99)
    disc_ids = {id(p) for d in (method.disc_main, method.disc_aux) for p in d.parameters()}
    assert {id(p) for g in adam.param_groups for p in g["params"]} == disc_ids
    seg_ids = {id(p) for g in opts["segmenter"].optimizer.param_groups for p in g["params"]}
    assert not seg_ids & disc_ids
    for it in (0, 50):  # poly-decayed with the segmenter's factor
        for o in opts.values():
            o.set_iteration(it)
        assert adam.param_groups[0]["lr"] == pytest.approx(1e-4 * (1 - it / 100) ** 0.9)


@pytest.mark.parametrize("name", ["minent", "advent"])
def test_tiny_training_run(tiny_synth, tmp_path, name):
    cfg = load_config(f"synthetic/{name}", tiny_overrides(tiny_synth, tmp_path / name, **{"train.iters": 4,
                                                                                           "train.ckpt_every": 4}))
    result = train_from_config(cfg, progress=False)
    assert 0.0 <= result.miou <= 1.0
    records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    logged = records[0]
    expected = {"minent": ["loss_ent_main", "loss_ent_aux"],
                "advent": ["loss_adv_main", "loss_adv_aux", "loss_disc_main", "loss_disc_aux", "lr_discriminator"]}
    for key in ["loss_seg_main"] + expected[name]:
        assert math.isfinite(logged[key]), key
    ckpt = torch.load(tmp_path / name / "final.pth", weights_only=False)
    if name == "advent":
        assert "disc_main.conv1.weight" in ckpt["method"] and "disc_aux.classifier.bias" in ckpt["method"]
        assert ckpt["optimizers"]["discriminator"]["state"]  # Adam's moments, for an exact resume
