import json
import sys

import pytest
import torch

from segadapt.cli import main
from segadapt.engine.export import export_segmenter
from segadapt.engine.inference import predict
from segadapt.errors import CheckpointError

from .conftest import load_eager_segmenter


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def eager(run_dir):
    return load_eager_segmenter(run_dir)


def stderr_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def load_torchscript(path, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), **kw)


def test_torchscript_round_trip_equals_eager(run_dir, eager, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out), "--size", "64", "32"]) == 0
    assert "max abs diff vs eager 0" in capsys.readouterr().out
    extra = {"segadapt.json": ""}
    scripted = load_torchscript(out, _extra_files=extra)
    meta = json.loads(extra["segadapt.json"])
    assert meta["num_classes"] == 19 and meta["size_wh"] == [64, 32]
    x = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, ref = scripted(x), eager(x)["main"]
    assert got.shape == ref.shape and got.shape[:2] == (2, 19) and got.shape[-1] < 64 // 4  # stride-8 main logits
    assert torch.allclose(got, ref, atol=1e-6)


def test_torchscript_with_argmax_gives_train_ids(run_dir, eager, tmp_path, capsys):
    out = tmp_path / "model_ids.pt"
    assert main(["export", str(run_dir / "final.pth"), "--format", "torchscript", "--out", str(out),
                 "--size", "64", "32", "--with-argmax"]) == 0
    assert "0 of 2048 pixels differ" in capsys.readouterr().out
    x = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ids = load_torchscript(out)(x)
    assert ids.dtype == torch.int64 and ids.shape == (1, 32, 64)
    assert torch.equal(ids, predict(eager, x, (32, 64)))


def test_broken_export_fails_the_check(eager, tmp_path, monkeypatch):
    real_load = torch.jit.load

    class Shifted(torch.nn.Module):  # an export whose outputs drifted
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 0.5

    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: Shifted(real_load(*a, **k)))
    with pytest.raises(CheckpointError, match=r"max abs diff 0\.5 vs the eager model exceeds"):
        export_segmenter(eager, "torchscript", tmp_path / "m.pt", (64, 32))


def test_onnx_without_onnx_package_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    code = main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--size", "64", "32"])
    assert code == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and "'onnx' package" in err[0] and "pip install 'segadapt[onnx]'" in err[0]
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_round_trip(eager, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    report = export_segmenter(eager, "onnx", tmp_path / "m.onnx", (64, 32))
    assert (tmp_path / "m.onnx").is_file()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        assert not report.checked and "onnxruntime not installed" in report.note
    else:
        assert report.checked and report.max_abs_diff < 1e-3


def test_size_is_required_without_eval_resize(run_dir, tmp_path, capsys):
    code = main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    assert code == 2
    err = stderr_lines(capsys)
    assert len(err) == 1 and "--size" in err[0]


# every backbone family, tiny, from scratch: what matters is the traced/exported graph
BACKBONES = {
    "resnet18": ["model.backbone=resnet18", "model.base_width=8"],
    "resnet50_v1c": ["model.backbone=resnet50", "model.base_width=8", "model.resnet_style=v1c"],
    "mit_b0": ["model.arch=encoder_decoder", "model.backbone=mit_b0", "model.embed_dims=[16,32,80,128]",
               "model.head_channels=16", "model.aux=false"],
    "dinov2_vits14": ["model.arch=encoder_decoder", "model.backbone=dinov2_vits14", "model.embed_dims=[32]",
                      "model.vit_depth=2", "model.vit_heads=2", "model.head_channels=16", "model.aux=false"],
    "mobilenetv2": ["model.arch=encoder_decoder", "model.backbone=mobilenetv2", "model.decode_head=aspp",
                    "model.aux=true"],
}


@pytest.fixture(scope="module")
def backbone_checkpoints(tmp_path_factory):
    from segadapt.config import load_config
    from segadapt.engine.checkpoint import FORMAT, VERSION
    from segadapt.models.segmenter import build_segmenter

    folder = tmp_path_factory.mktemp("backbones")
    paths = {}
    for name, overrides in BACKBONES.items():
        cfg = load_config("synthetic/source_only", overrides)
        torch.manual_seed(0)
        model = build_segmenter(cfg.model)
        paths[name] = folder / f"{name}.pth"
        torch.save({"format": FORMAT, "version": VERSION, "iteration": 0, "config": cfg.to_dict(),
                    "model": model.state_dict()}, paths[name])
    return paths


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_exports_in_every_format(backbone, fmt, backbone_checkpoints, tmp_path, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    # 70 x 42: a multiple of neither the ViT patch (14) nor the CNN stride (8); 56 x 28: of 14
    sizes = [("70", "42"), ("56", "28")] if backbone == "dinov2_vits14" else [("70", "42")]
    for w, h in sizes:
        for argmax in ([], ["--with-argmax"]):
            out = tmp_path / f"m_{w}x{h}{'_ids' if argmax else ''}.{fmt}"
            code = main(["export", str(backbone_checkpoints[backbone]), "--format", fmt, "--out", str(out),
                         "--size", w, h, *argmax])
            captured = capsys.readouterr()
            assert code == 0, captured.err
            assert captured.err.strip() == ""  # no tracer or exporter chatter
            assert f"exported {fmt} to {out}" in captured.out and out.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .partial or temporary left
