"""Rare class sampling (DAFormer), section ``method.rcs``: source images are drawn by a class
first (rarer classes more often, temperature-controlled), then an image holding that class, and
the crop is re-drawn until it holds enough of it. The statistics (per-image class pixel counts)
are cached beside the data (`segadapt.data.rcs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...errors import ConfigError
from ...utils import distributed as dist_utils


@dataclass
class RCSConfig:
    enabled: bool = False
    temperature: float = 0.01
    min_pixels: int = 3000  # an image is drawn for class c if it has more c pixels than this
    min_crop_ratio: float = 0.5  # crop re-drawn while it holds <= ratio * min_pixels of c
    crop_attempts: int = 10  # re-draws after the first crop
    stats: Optional[str] = None  # class statistics cache; default <source.root>/segadapt_class_stats.json

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"method.rcs.temperature must be positive, got {self.temperature}")
        if self.min_pixels < 1 or self.crop_attempts < 1:
            raise ConfigError("method.rcs.min_pixels and method.rcs.crop_attempts must be >= 1")


class RareClassSampling:
    """The source stream's sampler: `stream_sampler(dataset)` -> (sampler class, kwargs)."""

    def __init__(self, cfg: RCSConfig, num_classes: int, num_workers: int):
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_workers = num_workers
        self.probs = None  # class probabilities, once the statistics are read

    def stream_sampler(self, dataset):
        from ...data.rcs import RareClassPlan, RareClassSampler, dataset_class_counts

        c = self.cfg
        kw = {"path": c.stats, "num_classes": self.num_classes, "workers": self.num_workers}
        # one rank builds a missing cache, the others then read it
        counts = dataset_class_counts(dataset, **kw) if dist_utils.is_main() else None
        dist_utils.barrier()
        if counts is None:
            counts = dataset_class_counts(dataset, **kw)
        plan = RareClassPlan(counts, c.temperature, c.min_pixels)
        self.probs = plan.probs
        return RareClassSampler, plan.sampler_kwargs(round(c.min_crop_ratio * c.min_pixels), c.crop_attempts)


__all__ = ["RCSConfig", "RareClassSampling"]
