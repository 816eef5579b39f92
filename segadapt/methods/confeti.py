"""CONFETI ("Contrast, Stylize and Adapt"): CUT style transfer trained with the
segmenter, class prototypes built with cross-domain CAM weights, and
pixel-to-prototype contrast, on DAFormer's self-training core.

Stage 1, per iteration t (a backward per stage, see `StepContext.end_stage`; detaches route each
loss to its networks):
  1. x_s2t = G(x_s) keeps its graph to G; CUT's GAN + PatchNCE (+ identity) losses for
     G and F; D's halved LSGAN loss on the detached fake, by default (cut.d_step first, CUT's
     order) a stage of its own followed by D's step, before the GAN term, which sees the updated D;
  2. teacher pseudo-labels on x_t with the weight q; ClassMix of stopgrad(x_s2t) onto x_t;
  3. prototype update without gradient from the EMA head's raw projection of x_mix: the top-k
     pixels per class by weight, source pixels with uniform weights (random ties) up to
     `cross_domain_start`, the EMA CAM map after its ReLU as weights over all pixels after;
  4. student on stopgrad(x_s2t): CE + CAM loss (+ contrast after `contrast_start`),
     ImageNet feature distance against the frozen initial backbone on x_s;
  5. prototypical semantic consistency: MSE between the prototype similarities of the raw
     projections reg_proj(proj(f(x_s2t))) and stopgrad(proj(f(x_s))), the segmenter and head frozen for
     this term (no gradient, running BatchNorm statistics untouched); reaches G and reg_proj;
  6. student on x_mix: pixel-weighted CE, CAM loss (after `cam_mix_start`), contrast;
  7. target contrast: student on x_t with the teacher's pseudo-labels, scaled by q;
  (`mic`) then, a stage of its own, the student on the jittered, block-masked x_t: the same
  weighted CE against the teacher's pseudo-labels of the unmasked x_t (see DACS).
Stage 2: G from stage 1 frozen, a fresh segmenter, no consistency and no target contrast.
The single-stage variant (the authors' later version) is stage 1 with its own settings.

The teacher, ClassMix, rare class sampling, the feature distance (DAFormer's core, `SelfTraining`)
and CUT (`components.cut`, section ``method.cut``) are components; this module holds CONFETI's own
parts: the CAM head, the prototypes, the contrastive head and terms, the consistency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import ConfigError
from ..models.cut import from_cut_range, to_cut_range
from ..optim import ScheduledOptimizer
from . import register_method
from .base import StepContext
from .components.augment import AugmentConfig
from .components.classmix import present_classes
from .components.cut import CUTConfig, CUTStyleTransfer, frozen_generator
from .components.teacher import is_stochastic_layer
from .losses import resize_labels
from .self_training import DAFormerConfig, SelfTraining

CONSISTENCY_MODES = ("frozen_student", "ema", "none")


# --------------------------------------------------------------------------- losses
def cam_loss(cam_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE with logits between the global-average-pooled CAM logits (B, C) and the multi-hot
    vector of the classes present in each label map (ignore excluded)."""
    pooled = cam_logits.float().mean(dim=(2, 3))
    target = present_classes(labels, cam_logits.shape[1]).float()
    return F.binary_cross_entropy_with_logits(pooled, target)


def pixels_with_labels(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """features (B, D, h, w), labels (B, H, W) nearest-resized to (h, w) -> every pixel as rows:
    (v (B*h*w, D), y (B*h*w,), valid (B*h*w,) bool: labelled, not ignore)."""
    y = resize_labels(labels, features.shape[-2:]).reshape(-1)
    v = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return v, y, (y >= 0) & (y < num_classes)


def sample_pixels(features: torch.Tensor, labels: torch.Tensor, num_pixels: int, num_classes: int):
    """Labelled pixels at feature resolution, `num_pixels` drawn uniformly across the batch.

    features (B, D, h, w); labels (B, H, W), nearest-resized to (h, w). Returns (v (N, D),
    y (N,), keep (N,) bool): N = min(num_pixels, h*w*B) rows, `keep` False on rows that had to be
    filled with unlabelled pixels. Drawn with random scores and top-k: no host sync.
    """
    v, y, valid = pixels_with_labels(features, labels, num_classes)
    scores = torch.rand(y.shape, device=y.device).masked_fill(~valid, -1.0)
    idx = scores.topk(min(num_pixels, y.numel())).indices
    return v[idx], y[idx], valid[idx]


def prototype_contrast_loss(v: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, prototypes: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """Mean over kept pixels of CE((v . P^T) / tau, y); v and P rows L2-normalised by the caller."""
    logits = v.float() @ prototypes.float().t() / temperature
    ce = F.cross_entropy(logits, torch.where(keep, y, torch.zeros_like(y)), reduction="none")
    k = keep.float()
    return (ce * k).sum() / k.sum().clamp_min(1.0)


def prototype_regulariser(v: torch.Tensor, keep: torch.Tensor, prototypes: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """sum_c log softmax(mean(v) . stopgrad(P)^T / tau)_c / (C ln C), mean(v) over kept pixels
    (the caller passes every labelled pixel of the batch, not only the sampled ones).

    With the sign as specified it is -1 when the mean feature is equally similar to every
    prototype and lower the more it favours one; unit vectors bound it below."""
    k = keep.float().unsqueeze(1)
    mean = (v.float() * k).sum(0) / k.sum().clamp_min(1.0)
    c = prototypes.shape[0]
    log_p = torch.log_softmax(mean @ prototypes.detach().float().t() / temperature, dim=0)
    return log_p.sum() / (c * math.log(c))


def contrast_terms(proj: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, num_pixels: int,
                   temperature: float, num_classes: int, with_reg: bool = True) -> dict:
    """Unweighted pixel-to-prototype terms of one batch: proj (B, D, h, w) raw projection, L2-normalised
    per pixel here. "contrast" on `num_pixels` labelled pixels drawn at random; "reg" on the mean of
    every labelled pixel."""
    v_all = F.normalize(proj.float(), dim=1)
    v, y, keep = sample_pixels(v_all, labels, num_pixels, num_classes)
    out = {"contrast": prototype_contrast_loss(v, y, keep, prototypes, temperature)}
    if with_reg:
        v_all, _, valid = pixels_with_labels(v_all, labels, num_classes)
        out["reg"] = prototype_regulariser(v_all, valid, prototypes, temperature)
    return out


@torch.no_grad()
def top_pixels_per_class(labels: torch.Tensor, rank: torch.Tensor, valid: torch.Tensor, num_classes: int,
                         topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the `topk` valid pixels of that label with the highest `rank`.

    labels / rank / valid (N,). Returns (idx (C, k) flat pixel indices, chosen (C, k) bool): a
    class with fewer valid pixels has its extra slots unchosen.
    """
    onehot = (labels.unsqueeze(0) == torch.arange(num_classes, device=labels.device).unsqueeze(1)) & valid
    key = torch.where(onehot, rank.unsqueeze(0).float(), torch.full_like(onehot, -math.inf, dtype=torch.float))
    top, idx = key.topk(min(topk, labels.numel()), dim=1)
    return idx, torch.isfinite(top)


def weighted_class_means(v: torch.Tensor, w: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v (C, k, D) chosen pixels' features, w (C, k) their weights -> (normalize(sum w v / sum w) (C, D),
    present (C,) bool)."""
    w = torch.where(chosen, w.float(), torch.zeros_like(w, dtype=torch.float))
    total = w.sum(1, keepdim=True)
    f = F.normalize(torch.einsum("ck,ckd->cd", w, v.float()) / total.clamp_min(1e-12), dim=1)
    return f, chosen.any(1) & (total.squeeze(1) > 0)


def bilinear_at(features: torch.Tensor, flat_idx: torch.Tensor, size) -> torch.Tensor:
    """The values that bilinear upsampling of `features` to `size` (align_corners=True) has at the flat
    (B, H, W) pixel indices `flat_idx` (any shape), computed at those pixels only: (*idx.shape, D).
    Upsampling a wide feature map to label size just to read a few hundred pixels would cost
    B x D x H x W memory."""
    b, d = features.shape[:2]
    h, w = size
    flat = flat_idx.reshape(-1)
    n, y, x = flat // (h * w), (flat // w) % h, flat % w
    # align_corners=True: output pixel i sits at input position i * (in - 1) / (out - 1), which is
    # grid_sample(align_corners=True) at normalised coordinate 2 i / (out - 1) - 1
    gx = 2.0 * x.float() / max(w - 1, 1) - 1.0
    gy = 2.0 * y.float() / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1).view(1, 1, -1, 2).expand(b, 1, -1, 2).to(features.dtype)
    sampled = F.grid_sample(features, grid, mode="bilinear", align_corners=True)  # (B, D, 1, M)
    picked = sampled[n, :, 0, torch.arange(flat.numel(), device=flat.device)]  # each pixel from its own image
    return picked.reshape(*flat_idx.shape, d)


def cam_weights(cam_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each pixel's weight for the prototype of its label: the CAM map after its ReLU (as the CAM
    head outputs it), upsampled bilinearly (align_corners=True) to label size, read at the
    pixel's class. cam_logits (B, C, h, w), labels (B, H, W) -> (B*H*W,); ignored pixels get 0."""
    c = cam_logits.shape[1]
    cam = F.interpolate(F.relu(cam_logits.float()), size=tuple(labels.shape[-2:]), mode="bilinear",
                        align_corners=True)
    y = labels.reshape(-1)
    valid = (y >= 0) & (y < c)
    w = cam.gather(1, torch.where(valid, y, torch.zeros_like(y)).view(labels.shape).unsqueeze(1)).reshape(-1)
    return w * valid


@torch.no_grad()
def prototype_candidates(proj: torch.Tensor, cam_logits: Optional[torch.Tensor], labels: torch.Tensor,
                         source_mask: torch.Tensor, num_classes: int, topk: int):
    """Per class, normalize(sum w v / sum w) over its `topk` pixels of highest weight w, v the raw
    (unnormalised) projection upsampled to label size.

    cam_logits given (cross-domain phase): w = ReLU'd CAM over all labelled pixels (source GT and
    target pseudo-labels); None: source pixels only (source_mask), w = 1, the `topk` drawn
    uniformly at random among these ties. proj (B, D, h, w); labels / source_mask (B, H, W).
    Returns (f (C, D), present (C,) bool)."""
    y = labels.reshape(-1)
    valid = (y >= 0) & (y < num_classes)
    if cam_logits is not None:
        w = cam_weights(cam_logits, labels)
        rank = w
    else:
        valid = valid & source_mask.reshape(-1).bool()
        w = torch.ones_like(y, dtype=torch.float)
        rank = torch.rand(y.shape, device=y.device)
    idx, chosen = top_pixels_per_class(y, rank, valid, num_classes, topk)
    v = bilinear_at(proj.float(), idx, labels.shape[-2:])  # only the chosen pixels at label size
    return weighted_class_means(v, w[idx], chosen)


@torch.no_grad()
def update_prototypes_(prototypes: torch.Tensor, seen: torch.Tensor, f: torch.Tensor, present: torch.Tensor,
                       momentum: float) -> None:
    """P_c <- normalize((1 - a) P_c + a f_c) for present classes, a = 1 on a class's first
    update (`seen` False) and 1 - momentum after; absent classes untouched. In place."""
    a = torch.where(seen, torch.full_like(seen, 1.0 - momentum, dtype=prototypes.dtype),
                    torch.ones_like(seen, dtype=prototypes.dtype)).unsqueeze(1)
    new = F.normalize((1.0 - a) * prototypes + a * f.to(prototypes.dtype), dim=1)
    prototypes.copy_(torch.where(present.unsqueeze(1), new, prototypes))
    seen |= present


class ContrastiveHead(nn.Module):
    """Per-pixel projection, raw (not normalised): one 1x1 conv without bias (stage 1/2), or a
    2-layer MLP (the single-stage variant) when `hidden` is given. The prototype update and the
    consistency term use this output as it is; the contrastive loss L2-normalises it."""

    def __init__(self, in_channels: int, dim: int, hidden: Optional[int] = None):
        super().__init__()
        if hidden:
            self.proj = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                                      nn.Conv2d(hidden, dim, 1))
        else:
            self.proj = nn.Conv2d(in_channels, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).float()


# --------------------------------------------------------------------------- config
@dataclass
class ConfetiConfig(DAFormerConfig):
    RENAMED: ClassVar[dict] = {**DAFormerConfig.RENAMED, "stylizer": "cut.init", "stylizer_optimizer": "cut.optimizer",
                               "stylizer_weight_decay": "cut.weight_decay", "stylizer_poly": "cut.poly"}
    OLD_DEFAULTS: ClassVar[dict] = {**DAFormerConfig.OLD_DEFAULTS, "cam_bias": True, "consistency_bn": "frozen"}

    name: str = "confeti"
    # CONFETI pins kornia 0.6.7: its ColorJitter is torchvision's
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(jitter="kornia_0.6"))
    stage: int = 1  # 1: CUT trained jointly (and the single-stage variant); 2: G frozen from `cut.init`
    # stage 1: CUT's G, D, F start from `cut.init` (a CUT run folder, or a G file; None: random
    # init) and train with their own optimizers (cut.optimizer adam: CUT's, constant; adamw and
    # cut.poly: the single stage); stage 2: `cut.init` is the stage-1 run folder or its G (required)
    cut: CUTConfig = field(default_factory=CUTConfig)
    cam_weight: float = 1.0
    cam_mix_start: int = 2000  # CAM loss on the mixed batch for t > this
    proj_dim: int = 512
    proj_hidden: Optional[int] = None  # None: one 1x1 conv; a width: 2-layer MLP (single stage: 256)
    proto_init: str = "zeros"  # zeros (first update copies) | random (single stage)
    proto_topk: int = 32
    proto_momentum: float = 0.999  # a = 1 - momentum after a class's first update
    cross_domain_start: int = 3000  # prototypes: source pixels, uniform weights up to t; CAM weights after
    contrast_start: int = 3000  # source and target contrast for t > this, the mix contrast for t >= this (reference)
    contrast_weight: float = 0.5
    contrast_temperature: float = 0.1
    contrast_pixels: int = 4096
    reg_weight: float = 2.0
    consistency: str = "frozen_student"  # frozen_student | ema (single stage) | none (stage 2)
    consistency_weight: float = 0.1
    consistency_temperature: Optional[float] = None  # ema mode: both sides L2-normalised and / 0.1
    consistency_start: int = 0  # on for t >= this (reference: from t = 0; single stage: t > 1000, i.e. 1001)
    # the frozen student's consistency forward: update (reference: its BatchNorm running statistics
    # move with both images) | frozen (running statistics left as they are)
    consistency_bn: str = "update"
    cam_bias: bool = False  # the CAM head's 1x1 conv: no bias (reference); true for older checkpoints
    target_contrast: bool = True  # stage 1: contrast on x_t with pseudo-labels, scaled by q

    def __post_init__(self):
        super().__post_init__()
        _check(self)  # at config load: a bad value fails before any data is read


class _FeatureView(nn.Module):
    """``model.extract_features(x)[-1]`` as a forward, so ``functional_call`` can run it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(x)[-1]


@register_method("confeti")
class Confeti(SelfTraining):
    Config = ConfetiConfig
    find_unused_parameters = True  # heads unused before their start iterations
    RENAMED_STATE: ClassVar[dict] = {**SelfTraining.RENAMED_STATE, "generator.": "cut.G."}

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        m = self.mcfg
        c = self.num_classes
        if m.proto_init == "random":
            g = torch.Generator().manual_seed(cfg.train.seed)
            protos = F.normalize(torch.randn(c, m.proj_dim, generator=g), dim=1)
        else:
            protos = torch.zeros(c, m.proj_dim)
        self.register_buffer("prototypes", protos)
        self.register_buffer("prototype_seen", torch.full((c,), m.proto_init == "random"))
        # stage 2: only G, frozen (checkpoint keys cut.G.* in both stages)
        self.cut = CUTStyleTransfer(m.cut) if m.stage == 1 else _FrozenCUT(frozen_generator(m.cut))

    # ------------------------------------------------------------------ networks
    def build_heads(self) -> None:
        m, ch = self.mcfg, self.model.feature_channels
        self.cam = nn.Conv2d(ch, self.num_classes, 1, bias=m.cam_bias)
        self.proj = ContrastiveHead(ch, m.proj_dim, m.proj_hidden)
        self.reg_proj = nn.Conv2d(m.proj_dim, m.proj_dim, 1) if m.consistency != "none" else None

    def teacher_source(self) -> nn.Module:
        # EMA copies of the segmenter and both heads
        return nn.ModuleDict({"model": self.model, "cam": self.cam, "proj": self.proj})

    @property
    def trains_stylizer(self) -> bool:
        """Stage 1 / single stage: G, D and F are trained with the segmenter."""
        return self.mcfg.stage == 1

    def teacher_model(self):
        return self.teacher.ema["model"]

    # ------------------------------------------------------------------ optimisation
    def segmenter_param_groups(self) -> list[dict]:
        groups = super().segmenter_param_groups()
        heads = [(f"cam.{n}", p) for n, p in self.cam.named_parameters()]
        heads += [(f"proj.{n}", p) for n, p in self.proj.named_parameters()]
        if self.reg_proj is not None:
            heads += [(f"reg_proj.{n}", p) for n, p in self.reg_proj.named_parameters()]
        groups.append({"params": heads, "lr_mult": self.cfg.optim.head_lr_mult})
        return groups

    def build_optimizers(self) -> dict[str, ScheduledOptimizer]:
        opts = super().build_optimizers()
        if self.trains_stylizer:
            opts.update(self.cut.optimizers(self.poly_factor()))
        return opts

    # ------------------------------------------------------------------ prototypes
    @torch.no_grad()
    def update_prototypes(self, images: torch.Tensor, labels: torch.Tensor, source_mask: torch.Tensor,
                          it: int) -> torch.Tensor:
        """Step 5: the EMA head's raw projection and ReLU'd CAM of x_mix -> top-k per class -> EMA
        of P. Returns how many classes were updated (for logging)."""
        m = self.mcfg
        ema = self.teacher.ema
        feats = ema["model"](images, return_features=True)["features"]
        # category-wise cross-domain information after cross_domain_start
        cam = ema["cam"](feats) if it > m.cross_domain_start else None
        f, present = prototype_candidates(ema["proj"](feats), cam, labels, source_mask, self.num_classes,
                                          m.proto_topk)
        update_prototypes_(self.prototypes, self.prototype_seen, f, present, m.proto_momentum)
        return present.sum()

    def contrast_losses(self, features: torch.Tensor, labels: torch.Tensor, name: str, scale=1.0) -> dict:
        m = self.mcfg
        out = {}
        for key, value in contrast_terms(self.proj(features), labels, self.prototypes, m.contrast_pixels,
                                         m.contrast_temperature, self.num_classes, m.reg_weight > 0).items():
            weight = m.contrast_weight if key == "contrast" else m.reg_weight
            out[f"loss_{key}_{name}"] = scale * weight * value
        return out

    # ------------------------------------------------------------------ consistency
    def _frozen_student_features(self, x: torch.Tensor) -> torch.Tensor:
        """The student's last feature level with its parameters detached: gradients reach only the
        input. Its BatchNorm running statistics move as in any training forward (`consistency_bn:
        update`, the reference) or stay as they are (`frozen`: buffers copied). No heads are run, and
        dropout / drop path are off (a deterministic target, as on the reference's ResNet)."""
        view = _FeatureView(self.model)
        state = {f"model.{n}": p.detach() for n, p in self.model.named_parameters()}
        if self.mcfg.consistency_bn == "frozen":
            state.update({f"model.{n}": b.clone() for n, b in self.model.named_buffers()})
        stochastic = [m for m in self.model.modules() if is_stochastic_layer(m) and m.training]
        for m in stochastic:
            m.train(False)
        try:
            return functional_call(view, state, (x,))
        finally:
            for m in stochastic:
                m.train(True)

    def consistency_loss(self, x_s: torch.Tensor, x_s2t: torch.Tensor) -> torch.Tensor:
        """MSE between the prototype similarities of reg_proj(proj(f(x_s2t))) and
        stopgrad(proj(f(x_s))), raw projections (ema mode with a temperature: both L2-normalised
        and divided by it); the segmenter side is frozen (student or EMA)."""
        m = self.mcfg
        protos = self.prototypes.float()
        if m.consistency == "ema":
            ema = self.teacher.ema  # no parameter needs a gradient; eval-mode BatchNorm
            with torch.no_grad():
                a = ema["proj"](ema["model"](x_s, return_features=True)["features"])
            b = self.reg_proj(ema["proj"](ema["model"](x_s2t, return_features=True)["features"]))
        else:
            proj_state = {n: p.detach() for n, p in self.proj.named_parameters()}
            with torch.no_grad():
                a = functional_call(self.proj, proj_state, (self._frozen_student_features(x_s),))
            b = self.reg_proj(functional_call(self.proj, proj_state, (self._frozen_student_features(x_s2t),)))
        b = b.float()
        if m.consistency_temperature:
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        sim_a = torch.einsum("bdhw,cd->bchw", a.float(), protos)
        sim_b = torch.einsum("bdhw,cd->bchw", b, protos)
        if m.consistency_temperature:
            sim_a, sim_b = sim_a / m.consistency_temperature, sim_b / m.consistency_temperature
        return F.mse_loss(sim_b, sim_a.detach())

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict, it: int, ctx: StepContext) -> dict:
        m = self.mcfg
        src, tgt = batch["source"], batch["target"]
        x_s, y_s, x_t = src["image"], src["label"], tgt["image"]
        self.check_sizes("confeti", x_s, x_t)
        losses: dict = {}
        # 1. stylise (and CUT's own losses when G trains)
        if self.trains_stylizer:
            cut_step, fake = self.cut.losses(ctx, to_cut_range(x_s), to_cut_range(x_t))
            losses.update(cut_step)
            x_s2t = from_cut_range(fake)
        else:
            with torch.no_grad():
                x_s2t = from_cut_range(self.cut.G(to_cut_range(x_s)))
        x_s2t_sg = x_s2t.detach()
        ctx.keep("source/translated", x_s2t_sg)

        # 2. pseudo-labels and ClassMix of the stylised source onto the target
        pseudo = ctx.pseudo_labels = self.pseudo_labels(x_t, tgt.get("valid_pseudo_mask"))
        mixed = self.classmix(x_s2t_sg, y_s, x_t, pseudo)
        self.keep_mix(ctx, pseudo, mixed)

        # 3. prototypes (no gradient)
        losses["proto_classes_updated"] = self.update_prototypes(mixed.images, mixed.labels, mixed.mask, it).float()
        contrast_on = it > m.contrast_start
        mix_contrast_on = it >= m.contrast_start  # the reference's mix branch: one iteration earlier

        # 4. student on the stylised source: CE, CAM, contrast, feature distance to x_s's reference features
        out = self.model(x_s2t_sg, return_features=True)
        feat = out["features"]
        ctx.keep_prediction("source/prediction", out["main"], y_s.shape[-2:])
        src_losses = self.source_ce(out, y_s)
        if m.cam_weight > 0:
            src_losses["loss_cam_src"] = m.cam_weight * cam_loss(self.cam(feat), y_s)
        if contrast_on:
            src_losses.update(self.contrast_losses(feat, y_s, "src"))
        if self.fd is not None:
            src_losses.update(self.feature_distance(feat, x_s, y_s))
        losses.update(ctx.end_stage(src_losses))  # the student's source graph goes now
        del out, feat

        # 5. prototypical semantic consistency (reaches G and reg_proj only)
        if self.trains_stylizer and self.reg_proj is not None and m.consistency_weight > 0 \
                and it >= m.consistency_start:
            losses["loss_consistency"] = m.consistency_weight * self.consistency_loss(x_s, x_s2t)
        losses = ctx.end_stage(losses)  # G's losses and the consistency: G's graph goes now
        del x_s2t

        # 6. student on the mixed batch
        out_mix = self.model(mixed.images, return_features=True)
        ctx.keep_prediction("mix/prediction", out_mix["main"], mixed.labels.shape[-2:])
        losses.update(self.pseudo_label_losses(out_mix, mixed.labels, mixed.weights, "loss_mix_main", "loss_mix_aux"))
        if m.cam_weight > 0 and it > m.cam_mix_start:
            losses["loss_cam_mix"] = m.cam_weight * cam_loss(self.cam(out_mix["features"]), mixed.labels)
        if mix_contrast_on:
            losses.update(self.contrast_losses(out_mix["features"], mixed.labels, "mix"))
        losses = ctx.end_stage(losses)
        del out_mix

        # 7. target contrast with the teacher's pseudo-labels, scaled by q
        if m.target_contrast and contrast_on:
            feat_t = self.model(x_t, return_features=True)["features"]
            losses.update(self.contrast_losses(feat_t, pseudo.labels, "tgt", scale=pseudo.confidence))

        losses["pseudo_weight"] = pseudo.confidence.detach()
        losses["mix_source_fraction"] = mixed.mask.mean()
        return losses

    # ------------------------------------------------------------------ hooks
    def on_train_end(self, out_dir) -> None:
        """The run folder gets CUT's latest_net_G/D/F.pth: stage 2 takes the folder."""
        if self.trains_stylizer:
            self.cut.save_weights(out_dir)


# --------------------------------------------------------------------------- helpers
class _FrozenCUT(nn.Module):
    """Stage 2's style module: the stage-1 generator, frozen and always in eval mode."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.G = generator

    def train(self, mode: bool = True):
        super().train(mode)
        self.G.eval()
        return self


def _check(m: ConfetiConfig) -> None:
    def bad(key, problem):
        raise ConfigError(f"method.{key}: {problem}")

    if m.stage not in (1, 2):
        bad("stage", f"must be 1 or 2, got {m.stage}")
    if m.consistency_bn not in ("update", "frozen"):
        bad("consistency_bn", f"'{m.consistency_bn}' is not one of update, frozen")
    if m.consistency not in CONSISTENCY_MODES:
        bad("consistency", f"'{m.consistency}' is not one of {', '.join(CONSISTENCY_MODES)}")
    if m.stage == 2 and m.consistency != "none":
        bad("consistency", "stage 2 freezes G, so the consistency loss (which trains G) must be 'none'")
    if m.stage == 2 and not m.cut.init:
        bad("cut.init", "CONFETI stage 2 needs the stage-1 run folder (or its latest_net_G.pth): "
                        "method.cut.init=<runs/.../seedN>")
    if m.proto_init not in ("zeros", "random"):
        bad("proto_init", f"'{m.proto_init}' is not one of zeros, random")
    for key in ("proj_dim", "proto_topk", "contrast_pixels"):
        if getattr(m, key) < 1:
            bad(key, f"must be >= 1, got {getattr(m, key)}")
    if m.proj_hidden is not None and m.proj_hidden < 1:
        bad("proj_hidden", f"must be >= 1 or null, got {m.proj_hidden}")
    if not 0.0 <= m.proto_momentum < 1.0:
        bad("proto_momentum", f"must be in [0, 1), got {m.proto_momentum}")
    for key in ("contrast_temperature",):
        if getattr(m, key) <= 0:
            bad(key, f"must be > 0, got {getattr(m, key)}")
    if m.consistency_temperature is not None and m.consistency_temperature <= 0:
        bad("consistency_temperature", f"must be > 0 or null, got {m.consistency_temperature}")
    for key in ("cam_weight", "contrast_weight", "reg_weight", "consistency_weight"):
        if getattr(m, key) < 0:
            bad(key, f"must be >= 0, got {getattr(m, key)}")
