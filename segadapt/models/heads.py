"""Projection heads applied per pixel (1x1 convolutions) on a feature map.

``mlp``: conv1x1 - ReLU - conv1x1 (with biases; a per-pixel
Linear-ReLU-Linear, CFContra's head), ``linear``: one conv1x1, ``none``: the
features unchanged. Widths default to the input width (2048 for ResNet-101's
layer4), so the head's output lives in a space as wide as its input.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from segadapt.errors import ConfigError

HEAD_KINDS = ("mlp", "linear", "none")


class ProjectionHead(nn.Module):
    def __init__(self, in_channels: int, kind: str = "mlp", hidden_channels: Optional[int] = None,
                 out_channels: Optional[int] = None) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ConfigError(f"projection head: unknown kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        hidden = hidden_channels or in_channels
        out = out_channels or in_channels
        if kind == "none" and out != in_channels:
            raise ConfigError(f"projection head 'none' keeps the {in_channels} input channels; "
                              f"it cannot output {out}")
        self.kind = kind
        self.in_channels = in_channels
        self.out_channels = out
        if kind == "mlp":
            # PyTorch's default conv init equals nn.Linear's for a 1x1 kernel
            self.proj = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                                      nn.Conv2d(hidden, out, 1))
        elif kind == "linear":
            self.proj = nn.Conv2d(in_channels, out, 1)
        else:
            self.proj = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, {self.in_channels} -> {self.out_channels}"


__all__ = ["HEAD_KINDS", "ProjectionHead"]
