"""Where a run's scalars, images and config go besides metrics.jsonl (`train.loggers`).

`MetricLogger` is the interface: `log_scalars(step, {name: value})`, `log_images(step, name,
images)` with images an (N, 3, H, W) float tensor in [0, 1], `log_config(dict)`, `close()`,
and `drop_after(step)`, called on resume to forget what was logged past the checkpoint (what
the destination allows). Built in: `CSVLogger` (metrics.csv) and `TensorBoardLogger`; `WandbLogger`
and `MLflowLogger` need their packages (`pip install 'segadapt[wandb]'` / `'segadapt[mlflow]'`)
and are imported only when asked for.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import flatten_items
from ..errors import ConfigError, write_error
from ..utils.files import write_text_atomic

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def images_to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(N, 3, H, W) float in [0, 1] -> N (H, W, 3) uint8 arrays."""
    x = images.detach().float().clamp(0, 1).cpu()
    return list((x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8))


class MetricLogger:
    """One destination of a run's logs. Subclasses override what they can record."""

    name = "base"
    takes_images = False  # whether image grids are worth rendering for it

    def log_scalars(self, step: int, values: dict) -> None:
        pass

    def log_images(self, step: int, name: str, images: torch.Tensor) -> None:
        pass

    def log_config(self, config: dict) -> None:
        pass

    def drop_after(self, step: int, with_eval_at: bool = False) -> None:
        """On resume: what was logged after `step` is logged again (and with `with_eval_at`, the
        evaluation at `step` too)."""

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- CSV
class CSVLogger(MetricLogger):
    """metrics.csv: a row per `log_scalars` call (training means at each log interval, an
    evaluation's scores), the first column `iteration`. A name first seen later (the first
    evaluation) adds a column: the file is rewritten once, whole, with the wider header; rows
    without a value leave its cell empty."""

    name = "csv"

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "metrics.csv"
        self.columns: list[str] = []
        self._file = None
        if self.path.is_file():
            self.columns = self._read()[0]

    def _read(self) -> tuple[list[str], list[dict]]:
        """(header, rows) of the file; rows torn by a kill (too few cells, no iteration) dropped."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return [], []
        reader = csv.reader(io.StringIO(text))
        header = next(reader, [])
        rows = []
        for cells in reader:
            if len(cells) != len(header) or not cells or not cells[0].lstrip("-").isdigit():
                continue
            rows.append(dict(zip(header, cells)))
        return header, rows

    def _rewrite(self, header: list[str], rows: list[dict]) -> None:
        self._close_file()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path, buf.getvalue())
        self.columns = header

    def _close_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError:
                pass

    def log_scalars(self, step: int, values: dict) -> None:
        row = {"iteration": str(step), **{k: f"{float(v):.8g}" for k, v in values.items()}}
        new = [k for k in row if k not in self.columns]
        try:
            if new:  # a wider header: the file once more, whole
                self._rewrite((self.columns or ["iteration"]) + [k for k in new if k != "iteration"],
                              self._read()[1] + [row])
                return
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8", newline="")
            csv.DictWriter(self._file, fieldnames=self.columns, restval="", lineterminator="\n").writerow(row)
            self._file.flush()
        except OSError as e:  # a failed write() names no file
            raise write_error(self.path, e) from None

    def drop_after(self, step: int, with_eval_at: bool = False) -> None:
        if not self.path.is_file():
            return
        header, rows = self._read()
        kept = []
        for r in rows:
            it = int(r["iteration"])
            is_eval = any(r.get(k) for k in header if k.startswith("eval"))
            if it > step or (with_eval_at and it == step and is_eval):
                continue
            kept.append(r)
        self._rewrite(header, kept)

    def close(self) -> None:
        self._close_file()


# --------------------------------------------------------------------------- TensorBoard
class TensorBoardLogger(MetricLogger):
    """Event files in `<run>/tb`; on resume its events past the checkpoint are purged."""

    name = "tensorboard"
    takes_images = True

    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self.folder = Path(out_dir) / "tb"
        self.writer = SummaryWriter(str(self.folder))

    def log_scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_images(self, step: int, name: str, images: torch.Tensor) -> None:
        self.writer.add_images(name, images.detach().float().clamp(0, 1).cpu(), step)

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def drop_after(self, step: int, with_eval_at: bool = False) -> None:
        self.writer.close()
        self.writer = self._writer_cls(str(self.folder), purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- Weights & Biases, MLflow
def _run_id(path: Path) -> Optional[str]:
    """The id of the tracking run a run folder logged to before (continued on resume)."""
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


class WandbLogger(MetricLogger):
    """A Weights & Biases run (project: $WANDB_PROJECT, else segadapt), its id kept in
    `<run>/wandb_run_id` so that a resumed run continues it. W&B keeps what was logged past the
    checkpoint: a resumed run's repeated steps are ignored there (steps only grow)."""

    name = "wandb"
    takes_images = True

    def __init__(self, out_dir: Path, run_name: str):
        import wandb

        self.wandb = wandb
        id_file = Path(out_dir) / "wandb_run_id"
        run_id = _run_id(id_file)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "segadapt"), name=run_name, id=run_id,
                              resume="allow", dir=str(out_dir))
        if run_id is None:
            write_text_atomic(id_file, f"{self.run.id}\n")

    def log_scalars(self, step: int, values: dict) -> None:
        self.run.log(dict(values), step=step)

    def log_images(self, step: int, name: str, images: torch.Tensor) -> None:
        self.run.log({name: [self.wandb.Image(a) for a in images_to_uint8(images)]}, step=step)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


def _flat_params(d: dict) -> dict:
    # MLflow's older servers take 500 characters
    return {k: str(v)[:500] for k, v in flatten_items(d).items()}


class MLflowLogger(MetricLogger):
    """An MLflow run (tracking URI: $MLFLOW_TRACKING_URI, else MLflow's default ./mlruns;
    experiment: $MLFLOW_EXPERIMENT_NAME, else segadapt), its id kept in `<run>/mlflow_run_id` so
    that a resumed run continues it; the config becomes the run's parameters (once: MLflow
    refuses changed values), images artifacts `<name>/step_<N>.png`."""

    name = "mlflow"
    takes_images = True

    def __init__(self, out_dir: Path, run_name: str):
        import mlflow

        self.mlflow = mlflow
        id_file = Path(out_dir) / "mlflow_run_id"
        run_id = _run_id(id_file)
        self.fresh = run_id is None
        if self.fresh:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "segadapt"))
            self.run = mlflow.start_run(run_name=run_name)
            write_text_atomic(id_file, f"{self.run.info.run_id}\n")
        else:
            self.run = mlflow.start_run(run_id=run_id)

    def log_scalars(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def log_images(self, step: int, name: str, images: torch.Tensor) -> None:
        for i, a in enumerate(images_to_uint8(images)):
            suffix = f"_{i}" if images.shape[0] > 1 else ""
            self.mlflow.log_image(a, artifact_file=f"{name}/step_{step:07d}{suffix}.png")

    def log_config(self, config: dict) -> None:
        if self.fresh:
            self.mlflow.log_params(_flat_params(config))

    def close(self) -> None:
        self.mlflow.end_run()


# --------------------------------------------------------------------------- building
def _require(name: str, key: str) -> None:
    """One line when the package a logger needs is missing."""
    try:
        if name == "tensorboard":
            import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
        else:
            __import__(PACKAGES[name])
    except ImportError:
        raise ConfigError(f"{key}: {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}") from None


def check_loggers(names, tensorboard_flag: bool = False) -> None:
    """Fail before training when a logger's package is missing."""
    for n in names:
        if n in PACKAGES:
            key = "train.tensorboard" if n == "tensorboard" and tensorboard_flag else "train.loggers"
            _require(n, key)


def build_loggers(names, out_dir: Path, run_name: str) -> list[MetricLogger]:
    built: list[MetricLogger] = []
    try:
        for n in names:
            if n == "csv":
                built.append(CSVLogger(out_dir))
            elif n == "tensorboard":
                built.append(TensorBoardLogger(out_dir))
            elif n == "wandb":
                built.append(WandbLogger(out_dir, run_name))
            elif n == "mlflow":
                built.append(MLflowLogger(out_dir, run_name))
            else:
                raise ConfigError(f"train.loggers: unknown logger {n!r}")
    except BaseException:
        for logger in built:
            logger.close()
        raise
    return built


__all__ = ["MetricLogger", "CSVLogger", "TensorBoardLogger", "WandbLogger", "MLflowLogger", "images_to_uint8",
           "check_loggers", "build_loggers"]
