"""The debug grid of a training step ("seeing training", `train.debug_every`): what the method
kept of one step (`StepContext.debug`, see methods/base.py) as one image, a row per kept image of
the batch and a named column per panel: inputs and translated images as they are, label maps
and predictions in the dataset's colours, confidence and entropy maps as heat maps (black 0,
red, yellow, white 1)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.files import atomic_write
from .logging import colorize_tensor

# the columns in this order; names a method adds beyond these follow in the order it kept them
PANEL_ORDER = ("source/image", "source/translated", "source/label", "source/prediction",
               "target/image", "target/translated", "target/prediction", "target/entropy",
               "pseudo/label", "pseudo/confidence", "mix/image", "mix/label", "mix/prediction",
               "mic/masked_image", "mic/prediction")
MIN_PANEL_HEIGHT = 128  # tiny crops are enlarged so that the column names fit
MAX_PANEL_HEIGHT = 256
HEADER = 14  # pixels of the row of column names
GAP = 2


def heat_map(values: torch.Tensor) -> torch.Tensor:
    """(N, H, W) values in [0, 1] -> (N, 3, H, W) colours: black, red, yellow, white."""
    v = values.float().clamp(0, 1)
    return torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], dim=1)


def debug_panels(debug: dict, palette=None) -> list[tuple[str, torch.Tensor]]:
    """(name, (N, 3, H, W) float RGB in [0, 1] on the CPU) per kept tensor, in column order; tensors
    of no known kind (see `StepContext`) are left out."""
    names = [n for n in PANEL_ORDER if n in debug] + [n for n in debug if n not in PANEL_ORDER]
    panels = []
    for name in names:
        t = debug[name].detach().cpu()
        if t.ndim == 4 and t.shape[1] in (1, 3):
            rgb = t.float().expand(-1, 3, -1, -1).clamp(0, 1)
        elif t.ndim == 3 and not t.is_floating_point():
            rgb = colorize_tensor(t.long(), palette)
        elif t.ndim == 3:
            rgb = heat_map(t)
        else:
            continue
        panels.append((name, rgb))
    return panels


def render_debug_grid(debug: dict, palette=None) -> Optional[np.ndarray]:
    """The grid as an (H, W, 3) uint8 array (None: nothing kept): a header row with the panel
    names, then one row per image of the batch; every panel scaled (nearest) to one height."""
    from PIL import Image, ImageDraw

    panels = debug_panels(debug, palette)
    if not panels:
        return None
    rows = min(p.shape[0] for _, p in panels)
    tallest = max(p.shape[-2] for _, p in panels)
    height = min(max(tallest, MIN_PANEL_HEIGHT), MAX_PANEL_HEIGHT)
    scaled = []
    for name, p in panels:
        width = max(1, round(p.shape[-1] * height / p.shape[-2]))
        scaled.append((name, F.interpolate(p[:rows], size=(height, width), mode="nearest")))
    total_w = sum(p.shape[-1] for _, p in scaled) + GAP * (len(scaled) - 1)
    total_h = HEADER + rows * height + GAP * (rows - 1)
    grid = np.full((total_h, total_w, 3), 255, np.uint8)
    x = 0
    for _, p in scaled:
        pixels = (p.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
        for r in range(rows):
            y = HEADER + r * (height + GAP)
            grid[y:y + height, x:x + p.shape[-1]] = pixels[r]
        x += p.shape[-1] + GAP
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    x = 0
    for name, p in scaled:
        draw.text((x + 2, 1), name, fill=(0, 0, 0))
        x += p.shape[-1] + GAP
    return np.array(image)  # a writable copy (torch.from_numpy warns on read-only arrays)


def write_png(path: Path, array: np.ndarray) -> None:
    """An (H, W, 3) uint8 image to `path`, all or nothing."""
    from PIL import Image

    with atomic_write(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def debug_grid_files(run_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the debug grids in a run folder, by iteration."""
    found = []
    folder = Path(run_dir) / "debug"
    if folder.is_dir():
        for p in folder.glob("iter_*.png"):
            number = p.stem[len("iter_"):]
            if number.isdigit():
                found.append((int(number), p))
    return sorted(found)


__all__ = ["PANEL_ORDER", "heat_map", "debug_panels", "render_debug_grid", "write_png", "debug_grid_files"]
