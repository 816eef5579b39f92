"""ADVENT's fully convolutional discriminator (from AdaptSegNet).

Five 4x4 convolutions with stride 2 and padding 1, channels
``in -> w -> 2w -> 4w -> 8w -> 1`` (w = 64), LeakyReLU(0.2) between them, no
normalisation. Input: a per-class map at full image resolution (AdvEnt feeds
the self-information ``-p log p / log C``); output: one logit per 32x32 patch
("is this map from the target domain?"). Module names (``conv1`` ..
``conv4``, ``classifier``) are AdaptSegNet's; ADVENT's files name the convs
``0`` .. ``8`` (one nn.Sequential): ``methods.advent.load_advent_discriminator``.
"""
from __future__ import annotations

from torch import Tensor, nn


class FCDiscriminator(nn.Module):
    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width * 2, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width * 2, width * 4, 4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(width * 4, width * 8, 4, stride=2, padding=1)
        self.classifier = nn.Conv2d(width * 8, 1, 4, stride=2, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.act(conv(x))
        return self.classifier(x)


__all__ = ["FCDiscriminator"]
