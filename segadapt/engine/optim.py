"""Optimizers and learning-rate schedules.

Schedules are pure functions of the iteration, so a resumed run gets exactly the
learning rate an uninterrupted one would have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..config import OptimConfig


def poly_warmup_factor(it: int, total: int, power: float, warmup_iters: int = 0, warmup_ratio: float = 1e-6) -> float:
    """(1 - it/total)^power, times a linear warm-up from `warmup_ratio` to 1 while
    it < warmup_iters: mmcv's LrUpdaterHook (DAFormer) scales the poly lr of the same
    0-based iteration by 1 - (1 - it/warmup_iters) * (1 - warmup_ratio)."""
    poly = max(0.0, 1.0 - it / total) ** power
    if warmup_iters > 0 and it < warmup_iters:
        return poly * (1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio))
    return poly


@dataclass
class ScheduledOptimizer:
    """An optimizer with its schedule: lr of each group = group['initial_lr'] * factor(it)."""

    optimizer: torch.optim.Optimizer
    factor: Callable[[int], float]

    def set_iteration(self, it: int) -> None:
        f = self.factor(it)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f


def _is_norm(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 and ("bn" in name or "norm" in name or "downsample.1" in name)


def build_optimizer(cfg: OptimConfig, groups: Iterable[dict], total_iters: int) -> ScheduledOptimizer:
    """`groups`: dicts with `params` (list of (name, param) or of params) and `lr_mult`.

    SGD (ADVENT: momentum 0.9, wd 5e-4) or AdamW (DAFormer: wd 0.01, optional no
    decay on norm parameters), heads at `lr_mult` times the base rate.
    """
    param_groups = []
    for g in groups:
        named = [item if isinstance(item, tuple) else ("", item) for item in g["params"]]
        named = [(n, p) for n, p in named if p.requires_grad]
        lr = cfg.lr * g.get("lr_mult", 1.0)
        if cfg.no_decay_norm:
            decay = [p for n, p in named if not _is_norm(n, p)]
            no_decay = [p for n, p in named if _is_norm(n, p)]
            if decay:
                param_groups.append({"params": decay, "initial_lr": lr, "lr": lr, "weight_decay": cfg.weight_decay})
            if no_decay:
                param_groups.append({"params": no_decay, "initial_lr": lr, "lr": lr, "weight_decay": 0.0})
        elif named:
            param_groups.append(
                {"params": [p for _, p in named], "initial_lr": lr, "lr": lr, "weight_decay": cfg.weight_decay}
            )
    if cfg.name == "sgd":
        opt = torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    horizon = cfg.poly_iters or total_iters

    def factor(it: int) -> float:
        return poly_warmup_factor(it, horizon, cfg.poly_power, cfg.warmup_iters, cfg.warmup_ratio)

    return ScheduledOptimizer(opt, factor)
