"""Self-training with a mean teacher and ClassMix: DACS, and DAFormer's training strategies
(rare class sampling + ImageNet feature distance) on the same core.

Per iteration:
  1. source CE on the labelled source batch (+ the feature distance of its features to the
     frozen initial backbone, `fd`);
  2. teacher (EMA of the student's parameters; BatchNorm on the batch's statistics, as the
     reference) on the clean target batch -> pseudo-labels and their weight q (fraction of
     confident pixels), zero in the top/bottom rows;
  3. ClassMix per image pair: half of the source image's classes pasted on the target,
     labels and weights mixed the same way, then colour jitter (p 0.8) and Gaussian blur
     (p 0.5), each decided once per batch as the reference;
  4. pixel-weighted CE of the student on the mixed batch;
  5. (`mic`) a stage of its own: the student on the block-masked target against step 2's
     pseudo-labels (`UDAMethod.forward`);
and after the optimizer step the EMA update of the teacher. DACS and DAFormer are the same
composition; DAFormer's config switches rare class sampling (`rcs`) and `fd` on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError, TrainingError
from . import register_method
from .base import SegmentationMethodConfig, StepContext, UDAMethod
from .components.augment import StrongAugment
from .components.classmix import ClassMix, MixConfig
from .components.feature_distance import FDConfig, FeatureDistance
from .components.rcs import RareClassSampling, RCSConfig
from .components.teacher import MeanTeacher, PseudoLabels, TeacherConfig, pseudo_labels
from .losses import CE_MEANS, pseudo_label_losses, segmentation_loss

SELF_TRAINING_RENAMED = {
    "ema_alpha": "teacher.alpha", "teacher_norm": "teacher.norm", "pseudo_threshold": "teacher.pseudo_threshold",
    "ignore_top": "teacher.ignore_top", "ignore_bottom": "teacher.ignore_bottom",
    "jitter_strength": "augment.jitter_strength", "jitter_p": "augment.jitter_p", "blur_p": "augment.blur_p",
    "blur_sigma": "augment.blur_sigma", "blur_kernel_ratio": "augment.blur_kernel_ratio",
    "aug_apply_per": "augment.apply_per",
    "rcs_temperature": "rcs.temperature", "rcs_min_pixels": "rcs.min_pixels",
    "rcs_min_crop_ratio": "rcs.min_crop_ratio", "rcs_crop_attempts": "rcs.crop_attempts", "rcs_stats": "rcs.stats",
    "fd_lambda": ("fd", lambda v: {"enabled": v > 0, "weight": v}), "fd_classes": "fd.classes",
    "fd_min_ratio": "fd.min_ratio",
}


def _self_training_teacher() -> TeacherConfig:
    return TeacherConfig(ignore_top=15, ignore_bottom=120)  # DAFormer's pseudo_weight_ignore_top/bottom


@dataclass
class DACSConfig(SegmentationMethodConfig):
    RENAMED: ClassVar[dict] = {**SegmentationMethodConfig.RENAMED, **SELF_TRAINING_RENAMED}
    OLD_DEFAULTS: ClassVar[dict] = {**SegmentationMethodConfig.OLD_DEFAULTS, "mix.classes": "image"}

    name: str = "dacs"
    teacher: TeacherConfig = field(default_factory=_self_training_teacher)
    mix: MixConfig = field(default_factory=MixConfig)
    rcs: RCSConfig = field(default_factory=RCSConfig)
    fd: FDConfig = field(default_factory=FDConfig)
    source_ce_mean: str = "all"  # source CE over all pixels, ignored = 0 (mmseg) | valid (ADVENT)
    align_corners: bool = False  # upsampling of student and teacher logits to label size (mmseg: False)
    eval_teacher: bool = False  # evaluate the EMA teacher instead of the student

    def __post_init__(self):
        if self.source_ce_mean not in CE_MEANS:
            raise ConfigError(f"method.source_ce_mean must be one of {', '.join(CE_MEANS)}, got "
                              f"{self.source_ce_mean!r}")

    def check(self, cfg) -> None:
        if cfg.train.batch_source != cfg.train.batch_target:
            raise ConfigError(f"train.batch_source ({cfg.train.batch_source}) must equal train.batch_target "
                              f"({cfg.train.batch_target}) for {self.name}: ClassMix pairs source i with target i")
        if self.fd.enabled:
            self.fd.check_classes(cfg.model.num_classes)


@dataclass
class DAFormerConfig(DACSConfig):
    name: str = "daformer"
    rcs: RCSConfig = field(default_factory=lambda: RCSConfig(enabled=True))
    fd: FDConfig = field(default_factory=lambda: FDConfig(enabled=True))


class SelfTraining(UDAMethod):
    """Mean teacher + ClassMix self-training, with rare class sampling and the feature distance
    when configured: DACS, DAFormer and CONFETI's core."""

    Config = DACSConfig
    has_teacher = True
    RENAMED_STATE: ClassVar[dict] = {"imagenet.": "fd.imagenet."}

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        m = self.mcfg
        self.augment = StrongAugment(m.augment)
        self.classmix = ClassMix(m.mix, self.augment, self.num_classes)
        self.build_heads()
        # copied now: the student as built, i.e. after model.pretrained / train.init_from (t = 0)
        self.teacher = MeanTeacher(self.teacher_source(), m.teacher.alpha, norm_mode=m.teacher.norm)
        # frozen at construction too: the backbone right after model.pretrained / train.init_from
        self.fd = FeatureDistance(m.fd, model, self.num_classes) if m.fd.enabled else None
        self.rcs = RareClassSampling(m.rcs, self.num_classes, cfg.train.num_workers) if m.rcs.enabled else None

    @property
    def align_corners(self) -> bool:
        return self.mcfg.align_corners

    def build_heads(self) -> None:
        """Where subclasses create heads that the teacher averages too: called before it is copied."""

    def teacher_source(self) -> nn.Module:
        """What the mean teacher is an EMA of: the segmenter (subclasses add their heads)."""
        return self.model

    def teacher_model(self) -> nn.Module:
        """The teacher's segmenter (methods that average extra heads keep it in a ModuleDict)."""
        return self.teacher.ema

    # ------------------------------------------------------------------ pieces
    def pseudo_labels(self, target_images: torch.Tensor, valid: Optional[torch.Tensor] = None) -> PseudoLabels:
        """Teacher's argmax on the clean target, and the (B, H, W) pixel weights (times the
        target's valid pseudo-label mask, when its dataset has `pseudo_margins`)."""
        return pseudo_labels(self.teacher_model(), target_images, self.mcfg.teacher, self.align_corners, valid)

    def source_ce(self, out: dict, labels: torch.Tensor) -> dict:
        """The supervised source loss, averaged and upsampled as the method's config says."""
        return segmentation_loss(out, labels, self.cfg.model.aux_weight, prefix="loss_src",
                                 mean=self.mcfg.source_ce_mean, align_corners=self.align_corners)

    def pseudo_label_losses(self, out: dict, labels: torch.Tensor, weights: torch.Tensor, main_key: str,
                            aux_key: str) -> dict:
        return pseudo_label_losses(out, labels, weights, self.cfg.model.aux_weight, main_key, aux_key,
                                   align_corners=self.align_corners)

    def feature_distance(self, features: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> dict:
        return {"loss_fd": self.fd.loss(features, images, labels, self.model.feature_stride)}

    def source_losses(self, src: dict, ctx: Optional[StepContext] = None) -> dict:
        out = self.model(src["image"], return_features=self.fd is not None)
        if ctx is not None:
            ctx.keep_prediction("source/prediction", out["main"], src["image"].shape[-2:])
        losses = self.source_ce(out, src["label"])
        if self.fd is None:
            return losses
        losses.update(self.feature_distance(out["features"], src["image"], src["label"]))
        return losses

    @staticmethod
    def check_sizes(name: str, source_images: torch.Tensor, target_images: torch.Tensor) -> None:
        if source_images.shape[-2:] != target_images.shape[-2:]:
            raise TrainingError(f"{name}: source images are {tuple(source_images.shape[-2:])} (H, W) but target "
                                f"images {tuple(target_images.shape[-2:])}; ClassMix needs equal sizes "
                                "(set source.crop and target.crop to the same [W, H])")

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict, it: int, ctx: StepContext) -> dict:
        src, tgt = batch["source"], batch["target"]
        self.check_sizes(self.mcfg.name, src["image"], tgt["image"])
        losses = ctx.end_stage(self.source_losses(src, ctx))

        pseudo = ctx.pseudo_labels = self.pseudo_labels(tgt["image"], tgt.get("valid_pseudo_mask"))
        mixed = self.classmix(src["image"], src["label"], tgt["image"], pseudo)
        self.keep_mix(ctx, pseudo, mixed)
        out = self.model(mixed.images)
        ctx.keep_prediction("mix/prediction", out["main"], mixed.labels.shape[-2:])
        losses.update(self.pseudo_label_losses(out, mixed.labels, mixed.weights, "loss_mix_main", "loss_mix_aux"))
        losses["pseudo_weight"] = pseudo.confidence.detach()
        losses["mix_source_fraction"] = mixed.mask.mean()
        return losses

    @staticmethod
    def keep_mix(ctx: StepContext, pseudo: PseudoLabels, mixed) -> None:
        """On a debug step: the teacher's pseudo-labels and confidence, the mixed images and labels."""
        if ctx.want_debug:
            ctx.keep_pseudo_labels(pseudo)
            ctx.keep("mix/image", mixed.images)
            ctx.keep("mix/label", mixed.labels)

    # ------------------------------------------------------------------ hooks
    def stream_sampler(self, domain: str, dataset):
        if domain != "source" or self.rcs is None:
            return None
        return self.rcs.stream_sampler(dataset)

    @torch.no_grad()
    def after_step(self, it: int) -> None:
        super().after_step(it)
        # the teacher for iteration it + 1 (DAFormer updates at the start of each step t >= 1)
        self.teacher.update(it + 1)

    def eval_model(self):
        return self.teacher_model() if self.mcfg.eval_teacher else self.model


@register_method("dacs")
class DACS(SelfTraining):
    """Mean-teacher self-training with ClassMix (Tranheden et al., WACV 2021)."""

    Config = DACSConfig


@register_method("daformer")
class DAFormer(SelfTraining):
    """DACS + rare class sampling + ImageNet feature distance (Hoyer et al., CVPR 2022),
    the training strategies on any segmenter."""

    Config = DAFormerConfig


__all__ = ["DACSConfig", "DAFormerConfig", "SelfTraining", "DACS", "DAFormer"]
