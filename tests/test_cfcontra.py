import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segadapt.config import load_config
from segadapt.engine.trainer import train_from_config
from segadapt.errors import ConfigError
from segadapt.methods import build_method
from segadapt.methods.components import style as style_module
from segadapt.methods.cfcontra import CFContra, scale_channels_by_norm
from segadapt.methods.losses import (
    class_centroids,
    info_nce,
    momentum_update_,
    nearest_prototype_labels,
)
from segadapt.models.segmenter import build_segmenter
from segadapt.models.heads import ProjectionHead

from .conftest import assert_resumed_run_equal, kill_and_resume, tiny_overrides


# --------------------------------------------------------------------------- the loss helpers
def test_info_nce_matches_the_formula():
    tau = 0.07
    protos = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]), dim=1)
    feats = torch.tensor([[3.0, 4.0], [1.0, -1.0], [2.0, 2.0]])  # (N, D) pixels
    labels = torch.tensor([0, 1, 255])

    def by_hand(f, y, classes=(0, 1, 2)):
        n = math.hypot(*f)
        s = {k: (f[0] * protos[k, 0].item() + f[1] * protos[k, 1].item()) / n / tau for k in classes}
        return -s[y] + math.log(sum(math.exp(v) for v in s.values()))

    expected = (by_hand([3.0, 4.0], 0) + by_hand([1.0, -1.0], 1)) / 2  # the ignored pixel does not count
    assert info_nce(feats, labels, protos, tau).item() == pytest.approx(expected, rel=1e-5)
    # the same pixels as a (B, D, H, W) map
    fmap, lmap = feats.T.reshape(1, 2, 1, 3), labels.view(1, 1, 3)
    assert info_nce(fmap, lmap, protos, tau).item() == pytest.approx(expected, rel=1e-5)
    # prototype 2 not there yet: neither a negative nor a positive
    valid = torch.tensor([True, True, False])
    masked = (by_hand([3.0, 4.0], 0, (0, 1)) + by_hand([1.0, -1.0], 1, (0, 1))) / 2
    assert info_nce(feats, labels, protos, tau, valid=valid).item() == pytest.approx(masked, rel=1e-5)
    only_class_2 = torch.tensor([2, 2, 255])
    assert info_nce(feats, only_class_2, protos, tau, valid=valid).item() == 0.0
    assert info_nce(feats, torch.full((3,), 255), protos, tau).item() == 0.0  # no labelled pixel: 0, not nan


def test_class_centroids_masked_mean_over_images_then_l2():
    # image 0: class 0 at two pixels, class 1 at one; image 1: class 0 at one pixel, one ignored pixel
    feats = torch.tensor([[[1.0, 3.0, 5.0], [1.0, 1.0, 5.0]],
                          [[6.0, 9.0, 9.0], [0.0, 9.0, 9.0]]]).view(2, 2, 1, 3)
    labels = torch.tensor([[0, 0, 1], [0, 255, 255]]).view(2, 1, 3)
    centroids, present = class_centroids(feats, labels, num_classes=3)
    assert present.tolist() == [True, True, False]
    # class 0: image means (2, 1) and (6, 0), averaged over the images -> (4, 0.5), then L2
    c0 = torch.tensor([4.0, 0.5]) / math.hypot(4.0, 0.5)
    assert torch.allclose(centroids[0], c0, atol=1e-6)
    assert torch.allclose(centroids[1], torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    assert torch.equal(centroids[2], torch.zeros(2))  # absent: no centroid


def test_momentum_update_rule():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    centroids = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    present = torch.tensor([True, False, True])
    momentum_update_(bank, centroids, present, 0.9)
    # class 0: normalize(0.9 (1, 0) + 0.1 (0, 1)) = (0.9, 0.1) / sqrt(0.82)
    assert bank[0].tolist() == pytest.approx([0.9 / math.sqrt(0.82), 0.1 / math.sqrt(0.82)], abs=1e-6)
    assert bank[1].tolist() == [0.0, 1.0]  # absent: untouched
    assert bank[2].tolist() == pytest.approx([0.6, 0.8], abs=1e-6)  # first seen: takes the centroid


def test_margin_rule_for_pseudo_labels():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # (2, 0): d = 1 vs sqrt(5) -> 0; (1, 1): a tie -> ignored; (1, 0.98): d = 0.98 vs 1.0002, closer than
    # 0.05 -> ignored; (0, 3): d = sqrt(10) vs 2 -> 1
    feats = torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.98, 3.0]]).view(1, 2, 1, 4)
    assert nearest_prototype_labels(feats, protos, 0.05).flatten().tolist() == [0, 255, 255, 1]
    assert nearest_prototype_labels(feats, protos, 0.01).flatten().tolist() == [0, 255, 0, 1]
    only_1 = torch.tensor([False, True])  # a class missing from the bank is never a label
    assert nearest_prototype_labels(feats, protos, 0.05, valid=only_1).flatten().tolist() == [1, 1, 1, 1]
    none = torch.tensor([False, False])
    assert nearest_prototype_labels(feats, protos, 0.05, valid=none).flatten().tolist() == [255] * 4


# --------------------------------------------------------------------------- the method
class BlockModel(nn.Module):
    """A segmenter whose features are the image's first two channels averaged over 8x8
    blocks (output stride 8) and whose logits are (f_0, f_1, 0.5): predicted class 2
    when both features are below 0.5. Records the inputs and the train/eval mode."""

    feature_channels = 2

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, return_features=False):
        self.calls.append((x.detach().clone(), self.training))
        f = F.avg_pool2d(x[:, :2], 8) * self.scale
        logits = torch.cat([f, torch.full_like(f[:, :1], 0.5)], 1)
        out = {"main": logits, "aux": logits}
        if return_features:
            out["features"] = f
        return out

    def param_groups(self):
        return {"backbone": [self.scale], "head": []}


def block_cfg(*extra):
    return load_config("synthetic/cfcontra", ["model.num_classes=3", "method.contrast.head=none",
                                              "train.num_workers=0", "method.contrast.start_iter=0", *extra])


def blocks(*pixels, label=None):
    """An image of 8x8 blocks, one per (f_0, f_1) pixel, and its label map."""
    img = torch.zeros(3, 8, 8 * len(pixels))
    for i, (a, b) in enumerate(pixels):
        img[0, :, 8 * i: 8 * i + 8], img[1, :, 8 * i: 8 * i + 8] = a, b
    item = {"image": img}
    if label is not None:
        item["label"] = torch.tensor(label).repeat_interleave(8).expand(8, -1).clone()
    return item


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        return self.items[key[0] if isinstance(key, tuple) else key]


def test_bank_initialisation_pass(capsys):
    cfg = block_cfg("method.contrast.init_source_batches=2", "method.contrast.init_target_batches=1",
                    "train.batch_source=1", "train.batch_target=2")
    model = BlockModel()
    method = build_method(cfg, model)
    method.train()
    source = ListDataset([
        # counted only where the prediction equals the label: (0, 3) predicts 1, not 0
        blocks((2.0, 1.0), (4.0, 1.0), (0.0, 3.0), label=[0, 0, 0]),
        blocks((6.0, 0.0), (0.1, 0.2), (0.0, 5.0), label=[0, 2, 255]),
    ])
    m0 = torch.tensor([4.5, 0.5]) / math.hypot(4.5, 0.5)  # image means (3, 1) and (6, 0), averaged
    m2 = torch.tensor([0.1, 0.2]) / math.hypot(0.1, 0.2)
    tie = ((m0 + m2) / 2).tolist()  # equidistant from both prototypes: ignored by the margin
    target = ListDataset([blocks((5.0, 0.5), (0.2, 1.0), tie), blocks((3.0, 0.0), tie, tie)])
    missing = method.initialize_banks(source, target)

    assert torch.allclose(method.bank_source, torch.stack([m0, torch.zeros(2), m2]), atol=1e-6)
    t0 = torch.tensor([4.0, 0.25])  # image means (5, 0.5) and (3, 0), averaged
    t2 = torch.tensor([0.2, 1.0]) / math.hypot(0.2, 1.0)
    assert torch.allclose(method.bank_target, torch.stack([F.normalize(t0, dim=0), torch.zeros(2), t2]), atol=1e-6)
    assert missing == {"source": [1], "target": [1]} and method.banks_ready
    assert "source bank: 1; target bank: 1" in capsys.readouterr().out
    assert all(not training for _, training in model.calls) and method.training  # eval for the pass only


def test_training_step_uses_the_four_terms_as_tabled():
    cfg = block_cfg("method.contrast.margin=0.0")
    model = BlockModel()
    method = build_method(cfg, model)
    src_bank = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.7, 0.7]]), dim=1)
    tgt_bank = F.normalize(torch.tensor([[1.0, -0.3], [-0.2, 1.0], [1.0, 1.2]]), dim=1)
    method.load_banks(src_bank, tgt_bank)
    xs = blocks((2.0, 1.0), (0.3, 2.0), (0.1, 0.2), label=[0, 1, 255])
    xt = blocks((0.2, 3.0), (1.5, 1.4), (2.0, 0.1))
    batch = {"source": {"image": xs["image"][None], "label": xs["label"][None]},
             "target": {"image": xt["image"][None]}}
    losses = method(batch, 0)

    f_s, f_t = F.avg_pool2d(xs["image"][None, :2], 8), F.avg_pool2d(xt["image"][None, :2], 8)
    y_s = torch.tensor([[[0, 1, 255]]])
    y_t = torch.tensor([[[1, 2, 0]]])  # nearest source prototypes of (0.2, 3), (1.5, 1.4), (2, 0.1)
    assert torch.equal(nearest_prototype_labels(f_t, src_bank, 0.0), y_t)
    table = {"loss_con_source": (f_s, y_s, src_bank), "loss_con_target": (f_t, y_t, tgt_bank),
             "loss_con_source_to_target": (f_s, y_s, tgt_bank), "loss_con_target_to_source": (f_t, y_t, src_bank)}
    for name, (f, y, bank) in table.items():
        assert losses[name].item() == pytest.approx(0.001 * info_nce(f, y, bank, 0.07).item(), rel=1e-5), name
    assert losses["pseudo_label_ratio"].item() == 1.0
    # before start_iter: MinEnt only
    method.mcfg.contrast.start_iter = 5
    assert not any(k.startswith("loss_con") for k in method(batch, 4))


def test_pseudo_label_options():
    method = build_method(block_cfg("method.contrast.pseudo_label=prediction"), BlockModel())
    feats = torch.tensor([[2.0, 0.1, 0.0], [1.0, 0.2, 3.0]]).view(1, 2, 1, 3)
    logits = torch.cat([feats, torch.full((1, 1, 1, 3), 0.5)], 1)
    assert method.target_pseudo_labels(feats, logits, 0).flatten().tolist() == [0, 2, 1]  # argmax, no margin
    decayed = build_method(block_cfg("method.contrast.margin_decay=true", "train.iters=100",
                                     "optim.poly_iters=null"), BlockModel())
    assert decayed.margin_at(0) == pytest.approx(0.05)
    assert decayed.margin_at(50) == pytest.approx(0.05 * 0.5**0.9)
    assert method.margin_at(50) == 0.05


def test_before_start_iter_and_without_contrast_it_is_minent():
    torch.manual_seed(0)
    cfg = load_config("synthetic/minent", ["model.base_width=8", "model.backbone=resnet18"])
    model = build_segmenter(cfg.model)
    minent = build_method(cfg, model)
    g = torch.Generator().manual_seed(0)
    batch = {"source": {"image": torch.rand(1, 3, 32, 32, generator=g), "label": torch.randint(0, 19, (1, 32, 32))},
             "target": {"image": torch.rand(1, 3, 32, 32, generator=g)}}
    want = minent(batch, 3)
    for extra in (["method.contrast.start_iter=4"], [f"method.contrast.{w}=0" for w in (
            "weight_source", "weight_target", "weight_source_to_target", "weight_target_to_source")]):
        cf_cfg = load_config("synthetic/cfcontra", ["model.base_width=8", "model.backbone=resnet18", *extra])
        got = build_method(cf_cfg, model)(batch, 3)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("cross_update", [False, True])
def test_bank_update_after_the_step(cross_update):
    cfg = block_cfg(f"method.contrast.cross_update={str(cross_update).lower()}")
    method = build_method(cfg, BlockModel())
    src_bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    tgt_bank = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    method.load_banks(src_bank, tgt_bank)
    c_s, p_s = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]), torch.tensor([True, False, True])
    c_t, p_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), torch.tensor([True, True, False])
    method.update_banks(c_s, p_s, c_t, p_t)

    def upd(bank, c, p):
        new = F.normalize(0.9 * bank + 0.1 * c, dim=1)
        return torch.where(p[:, None], new, bank)

    if cross_update:  # reference: the other domain's centroids first, the bank's own last
        want_src = upd(upd(src_bank, c_t, p_t), c_s, p_s)
        want_tgt = upd(upd(tgt_bank, c_s, p_s), c_t, p_t)
    else:
        want_src, want_tgt = upd(src_bank, c_s, p_s), upd(tgt_bank, c_t, p_t)
        assert method.bank_source[1].tolist() == [0.0, 1.0]  # absent from the source batch: untouched
    assert torch.allclose(method.bank_source, want_src, atol=1e-6)
    assert torch.allclose(method.bank_target, want_tgt, atol=1e-6)


def test_cross_update_order_hand_values():
    """cross_update: M_src takes C_t then C_s, M_tgt C_s then C_t, both in one step (mu = 0.9)."""
    method = build_method(block_cfg("method.contrast.cross_update=true"), BlockModel())
    method.load_banks(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
                      torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))
    c_s, p_s = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([True, False, False])
    c_t, p_t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]), torch.tensor([True, True, False])
    method.update_banks(c_s, p_s, c_t, p_t)
    r = math.sqrt(0.82)
    # M_src row 0: (1, 0) -> C_t (0, 1): (0.9, 0.1) / r -> C_s (-1, 0): 0.9 (0.9, 0.1) / r + 0.1 (-1, 0)
    src0 = torch.tensor([0.81 / r - 0.1, 0.09 / r])
    # (C_s first would give (1, 0) -> (1, 0) -> (0.9, 0.1) / r: the order matters)
    # M_src row 1: only C_t (1, 0) -> (0.1, 0.9) / r
    want_src = torch.stack([src0 / src0.norm(), torch.tensor([0.1 / r, 0.9 / r]), torch.zeros(2)])
    # M_tgt row 0: (0, 1) -> C_s (-1, 0): (-0.1, 0.9) / r -> C_t (0, 1): 0.9 (-0.1, 0.9) / r + 0.1 (0, 1)
    tgt0 = torch.tensor([-0.09 / r, 0.81 / r + 0.1])
    want_tgt = torch.stack([tgt0 / tgt0.norm(), torch.tensor([1.0, 0.0]), torch.zeros(2)])
    assert torch.allclose(method.bank_source, want_src, atol=1e-6)
    assert torch.allclose(method.bank_target, want_tgt, atol=1e-6)
    assert not torch.allclose(want_src[0], torch.tensor([0.9 / r, 0.1 / r]), atol=1e-3)


def test_scale_features_divides_channels_by_their_l2_norm():
    # channel 0 holds 3 and 4 over the batch (norm 5, max 4), channel 1 holds 6 and 8 (norm 10, max 8)
    feats = torch.tensor([[3.0, 6.0], [4.0, 8.0]]).view(2, 2, 1, 1)
    scaled = scale_channels_by_norm(feats)
    assert torch.allclose(scaled.flatten(1), torch.tensor([[0.6, 0.6], [0.8, 0.8]]), atol=1e-7)
    assert torch.equal(scale_channels_by_norm(torch.zeros(1, 2, 1, 1)), torch.zeros(1, 2, 1, 1))
    # through the pseudo-labels: (0.6, 0.6) is on prototype 0; (0.8, 0.8) is 0.2 sqrt(2) and
    # 0.22 sqrt(2) from the two prototypes, closer than the margin 0.05 -> ignored. (Dividing by
    # the max would give (0.75, 0.75) -> 0 and (1, 1) -> 1.)
    method = build_method(block_cfg("method.contrast.scale_features=true"), BlockModel())
    method.load_banks(torch.tensor([[0.6, 0.6], [1.02, 1.02], [0.0, 0.0]]), torch.zeros(3, 2))
    assert method.target_pseudo_labels(feats, None, 0).flatten().tolist() == [0, 255]
    unscaled = build_method(block_cfg(), BlockModel())
    unscaled.load_banks(method.bank_source, torch.zeros(3, 2))
    assert unscaled.target_pseudo_labels(feats, None, 0).flatten().tolist() == [1, 1]


def test_after_step_moves_banks_toward_the_batch_centroids():
    method = build_method(block_cfg(), BlockModel())
    method.load_banks(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), torch.zeros(3, 2))
    xs = blocks((0.0, 2.0), (1.0, 1.0), label=[0, 2])
    xt = blocks((3.0, 0.0), (0.0, 3.0))
    batch = {"source": {"image": xs["image"][None], "label": xs["label"][None]},
             "target": {"image": xt["image"][None]}}
    method(batch, 0)
    method.after_step(0)
    s = F.normalize(torch.tensor([0.9, 0.1]), dim=0)  # class 0 pulled toward (0, 1)
    assert torch.allclose(method.bank_source, torch.stack([s, torch.tensor([0.0, 1.0]),
                                                           torch.tensor([1.0, 1.0]) / math.sqrt(2)]), atol=1e-6)
    # target pseudo-labels from the source bank: (3, 0) -> 0, (0, 3) -> 1
    assert torch.allclose(method.bank_target, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), atol=1e-6)


def tiny_cfcontra(*extra):
    cfg = load_config("synthetic/cfcontra", ["model.base_width=8", "model.backbone=resnet18", *extra])
    return build_method(cfg, build_segmenter(cfg.model))


def test_train_head_switch_and_optimizers():
    method = tiny_cfcontra("optim.lr=0.01", "optim.head_lr_mult=10")
    assert isinstance(method.head, ProjectionHead) and method.head.kind == "mlp"
    convs = [m for m in method.head.modules() if isinstance(m, nn.Conv2d)]
    width = method.model.feature_channels
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(width, width, (1, 1))] * 2
    assert method.bank_source.shape == method.bank_target.shape == (19, width)
    head_ids = {id(p) for p in method.head.parameters()}
    groups = method.build_optimizers()["segmenter"].optimizer.param_groups
    head_groups = [g for g in groups if {id(p) for p in g["params"]} == head_ids]
    assert len(head_groups) == 1 and head_groups[0]["initial_lr"] == pytest.approx(0.01 * 10)

    frozen = tiny_cfcontra("method.contrast.train_head=false")
    head_ids = {id(p) for p in frozen.head.parameters()}
    for opt in frozen.build_optimizers().values():
        assert not head_ids & {id(p) for g in opt.optimizer.param_groups for p in g["params"]}
    assert not any(p.requires_grad for p in frozen.head.parameters())

    assert tiny_cfcontra("method.contrast.head=linear", "method.contrast.dim=16").bank_source.shape == (19, 16)
    none = tiny_cfcontra("method.contrast.head=none")
    assert not list(none.head.parameters()) and none.bank_source.shape == (19, width)
    with pytest.raises(ConfigError, match="init_features=layer4"):
        tiny_cfcontra("method.contrast.init_features=layer4", "method.contrast.dim=16")


def test_packaged_variants():
    ablation = load_config("synthetic/cfcontra_no_contrast").method.contrast
    assert ablation.weight_source == ablation.weight_target_to_source == 0.0
    assert tiny_cfcontra("method.contrast.weight_source=0", "method.contrast.weight_target=0",
                         "method.contrast.weight_source_to_target=0",
                         "method.contrast.weight_target_to_source=0").head is None
    ref = load_config("synthetic/cfcontra_reference").method.contrast
    assert (ref.cross_update, ref.train_head, ref.init_features) == (True, False, "layer4")
    for bench in ("gta5_cityscapes", "synthia_cityscapes"):
        cfg = load_config(f"{bench}/cfcontra")
        c = cfg.method.contrast
        assert cfg.source.resize == cfg.target.resize == [1280, 640] and cfg.train.seed == 1234
        assert (c.temperature, c.momentum, c.margin, c.weight_source) == (0.07, 0.9, 0.05, 0.001)
        assert (c.init_source_batches, c.init_target_batches) == (300, 1600)


# --------------------------------------------------------------------------- online restyling
class MeanColourStylizer(nn.Module):
    """Stands in for AdaIN: every restyled image is the style images' mean colour."""

    def style_stats(self, style):
        return style.mean((0, 2, 3)).view(1, 3, 1, 1), style.std()

    def stylize_with_stats(self, content, mean, std, alpha=1.0):
        return (alpha * mean + (1 - alpha) * content).expand_as(content).clone()


def test_online_restyling_wiring(tiny_synth, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(style_module, "build_stylizer", lambda scfg: built.append(scfg) or MeanColourStylizer())
    overrides = tiny_overrides(tiny_synth, tmp_path, **{"model.num_classes": 3, "method.contrast.head": "none",
                                                        "method.style.mode": "online",
                                                        "method.style.decoder": "decoder.pth",
                                                        "method.style.num_styles": 2,
                                                        "method.contrast.start_iter": 1})
    cfg = load_config("synthetic/cfcontra", overrides)
    model = BlockModel()
    method = build_method(cfg, model)
    method.load_banks(torch.eye(3, 2), torch.eye(3, 2))
    g = torch.Generator().manual_seed(0)
    batch = {"source": {"image": torch.rand(2, 3, 16, 16, generator=g), "label": torch.zeros(2, 16, 16).long()},
             "target": {"image": torch.rand(2, 3, 16, 16, generator=g)}}
    for it in (0, 1):  # the MinEnt phase and the contrast phase
        model.calls.clear()
        method(batch, it)
        (seen_s, _), (seen_t, _) = model.calls
        styles = method.restyler.styles
        assert styles.shape == (2, 3, 32, 64)  # two target training images at the benchmark's size
        assert torch.allclose(seen_s, styles.mean((0, 2, 3)).view(1, 3, 1, 1).expand(2, 3, 16, 16))
        assert torch.equal(seen_t, batch["target"]["image"])  # domains: [source]
    assert len(built) == 1 and built[0].decoder == "decoder.pth"  # built once, lazily

    # prob < 1: which images are restyled depends only on (seed, iteration)
    method.mcfg.style.prob = 0.5
    big = {"source": {"image": torch.rand(16, 3, 8, 8, generator=g)}}
    picks = []
    for it in (3, 3, 4):
        out = method.restyle(big, it)["source"]["image"]
        restyled = (out != big["source"]["image"]).flatten(1).any(1)
        picks.append(restyled.tolist())
    assert picks[0] == picks[1] and 0 < sum(picks[0]) < 16 and picks[0] != picks[2]


# --------------------------------------------------------------------------- through the trainer
def test_tiny_run_and_exact_resume(tiny_synth, tmp_path, monkeypatch):
    """Contrast from iteration 1 (banks initialised then), checkpoint at 2, killed at 3, resumed."""
    extra = {"train.iters": 4, "train.ckpt_every": 2, "method.contrast.start_iter": 1,
             "method.contrast.init_source_batches": 2, "method.contrast.init_target_batches": 2}
    train_from_config(load_config("synthetic/cfcontra", tiny_overrides(tiny_synth, tmp_path / "a", **extra)),
                      progress=False)
    ref = torch.load(tmp_path / "a" / "final.pth", weights_only=False)
    assert ref["method_extra"] == {"banks_ready": True}
    for bank in ("bank_source", "bank_target"):
        norms = ref["method"][bank].norm(dim=1)
        assert ((norms - 1).abs() < 1e-5).any() and (((norms - 1).abs() < 1e-5) | (norms == 0)).all()
    assert "head.proj.0.weight" in ref["method"]

    cfg = load_config("synthetic/cfcontra", tiny_overrides(tiny_synth, tmp_path / "b", **extra))
    interrupted, got = kill_and_resume(monkeypatch, CFContra, cfg, 3, 2)
    assert interrupted["method_extra"] == {"banks_ready": True}

    assert_resumed_run_equal(ref, got)
