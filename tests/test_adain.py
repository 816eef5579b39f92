import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from segadapt.cli import main
from segadapt.errors import CheckpointError, ConfigError
from segadapt.models.adain import (
    AdaINDecoder,
    AdaINStylizer,
    AdaINTrainConfig,
    VGGEncoder,
    adain,
    adain_from_stats,
    adain_losses,
    load_style_images,
    mean_std,
    save_decoder,
    train_decoder,
)

# The published layouts, written out independently of the module's generator.
VGG_CONVS = {0: (3, 3, 1), 2: (3, 64, 3), 5: (64, 64, 3), 9: (64, 128, 3), 12: (128, 128, 3),
             16: (128, 256, 3), 19: (256, 256, 3), 22: (256, 256, 3), 25: (256, 256, 3), 29: (256, 512, 3)}
VGG_PADS = {1, 4, 8, 11, 15, 18, 21, 24, 28}
VGG_POOLS = {7, 14, 27}
DEC_CONVS = {1: (512, 256), 5: (256, 256), 8: (256, 256), 11: (256, 256), 14: (256, 128),
             18: (128, 128), 21: (128, 64), 25: (64, 64), 28: (64, 3)}
DEC_UPS = {3, 16, 23}


def expected_shapes(convs):
    out = {}
    for i, spec in convs.items():
        c_in, c_out, k = spec if len(spec) == 3 else (*spec, 3)
        out[f"{i}.weight"] = (c_out, c_in, k, k)
        out[f"{i}.bias"] = (c_out,)
    return out


def shapes_of(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def stylizer():
    return AdaINStylizer().eval()


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory, stylizer):
    path = tmp_path_factory.mktemp("adain") / "decoder.pth"
    save_decoder(stylizer, path)
    return path


# --------------------------------------------------------------------------- AdaIN arithmetic


def test_adain_hand_checked_values_and_eps():
    content = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)  # mean 2.5, var 1.25
    style = torch.tensor([10.0, 10.0, 20.0, 20.0]).view(1, 1, 2, 2)  # mean 15, var 25
    out = adain(content, style, eps=0.0)
    k = 5 / math.sqrt(1.25)
    assert torch.allclose(out.flatten(), torch.tensor([15 - 1.5 * k, 15 - 0.5 * k, 15 + 0.5 * k, 15 + 1.5 * k]))
    assert out.mean().item() == pytest.approx(15.0)
    assert out.var(correction=0).sqrt().item() == pytest.approx(5.0)
    # eps goes under both square roots: std_out = sqrt(25 + eps) * sqrt(1.25) / sqrt(1.25 + eps)
    eps = 0.01
    out = adain(content, style, eps=eps)
    assert out.mean().item() == pytest.approx(15.0)
    expected = math.sqrt(25 + eps) * math.sqrt(1.25) / math.sqrt(1.25 + eps)
    assert out.var(correction=0).sqrt().item() == pytest.approx(expected, rel=1e-6)
    # a constant content channel takes the style mean, no NaN
    out = adain(torch.full((1, 1, 2, 2), 7.0), style)
    assert torch.equal(out, torch.full_like(out, 15.0))


def test_adain_matches_style_statistics_per_channel():
    g = torch.Generator().manual_seed(0)
    content = torch.randn(2, 5, 6, 7, generator=g) * 3 + 1
    style = torch.randn(2, 5, 4, 4, generator=g) * torch.arange(1.0, 6.0).view(1, 5, 1, 1) - 2
    out = adain(content, style)
    o_mean, o_std = mean_std(out, eps=0.0)
    s_mean, s_std = mean_std(style, eps=0.0)
    assert torch.allclose(o_mean, s_mean, atol=1e-5)
    assert torch.allclose(o_std, s_std, rtol=1e-4)
    # one style shared by the batch
    shared = adain(content, style[:1])
    assert torch.allclose(mean_std(shared, 0.0)[0], s_mean[:1].expand(2, -1, -1, -1), atol=1e-5)
    with pytest.raises(ValueError, match="style batch"):
        adain(content, torch.randn(3, 5, 4, 4))


def test_style_blending_equals_blended_adain_outputs(stylizer):
    g = torch.Generator().manual_seed(1)
    content, styles = torch.rand(2, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    styles[1] *= 0.3  # a dark style
    weights = [2.0, 1.0, 1.0]
    mean, std = stylizer.style_stats(styles, weights)
    feats = stylizer.encoder(styles)
    f_c = stylizer.encoder(content)
    # the reference interpolation: a weighted sum of one AdaIN per style (weights normalised)
    reference = sum(w / 4.0 * adain(f_c, feats[i:i + 1]) for i, w in enumerate(weights))
    assert torch.allclose(adain_from_stats(f_c, mean, std), reference, atol=1e-4)
    # default weights are equal
    m_eq, s_eq = stylizer.style_stats(styles)
    per_mean, per_std = mean_std(feats)
    assert torch.allclose(m_eq, per_mean.mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(s_eq, per_std.mean(0, keepdim=True), atol=1e-6)
    # weight 1 on one style = that style alone
    assert torch.allclose(stylizer(content, styles, style_weights=[0, 1, 0]), stylizer(content, styles[1:2]),
                          atol=1e-5)
    with pytest.raises(ConfigError, match="style_weights"):
        stylizer(content, styles, style_weights=[1, 1])


def test_alpha_interpolates_decoder_input(stylizer):
    g = torch.Generator().manual_seed(2)
    content, style = torch.rand(1, 3, 16, 24, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    seen = []
    hook = stylizer.decoder.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].clone()))
    try:
        out0 = stylizer(content, style, alpha=0.0)
        stylizer(content, style, alpha=1.0)
        stylizer(content, style, alpha=0.25)
    finally:
        hook.remove()
    f_c = stylizer.encoder(content)
    assert torch.equal(seen[0], f_c)  # alpha = 0: the content features themselves
    assert torch.allclose(seen[1], adain(f_c, stylizer.encoder(style)), atol=1e-5)
    assert torch.allclose(seen[2], 0.25 * seen[1] + 0.75 * f_c, atol=1e-5)
    assert out0.shape == content.shape and out0.min() >= 0 and out0.max() <= 1


def test_odd_sizes_come_back_at_input_size(stylizer):
    out = stylizer(torch.rand(2, 3, 13, 21), torch.rand(1, 3, 9, 11))
    assert out.shape == (2, 3, 13, 21)
    assert not out.requires_grad


# --------------------------------------------------------------------------- layouts and weight files


def test_encoder_and_decoder_layouts_match_published_files():
    enc, dec = VGGEncoder(), AdaINDecoder()
    assert len(enc) == 31 and len(dec) == 29
    assert shapes_of(enc.state_dict()) == expected_shapes(VGG_CONVS)
    assert shapes_of(dec.state_dict()) == expected_shapes(DEC_CONVS)
    for i, m in enumerate(enc):
        kind = (nn.Conv2d if i in VGG_CONVS else nn.ReflectionPad2d if i in VGG_PADS
                else nn.MaxPool2d if i in VGG_POOLS else nn.ReLU)
        assert isinstance(m, kind), (i, m)
    for i, m in enumerate(dec):
        kind = (nn.Conv2d if i in DEC_CONVS else nn.Upsample if i in DEC_UPS
                else nn.ReflectionPad2d if (i + 1) in DEC_CONVS else nn.ReLU)
        assert isinstance(m, kind), (i, m)
    assert isinstance(dec[-1], nn.Conv2d)  # the image is the last conv's output, no ReLU
    # 256x256 -> relu4_1 at 32x32 -> decoded back to 256x256
    with torch.no_grad():
        assert enc(torch.rand(1, 3, 64, 64)).shape == (1, 512, 8, 8)
        assert dec(torch.rand(1, 512, 4, 5)).shape == (1, 3, 32, 40)


def _random_sd(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}


def test_published_files_load_by_path(tmp_path, caplog):
    vgg_sd = _random_sd(expected_shapes(VGG_CONVS), 0)
    vgg_sd["51.bias"] = torch.zeros(512)  # the published file goes on to relu5_4: deeper keys are ignored
    dec_sd = _random_sd(expected_shapes(DEC_CONVS), 1)
    torch.save(vgg_sd, tmp_path / "vgg_normalised.pth")
    torch.save(dec_sd, tmp_path / "decoder.pth")
    with caplog.at_level(logging.WARNING, logger="segadapt.models.adain"):
        s = AdaINStylizer(vgg_path=str(tmp_path / "vgg_normalised.pth"), decoder_path=str(tmp_path / "decoder.pth"))
    assert "RANDOM" not in caplog.text
    assert torch.equal(s.encoder[29].weight, vgg_sd["29.weight"])
    assert torch.equal(s.decoder[28].bias, dec_sd["28.bias"])
    info = s.describe()
    assert info["random_encoder"] is False and info["encoder"] == "vgg" and len(info["vgg_sha256"]) == 64
    assert not s.encoder[0].weight.requires_grad

    def one_line_error(**kwargs):
        with pytest.raises(CheckpointError) as e:
            AdaINStylizer(**kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "AdaIN decoder, not VGG weights" in one_line_error(vgg_path=str(tmp_path / "decoder.pth"))
    assert "not AdaIN decoder" in one_line_error(vgg_path=str(tmp_path / "vgg_normalised.pth"),
                                                 decoder_path=str(tmp_path / "vgg_normalised.pth"))
    bad = dict(vgg_sd)
    bad["29.weight"] = torch.zeros(512, 256, 1, 1)
    del bad["0.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    msg = one_line_error(vgg_path=str(tmp_path / "bad.pth"))
    assert "bad.pth" in msg and "0.bias" in msg and "29.weight" in msg
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert "text.pth" in one_line_error(vgg_path=str(tmp_path / "text.pth"))
    assert "not found" in one_line_error(vgg_path=str(tmp_path / "missing.pth"))
    # a published decoder belongs to the real VGG: refused with the random encoder
    assert "pass vgg_path" in one_line_error(decoder_path=str(tmp_path / "decoder.pth"))


def test_random_encoder_is_seeded_announced_and_recorded(tmp_path, caplog, stylizer, decoder_file):
    rng_before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="segadapt.models.adain"):
        a, b = AdaINStylizer(), AdaINStylizer(encoder_seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # private generator
    assert "RANDOM encoder" in caplog.text
    assert a.describe()["random_encoder"] is True and a.describe()["encoder_seed"] == 0
    assert torch.equal(a.encoder[29].weight, stylizer.encoder[29].weight)
    assert not torch.equal(a.encoder[29].weight, b.encoder[29].weight)
    # the decoder file rebuilds its encoder; other encoders are refused
    c = AdaINStylizer(decoder_path=str(decoder_file))
    assert torch.equal(c.encoder[2].weight, stylizer.encoder[2].weight)
    assert torch.equal(c.decoder[1].weight, stylizer.decoder[1].weight) and c.decoder_trained
    with pytest.raises(CheckpointError, match="seed 0, not 3"):
        AdaINStylizer(decoder_path=str(decoder_file), encoder_seed=3)
    vgg = tmp_path / "vgg.pth"
    torch.save(_random_sd(expected_shapes(VGG_CONVS), 0), vgg)
    with pytest.raises(CheckpointError, match="random encoder"):
        AdaINStylizer(vgg_path=str(vgg), decoder_path=str(decoder_file))
    with pytest.raises(ConfigError, match="encoder_init"):
        AdaINStylizer(encoder_init="none")


def test_random_encoder_features_stay_at_unit_scale(stylizer):
    # He init with a standardising first layer: no tap explodes or vanishes
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for f in stylizer.encoder.taps(x):
            rms = f.pow(2).mean().sqrt().item()
            assert 0.3 < rms < 3.0, rms


def test_load_style_images_picks_a_seeded_subset(tiny_synth):
    folder = tiny_synth / "target" / "leftImg8bit" / "train"
    images, names = load_style_images(folder, (32, 16), max_images=3, seed=5, return_names=True)
    assert images.shape == (3, 3, 16, 32) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    again, names2 = load_style_images(folder, (32, 16), max_images=3, seed=5, return_names=True)
    assert names == names2 and names == sorted(names) and torch.equal(images, again)
    assert load_style_images(folder, (32, 16)).shape[0] == 8  # all of them


# --------------------------------------------------------------------------- decoder training


def test_decoder_training_reduces_the_loss(tiny_synth, tmp_path):
    from segadapt.config import DatasetConfig
    from segadapt.data.datasets import build_dataset

    content = build_dataset(DatasetConfig(kind="gta5", root=str(tiny_synth / "source"), split="all",
                                          labels=False, crop=[16, 16]))
    style = build_dataset(DatasetConfig(kind="cityscapes", root=str(tiny_synth / "target"), split="train",
                                        labels=False, crop=[16, 16]))
    s = AdaINStylizer()
    fixed_c = torch.stack([content[(i, 0)]["image"] for i in range(2)])
    fixed_s = torch.stack([style[(i, 0)]["image"] for i in range(2)])

    def fixed_loss():
        with torch.no_grad():
            c, st = adain_losses(s, fixed_c, fixed_s)
        return (c + 10 * st).item()

    before = fixed_loss()
    # the reference's Adam settings; a fixed batch measures progress, not the luck of the draws
    cfg = AdaINTrainConfig(iters=4, batch_size=2, resize=None, crop=16, num_workers=0, log_every=2)
    history = train_decoder(s, content, style, cfg, save_path=tmp_path / "dec.pth", progress=False)
    assert [h["iter"] for h in history] == [2, 4]
    assert fixed_loss() < 0.2 * before
    assert not any(p.grad is not None for p in s.encoder.parameters())  # the encoder stays frozen
    # the written file restores exactly this decoder, with its encoder and settings
    r = AdaINStylizer(decoder_path=str(tmp_path / "dec.pth"))
    assert all(torch.equal(p, q) for p, q in zip(r.decoder.parameters(), s.decoder.parameters()))
    meta = torch.load(tmp_path / "dec.pth", weights_only=True)["segadapt_adain"]
    assert meta["encoder"] == "random" and meta["train"]["style_weight"] == 10.0 and meta["iters_done"] == 4


def test_adain_train_command_writes_a_loadable_decoder(tiny_synth, tmp_path, capsys):
    out = tmp_path / "decoder.pth"
    code = main(["adain-train", "--content-root", str(tiny_synth / "source"), "--content-kind", "gta5",
                 "--style-root", str(tiny_synth / "target"), "--style-kind", "cityscapes", "--out", str(out),
                 "--iters", "2", "--batch-size", "1", "--crop", "16", "--resize", "0", "0", "--workers", "0",
                 "--log-every", "1", "--no-progress"])
    assert code == 0
    assert "RANDOM encoder" in capsys.readouterr().out
    assert AdaINStylizer(decoder_path=str(out)).describe()["decoder_trained"]
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no leftovers
    code = main(["adain-train", "--content-root", str(tiny_synth / "source"), "--style-root",
                 str(tiny_synth / "target"), "--style-kind", "cityscapes", "--split", "val", "--out", str(out)])
    assert code == 2 and "evaluation split" in capsys.readouterr().err

    # an absurd learning rate: one line, non-zero exit, the earlier good decoder untouched
    good = out.read_bytes()
    code = main(["adain-train", "--content-root", str(tiny_synth / "source"), "--content-kind", "gta5",
                 "--style-root", str(tiny_synth / "target"), "--style-kind", "cityscapes", "--out", str(out),
                 "--iters", "3", "--batch-size", "1", "--crop", "16", "--resize", "0", "0", "--workers", "0",
                 "--log-every", "1", "--no-progress", "--lr", "1e30"])
    err = capsys.readouterr().err
    assert code != 0 and "non-finite AdaIN" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == good


# --------------------------------------------------------------------------- stylize command


def _tiny_gta5(src: Path, dst: Path, names) -> Path:
    for sub in ("images", "labels"):
        (dst / sub).mkdir(parents=True)
        for n in names:
            shutil.copyfile(src / sub / n, dst / sub / n)
    (dst / "train.txt").write_text("".join(n + "\n" for n in names))
    return dst


def _tiny_cityscapes(src: Path, dst: Path, per_split: int) -> Path:
    for split in ("train", "val"):
        images = sorted((src / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))[:per_split]
        for img in images:
            rel = img.relative_to(src / "leftImg8bit")
            (dst / "leftImg8bit" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(img, dst / "leftImg8bit" / rel)
            base = img.name.replace("_leftImg8bit.png", "")
            for lab in (src / "gtFine" / rel.parent).glob(base + "_gtFine_*"):
                (dst / "gtFine" / rel.parent).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(lab, dst / "gtFine" / rel.parent / lab.name)
    return dst


def _files(root: Path):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_stylize_gta5_layout(tiny_synth, tmp_path, decoder_file, capsys):
    from segadapt.config import DatasetConfig
    from segadapt.data.datasets import build_dataset

    src = _tiny_gta5(tiny_synth / "source", tmp_path / "gta5", ["00001.png", "00002.png", "00003.png"])
    (src / "val.txt").write_text("00003\n")
    out = tmp_path / "gta5_styled"
    common = ["stylize", "--data-kind", "gta5", "--root", str(src), "--decoder", str(decoder_file),
              "--style-dir", str(tiny_synth / "target" / "leftImg8bit" / "train"), "--style-size", "32", "16",
              "--size", "32", "16", "--batch-size", "2", "--workers", "0", "--no-progress"]
    code = main([*common, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert _files(out) == sorted(_files(src) + ["stylize.json"])
    for n in ("00001.png", "00002.png", "00003.png"):
        assert (out / "labels" / n).read_bytes() == (src / "labels" / n).read_bytes()
        assert (out / "images" / n).read_bytes() != (src / "images" / n).read_bytes()
    assert (out / "train.txt").read_bytes() == (src / "train.txt").read_bytes()
    # the copy is read by the same reader, at the original size, with the same labels
    a = build_dataset(DatasetConfig(kind="gta5", root=str(src), list_file="train.txt"))
    b = build_dataset(DatasetConfig(kind="gta5", root=str(out), list_file="train.txt"))
    assert b[0]["image"].shape == a[0]["image"].shape and torch.equal(b[2]["label"], a[2]["label"])
    info = json.loads((out / "stylize.json").read_text())
    run = info["runs"]["gta5:train:"]
    assert info["random_encoder"] is True and run["encoder"]["encoder"] == "random"
    assert run["num_styles"] == 4 and run["images"] == 3 and not info["includes_eval_split"]
    assert not (out / "RESTYLED_EVAL_SPLIT.txt").exists()
    # a restricted run copies only its own list: the others would name images the copy lacks
    assert main([*common, "--out", str(tmp_path / "sub"), "--list-file", "val.txt"]) == 0
    assert _files(tmp_path / "sub") == ["images/00003.png", "labels/00003.png", "stylize.json", "val.txt"]


def test_stylize_cityscapes_refuses_val_unless_asked(tiny_synth, tmp_path, decoder_file, capsys):
    src = _tiny_cityscapes(tiny_synth / "target", tmp_path / "cs", per_split=2)
    out = tmp_path / "cs_styled"
    common = ["--data-kind", "cityscapes", "--root", str(src), "--out", str(out), "--decoder", str(decoder_file),
              "--target-root", str(src), "--num-styles", "2", "--style-size", "32", "16", "--size", "32", "16",
              "--workers", "0", "--no-progress"]
    assert main(["stylize", *common]) == 0
    capsys.readouterr()
    assert _files(out) == sorted([f for f in _files(src) if "/val/" not in f] + ["stylize.json"])
    for f in _files(src / "gtFine" / "train"):
        assert (out / "gtFine" / "train" / f).read_bytes() == (src / "gtFine" / "train" / f).read_bytes()

    assert main(["stylize", *common, "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "evaluation split" in err and "--include-eval" in err and len(err.strip().splitlines()) == 1
    assert not (out / "leftImg8bit" / "val").exists()

    assert main(["stylize", *common, "--split", "val", "--include-eval"]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert (out / "RESTYLED_EVAL_SPLIT.txt").is_file()
    assert _files(out) == sorted(_files(src) + ["RESTYLED_EVAL_SPLIT.txt", "stylize.json"])
    info = json.loads((out / "stylize.json").read_text())
    assert info["includes_eval_split"] is True
    assert set(info["runs"]) == {"cityscapes:train:", "cityscapes:val:"}


def test_stylize_input_errors_are_one_line(tmp_path, tiny_synth, decoder_file, capsys):
    root = tiny_synth / "source"
    base = ["stylize", "--data-kind", "gta5", "--root", str(root)]
    assert main([*base, "--out", str(tmp_path / "o"), "--style-dir", str(tmp_path)]) == 2
    assert "give --decoder" in capsys.readouterr().err
    assert main([*base, "--out", str(root / "x"), "--decoder", str(decoder_file), "--style-dir", str(tmp_path)]) == 2
    assert "is inside --root" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o"), "--decoder", str(decoder_file)]) == 2
    assert "--style-dir or --target-root" in capsys.readouterr().err


def test_stylize_with_a_cut_generator(tiny_synth, tmp_path, decoder_file, capsys):
    """--cut-generator: the copy holds G's translation of each image (sized from the file, odd
    sides padded and cropped back); labels are copied; stylize.json says CUT."""
    import numpy as np

    from segadapt.data.io import read_image
    from segadapt.models.cut import ResnetGenerator, from_cut_range, save_cut_weights, to_cut_range

    torch.manual_seed(0)
    G = ResnetGenerator(ngf=4, n_blocks=1).eval()
    save_cut_weights(tmp_path / "cut", G=G)
    src = _tiny_gta5(tiny_synth / "source", tmp_path / "gta5", ["00001.png", "00002.png"])
    out = tmp_path / "gta5_cut"
    common = ["stylize", "--data-kind", "gta5", "--root", str(src), "--batch-size", "2", "--workers", "0",
              "--no-progress"]
    # odd sizes exercise the padding to G's multiple of 4
    assert main([*common, "--cut-generator", str(tmp_path / "cut"), "--size", "31", "18", "--out", str(out)]) == 0
    capsys.readouterr()
    assert _files(out) == sorted(_files(src) + ["stylize.json"])
    for n in ("00001.png", "00002.png"):
        assert (out / "labels" / n).read_bytes() == (src / "labels" / n).read_bytes()
    x = torch.from_numpy(read_image(src / "images" / "00001.png").transpose(2, 0, 1).copy()).float()[None] / 255
    h, w = x.shape[-2:]
    small = torch.nn.functional.interpolate(x, size=(18, 31), mode="bilinear", align_corners=False, antialias=True)
    padded = torch.nn.functional.pad(small, (0, 1, 0, 2), mode="reflect")
    with torch.no_grad():
        y = from_cut_range(G(to_cut_range(padded)))[..., :18, :31]
    y = torch.nn.functional.interpolate(y, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    expected = y.mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    got = read_image(out / "images" / "00001.png")
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    run = json.loads((out / "stylize.json").read_text())["runs"]["gta5:train:"]
    assert run["stylizer"] == "cut" and run["cut_ngf"] == 4 and run["random_encoder"] is False

    # exactly one stylizer; a file that is not a CUT G is one line
    assert main([*common, "--cut-generator", str(tmp_path / "cut"), "--decoder", str(decoder_file),
                 "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*common, "--cut-generator", str(decoder_file), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "not a CUT generator" in err and len(err.strip().splitlines()) == 1
