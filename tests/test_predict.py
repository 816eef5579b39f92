import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.cli import main
from segadapt.data.io import read_image, read_label
from segadapt.data.labels import PALETTE
from segadapt.data.transforms import resize_image, to_tensor
from segadapt.engine.inference import predict, predict_logits
from segadapt.engine.predictor import collect_images

from .conftest import load_eager_segmenter


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def eager(run_dir):
    return load_eager_segmenter(run_dir)


@pytest.fixture
def images(tiny_synth, tmp_path):
    """Two 64x32 target images in a sub-folder and one 40x20 image (another size group)."""
    src = sorted((tiny_synth / "target" / "leftImg8bit" / "val").rglob("*.png"))
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(src[0], folder / "sub" / "a.png")
    shutil.copy(src[1], folder / "sub" / "b.png")
    Image.open(src[2]).resize((40, 20), Image.BILINEAR).save(folder / "small.png")
    return folder


def stderr_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_outputs_match_eager_model_at_original_size(run_dir, eager, images, tmp_path):
    out = tmp_path / "pred"
    code = main(["predict", str(images), "--checkpoint", str(run_dir), "--out", str(out),
                 "--entropy", "--batch-size", "2", "--no-progress"])
    assert code == 0
    for name, size in (("sub/a", (32, 64)), ("sub/b", (32, 64)), ("small", (20, 40))):
        image = read_image(images / f"{name}.png")
        ids = read_label(out / f"{name}_trainid.png")
        assert ids.shape == size == image.shape[:2]
        x = to_tensor(image)[None]
        assert np.array_equal(ids, predict(eager, x, size)[0].numpy()), name

        color = np.asarray(Image.open(out / f"{name}_color.png").convert("RGB"))
        assert np.array_equal(color, PALETTE[ids])
        if (ids == 0).any():  # road is (128, 64, 128) in the Cityscapes palette
            assert tuple(color[ids == 0][0]) == (128, 64, 128)
        blend = np.asarray(Image.open(out / f"{name}_overlay.png").convert("RGB")).astype(int)
        assert np.abs(blend - (0.5 * image + 0.5 * PALETTE[ids].astype(float))).max() <= 0.5 + 1e-6

        probs = predict_logits(eager, x, size).softmax(1)[0]
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(0) / math.log(19)
        got = np.asarray(Image.open(out / f"{name}_entropy.png")).astype(float) / 255
        assert got.shape == size and np.abs(got - entropy.numpy()).max() <= 1 / 255
        conf = np.asarray(Image.open(out / f"{name}_confidence.png")).astype(float) / 255
        assert np.abs(conf - probs.max(0).values.numpy()).max() <= 1 / 255


def test_size_option_resizes_the_model_input(run_dir, eager, images, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", str(images / "sub" / "a.png"), "--checkpoint", str(run_dir / "final.pth"),
                 "--out", str(out), "--size", "32", "16", "--no-progress"]) == 0
    image = read_image(images / "sub" / "a.png")
    expected = predict(eager, to_tensor(resize_image(image, (32, 16)))[None], (32, 64))[0].numpy()
    got = read_label(out / "a_trainid.png")
    assert got.shape == (32, 64) and np.array_equal(got, expected)
    assert not (out / "a_entropy.png").exists()  # only with --entropy


def test_corrupt_and_missing_inputs_are_listed_and_exit_1(run_dir, images, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    out = tmp_path / "pred"
    code = main(["predict", str(images), str(tmp_path / "absent.jpg"), "--checkpoint", str(run_dir),
                 "--out", str(out), "--no-progress"])
    assert code == 1
    for name in ("sub/a", "sub/b", "small"):
        assert (out / f"{name}_trainid.png").is_file()
    assert not list(out.glob("broken*"))
    err = stderr_lines(capsys)
    assert sum("broken.png" in ln for ln in err) == 2  # the warning, then the final list
    assert any("absent.jpg" in ln and "no such file" in ln for ln in err)
    assert any("2 input(s) failed" in ln for ln in err)
    assert "Traceback" not in "\n".join(err)
    # the verdict is the last line, the list above it
    assert err[-1].startswith("segadapt predict: error: 2 input(s) failed (listed above); 3 of 5 inputs segmented")


def test_missing_checkpoint_is_one_line_exit_2(images, tmp_path, capsys):
    code = main(["predict", str(images), "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("segadapt predict: error:") and "nope.pth" in err[0]


def test_plain_weights_need_a_config(run_dir, eager, images, tmp_path, capsys):
    weights = tmp_path / "advent_style.pth"
    torch.save(torch.load(run_dir / "final.pth", weights_only=False)["model"], weights)
    code = main(["predict", str(images), "--checkpoint", str(weights), "--out", str(tmp_path / "o")])
    assert code == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and "--config" in err[0] and "advent_style.pth" in err[0]

    out = tmp_path / "o2"
    assert main(["predict", str(images / "small.png"), "--checkpoint", str(weights), "--config",
                 str(run_dir / "config.yaml"), "--out", str(out), "--no-progress"]) == 0
    x = to_tensor(read_image(images / "small.png"))[None]
    assert np.array_equal(read_label(out / "small_trainid.png"), predict(eager, x, (20, 40))[0].numpy())


def test_evaluated_weights_win_over_the_student(run_dir, images, tmp_path):
    ckpt = torch.load(run_dir / "final.pth", map_location="cpu", weights_only=False)
    teacher = {k: v.clone() for k, v in ckpt["model"].items()}
    for i in range(4):  # the main classifier sums four branches: +100 on class 5 in each
        teacher[f"layer6.conv2d_list.{i}.bias"][5] += 100.0
    torch.save({**ckpt, "eval_model": teacher}, tmp_path / "with_teacher.pth")
    out = tmp_path / "o"
    assert main(["predict", str(images / "small.png"), "--checkpoint", str(tmp_path / "with_teacher.pth"),
                 "--out", str(out), "--no-progress"]) == 0
    assert (read_label(out / "small_trainid.png") == 5).all()


def test_collect_images_names(tmp_path):
    for rel in ("d/x.png", "d/deep/x.png", "d/.hidden.png", "d/notes.txt", "e/x.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found, failed = collect_images([str(tmp_path / "d"), str(tmp_path / "e" / "*.jpg"),
                                    str(tmp_path / "d" / "x.png"), str(tmp_path / "none*.png")])
    assert [(p.relative_to(tmp_path).as_posix(), n) for p, n in found] == [
        ("d/x.png", "x"), ("d/deep/x.png", "deep/x"), ("e/x.jpg", "x_2")]  # d/x.png only once
    assert failed == [(str(tmp_path / "none*.png"), "no images match this pattern")]


class _TinyLogits(torch.nn.Module):
    """A fixed random conv at stride 4: logits far from ties, smaller than the input."""

    def __init__(self, num_classes=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, num_classes, 4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 3)
            self.conv.bias.copy_(torch.randn(num_classes, generator=g))

    def forward(self, x):
        return {"main": self.conv(x)}


@pytest.mark.parametrize("infer", [{}, {"scales": (0.75, 1.0), "flip": True}])
def test_strips_equal_the_full_size_argmax(infer):
    from segadapt.engine.predictor import Predictor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # odd sizes: uneven last strip
    model = _TinyLogits().eval()
    full = predict_logits(model, to_tensor(image)[None], (37, 53), **infer)
    views = 2 * 2 if infer else 1
    probs = full if views > 1 else full.softmax(dim=1)
    ref_ids = full.argmax(dim=1)[0].numpy()
    ref_conf = np.rint(probs.amax(dim=1)[0].numpy() * 255)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)[0].numpy() / math.log(5)
    for rows in (1, 4, 10, 37):  # several strips, and one strip holding the whole image
        pred = Predictor(model, "cpu", infer, strip_rows=rows).predict_arrays([image], maps=True)[0]
        assert np.array_equal(pred.train_ids, ref_ids), rows
        assert np.abs(pred.confidence.astype(int) - ref_conf).max() <= 1, rows
        assert np.abs(pred.entropy.astype(int) - np.rint(ent * 255)).max() <= 1, rows
    # the default band (64 MiB of float scores) covers this image in one strip: same result
    assert np.array_equal(Predictor(model, "cpu", infer).predict_arrays([image])[0].train_ids, ref_ids)


@pytest.mark.parametrize("align_corners", [False, True])
def test_upsample_rows_matches_interpolate(align_corners):
    from segadapt.engine.inference import upsample_rows

    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.interpolate(x, (23, 31), mode="bilinear", align_corners=align_corners)
    got = torch.cat([upsample_rows(x, (23, 31), y, min(23, y + 4), align_corners) for y in range(0, 23, 4)], dim=2)
    assert torch.allclose(got, ref, atol=1e-6)
