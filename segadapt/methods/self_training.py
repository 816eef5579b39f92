"""Self-training with a mean teacher and ClassMix: DACS, and DAFormer's training
strategies (rare class sampling + ImageNet feature distance) on the same core.

Per iteration:
  1. source CE on the labelled source batch;
  2. (DAFormer) feature distance of the source features to the frozen initial backbone;
  3. teacher (EMA of the student's parameters; BatchNorm on the batch's statistics, as the
     reference) on the clean target batch -> pseudo-labels and their weight q (fraction of
     confident pixels), zero in the top/bottom rows;
  4. ClassMix per image pair: half of the source image's classes pasted on the target,
     labels and weights mixed the same way, then colour jitter (p 0.8) and Gaussian blur
     (p 0.5), each decided once per batch as the reference;
  5. pixel-weighted CE of the student on the mixed batch;
  6. (`mic`, masked image consistency, Hoyer et al. CVPR 2023) the clean target with its own
     jitter/blur draw, block-masked (masked pixels = the normalisation mean, i.e. 0 at the
     network input), and the same pixel-weighted CE against step 3's pseudo-labels and weights;
     a backward stage of its own after the mix loss's;
and after the optimizer step the EMA update of the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.labels import THING_CLASSES
from ..utils import distributed as dist_utils
from ..errors import ConfigError, TrainingError
from . import register_method
from .augment import (APPLY_PER, block_mask, choose_mix_classes, class_mix_mask, color_jitter, mask_image, mix,
                      normalization_mean_rgb, random_gaussian_blur)
from .base import CE_MEANS, IGNORE_INDEX, MethodConfig, UDAMethod, segmentation_loss, upsample
from .feature_distance import FrozenBackbone, class_lookup, feature_distance_mask, masked_feature_distance
from .teacher import MeanTeacher

REFERENCE_HEIGHT = 512  # ignore_top / ignore_bottom are given for 512-pixel-high target crops


def confidence_weight(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """q: the fraction of pixels (over the whole batch, as DAFormer) whose max probability is >= threshold."""
    return (probs.max(dim=1).values >= threshold).float().mean()


def pseudo_weight_map(q: torch.Tensor, shape, ignore_top: int, ignore_bottom: int) -> torch.Tensor:
    """(B, H, W) weights: q everywhere but 0 in the top/bottom rows (counts scaled by H / 512)."""
    b, h, w = shape
    top = round(ignore_top * h / REFERENCE_HEIGHT)
    bottom = round(ignore_bottom * h / REFERENCE_HEIGHT)
    weight = q.expand(b, h, w).clone()
    if top > 0:
        weight[:, :top] = 0
    if bottom > 0:
        weight[:, max(h - bottom, 0):] = 0
    return weight


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           align_corners: bool = False) -> torch.Tensor:
    """Mean over all pixels of weight * CE (ignored pixels contribute 0), DACS/DAFormer's normalisation;
    logits upsampled as mmseg's decode head does (align_corners=False)."""
    ce = F.cross_entropy(upsample(logits, labels.shape[-2:], align_corners).float(), labels,
                         ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weights).mean()


@register_method("dacs")
class DACS(UDAMethod):
    """Mean-teacher self-training with ClassMix (Tranheden et al., WACV 2021)."""

    @dataclass
    class Config(MethodConfig):
        name: str = "dacs"
        ema_alpha: float = 0.999  # DACS paper: 0.99; DAFormer: 0.999
        pseudo_threshold: float = 0.968
        ignore_top: int = 15  # rows (at 512 px height) without pseudo-label weight: rectification border
        ignore_bottom: int = 120  # ... and the ego car
        jitter_strength: float = 0.2
        jitter_p: float = 0.8  # probability of jittering (the reference jitters when u ~ U(0,1) > 0.2)
        blur_p: float = 0.5
        blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
        blur_kernel_ratio: float = 0.1  # kernel side ~ 10% of the image side (odd)
        aug_apply_per: str = "batch"  # jitter/blur applied or not once per batch (reference) | image
        teacher_norm: str = "batch"  # teacher BatchNorm: batch statistics (reference) | running (eval mode)
        source_ce_mean: str = "all"  # source CE over all pixels, ignored = 0 (mmseg) | valid (ADVENT)
        align_corners: bool = False  # upsampling of student and teacher logits to label size (mmseg: False)
        eval_teacher: bool = False  # evaluate the EMA teacher instead of the student
        # masked image consistency (MIC): the student on the block-masked target, the teacher's labels
        mic: bool = False
        mic_weight: float = 1.0  # MIC's mask_lambda
        mic_mask_ratio: float = 0.7  # a block is masked with this probability
        mic_block_size: int = 64  # block side in input pixels (MIC: 64 on 512/1024 crops)
        mic_augment: bool = True  # jitter + blur, own draw, before masking (MIC 'separatetrgaug'; false: 'separatetrg')

    def __init__(self, model, cfg, mcfg):
        super().__init__(model, cfg, mcfg)
        m = self.mcfg
        if cfg.train.batch_source != cfg.train.batch_target:
            raise ConfigError(f"train.batch_source ({cfg.train.batch_source}) must equal train.batch_target "
                              f"({cfg.train.batch_target}) for {m.name}: ClassMix pairs source i with target i")
        if not 0.0 <= m.ema_alpha < 1.0:
            raise ConfigError(f"method.ema_alpha must be in [0, 1), got {m.ema_alpha}")
        if len(m.blur_sigma) != 2 or not 0 < m.blur_sigma[0] <= m.blur_sigma[1]:
            raise ConfigError(f"method.blur_sigma must be [low, high] with 0 < low <= high, got {m.blur_sigma}")
        if m.ignore_top < 0 or m.ignore_bottom < 0:
            raise ConfigError("method.ignore_top / method.ignore_bottom must be >= 0")
        for key, value, choices in (("aug_apply_per", m.aug_apply_per, APPLY_PER),
                                    ("teacher_norm", m.teacher_norm, ("batch", "running")),
                                    ("source_ce_mean", m.source_ce_mean, CE_MEANS)):
            if value not in choices:
                raise ConfigError(f"method.{key} must be one of {', '.join(choices)}, got {value!r}")
        if not 0.0 <= m.jitter_p <= 1.0 or not 0.0 <= m.blur_p <= 1.0:
            raise ConfigError("method.jitter_p and method.blur_p are probabilities in [0, 1]")
        if not 0.0 <= m.mic_mask_ratio < 1.0:
            raise ConfigError(f"method.mic_mask_ratio must be in [0, 1), got {m.mic_mask_ratio}")
        if m.mic_block_size < 1:
            raise ConfigError(f"method.mic_block_size must be >= 1 (pixels), got {m.mic_block_size}")
        if m.mic_weight < 0:
            raise ConfigError(f"method.mic_weight must be >= 0, got {m.mic_weight}")
        self.num_classes = cfg.model.num_classes
        # MIC's masked colour: a buffer, so that it is on the device without a copy per step
        kind = getattr(model, "normalization", None) or cfg.model.normalization
        self.register_buffer("mic_fill", torch.tensor(normalization_mean_rgb(kind)), persistent=False)
        self.build_heads()
        # copied now: the student as built, i.e. after model.pretrained / train.init_from (t = 0)
        self.teacher = MeanTeacher(self.teacher_source(), m.ema_alpha, norm_mode=m.teacher_norm)

    def build_heads(self) -> None:
        """Where subclasses create heads that the teacher averages too: called before it is copied."""

    def teacher_source(self) -> nn.Module:
        """What the mean teacher is an EMA of: the segmenter (subclasses add their heads)."""
        return self.model

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def pseudo_labels(self, target_images: torch.Tensor):
        """Teacher's argmax on the clean target, and the (B, H, W) pixel weights."""
        logits = upsample(self.teacher_model()(target_images)["main"], target_images.shape[-2:],
                          self.mcfg.align_corners)
        probs = torch.softmax(logits.float(), dim=1)
        labels = probs.argmax(dim=1)
        q = confidence_weight(probs, self.mcfg.pseudo_threshold)
        return labels, pseudo_weight_map(q, labels.shape, self.mcfg.ignore_top, self.mcfg.ignore_bottom), q

    @torch.no_grad()
    def mix_batch(self, src: dict, target_images: torch.Tensor, target_labels, target_weights):
        chosen = choose_mix_classes(src["label"], self.num_classes)
        mask = class_mix_mask(src["label"], chosen)
        images = mix(mask, src["image"], target_images)
        labels = mix(mask, src["label"], target_labels)
        weights = mix(mask, torch.ones_like(target_weights), target_weights)
        return self.strong_augment(images), labels, weights, mask

    @torch.no_grad()
    def strong_augment(self, images: torch.Tensor) -> torch.Tensor:
        """DACS's photometric augmentation: colour jitter, then Gaussian blur."""
        m = self.mcfg
        images = color_jitter(images, m.jitter_strength, m.jitter_p, per=m.aug_apply_per)
        return random_gaussian_blur(images, m.blur_p, m.blur_sigma, m.blur_kernel_ratio, per=m.aug_apply_per)

    def source_ce(self, out: dict, labels: torch.Tensor) -> dict:
        """The supervised source loss, averaged and upsampled as the method's config says."""
        return segmentation_loss(out, labels, self.cfg.model.aux_weight, prefix="loss_src",
                                 mean=self.mcfg.source_ce_mean, align_corners=self.mcfg.align_corners)

    def mix_ce(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_cross_entropy(logits, labels, weights, self.mcfg.align_corners)

    def pseudo_label_losses(self, out: dict, labels: torch.Tensor, weights: torch.Tensor, main_key: str,
                            aux_key: str, scale: float = 1.0) -> dict:
        """`scale` x the pixel-weighted CE of the main output (and aux_weight x it of the aux one)."""
        aux_w = self.cfg.model.aux_weight
        losses = {main_key: scale * self.mix_ce(out["main"], labels, weights)}
        if "aux" in out and aux_w > 0:
            losses[aux_key] = scale * aux_w * self.mix_ce(out["aux"], labels, weights)
        return losses

    def source_losses(self, src: dict) -> dict:
        return self.source_ce(self.model(src["image"]), src["label"])

    @torch.no_grad()
    def mic_images(self, target_images: torch.Tensor) -> torch.Tensor:
        """MIC's input: the clean target, jittered and blurred with its own draw, block-masked."""
        m = self.mcfg
        x = self.strong_augment(target_images) if m.mic_augment else target_images
        b, _, h, w = x.shape
        mask = block_mask(b, h, w, m.mic_block_size, m.mic_mask_ratio, x.device)
        return mask_image(x, mask, self.mic_fill)

    def mic_losses(self, target_images: torch.Tensor, pseudo: torch.Tensor, weights: torch.Tensor) -> dict:
        """The student on the masked target against the teacher's labels of the unmasked one,
        weighted as the mix loss (q, zero in the ignored rows)."""
        out = self.model(self.mic_images(target_images))
        return self.pseudo_label_losses(out, pseudo, weights, "loss_mic", "loss_mic_aux", self.mcfg.mic_weight)

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict, it: int) -> dict:
        src, tgt = batch["source"], batch["target"]
        if src["image"].shape[-2:] != tgt["image"].shape[-2:]:
            raise TrainingError(f"{self.mcfg.name}: source images are {tuple(src['image'].shape[-2:])} (H, W) but "
                                f"target images {tuple(tgt['image'].shape[-2:])}; ClassMix needs equal sizes "
                                "(set source.crop and target.crop to the same [W, H])")
        losses = self.end_stage(self.source_losses(src))

        pseudo, pseudo_weights, q = self.pseudo_labels(tgt["image"])
        images, labels, weights, mask = self.mix_batch(src, tgt["image"], pseudo, pseudo_weights)
        out = self.model(images)
        losses.update(self.pseudo_label_losses(out, labels, weights, "loss_mix_main", "loss_mix_aux"))
        if self.mcfg.mic:
            del out
            losses = self.end_stage(losses)  # the mix graph goes before the masked forward
            losses.update(self.mic_losses(tgt["image"], pseudo, pseudo_weights))
        losses["pseudo_weight"] = q.detach()
        losses["mix_source_fraction"] = mask.mean()
        return losses

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def after_step(self, it: int) -> None:
        # the teacher for iteration it + 1 (DAFormer updates at the start of each step t >= 1)
        self.teacher.update(it + 1)

    def teacher_model(self):
        """The teacher's segmenter (methods that average extra heads keep it in a ModuleDict)."""
        return self.teacher.ema

    def eval_model(self):
        return self.teacher_model() if self.mcfg.eval_teacher else self.model


@register_method("daformer")
class DAFormer(DACS):
    """DACS + rare class sampling + ImageNet feature distance (Hoyer et al., CVPR 2022),
    the training strategies on a DeepLabV2 segmenter."""

    @dataclass
    class Config(DACS.Config):
        name: str = "daformer"
        rcs: bool = True
        rcs_temperature: float = 0.01
        rcs_min_pixels: int = 3000  # an image is drawn for class c if it has more c pixels than this
        rcs_min_crop_ratio: float = 0.5  # crop re-drawn while it holds <= ratio * rcs_min_pixels of c
        rcs_crop_attempts: int = 10  # re-draws after the first crop
        rcs_stats: Optional[str] = None  # class statistics cache; default <source.root>/segadapt_class_stats.json
        fd_lambda: float = 0.005  # 0 turns the feature distance off
        fd_classes: list[int] = field(default_factory=lambda: list(THING_CLASSES))
        fd_min_ratio: float = 0.75  # a feature cell counts if one class covers >= this fraction of it

    def __init__(self, model, cfg, mcfg):
        super().__init__(model, cfg, mcfg)
        m = self.mcfg
        if m.rcs_temperature <= 0:
            raise ConfigError(f"method.rcs_temperature must be positive, got {m.rcs_temperature}")
        if m.rcs_min_pixels < 1 or m.rcs_crop_attempts < 1:
            raise ConfigError("method.rcs_min_pixels and method.rcs_crop_attempts must be >= 1")
        bad = [c for c in m.fd_classes if not 0 <= c < self.num_classes]
        if bad:
            raise ConfigError(f"method.fd_classes: {bad} are not class ids 0..{self.num_classes - 1}")
        # frozen at construction: the backbone right after model.pretrained / train.init_from
        self.imagenet = FrozenBackbone(model) if m.fd_lambda > 0 else None
        self.register_buffer("fd_class_table", class_lookup(m.fd_classes), persistent=False)

    def stream_sampler(self, domain: str, dataset):
        if domain != "source" or not self.mcfg.rcs:
            return None
        from ..data.rcs import RareClassPlan, RareClassSampler, dataset_class_counts

        m = self.mcfg
        kw = {"path": m.rcs_stats, "num_classes": self.num_classes, "workers": self.cfg.train.num_workers}
        # one rank builds a missing cache, the others then read it
        counts = dataset_class_counts(dataset, **kw) if dist_utils.is_main() else None
        dist_utils.barrier()
        if counts is None:
            counts = dataset_class_counts(dataset, **kw)
        plan = RareClassPlan(counts, m.rcs_temperature, m.rcs_min_pixels)
        self.rcs_probs = plan.probs
        return RareClassSampler, plan.sampler_kwargs(round(m.rcs_min_crop_ratio * m.rcs_min_pixels),
                                                     m.rcs_crop_attempts)

    def source_losses(self, src: dict) -> dict:
        if self.imagenet is None:
            return super().source_losses(src)
        out = self.model(src["image"], return_features=True)
        losses = self.source_ce(out, src["label"])
        feat = out["features"]
        with torch.no_grad():
            ref = self.imagenet(src["image"])
            mask = feature_distance_mask(src["label"], feat.shape[-2:], self.fd_class_table,
                                         self.mcfg.fd_min_ratio, self.num_classes,
                                         self.model.feature_stride)
        losses["loss_fd"] = self.mcfg.fd_lambda * masked_feature_distance(feat, ref, mask)
        return losses
