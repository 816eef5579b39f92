"""Run logging: progress bar with ETA and losses, metrics.jsonl (always), the loggers of
`train.loggers` (metrics.csv, TensorBoard, W&B, MLflow: `loggers.py`) and the debug grids of
`train.debug_every` (`debug/iter_<N>.png`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from ..errors import write_error
from ..utils.files import atomic_write
from ..data.labels import PALETTE


def colorize_tensor(labels: torch.Tensor, palette=None) -> torch.Tensor:
    """(B,H,W) train ids -> (B,3,H,W) float colours in [0,1] (the Cityscapes colours, or
    `palette`: a dataset's own); ignore (255) black."""
    palette = PALETTE if palette is None else palette[:255]
    lut = torch.zeros(256, 3, dtype=torch.uint8, device=labels.device)
    lut[: len(palette)] = torch.as_tensor(palette, device=labels.device)
    return lut[labels.clamp(0, 255).long()].permute(0, 3, 1, 2).float() / 255.0


class RunLogger:
    """What the trainer logs, on the main process (`enabled`). `loggers`: `train.loggers` (see
    `loggers.py`); `tensorboard` adds TensorBoard (`train.tensorboard`, `--tensorboard`)."""

    def __init__(self, out_dir: Path, cfg, enabled: bool = True, tensorboard: bool = False,
                 loggers: Sequence[str] = ()):
        from .loggers import build_loggers, check_loggers

        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.bar: Optional[tqdm] = None
        self.loggers: list = []
        self.metrics_file = None
        self.palette = None  # colours of the image grids: the eval dataset's classes (None: Cityscapes)
        if not enabled:
            return
        names = list(loggers) + (["tensorboard"] if tensorboard and "tensorboard" not in loggers else [])
        check_loggers(names, tensorboard_flag=tensorboard)  # one line before anything is written
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(self.out_dir / "metrics.jsonl", "a")
        name = getattr(cfg, "name", None) or self.out_dir.name
        self.loggers = build_loggers(names, self.out_dir, f"{name} {self.out_dir.name}")

    @property
    def takes_images(self) -> bool:
        return any(lg.takes_images for lg in self.loggers)

    def log_config(self, config: dict) -> None:
        for lg in self.loggers:
            lg.log_config(config)

    def _scalars(self, step: int, values: dict) -> None:
        for lg in self.loggers:
            lg.log_scalars(step, values)

    def drop_records_after(self, iteration: int, with_eval_at: bool = False) -> None:
        """On resume: records past the checkpoint's iteration will be logged again, so drop them
        (and a line torn by a kill) from metrics.jsonl, metrics.csv and the debug grids;
        TensorBoard purges its events after it too. `with_eval_at`: the evaluation at `iteration`
        came after the checkpoint (a run's final one)."""
        if not self.enabled:
            return
        path = self.out_dir / "metrics.jsonl"
        self.metrics_file.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("iteration", 0) > iteration:
                continue
            if not (with_eval_at and rec.get("iteration") == iteration and "eval/mIoU" in rec):
                kept.append(line + "\n")
        with atomic_write(path, "w") as f:
            f.write("".join(kept))
        self.metrics_file = open(path, "a")
        for lg in self.loggers:
            lg.drop_after(iteration, with_eval_at)
        from .debug_grid import debug_grid_files

        for it, p in debug_grid_files(self.out_dir):
            if it > iteration:
                p.unlink(missing_ok=True)

    def start(self, start_iter: int, total: int, progress: bool) -> None:
        if self.enabled and progress:
            self.bar = tqdm(total=total, initial=start_iter, desc="train", dynamic_ncols=True, smoothing=0.05)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log_train(self, it: int, values: dict, sec_per_iter: float) -> None:
        if not self.enabled:
            return
        rec = {"iteration": it, **{k: round(v, 6) for k, v in values.items()}, "sec_per_iter": round(sec_per_iter, 4)}
        self._append(rec)
        if self.bar is not None:
            short = {k.replace("loss_", ""): f"{v:.3g}" for k, v in values.items() if k.startswith("loss")}
            self.bar.set_postfix(short, refresh=False)
        self._scalars(it, {("train/" if k.startswith("loss") else "") + k: v for k, v in values.items()}
                      | {"sec_per_iter": sec_per_iter})

    @torch.no_grad()
    def log_eval(self, it: int, result, model, loader, device, num_images: int = 4) -> None:
        if not self.enabled:
            return
        line = f"iteration {it}: mIoU {result.miou * 100:.2f}"
        for k, v in result.subset_mious.items():
            line += f", {k} {v * 100:.2f}"
        self.info(line)
        if self.metrics_file is not None:
            self._append({"iteration": it, "eval/mIoU": result.miou,
                          **{f"eval/{k}": v for k, v in result.subset_mious.items()}})
        scalars = {"eval/mIoU": result.miou, **{f"eval/{k}": v for k, v in result.subset_mious.items()}}
        scalars.update({f"eval_class/{name}": iou for name, iou in zip(result.class_names, result.per_class_iou)
                        if iou == iou})  # not NaN
        self._scalars(it, scalars)
        if self.takes_images:
            self._image_grid(it, model, loader, device, num_images)

    def _image_grid(self, it, model, loader, device, num_images):
        from .inference import predict

        was_training = model.training
        model.eval()
        rows = []
        for batch in loader:
            img = batch["image"][:1].to(device)
            h, w = img.shape[-2:]
            pred = predict(model, img, (h, w))
            lbl = torch.nn.functional.interpolate(batch["label"][:1, None].float(), size=(h, w), mode="nearest")
            rows.append(torch.cat([img.float().cpu(), colorize_tensor(pred, self.palette).cpu(),
                                   colorize_tensor(lbl[:, 0].long(), self.palette).cpu()], dim=3))
            if len(rows) >= num_images:
                break
        model.train(was_training)
        if rows:
            self.log_images(it, "eval/input_prediction_label", torch.cat(rows, 0))

    def log_images(self, it: int, name: str, images: torch.Tensor) -> None:
        """(N, 3, H, W) float images in [0, 1] to every logger that takes images."""
        for lg in self.loggers:
            if lg.takes_images:
                lg.log_images(it, name, images)

    def log_debug(self, it: int, debug: dict) -> Optional[Path]:
        """A debug step's grid (see `debug_grid`) to `debug/iter_<it>.png` and the image loggers."""
        if not self.enabled or not debug:
            return None
        from .debug_grid import render_debug_grid, write_png

        grid = render_debug_grid(debug, self.palette)
        if grid is None:
            return None
        path = self.out_dir / "debug" / f"iter_{it}.png"
        write_png(path, grid)
        if self.takes_images:
            self.log_images(it, "debug/grid", torch.from_numpy(grid).permute(2, 0, 1)[None].float() / 255.0)
        return path

    def info(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def _append(self, record: dict) -> None:
        """One line of metrics.jsonl, flushed (a line torn by a full disk or a kill is dropped on resume)."""
        try:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        except OSError as e:  # a failed write() names no file
            raise write_error(self.out_dir / "metrics.jsonl", e) from None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        loggers, self.loggers = self.loggers, []
        for lg in loggers:
            lg.close()
        if self.metrics_file is not None:
            f, self.metrics_file = self.metrics_file, None
            try:
                f.close()
            except OSError:  # only a line whose write already failed (and was reported) was left
                pass
