"""The method interface.

A method is a small object wrapping a plain segmenter (evaluation never needs to know which
method trained it). It turns a batch into named losses, composes the adaptation components it
uses (`components/`), owns its extra state (teachers, memory banks, discriminators, style nets)
and declares its optimizers; the trainer owns backward and the optimizer steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
import torch.nn as nn

from ..config import MethodConfig
from ..optim import (ScheduledOptimizer, advent_repeated_backbone, build_optimizer, layer_decay_groups,
                     poly_warmup_factor)
from .components.augment import AugmentConfig, StrongAugment
from .components.mic import MaskedImageConsistency, MICConfig
from .components.teacher import PseudoLabels, TeacherConfig
from .losses import entropy_map, upsample

MIC_RENAMED = {"mic_weight": "mic.weight", "mic_mask_ratio": "mic.mask_ratio", "mic_block_size": "mic.block_size",
               "mic_augment": "mic.augment"}


@dataclass
class SegmentationMethodConfig(MethodConfig):
    """Every method that trains the segmenter. Masked image consistency (`mic`) works on each:
    with the method's own teacher when it has one, else with a teacher of MIC's made from
    `teacher`; `augment` is the photometric augmentation of mixed and masked images."""

    RENAMED: ClassVar[dict] = dict(MIC_RENAMED)
    OLD_DEFAULTS: ClassVar[dict] = {"teacher.scale_ignored_rows": True, "augment.jitter": "kornia_0.6",
                                    "augment.jitter_order": "fixed"}

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mic: MICConfig = field(default_factory=MICConfig)


DEBUG_SAMPLES = 2  # images of a batch that a debug step keeps


class StepContext:
    """What the trainer lends one training step.

    `end_stage(losses, step=())` hands over a stage's losses: with staged backward on, the
    trainer back-propagates their sum at once (that stage's activations are freed before the next
    forward) and returns them detached, for logging; then it steps the optimizers named in `step`
    (e.g. a discriminator the next stage must see updated). Without a trainer (a method's losses
    unit-tested on their own) or with staging off and nothing to step, `losses` come back
    unchanged and the step's one backward covers them. `pseudo_labels` is what a self-training
    method's teacher gave this step, for the parts that run after it (MIC).

    Debug images: with `want_debug` set (the trainer's `train.debug_every` steps), the method and
    its components `keep` what they computed anyway into `debug`, name -> the first DEBUG_SAMPLES
    images of the batch, detached copies:

    * (B, 3, H, W) float: an RGB image in [0, 1] (an input, a translated, mixed or masked image);
    * (B, H, W) integer: a label map of train ids (255 ignore), e.g. a label or a prediction;
    * (B, H, W) float: a map in [0, 1] (the teacher's confidence, the normalised entropy).

    Names are `<what>/<panel>`: source/image, source/label, source/translated, source/prediction,
    target/image, target/translated, target/prediction, target/entropy, pseudo/label,
    pseudo/confidence, mix/image, mix/label, mix/prediction, mic/masked_image, mic/prediction.
    Without `want_debug` every `keep*` call returns at once: no copy, no computation, no sync.
    Nothing here draws random numbers, so a debug step trains exactly as any other.
    """

    def __init__(self, run_stage: Optional[Callable[[dict, tuple], dict]] = None, want_debug: bool = False):
        self._run_stage = run_stage
        self.pseudo_labels: Optional[PseudoLabels] = None
        self.want_debug = want_debug
        self.debug: dict[str, torch.Tensor] = {}

    def keep(self, name: str, tensor: torch.Tensor) -> None:
        """On a debug step: the first images of `tensor` (see the class notes for the kinds)."""
        if self.want_debug:
            self.debug[name] = tensor.detach()[:DEBUG_SAMPLES].clone()

    @torch.no_grad()
    def keep_prediction(self, name: str, logits: torch.Tensor, size, entropy: Optional[str] = None) -> None:
        """On a debug step: the argmax of `logits` upsampled to `size` (H, W), and with `entropy`
        its normalised entropy map under that name."""
        if not self.want_debug:
            return
        x = upsample(logits.detach()[:DEBUG_SAMPLES].float(), tuple(size), align_corners=False)
        self.debug[name] = x.argmax(dim=1)
        if entropy is not None:
            self.debug[entropy] = entropy_map(x)

    def keep_pseudo_labels(self, pseudo: PseudoLabels) -> None:
        """On a debug step: a teacher's pseudo-labels and its per-pixel confidence (top probability)."""
        if self.want_debug:
            self.keep("pseudo/label", pseudo.labels)
            if pseudo.max_probability is not None:
                self.keep("pseudo/confidence", pseudo.max_probability)

    def end_stage(self, losses: dict, step: tuple = ()) -> dict:
        if self._run_stage is None:
            if step:
                raise RuntimeError(f"stepping {tuple(step)} mid-iteration needs the trainer")
            return losses
        return self._run_stage(losses, tuple(step))


class UDAMethod(nn.Module):
    """Base class. `self.model` is the plain segmenter that evaluation and export see.

    Subclasses implement `training_step(batch, it, ctx) -> dict`: entries named `loss*` are
    summed into the objective; other entries are detached tensors that are only logged. A step
    may hand its losses over in stages with `ctx.end_stage` (e.g. source, then target); what it
    returns is the last stage. `forward` adds the MIC stage when `method.mic` is on.
    """

    Config = SegmentationMethodConfig
    method_name = "base"
    uses_target = True  # does the trainer need to feed the unlabelled target stream?
    trains_segmenter = True  # False for pure style-transfer pre-training (no segmentation eval)
    find_unused_parameters = False  # for DDP
    has_teacher = False  # True: the step publishes its teacher's pseudo-labels (ctx.pseudo_labels)
    # checkpoint state keys of older versions -> today's (prefix renames), applied on resume
    RENAMED_STATE: ClassVar[dict] = {}

    def __init__(self, model: nn.Module, cfg):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.mcfg = cfg.method
        self.num_classes = cfg.model.num_classes
        mic = getattr(self.mcfg, "mic", None)
        self.mic = None
        if mic is not None and mic.enabled:
            self.mic = MaskedImageConsistency(
                mic, StrongAugment(self.mcfg.augment), getattr(model, "normalization", None) or cfg.model.normalization,
                cfg.model.aux_weight, self.align_corners,
                student=None if self.has_teacher else model, teacher=None if self.has_teacher else self.mcfg.teacher)

    @property
    def align_corners(self) -> bool:
        """How the losses upsample logits to label size: True is ADVENT's convention."""
        return True

    def forward(self, batch: dict, it: int, ctx: Optional[StepContext] = None) -> dict:  # DDP calls forward
        ctx = StepContext() if ctx is None else ctx
        if ctx.want_debug:
            self.keep_inputs(batch, ctx)
        losses = self.training_step(batch, it, ctx)
        if self.mic is not None:
            losses = ctx.end_stage(losses)  # the step's graph goes before the masked forward
            tgt = batch["target"]
            losses.update(self.mic.losses(self.model, tgt["image"], ctx.pseudo_labels, tgt.get("valid_pseudo_mask"),
                                          ctx=ctx))
        if ctx.want_debug:
            self.keep_target_prediction(batch, ctx)
        return losses

    def training_step(self, batch: dict, it: int, ctx: StepContext) -> dict:
        raise NotImplementedError

    # ----------------------------------------------------------- debug images
    def keep_inputs(self, batch: dict, ctx: StepContext) -> None:
        """A debug step's inputs as the data gave them: images and the source label."""
        for domain in ("source", "target"):
            if domain in batch:
                ctx.keep(f"{domain}/image", batch[domain]["image"])
        if "source" in batch and "label" in batch["source"]:
            ctx.keep("source/label", batch["source"]["label"])

    @torch.no_grad()
    def keep_target_prediction(self, batch: dict, ctx: StepContext) -> None:
        """The student's prediction on the clean target, for methods whose step makes none
        (self-training sees mixed and masked targets only): one forward more, on debug steps
        only, in eval mode (as evaluation predicts; no BatchNorm statistics change, no random
        numbers drawn) and without gradients."""
        if not self.trains_segmenter or "target" not in batch or "target/prediction" in ctx.debug:
            return
        images = batch["target"]["image"][:DEBUG_SAMPLES]
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model.infer(images)["main"]
        finally:
            self.model.train(was_training)
        ctx.keep_prediction("target/prediction", logits, images.shape[-2:])

    # ----------------------------------------------------------- optimisation
    def segmenter_param_groups(self) -> list[dict]:
        head_ids = {id(p) for p in self.model.param_groups()["head"]}
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        backbone = [(n, p) for n, p in named if id(p) not in head_ids]
        if self.cfg.optim.param_list == "advent_repeated":
            backbone = advent_repeated_backbone(self.model, backbone)
        head = {"params": [(n, p) for n, p in named if id(p) in head_ids], "lr_mult": self.cfg.optim.head_lr_mult}
        if self.cfg.optim.layer_decay is not None:
            return layer_decay_groups(self.model, backbone, self.cfg.optim.layer_decay) + [head]
        return [{"params": backbone, "lr_mult": 1.0}, head]

    def build_optimizers(self) -> dict[str, ScheduledOptimizer]:
        """Name -> optimizer with schedule. Subclasses add their own (discriminators, style nets)."""
        return {"segmenter": build_optimizer(self.cfg.optim, self.segmenter_param_groups(), self.cfg.train.iters)}

    def poly_factor(self) -> Callable[[int], float]:
        """The segmenter's poly decay without its warm-up, for the optimizers of extra networks."""
        o = self.cfg.optim
        horizon = o.poly_iters or self.cfg.train.iters
        return lambda it: poly_warmup_factor(it, horizon, o.poly_power)

    # ----------------------------------------------------------- hooks
    def stream_sampler(self, domain: str, dataset):
        """(sampler_cls, kwargs) for the 'source'/'target' stream, or None for the default
        uniform `StreamSampler` (rare class sampling plugs in here)."""
        return None

    def before_train(self, trainer) -> None:
        """Called once after the optimizers are built and any checkpoint is restored."""

    @torch.no_grad()
    def after_step(self, it: int) -> None:
        """Called after the optimizers stepped (EMA teachers, memory banks); subclasses call super()."""
        if self.mic is not None:
            self.mic.after_step(it)

    def on_train_end(self, out_dir) -> None:
        """Called on the main process after the final checkpoint (e.g. export style-net weights)."""

    def eval_model(self) -> nn.Module:
        """The segmenter to evaluate (a teacher for methods that prefer it)."""
        return self.model

    def extra_state_dict(self) -> dict:
        """Method state beyond nn.Module parameters/buffers (counters etc.)."""
        return {}

    def load_extra_state_dict(self, state: dict) -> None:
        pass
