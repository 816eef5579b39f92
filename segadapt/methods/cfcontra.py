"""CFContra: coarse-to-fine alignment with contrastive learning, on top of MinEnt.

1. coarse, pixel level: optional AdaIN restyling of the inputs (``style:``,
   shared with MinEnt; or an offline restyled copy of the dataset);
2. fine, feature level: pixel-to-prototype InfoNCE against two small banks of
   class prototypes (``num_classes x dim`` each, one per domain), in the space
   of a projection head on layer4;
3. output level: MinEnt.

One step (from ``contrast.start_iter`` on; plain MinEnt before):

    f_s, f_t = head(layer4(x_s)), head(layer4(x_t))
    y_s = source labels nearest-resized to the feature map
    y_t = nearest M_src prototype of detached f_t, ignored if the two nearest
          are closer than `margin` (or the prediction: pseudo_label=prediction)
    loss = CE_s + MinEnt_t + w * (NCE(f_s, y_s, M_src) + NCE(f_t, y_t, M_tgt)
                                  + NCE(f_s, y_s, M_tgt) + NCE(f_t, y_t, M_src))

and after the optimizer step, without gradients, each bank moves toward the
batch centroids of its domain: ``m_k <- normalize(mu m_k + (1 - mu) c_k)`` for
the classes present (``cross_update: true``, the reference behaviour: each bank
takes both domains' centroids in one step, the other domain's first, its own last).

The banks are buffers (saved in checkpoints). They are initialised by a pass
over data in the loss's own feature space when the contrast switches on: at
``before_train`` for ``start_iter: 0`` (typically with ``train.init_from`` a
trained MinEnt or source-only model, the reference schedule), else at
iteration ``start_iter`` with the warmed-up model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..data.labels import CLASS_NAMES, IGNORE_INDEX
from ..errors import ConfigError
from ..models.heads import HEAD_KINDS, ProjectionHead
from ..utils import distributed as dist_utils
from . import register_method
from .base import StepContext
from .losses import (
    centroids_from_sums,
    class_mean_sums,
    info_nce,
    momentum_update_,
    nearest_prototype_labels,
    resize_labels,
    segmentation_loss,
    upsample,
    valid_prototypes,
)
from .minent import MinEnt, MinEntConfig


@dataclass
class ContrastConfig:
    """The class-wise contrastive alignment; reference defaults."""

    head: str = "mlp"  # mlp (reference: Linear-ReLU-Linear per pixel) | linear | none (raw layer4)
    # true: the head trains at the classifier's lr (optim.head_lr_mult); false = the reference,
    # whose head never reaches the optimizer and stays a fixed random projection
    train_head: bool = True
    dim: Optional[int] = None  # head output width; None = model.feature_channels (2048 on ResNet-101)
    temperature: float = 0.07
    weight_source: float = 0.001  # L_s:   source features, source labels, source bank
    weight_target: float = 0.001  # L_t:   target features, pseudo-labels, target bank
    weight_source_to_target: float = 0.001  # L_s2t: source features, source labels, target bank
    weight_target_to_source: float = 0.001  # L_t2s: target features, pseudo-labels, source bank
    momentum: float = 0.9  # bank EMA (reference HEAD; earlier reference configs 0.99)
    cross_update: bool = False  # true = reference: each bank also takes the other domain's centroids
    pseudo_label: str = "prototype"  # prototype (nearest source prototype + margin) | prediction (argmax)
    margin: float = 0.05  # delta: ignore a pixel whose two nearest prototypes are closer than this
    margin_decay: bool = False  # poly-decay the margin with the lr schedule (reference option)
    # reference option: divide each channel by its L2 norm over the batch and all pixels before the distances
    scale_features: bool = False
    init_source_batches: int = 300  # bank init: source batches (only pixels where GT == prediction)
    init_target_batches: int = 1600  # bank init: target batches labelled by the source bank
    init_features: str = "head"  # head (the loss's space) | layer4 (reference defect: raw layer4 prototypes)
    start_iter: int = 0  # contrast on from this iteration (MinEnt before); banks initialised then

    def __post_init__(self):
        for key, value, allowed in (("head", self.head, HEAD_KINDS),
                                    ("pseudo_label", self.pseudo_label, ("prototype", "prediction")),
                                    ("init_features", self.init_features, ("head", "layer4"))):
            if value not in allowed:
                raise ConfigError(f"method.contrast.{key}: '{value}' is not one of {', '.join(allowed)}")
        if self.temperature <= 0:
            raise ConfigError(f"method.contrast.temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"method.contrast.momentum must be in [0, 1], got {self.momentum}")
        for key in ("margin", "init_source_batches", "init_target_batches", "start_iter", "weight_source",
                    "weight_target", "weight_source_to_target", "weight_target_to_source"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.contrast.{key} must be >= 0, got {getattr(self, key)}")
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"method.contrast.dim must be positive, got {self.dim}")


@dataclass
class CFContraConfig(MinEntConfig):
    name: str = "cfcontra"
    contrast: ContrastConfig = field(default_factory=ContrastConfig)


def scale_channels_by_norm(features: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) features with each channel divided by its L2 norm over the batch and all
    pixels (the reference's optional scaling before the prototype distances)."""
    f = features.float()
    dims = [0] + list(range(2, f.ndim))
    return f / f.square().sum(dim=dims, keepdim=True).sqrt().clamp_min(1e-12)


def _batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@register_method("cfcontra")
class CFContra(MinEnt):
    Config = CFContraConfig

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        c = self.mcfg.contrast
        self.contrast_enabled = any(w > 0 for w in (c.weight_source, c.weight_target, c.weight_source_to_target,
                                                     c.weight_target_to_source))
        self.banks_ready = False  # checkpointed through extra_state_dict
        self._pending = None  # this step's centroid sums, applied in after_step
        self._init_data = None  # (source, target) datasets for a deferred bank initialisation
        self.head = None
        if not self.contrast_enabled:  # the "no contrast" ablation: MinEnt (+ style) exactly
            return
        in_channels = model.feature_channels
        self.head = ProjectionHead(in_channels, c.head, out_channels=c.dim)
        if c.init_features == "layer4" and self.head.out_channels != in_channels:
            raise ConfigError(f"method.contrast.init_features=layer4 needs a head keeping the {in_channels} "
                              f"layer4 channels, got dim {self.head.out_channels}")
        if not c.train_head:
            self.head.requires_grad_(False)
        self.register_buffer("bank_source", torch.zeros(self.num_classes, self.head.out_channels))
        self.register_buffer("bank_target", torch.zeros(self.num_classes, self.head.out_channels))
        # the head gets no gradient before start_iter
        self.find_unused_parameters = c.start_iter > 0

    # ------------------------------------------------------------------ optimisation
    def segmenter_param_groups(self) -> list[dict]:
        groups = super().segmenter_param_groups()
        if self.head is not None and self.mcfg.contrast.train_head:
            named = [(f"head.{n}", p) for n, p in self.head.named_parameters()]
            if named:
                groups.append({"params": named, "lr_mult": self.cfg.optim.head_lr_mult})
        return groups

    # ------------------------------------------------------------------ pseudo-labels
    def margin_at(self, it: int) -> float:
        c = self.mcfg.contrast
        if not c.margin_decay:
            return c.margin
        horizon = self.cfg.optim.poly_iters or self.cfg.train.iters
        return c.margin * max(0.0, 1.0 - it / horizon) ** self.cfg.optim.poly_power

    @torch.no_grad()
    def target_pseudo_labels(self, features: torch.Tensor, logits: torch.Tensor, it: int) -> torch.Tensor:
        """Target labels at feature resolution, 255 where ambiguous."""
        c = self.mcfg.contrast
        if c.pseudo_label == "prediction":
            return upsample(logits.detach().float(), features.shape[-2:]).argmax(1)
        if c.scale_features:
            features = scale_channels_by_norm(features)
        return nearest_prototype_labels(features, self.bank_source, self.margin_at(it),
                                        valid=valid_prototypes(self.bank_source))

    # ------------------------------------------------------------------ banks
    def before_train(self, trainer) -> None:
        if not self.contrast_enabled:
            return
        if self.mcfg.contrast.start_iter == 0:
            self.initialize_banks(trainer.source_ds, trainer.target_ds)
        else:  # later, with the warmed-up model
            self._init_data = (trainer.source_ds, trainer.target_ds)

    def load_banks(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Set both banks (rows L2-normalised or zero) and skip the data pass."""
        self.bank_source.copy_(source)
        self.bank_target.copy_(target)
        self.banks_ready = True

    def _init_stream(self, dataset, batch_size: int, seed: int):
        from ..data.sampling import DataStream

        # a fresh stream with the training stream's seed: "the first N batches", without
        # advancing the trainer's own streams
        return DataStream(dataset, batch_size, seed, self.cfg.train.num_workers, dist_utils.rank(),
                          dist_utils.world_size())

    def _bank_features(self, outputs: dict) -> torch.Tensor:
        if self.mcfg.contrast.init_features == "layer4":
            return outputs["features"].float()
        return self.head(outputs["features"]).float()

    def _centroid_pass(self, dataset, domain: str, batch_size: int, seed: int, num_batches: int, label_fn):
        """Class centroids over the first `num_batches` batches of a fresh stream (and of every
        DDP rank's share), from `label_fn(batch, outputs, features)` at feature resolution."""
        k, device = self.num_classes, self.bank_source.device
        sums = self.bank_source.new_zeros(k, self.bank_source.shape[1] + 1)  # [mean sums | image counts]
        stream = self._init_stream(dataset, batch_size, seed)
        try:
            for i in range(num_batches):
                batch = self.restyle({domain: _batch_to(next(stream), device)}, i)[domain]
                out = self.model(batch["image"], return_features=True)
                feats = self._bank_features(out)
                mean_sums, counts = class_mean_sums(feats, label_fn(batch, out, feats), k)
                sums += torch.cat([mean_sums, counts[:, None]], 1)
        finally:
            stream.close()
        dist_utils.all_reduce_sum(sums)
        return centroids_from_sums(sums[:, :-1], sums[:, -1])

    @torch.no_grad()
    def initialize_banks(self, source_ds, target_ds, it: int = 0) -> dict:
        """Both banks from class centroids of a pass over data with the current model (in
        eval mode: no BN statistics change). M_src: per-image class means over the pixels
        whose prediction equals the ground truth, averaged over images; then M_tgt: the
        same over target pixels labelled as in training (by M_src). Returns, per bank, the
        classes never seen (their rows stay zero until first seen)."""
        c, tc = self.mcfg.contrast, self.cfg.train

        def correctly_predicted(batch, out, feats):
            labels = resize_labels(batch["label"], feats.shape[-2:])
            pred = upsample(out["main"].float(), feats.shape[-2:]).argmax(1)
            return torch.where(labels == pred, labels, IGNORE_INDEX)

        def pseudo_labels(batch, out, feats):
            return self.target_pseudo_labels(feats, out["main"], it)

        was_training = self.training
        self.eval()
        try:
            centroids, present_s = self._centroid_pass(source_ds, "source", tc.batch_source, tc.seed,
                                                       c.init_source_batches, correctly_predicted)
            self.bank_source.copy_(centroids)
            centroids, present_t = self._centroid_pass(target_ds, "target", tc.batch_target, tc.seed + 1,
                                                       c.init_target_batches, pseudo_labels)
            self.bank_target.copy_(centroids)
        finally:
            self.train(was_training)
        self.banks_ready = True
        self._init_data = None
        missing = {"source": (~present_s).nonzero().flatten().tolist(),
                   "target": (~present_t).nonzero().flatten().tolist()}
        if dist_utils.is_main():
            names = CLASS_NAMES if self.num_classes == len(CLASS_NAMES) else [str(i) for i in range(self.num_classes)]

            def listed(ids):
                return ", ".join(names[i] for i in ids) if ids else "none"

            print(f"cfcontra: prototype banks initialised at iteration {it} from {c.init_source_batches} source / "
                  f"{c.init_target_batches} target batches; classes never seen (zero row until first seen): "
                  f"source bank: {listed(missing['source'])}; target bank: {listed(missing['target'])}", flush=True)
        return missing

    def update_banks(self, centroids_source, present_source, centroids_target, present_target) -> None:
        """The momentum update; absent classes keep their row."""
        mu = self.mcfg.contrast.momentum
        if self.mcfg.contrast.cross_update:
            # reference: each bank takes both domains' centroids, the other domain's first and its
            # own last (its memory updates run in the backward pass, in reverse call order)
            momentum_update_(self.bank_source, centroids_target, present_target, mu)
            momentum_update_(self.bank_source, centroids_source, present_source, mu)
            momentum_update_(self.bank_target, centroids_source, present_source, mu)
            momentum_update_(self.bank_target, centroids_target, present_target, mu)
        else:
            momentum_update_(self.bank_source, centroids_source, present_source, mu)
            momentum_update_(self.bank_target, centroids_target, present_target, mu)

    @torch.no_grad()
    def after_step(self, it: int) -> None:
        super().after_step(it)
        if self._pending is None:
            return
        sums, self._pending = self._pending, None
        dist_utils.all_reduce_sum(sums)  # identical banks on every rank
        k = self.num_classes
        d = self.bank_source.shape[1]
        c_s, p_s = centroids_from_sums(sums[:k, :d], sums[:k, d])
        c_t, p_t = centroids_from_sums(sums[k:, :d], sums[k:, d])
        self.update_banks(c_s, p_s, c_t, p_t)

    def extra_state_dict(self) -> dict:
        return {"banks_ready": self.banks_ready}

    def load_extra_state_dict(self, state: dict) -> None:
        self.banks_ready = bool(state.get("banks_ready", False))

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict, it: int, ctx: StepContext) -> dict:
        c = self.mcfg.contrast
        if not self.contrast_enabled or it < c.start_iter:
            return super().training_step(batch, it, ctx)
        if not self.banks_ready:  # contrast switches on now (or a run resumed before it did)
            if self._init_data is None:
                from ..data.datasets import build_dataset

                self._init_data = (build_dataset(self.cfg.source), build_dataset(self.cfg.target))
            self.initialize_banks(*self._init_data, it=it)

        batch = self.restyle(batch, it, ctx)
        src, tgt = batch["source"], batch["target"]
        valid_s, valid_t = valid_prototypes(self.bank_source), valid_prototypes(self.bank_target)
        tau = c.temperature

        def contrast(terms) -> dict:
            return {name: weight * info_nce(feats, labels, bank, tau, valid)
                    for name, weight, feats, labels, bank, valid in terms if weight > 0}

        # source stage: CE and the two terms on source features
        out_s = self.model(src["image"], return_features=True)
        ctx.keep_prediction("source/prediction", out_s["main"], src["image"].shape[-2:])
        f_s = self.head(out_s["features"]).float()
        y_s = resize_labels(src["label"], f_s.shape[-2:])
        with torch.no_grad():
            s_sums, s_counts = class_mean_sums(f_s, y_s, self.num_classes)
        losses = segmentation_loss(out_s, src["label"], self.cfg.model.aux_weight)
        losses.update(contrast([
            ("loss_con_source", c.weight_source, f_s, y_s, self.bank_source, valid_s),
            ("loss_con_source_to_target", c.weight_source_to_target, f_s, y_s, self.bank_target, valid_t)]))
        losses = ctx.end_stage(losses)
        del out_s, f_s

        # target stage: entropy and the two terms on target features
        out_t = self.model(tgt["image"], return_features=True)
        losses.update(self.entropy_losses(out_t, tgt["image"].shape[-2:]))
        ctx.keep_prediction("target/prediction", out_t["main"], tgt["image"].shape[-2:], entropy="target/entropy")
        f_t = self.head(out_t["features"]).float()
        with torch.no_grad():
            y_t = self.target_pseudo_labels(f_t, out_t["main"], it)
            ctx.keep("pseudo/label", y_t)  # at feature resolution
            t_sums, t_counts = class_mean_sums(f_t, y_t, self.num_classes)
            # one tensor, so that DDP needs one all-reduce in after_step
            self._pending = torch.cat([torch.cat([s_sums, s_counts[:, None]], 1),
                                       torch.cat([t_sums, t_counts[:, None]], 1)], 0)
        losses.update(contrast([
            ("loss_con_target", c.weight_target, f_t, y_t, self.bank_target, valid_t),
            ("loss_con_target_to_source", c.weight_target_to_source, f_t, y_t, self.bank_source, valid_s)]))
        losses["pseudo_label_ratio"] = (y_t != IGNORE_INDEX).float().mean()
        return losses


__all__ = ["ContrastConfig", "CFContraConfig", "CFContra", "scale_channels_by_norm"]
