"""Optimizers and learning-rate schedules.

Schedules are pure functions of the iteration, so a resumed run gets exactly the
learning rate an uninterrupted one would have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .config import OptimConfig
from .errors import ConfigError


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


# ADVENT's get_1x_lr_params_no_scale walks these trunk modules (our v1c `stem` in place of conv1/bn1)
ADVENT_TRUNK = ("conv1", "bn1", "stem", "layer1", "layer2", "layer3", "layer4")


def advent_repeated_backbone(model: nn.Module, backbone: list) -> list:
    """ADVENT's backbone list: for each trunk module, every sub-module in pre-order (itself
    included) and each trainable parameter of it, recursively. A tensor is thus listed once
    per module on its path below the trunk module: conv1 once, a block's conv 3 times (layer,
    block, conv), a downsample conv 4 times (layer, block, downsample, conv).

    `backbone`: the (name, param) pairs of the one-entry-per-tensor backbone group; the walk
    must list the same tensors. Returns (name, param) pairs with the repeats, in walk order.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    walk = []
    for attr in ADVENT_TRUNK:
        top = getattr(model, attr, None)
        if top is None:
            continue
        for module in top.modules():
            walk.extend((names[id(p)], p) for p in module.parameters() if p.requires_grad)
    missing = sorted({n for n, _ in backbone} - {n for n, _ in walk})
    extra = sorted({n for n, _ in walk} - {n for n, _ in backbone})
    if missing or extra:
        raise ConfigError(f"optim.param_list=advent_repeated needs ADVENT's trunk layout (conv1/bn1 or stem, "
                          f"layer1..4); not walked: {missing[:3]}, not in the backbone group: {extra[:3]}")
    return walk


class RepeatedSGD(torch.optim.Optimizer):
    """SGD with momentum over parameter lists in which a tensor may repeat, stepped as
    torch's single-tensor SGD loop of ADVENT's time did: once per repeat, in list order, each
    repeat reading the weights the previous one wrote and advancing the tensor's one momentum
    buffer (the first repeat ever starts it at d_p; later ones: buf = m * buf + d_p).

    `param_groups` hold each tensor once (so grad clipping, GradScaler and checkpoints see
    plain groups and no duplicate-parameter warning arises); `visits[g]` lists the indices
    into group g's params in stepping order, repeats included. Modern torch's SGD gathers the
    momentum buffers before its loop, so at the first step every repeat would start a fresh
    buffer: this class keeps the sequential semantics whatever the torch version.

    `decay_into_grad`: d_p = p.grad += wd * p (torch 0.4, ADVENT's 0.4.1), so a later
    repeat also carries the earlier repeats' decay; otherwise d_p = p.grad + wd * p (a copy;
    later torch such as CFContra's 1.7.0) and .grad is left as it was.
    """

    def __init__(self, param_groups: list[dict], visits: list[list[int]], lr: float, momentum: float,
                 weight_decay: float, decay_into_grad: bool = False):
        # dampening / nesterov: torch SGD's fixed values, so a checkpoint loads into either optimizer
        super().__init__(param_groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=0.0,
                                            nesterov=False))
        if len(visits) != len(self.param_groups):
            raise ValueError(f"{len(visits)} visit orders for {len(self.param_groups)} parameter groups")
        for order, group in zip(visits, self.param_groups):
            if order and not 0 <= min(order) <= max(order) < len(group["params"]):
                raise ValueError("a visit index is outside its parameter group")
        self.visits = [list(v) for v in visits]
        self.decay_into_grad = decay_into_grad

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, order in zip(self.param_groups, self.visits):
            params, lr, momentum, wd = group["params"], group["lr"], group["momentum"], group["weight_decay"]
            for i in order:
                p = params[i]
                if p.grad is None:
                    continue
                d_p = p.grad
                if wd != 0:
                    d_p = d_p.add_(p, alpha=wd) if self.decay_into_grad else d_p.add(p, alpha=wd)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.detach().clone()
                    else:
                        buf.mul_(momentum).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-lr)
        return loss


def _unique_with_visits(params: list) -> tuple[list, list[int]]:
    """Each tensor once (first-occurrence order) and, per entry of `params`, its index there."""
    index: dict[int, int] = {}
    unique, visits = [], []
    for p in params:
        if id(p) not in index:
            index[id(p)] = len(unique)
            unique.append(p)
        visits.append(index[id(p)])
    return unique, visits


def layer_decay_groups(model, named_params: list, decay: float) -> list[dict]:
    """Backbone (name, param) pairs -> one group per depth with lr_mult = decay^(depth + 1 - layer)
    (BEiT / DINOv2 layer-wise decay: the patch embedding learns slowest, the last block fastest)."""
    depth = getattr(model, "num_layers", None)
    if depth is None:
        raise ConfigError("optim.layer_decay needs a backbone with numbered layers (a ViT); "
                          f"{getattr(model, 'backbone_name', type(model).__name__)} has none")
    by_layer: dict[int, list] = {}
    for n, p in named_params:
        layer = model.layer_id(n)
        by_layer.setdefault(depth + 1 if layer is None else layer, []).append((n, p))
    return [{"params": by_layer[k], "lr_mult": decay ** (depth + 1 - k)} for k in sorted(by_layer)]


def _is_norm(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 and ("bn" in name or "norm" in name or "downsample.1" in name)


def build_optimizer(cfg: OptimConfig, groups: Iterable[dict], total_iters: int) -> ScheduledOptimizer:
    """`groups`: dicts with `params` (list of (name, param) or of params) and `lr_mult`.

    SGD (ADVENT: momentum 0.9, wd 5e-4) or AdamW (DAFormer: wd 0.01, optional no
    decay on norm parameters), heads at `lr_mult` times the base rate.
    `param_list=advent_repeated`: `RepeatedSGD`, a group's repeated tensors stepped per repeat.
    """
    param_groups, visits = [], []
    for g in groups:
        named = [item if isinstance(item, tuple) else ("", item) for item in g["params"]]
        named = [(n, p) for n, p in named if p.requires_grad]
        lr = cfg.lr * g.get("lr_mult", 1.0)
        if cfg.no_decay_norm or cfg.no_decay_keys is not None:
            if cfg.no_decay_keys is not None:
                exempt = [any(key in n for key in cfg.no_decay_keys) for n, _ in named]
            else:
                exempt = [_is_norm(n, p) for n, p in named]
            decay = [p for (n, p), e in zip(named, exempt) if not e]
            no_decay = [p for (n, p), e in zip(named, exempt) if e]
            if decay:
                param_groups.append({"params": decay, "initial_lr": lr, "lr": lr, "weight_decay": cfg.weight_decay})
            if no_decay:
                param_groups.append({"params": no_decay, "initial_lr": lr, "lr": lr, "weight_decay": 0.0})
        elif named and cfg.param_list == "advent_repeated":
            unique, order = _unique_with_visits([p for _, p in named])
            param_groups.append({"params": unique, "initial_lr": lr, "lr": lr, "weight_decay": cfg.weight_decay})
            visits.append(order)
        elif named:
            param_groups.append(
                {"params": [p for _, p in named], "initial_lr": lr, "lr": lr, "weight_decay": cfg.weight_decay}
            )
    if cfg.param_list == "advent_repeated":
        opt = RepeatedSGD(param_groups, visits, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          decay_into_grad=cfg.decay_into_grad)
    elif cfg.name == "sgd":
        opt = torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    horizon = cfg.poly_iters or total_iters

    def factor(it: int) -> float:
        return poly_warmup_factor(it, horizon, cfg.poly_power, cfg.warmup_iters, cfg.warmup_ratio)

    return ScheduledOptimizer(opt, factor)
