"""Infinite, resumable sample streams.

The k-th draw of a stream is a pure function of (seed, k): which image (a
per-epoch permutation) and the seed of its augmentations. A stream resumed at
draw k therefore yields exactly what an uninterrupted one would, whatever the
number of DataLoader workers. Under DDP rank r takes draws r, r+W, r+2W, ...
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler

_MIX = 0x9E3779B97F4A7C15


def _draw_seed(seed: int, k: int) -> int:
    return ((seed * 1_000_003 + k) * _MIX) % (2**63)


class StreamSampler(Sampler):
    """Yields `(index, augmentation_seed)` keys forever, starting at local draw `start`."""

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.size = size
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[torch.Tensor] = None

    def _index(self, g: int) -> int:
        epoch, pos = divmod(g, self.size)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = torch.randperm(self.size, generator=gen)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k = self.start
        while True:
            g = k * self.world_size + self.rank
            yield self._index(g), _draw_seed(self.seed, g)
            k += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs it for len()
        return 2**62


class DataStream:
    """An endless iterator of collated batches with a resumable position (batches consumed)."""

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False, sampler_cls=StreamSampler, sampler_kwargs=None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self.sampler_cls = sampler_cls
        self.sampler_kwargs = sampler_kwargs or {}
        self.batches_consumed = 0
        self._iter = None

    def _make_iter(self):
        sampler = self.sampler_cls(len(self.dataset), self.seed, start=self.batches_consumed * self.batch_size,
                                   rank=self.rank, world_size=self.world_size, **self.sampler_kwargs)
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            drop_last=True, pin_memory=self.pin_memory, persistent_workers=False,
            # own generator: creating loaders must not consume the global torch RNG
            generator=torch.Generator().manual_seed(self.seed),
            prefetch_factor=2 if self.num_workers > 0 else None,
        )
        return iter(loader)

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.batches_consumed += 1
        return batch

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed = int(state["batches_consumed"])
        self._iter = None

    def close(self) -> None:
        self._iter = None
