"""Seeing training: the debug grids of `train.debug_every`, and the loggers of `train.loggers`
(metrics.csv, TensorBoard, W&B and MLflow through fake modules)."""
import csv
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.cli import main
from segadapt.config import load_config
from segadapt.engine.debug_grid import HEADER, MIN_PANEL_HEIGHT, debug_panels, render_debug_grid
from segadapt.engine.loggers import CSVLogger
from segadapt.engine.run_folder import RESUME_MAY_CHANGE
from segadapt.engine.trainer import Trainer, move_to, train_from_config
from segadapt.errors import ConfigError
from segadapt.methods.base import DEBUG_SAMPLES, StepContext

from . import golden_steps
from .conftest import tiny_overrides
from .test_golden_steps import GOLDEN, SAME_MACHINE, _close

INPUTS = {"source/image", "source/label", "source/prediction"}
TARGET = {"target/image", "target/prediction"}
SELF_TRAINING = {"pseudo/label", "pseudo/confidence", "mix/image", "mix/label", "mix/prediction"}
MIC = {"mic/masked_image", "mic/prediction"}

# what each method keeps on a debug step (the golden configs: tiny models, 64x64 crops)
EXPECTED_PANELS = {
    "synthetic/source_only": INPUTS,
    "synthetic/minent": INPUTS | TARGET | {"target/entropy"},
    "synthetic/advent": INPUTS | TARGET | {"target/entropy"},
    "synthetic/minent_mic": INPUTS | TARGET | {"target/entropy", "pseudo/label", "pseudo/confidence"} | MIC,
    "synthetic/daformer": INPUTS | TARGET | SELF_TRAINING,
    "synthetic/mic_daformer": INPUTS | TARGET | SELF_TRAINING | MIC,
    "synthetic/hrda_daformer": INPUTS | TARGET | SELF_TRAINING,
    "gta5_cityscapes/confeti_single": INPUTS | TARGET | SELF_TRAINING | {"source/translated"},
    "synthetic/cut": {"source/image", "source/label", "target/image", "source/translated"},
    "variant/minent_online_style": INPUTS | TARGET | {"target/entropy", "source/translated"},
    "synthetic/cfcontra": INPUTS | TARGET | {"target/entropy"},
}
# panels from an iteration on: CFContra's pseudo-labels once the contrast starts (400)
LATER = {"synthetic/cfcontra": (400, {"pseudo/label"})}


@pytest.fixture(scope="module")
def golden_work(tmp_path_factory):
    from segadapt.data.synthetic import SynthParams, generate

    from .conftest import TINY_SYNTH

    work = tmp_path_factory.mktemp("golden_debug")
    generate(work / "bench", SynthParams(**{**TINY_SYNTH, "size": (128, 64)}, workers=1))
    return work


@pytest.mark.parametrize("name", sorted(EXPECTED_PANELS))
def test_debug_steps_keep_the_panels_and_train_as_the_golden_steps(name, golden_work):
    """Debug capture changes no loss, weight, optimizer state or random stream: the recorded
    golden values come out with every step a debug step."""
    got = golden_steps.run_config(name, golden_work / "bench", golden_work, debug=True)
    ref = GOLDEN["configs"][name]
    for a, b in zip(ref["steps"], got["steps"]):
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]) if SAME_MACHINE else _close(a[k], b[k]), (name, k, a[k], b[k])
    for k in ("weights", "optimizer_state"):
        assert (ref[k] == got[k]) if SAME_MACHINE else _close(ref[k], got[k]), (name, k)
    for it, kept in zip(golden_steps.ITERATIONS, got["debug"]):
        expected = set(EXPECTED_PANELS[name])
        if name in LATER and it >= LATER[name][0]:
            expected |= LATER[name][1]
        assert set(kept) == expected, (name, it)
        for key, t in kept.items():
            assert not t.requires_grad and t.shape[0] == DEBUG_SAMPLES, (key, t.shape)
            if t.ndim == 4:
                assert t.shape[1] == 3 and 0 <= float(t.min()) and float(t.max()) <= 1, key
            elif t.is_floating_point():
                assert 0 <= float(t.min()) and float(t.max()) <= 1 + 1e-5, key
        assert len(debug_panels(kept)) == len(kept)


def test_no_debug_tensors_without_want_debug(tiny_synth, tmp_path, monkeypatch):
    cfg = load_config("synthetic/mic_daformer", tiny_overrides(tiny_synth, tmp_path / "run", **{
        "model.backbone": "resnet18", "model.arch": "deeplabv2", "train.iters": 4}))
    trainer = Trainer(cfg, progress=False)
    extra_forward = []
    monkeypatch.setattr(type(trainer.method), "keep_target_prediction", lambda *a: extra_forward.append(a))
    try:
        trainer.method.train()
        batch = {k: move_to(next(s), trainer.device) for k, s in trainer.streams.items()}
        trainer.step(batch, 0)
        assert trainer.debug_tensors == {} and extra_forward == []
        trainer.step(batch, 1, want_debug=True)
        assert "mic/masked_image" in trainer.debug_tensors and len(extra_forward) == 1
    finally:
        for s in trainer.streams.values():
            s.close()
        trainer.release()
    ctx = StepContext()
    ctx.keep("source/image", torch.zeros(4, 3, 8, 8))
    ctx.keep_prediction("source/prediction", torch.zeros(4, 5, 2, 2), (8, 8), entropy="x")
    assert ctx.debug == {}


def _png(path):
    return np.asarray(Image.open(path))


def test_debug_grids_of_a_short_run(tiny_synth, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from segadapt.engine import logging as run_logging
    from segadapt.engine.report import build_report, load_run

    logged = []
    original = run_logging.RunLogger.log_debug
    monkeypatch.setattr(run_logging.RunLogger, "log_debug",
                        lambda self, it, debug: logged.append((it, sorted(debug))) or original(self, it, debug))
    run = tmp_path / "run"
    cfg = load_config("synthetic/source_only", tiny_overrides(tiny_synth, run, **{
        "train.debug_every": 2, "train.iters": 5, "train.ckpt_every": 5}))
    train_from_config(cfg, progress=False)
    assert [it for it, _ in logged] == [2, 4]
    assert logged[0][1] == sorted(INPUTS)
    assert sorted(p.name for p in (run / "debug").iterdir()) == ["iter_2.png", "iter_4.png"]
    grid = _png(run / "debug" / "iter_4.png")
    # a header, then a row per kept image; 64 x 32 crops shown MIN_PANEL_HEIGHT high, 3 panels
    assert grid.shape == (HEADER + 2 * MIN_PANEL_HEIGHT + 2, 3 * 2 * MIN_PANEL_HEIGHT + 2 * 2, 3)

    out = tmp_path / "rep"
    build_report([load_run(run)], out, samples=0, markdown=True, debug_grids=1, log=lambda m: None)
    md = (out / "report.md").read_text()
    assert "## Debug grids" in md and "training step 4" in md and "training step 2" not in md


def test_render_colours_labels_and_heat_maps():
    debug = {"pseudo/confidence": torch.tensor([[[0.0, 1.0]]]), "pseudo/label": torch.tensor([[[0, 255]]]),
             "source/image": torch.full((1, 3, 1, 2), 0.5)}
    names = [n for n, _ in debug_panels(debug)]
    assert names == ["source/image", "pseudo/label", "pseudo/confidence"]  # the fixed column order
    panels = dict(debug_panels(debug))
    assert panels["pseudo/confidence"][0, :, 0, 0].tolist() == [0, 0, 0]
    assert panels["pseudo/confidence"][0, :, 0, 1].tolist() == [1, 1, 1]
    assert panels["pseudo/label"][0, :, 0, 1].tolist() == [0, 0, 0]  # ignore: black
    assert render_debug_grid({}) is None


# --------------------------------------------------------------------------- loggers
def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_grows_its_header_and_drops_on_resume(tmp_path):
    lg = CSVLogger(tmp_path)
    lg.log_scalars(1, {"train/loss": 1.5, "lr": 0.01})
    lg.log_scalars(2, {"train/loss": 1.25, "lr": 0.01})
    lg.log_scalars(2, {"eval/mIoU": 0.5})  # a new column: the file is rewritten with it
    lg.log_scalars(3, {"train/loss": 1.0, "lr": 0.01})
    lg.close()
    rows = _csv(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["iteration", "train/loss", "lr", "eval/mIoU"]
    assert [(r["iteration"], r["train/loss"], r["eval/mIoU"]) for r in rows] == [
        ("1", "1.5", ""), ("2", "1.25", ""), ("2", "", "0.5"), ("3", "1", "")]
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("4,0.9")  # torn by a kill
    lg = CSVLogger(tmp_path)  # a resumed run from the checkpoint at 2, whose evaluation came after it
    lg.drop_after(2, with_eval_at=True)
    assert [r["iteration"] for r in _csv(tmp_path / "metrics.csv")] == ["1", "2"]
    lg.log_scalars(3, {"train/loss": 0.5, "lr": 0.02})
    lg.close()
    rows = _csv(tmp_path / "metrics.csv")
    assert [(r["iteration"], r["train/loss"]) for r in rows] == [("1", "1.5"), ("2", "1.25"), ("3", "0.5")]


def test_training_writes_metrics_csv(tiny_synth, tmp_path):
    run = tmp_path / "run"
    cfg = load_config("synthetic/source_only", tiny_overrides(tiny_synth, run, **{
        "train.iters": 4, "train.log_every": 1, "train.eval_every": 2, "train.ckpt_every": 4}))
    train_from_config(cfg, progress=False)
    rows = _csv(run / "metrics.csv")
    jsonl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["iteration"]) for r in rows] == [r["iteration"] for r in jsonl]
    train_rows = [r for r in rows if r["train/loss_seg_main"]]
    assert len(train_rows) == 4 and all(r["sec_per_iter"] and r["lr_segmenter"] for r in train_rows)
    evals = [r for r in rows if r["eval/mIoU"]]
    assert [r["iteration"] for r in evals] == ["2", "4"]
    assert float(evals[-1]["eval/mIoU"]) == pytest.approx(jsonl[-1]["eval/mIoU"], rel=1e-6)


def test_a_resumed_run_logs_as_an_uninterrupted_one(tiny_synth, tmp_path, monkeypatch):
    """metrics.csv and the debug grids of a run killed after its checkpoint at 3 and resumed
    equal those of the run that was not."""
    from segadapt.methods.source_only import SourceOnly

    from .conftest import kill_and_resume

    extra = {"train.iters": 6, "train.log_every": 1, "train.eval_every": 3, "train.debug_every": 2}
    train_from_config(load_config("synthetic/source_only", tiny_overrides(tiny_synth, tmp_path / "a", **extra)),
                      progress=False)
    kill_and_resume(monkeypatch, SourceOnly,
                    load_config("synthetic/source_only", tiny_overrides(tiny_synth, tmp_path / "b", **extra)), 4, 3)

    def cells(run):  # everything but the timings
        return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in _csv(run / "metrics.csv")]

    assert cells(tmp_path / "b") == cells(tmp_path / "a")
    grids = {run: sorted(p.name for p in (tmp_path / run / "debug").iterdir()) for run in "ab"}
    assert grids["a"] == grids["b"] == ["iter_2.png", "iter_4.png", "iter_6.png"]
    for name in grids["a"]:
        assert np.array_equal(_png(tmp_path / "a" / "debug" / name), _png(tmp_path / "b" / "debug" / name))


class _FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        fake = self

        class Run:
            id = "run123"

            class config:
                @staticmethod
                def update(d, allow_val_change=False):
                    fake.calls.append(("config", d))

            @staticmethod
            def log(values, step=None):
                fake.calls.append(("log", step, values))

            @staticmethod
            def finish():
                fake.calls.append(("finish",))

        class Image:
            def __init__(self, array):
                self.array = array

        self.Image = Image
        self._run = Run

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self._run


class _FakeMlflow(types.ModuleType):
    def __init__(self):
        super().__init__("mlflow")
        self.calls = []

    def set_experiment(self, name):
        self.calls.append(("experiment", name))

    def start_run(self, run_id=None, run_name=None):
        self.calls.append(("start", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "ml42"))

    def log_metrics(self, values, step=None):
        self.calls.append(("metrics", step, values))

    def log_image(self, image, artifact_file=None):
        self.calls.append(("image", artifact_file, image.shape, str(image.dtype)))

    def log_params(self, params):
        self.calls.append(("params", params))

    def end_run(self):
        self.calls.append(("end",))


def test_wandb_and_mlflow_loggers_through_fake_modules(tiny_synth, tmp_path, monkeypatch):
    wandb, mlflow = _FakeWandb(), _FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    run = tmp_path / "run"
    cfg = load_config("synthetic/source_only", tiny_overrides(tiny_synth, run, **{
        "train.iters": 2, "train.log_every": 1, "train.eval_every": 0, "train.ckpt_every": 2,
        "train.debug_every": 2, "train.loggers": "[wandb, mlflow]"}))
    train_from_config(cfg, progress=False)

    init = wandb.calls[0]
    assert init[0] == "init" and init[1]["id"] is None and init[1]["dir"] == str(run)
    assert (run / "wandb_run_id").read_text().strip() == "run123"
    logs = [c for c in wandb.calls if c[0] == "log"]
    assert (1, "train/loss_seg_main") in {(c[1], k) for c in logs for k in c[2]}
    assert {(c[1], k) for c in logs for k in c[2]} >= {(2, "eval/mIoU"), (2, "debug/grid"),
                                                       (2, "eval/input_prediction_label")}
    grid = next(c[2]["debug/grid"] for c in logs if "debug/grid" in c[2])
    assert grid[0].array.dtype == np.uint8 and grid[0].array.shape[-1] == 3
    assert ("config", cfg.to_dict()) in wandb.calls and wandb.calls[-1] == ("finish",)
    assert not (run / "metrics.csv").exists()  # csv not listed

    assert mlflow.calls[:2] == [("experiment", "segadapt"), ("start", None, f"{cfg.name} run")]
    assert (run / "mlflow_run_id").read_text().strip() == "ml42"
    metrics = [c for c in mlflow.calls if c[0] == "metrics"]
    assert (2, "eval/mIoU") in {(c[1], k) for c in metrics for k in c[2]}
    images = [c for c in mlflow.calls if c[0] == "image"]
    assert ("debug/grid/step_0000002.png", "uint8") in {(c[1], c[3]) for c in images}
    params = next(c[1] for c in mlflow.calls if c[0] == "params")
    assert params["train.iters"] == "2" and params["method.name"] == "source_only"
    assert mlflow.calls[-1] == ("end",)

    # a resumed run continues both tracking runs and leaves MLflow's parameters as they were
    from segadapt.engine.loggers import MLflowLogger, WandbLogger

    wandb.calls.clear()
    mlflow.calls.clear()
    WandbLogger(run, "x").close()
    assert wandb.calls[0][1]["id"] == "run123"
    lg = MLflowLogger(run, "x")
    lg.log_config({"a": 1})
    lg.close()
    assert mlflow.calls == [("start", "ml42", None), ("end",)]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_logger_package_is_one_line(name, tiny_synth, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    code = main(["train", "--no-progress", *tiny_overrides(tiny_synth, tmp_path / "run"),
                 f"train.loggers=[csv,{name}]"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code != 0 and len(err) == 1
    assert f"train.loggers: {name} needs the {name} package: pip install {name}" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("train.loggers=[csv,foo]", "train.loggers"), ("train.loggers=[csv,csv]", "more than once"),
    ("train.debug_every=-1", "train.debug_every must be >= 0")])
def test_bad_logging_keys(override, message, tiny_synth, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config("synthetic/source_only", tiny_overrides(tiny_synth, tmp_path / "run") + [override])


def test_logging_keys_may_change_on_resume():
    assert {"train.loggers", "train.debug_every", "train.tensorboard"} <= set(RESUME_MAY_CHANGE)
