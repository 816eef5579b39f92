"""One iteration-based trainer for every method.

Per iteration: draw a labelled source batch (and an unlabelled target batch if
the method uses one), let the method turn it into named losses, sum the
`loss*` entries, one backward, step every optimizer the method declared, then
the method's `after_step` hook (EMA teachers, memory banks). Checkpoints hold
everything needed to continue exactly: weights, method state, optimizers,
AMP scaler, RNG states and the data streams' positions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from ..config import Config, dump_config
from ..data.datasets import build_dataset, restyled_eval_note
from ..data.sampling import DataStream
from ..errors import CheckpointError, ConfigError, OutputError, SegadaptError, TrainingError, write_error
from ..methods import StepContext, build_method
from ..models.checkpoints import load_pretrained
from ..models.segmenter import build_segmenter
from ..utils import distributed as dist_utils
from ..utils.checkpoint import atomic_save, first_non_finite, rng_state, set_rng_state
from .checkpoint import FORMAT, VERSION, load_checkpoint, rename_state_keys
from .evaluator import evaluate, inference_options, subsets_for
from .host_memory import tune_malloc
from .logging import RunLogger
from .provenance import Provenance
from .run_folder import LOCK_NAME, missing_folders, prepare_run_folder, remove_unused_run_folder
from ..utils.files import write_text_atomic
from ..utils.threads import ThreadPolicy

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_grad_scaler(device_type: str, enabled: bool):
    """fp16 loss scaling; torch.amp.GradScaler appeared in torch 2.3 (we support >= 2.2)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device_type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compile_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot compile on `device` here, or None."""
    if backend != "inductor":
        return None
    if device.type == "cpu":
        names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(n and shutil.which(n) for n in names):
            return "no C++ compiler (g++, c++, clang++ or $CXX) for the inductor backend on CPU"
        # inductor runs $CXX (else g++) and gives up on it when `--version` fails: ask it first,
        # quietly, instead of letting every compiled frame fail with a screen of warnings
        cxx = os.environ.get("CXX") or "g++"
        if shutil.which(cxx):
            import subprocess

            try:
                subprocess.run([cxx, "--version"], capture_output=True, check=True, timeout=60)
            except (OSError, subprocess.SubprocessError) as e:
                said = getattr(e, "stderr", None) or b""
                said = said.decode(errors="replace").strip().splitlines()
                why = said[-1] if said else (getattr(e, "strerror", None) or type(e).__name__)
                return f"the C++ compiler {cxx} does not run ({why[:200]})"
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "the inductor backend on CUDA needs Triton, which is not installed"
    return None


def compile_segmenter(model: torch.nn.Module, backend: str, device: torch.device, announce: bool = True) -> bool:
    """torch.compile the segmenter in place (state-dict keys unchanged); one line and eager
    execution where the platform cannot compile. Graphs dynamo cannot handle run eagerly."""
    reason = compile_unavailable(backend, device)
    if reason is not None:
        if announce:
            print(f"warning: train.compile: {reason}; training uncompiled", file=sys.stderr)
        return False
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"train.compile_backend: unknown backend {backend!r}; known: {', '.join(known)}")
    torch._dynamo.config.suppress_errors = True  # a failing graph falls back to eager, not the run
    model.compile(backend=backend)
    return True


class CompileFallback:
    """After the first graph the backend fails to compile: one line, then the segmenter runs eagerly
    and dynamo stays off for the rest of the run (with `suppress_errors` alone every frame is tried
    again, each failure logged with its traceback: thousands of lines)."""

    LOGGER = "torch._dynamo.convert_frame"  # where dynamo logs a suppressed compile error

    def __init__(self, model: torch.nn.Module, announce: bool = True):
        import logging

        import torch._dynamo

        self.model, self.announce, self.failed = model, announce, False
        self._logger = logging.getLogger(self.LOGGER)
        self._disable_before = torch._dynamo.config.disable
        self._logger.addFilter(self)

    def filter(self, record) -> bool:
        import logging

        import torch._dynamo

        if record.levelno < logging.WARNING:
            return True
        if not self.failed:
            self.failed = True
            torch._dynamo.config.disable = True  # checked per frame: nothing more is tried
            self.model._compiled_call_impl = None  # nn.Module.compile's hook: this model runs eagerly
            if self.announce:
                exc = record.exc_info[1] if record.exc_info else None
                lines = [ln.strip() for ln in (str(exc) if exc is not None else record.getMessage()).splitlines()
                         if ln.strip() and "TORCHDYNAMO_VERBOSE" not in ln] or ["?"]
                # the first lines name the error, the last holds the compiler's own complaint
                picked = lines[:2] + lines[-1:] if len(lines) > 3 else lines
                why = " / ".join(ln[:120] for ln in picked)
                if exc is not None:
                    why = f"{type(exc).__name__}: {why}"
                print(f"warning: train.compile: compiling failed ({why}); given up, training goes on "
                      "uncompiled", file=sys.stderr)
        return False

    def remove(self) -> None:
        import torch._dynamo

        self._logger.removeFilter(self)
        torch._dynamo.config.disable = self._disable_before


def move_to(batch, device, channels_last: bool = False):
    if isinstance(batch, dict):
        return {k: move_to(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        t = batch.to(device, non_blocking=True)
        if channels_last and t.ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    return batch


def ensure_data(cfg: Config) -> None:
    """Generate the built-in synthetic benchmark on first use (rank 0 only)."""
    if not cfg.synthetic.auto:
        return
    from ..data.synthetic import SynthParams, ensure_synthetic

    # SyntheticConfig holds SynthParams' fields plus `auto` and `out`
    params = SynthParams.from_dict(dataclasses.asdict(cfg.synthetic))
    if dist_utils.is_main():
        ensure_synthetic(Path(cfg.synthetic.out), params)
    dist_utils.barrier()


def build_eval_loader(cfg: Config, dataset=None, num_workers: Optional[int] = None) -> DataLoader:
    ds = dataset if dataset is not None else build_dataset(cfg.eval.data)
    if cfg.eval.max_images is not None:
        ds = Subset(ds, range(min(cfg.eval.max_images, len(ds))))
    if dist_utils.world_size() > 1:  # each rank takes a strided share; the confusion matrix is all-reduced
        ds = Subset(ds, range(dist_utils.rank(), len(ds), dist_utils.world_size()))
    workers = cfg.train.num_workers if num_workers is None else num_workers
    return DataLoader(ds, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=workers,
                      generator=torch.Generator().manual_seed(0))


def eval_kwargs(cfg: Config, dataset=None) -> dict:
    """`evaluate` keyword arguments of a config; with the evaluation `dataset`, its class names
    when it has a class map of its own (else the default names, as without a dataset)."""
    infer = inference_options(cfg.eval)
    own = dataset.classes if getattr(dataset, "has_class_map", False) else None
    if cfg.eval.subsets == "none" or (own is not None and cfg.eval.subsets == "auto"):
        subsets = {}  # the SYNTHIA subsets are Cityscapes train ids
    elif cfg.eval.subsets == "synthia":
        if own is not None and own.num_classes != 19:
            raise ConfigError(f"eval.subsets=synthia needs the 19 Cityscapes classes; eval.data.class_map has "
                              f"{own.num_classes}: set eval.subsets=none")
        subsets = subsets_for("synthia")
    else:
        subsets = subsets_for(cfg.source.kind)
    return {"num_classes": cfg.model.num_classes, "infer": infer, "subsets": subsets,
            "amp_dtype": AMP_DTYPES.get(cfg.train.amp),
            "class_names": list(own.names) if own is not None else None}


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None, progress: bool = True, overwrite: bool = False,
                 config_file: Optional[dict] = None, command: Optional[list[str]] = None):
        self.cfg = cfg
        setup_started = time.perf_counter()
        self.resumed_from = resume
        # the values of the config file the run was started or resumed with (see
        # run_folder.resume_config); None: kept from the checkpoint a resume reads
        self.config_file = config_file
        self.device = dist_utils.init_from_env(cfg.train.device)
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.is_main = self.rank == 0
        self.out_dir = Path(cfg.out_dir)
        self.progress = progress and self.is_main
        # one process per run folder; a fresh run never lands on an existing one
        reads = [("train.init_from", cfg.train.init_from), ("model.pretrained", cfg.model.pretrained),
                 ("source.root", cfg.source.root), ("target.root", cfg.target.root),
                 ("eval.data.root", cfg.eval.data.root)]
        created = missing_folders(self.out_dir) if self.is_main else []
        lock_existed = (self.out_dir / LOCK_NAME).exists()
        self.run_lock, refused = None, None
        if self.is_main:
            try:
                self.run_lock = prepare_run_folder(self.out_dir, resume, overwrite, reads)
            except SegadaptError as e:
                refused = e
            except OSError as e:  # the folder cannot be made (a file in the way, a read-only disk)
                refused = write_error(e.filename or self.out_dir, e)
        try:
            # under torchrun every rank stops with rank 0's one line, none waits for it in a collective
            dist_utils.share_error(refused)
            self._setup(resume)
        except BaseException:
            self.release()
            if self.is_main:  # refused before anything was written: leave no empty run folder behind
                remove_unused_run_folder(self.out_dir, created, lock_existed)
            raise
        self.provenance = None
        if self.is_main:
            self.provenance = Provenance(self.out_dir, self.device, resumed_from=resume,
                                         start_iteration=self.start_iter, argv=command)
            self.provenance.add("setup", time.perf_counter() - setup_started)

    compile_fallback: Optional[CompileFallback] = None

    def release(self) -> None:
        """Give the run folder free (the lock also drops when the process dies)."""
        if self.compile_fallback is not None:
            self.compile_fallback.remove()
            self.compile_fallback = None
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _setup(self, resume: Optional[str]) -> None:
        cfg = self.cfg
        tc = cfg.train
        tune_malloc()  # once per process; the CLI did it already
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(tc.seed + self.rank)

        ensure_data(cfg)
        self.source_ds = build_dataset(cfg.source)
        self.eval_ds = build_dataset(cfg.eval.data)
        self.eval_note = restyled_eval_note(cfg.eval.data.root)
        if self.eval_note and self.is_main:
            print(f"warning: evaluating on a restyled copy, not the standard benchmark: {self.eval_note}",
                  file=sys.stderr)
        self.model = build_segmenter(cfg.model)
        if tc.init_from:
            load_pretrained(self.model, tc.init_from)
        self.model.to(self.device)
        if tc.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.method = build_method(cfg, self.model).to(self.device)
        if tc.compile:  # after the method copied what it needs (teacher, frozen backbone) uncompiled
            if compile_segmenter(self.model, tc.compile_backend, self.device, announce=self.is_main):
                self.compile_fallback = CompileFallback(self.model, announce=self.is_main)
        self.target_ds = build_dataset(cfg.target) if self.method.uses_target else None
        self.optimizers = self.method.build_optimizers()
        self.amp_dtype = AMP_DTYPES.get(tc.amp)
        self.scaler = make_grad_scaler(self.device.type, enabled=tc.amp == "fp16")

        pin = self.device.type == "cuda"
        self.streams = {}
        for domain, ds, bs, seed in (("source", self.source_ds, tc.batch_source, tc.seed),
                                     ("target", self.target_ds, tc.batch_target, tc.seed + 1)):
            if ds is None:
                continue
            custom = self.method.stream_sampler(domain, ds)
            kw = {"sampler_cls": custom[0], "sampler_kwargs": custom[1]} if custom else {}
            self.streams[domain] = DataStream(ds, bs, seed, tc.num_workers, self.rank, self.world, pin, **kw)
        self.start_iter = 0
        self.last_good: Optional[int] = None  # iteration of the last checkpoint written (and checked finite)
        self.history: list[dict] = []
        self.logger = RunLogger(self.out_dir, cfg, enabled=self.is_main, tensorboard=tc.tensorboard,
                                loggers=tc.loggers)
        self.debug_tensors: dict = {}  # what the last debug step kept (StepContext.debug)
        if getattr(self.eval_ds, "has_class_map", False):
            self.logger.palette = self.eval_ds.classes.palette
        if resume is not None:
            ckpt = load_checkpoint(resume)
            self._restore(ckpt, resume)
            self.last_good = self.start_iter or None
            # a run that had ended evaluated after this checkpoint: that evaluation is done again
            ended = self.start_iter >= int(ckpt["config"]["train"]["iters"])
            if ended:
                self.history = [h for h in self.history if h.get("iteration") != self.start_iter]
            self.logger.drop_records_after(self.start_iter, with_eval_at=ended)
            del ckpt
        else:
            # the method's one-off preparation (e.g. memory-bank initialisation)
            # only for fresh runs; its results live in the checkpoint
            self.method.before_train(self)
        # staged backward: each stage's graph is freed before the next forward; several backward
        # passes per step do not fit DDP's hooks, so ranks average gradients by hand then
        self.staged = tc.staged_backward
        self.manual_sync = self.world > 1 and self.staged
        self._stepped: set[str] = set()
        self.ddp = None
        if self.manual_sync:
            dist_utils.broadcast_state(self.method)
        elif self.world > 1:
            self.ddp = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.method.find_unused_parameters)

    # ------------------------------------------------------------------ state
    def state_dict(self, iteration: int) -> dict:
        method_state = {k: v for k, v in self.method.state_dict().items() if not k.startswith("model.")}
        return {
            "format": FORMAT, "version": VERSION, "iteration": iteration,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "method": method_state,
            "method_extra": self.method.extra_state_dict(),
            "optimizers": {k: o.optimizer.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "history": self.history,
            **({"config_file": self.config_file} if self.config_file is not None else {}),
            # what evaluation scored, when it is not the student (e.g. an EMA teacher)
            **({"eval_model": self.method.eval_model().state_dict()}
               if self.method.eval_model() is not self.model else {}),
            # the classes the model predicts (names, ids, colours): predict and export read them
            # here, so a checkpoint needs no class-map file beside it
            **({"classes": self.eval_ds.classes.to_dict()} if getattr(self.eval_ds, "has_class_map", False)
               else {}),
        }

    def _restore(self, ckpt: dict, where: str) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            method_state = rename_state_keys(ckpt["method"], type(self.method).RENAMED_STATE) \
                if int(ckpt.get("version", 1)) < 2 else ckpt["method"]
            missing, unexpected = self.method.load_state_dict(
                {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **method_state}, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"missing {missing[:3]} unexpected {unexpected[:3]}")
            self.method.load_extra_state_dict(ckpt.get("method_extra", {}))
            for k, o in self.optimizers.items():
                o.optimizer.load_state_dict(ckpt["optimizers"][k])
        except (RuntimeError, KeyError) as e:
            # torch's first line only says "Error(s) in loading ...": keep its details, on one line
            msg = "; ".join(x.strip() for x in str(e).splitlines() if x.strip())[:400]
            raise CheckpointError(f"checkpoint {where} does not match this model/method: {msg}") from None
        try:
            self.scaler.load_state_dict(ckpt["scaler"])
            for k, s in self.streams.items():
                s.load_state_dict(ckpt["streams"][k])
            set_rng_state(ckpt["rng"])
            self.start_iter = int(ckpt["iteration"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            what = f"no entry {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:300]
            raise CheckpointError(f"checkpoint {where}: its loss-scaler, data-stream or RNG state is unusable "
                                  f"({what}); cannot resume exactly from it") from None
        self.history = list(ckpt.get("history", []))
        if self.config_file is None and isinstance(ckpt.get("config_file"), dict):
            self.config_file = ckpt["config_file"]

    def _named_state_tensors(self, state: dict):
        """(name, tensor) for the weights, buffers and optimizer state in a checkpoint dict."""
        for part in ("model", "method", "eval_model"):
            for k, v in state.get(part, {}).items():
                yield f"{part}.{k}", v
        stack = [("method_extra", state.get("method_extra", {}))]
        while stack:  # nested dicts/lists of tensors (e.g. a lazily built discriminator)
            prefix, obj = stack.pop(0)
            if isinstance(obj, dict):
                stack += [(f"{prefix}.{k}", v) for k, v in obj.items()]
            elif isinstance(obj, (list, tuple)):
                stack += [(f"{prefix}.{i}", v) for i, v in enumerate(obj)]
            else:
                yield prefix, obj
        param_names = {id(p): n for n, p in self.method.named_parameters()}
        for opt_name, o in self.optimizers.items():
            params = [p for g in o.optimizer.param_groups for p in g["params"]]
            for idx, slots in state["optimizers"][opt_name]["state"].items():
                pname = param_names.get(id(params[idx]), f"parameter {idx}") if idx < len(params) else idx
                for slot, v in slots.items():
                    yield f"optimizer '{opt_name}' {slot} of {pname}", v

    def _where_last_good(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"last good checkpoint: {self.out_dir / 'last.pth'} (iteration {self.last_good})"

    def save(self, iteration: int, name: str = "last.pth") -> Optional[Path]:
        """Write a checkpoint, only of a finite state: NaN/inf weights, buffers or optimizer state
        stop the run and leave the previous good checkpoint in place."""
        state = self.state_dict(iteration)
        bad = first_non_finite(self._named_state_tensors(state))
        if bad is not None:
            raise TrainingError(f"non-finite {bad} at iteration {iteration}; run stopped, {self._where_last_good()}")
        if not self.is_main:
            return None
        path = self.out_dir / name
        self.provenance.begin("checkpoint")
        try:
            atomic_save(state, path)
        except OutputError as e:  # a full disk: say what is still there to resume from
            raise OutputError(f"{e}; run stopped, {self._where_last_good()}") from None
        if name == "last.pth":
            self.last_good = iteration
        self.provenance.end("checkpoint")
        self.provenance.write(iteration)
        return path

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _check_finite(self, sums: dict, it: int) -> None:
        """One host sync per log interval (not per step) to catch NaN/inf losses."""
        bad = [k for k, v in sums.items() if not math.isfinite(float(v))]
        if bad:
            raise TrainingError(f"non-finite loss ({', '.join(bad)}) before iteration {it}; run stopped, "
                                f"{self._where_last_good()}")

    def evaluate(self, iteration: int):
        started = time.perf_counter()
        dist_utils.broadcast_buffers(self.method)  # evaluate (and save) rank 0's model on every rank
        loader = build_eval_loader(self.cfg, self.eval_ds)
        result = evaluate(self.method.eval_model(), loader, device=self.device, progress=self.progress,
                          **eval_kwargs(self.cfg, self.eval_ds))
        result.meta.update({"iteration": iteration, "method": self.cfg.method.name, "config": self.cfg.name,
                            "seed": self.cfg.train.seed, "eval_root": self.cfg.eval.data.root,
                            "eval_split": self.cfg.eval.data.split})
        if self.eval_note:
            result.meta["restyled_eval_split"] = self.eval_note
        self.history.append({"iteration": iteration, "mIoU": result.miou, **result.subset_mious})
        self.logger.log_eval(iteration, result, self.method.eval_model(), loader, self.device)
        if self.provenance is not None:
            self.provenance.add("eval", time.perf_counter() - started)
            result.meta.update(self.provenance.summary())
        return result

    def _params_of(self, names) -> list:
        return [p for n in names for g in self.optimizers[n].optimizer.param_groups for p in g["params"]]

    def _backward(self, losses: dict) -> None:
        """Backward on the sum of the `loss*` entries that still hold a graph (outside autocast)."""
        parts = [v.float() for k, v in losses.items()
                 if k.startswith("loss") and torch.is_tensor(v) and v.requires_grad]
        if parts:
            with torch.autocast(self.device.type, enabled=False):
                self.scaler.scale(sum(parts)).backward()

    def _step(self, names, mid_step: bool = False) -> None:
        """Average over ranks (staged DDP; or a step inside DDP's forward, which its hooks do not
        see), unscale and clip, then step the named optimizers."""
        if not names:
            return
        unknown = [n for n in names if n not in self.optimizers]
        if unknown:
            raise TrainingError(f"{self.cfg.method.name}: no optimizer named {unknown} to step "
                                f"(have {sorted(self.optimizers)})")
        if self.manual_sync or (mid_step and self.world > 1):
            dist_utils.average_gradients([p for p in self._params_of(names) if p.requires_grad])
        if self.cfg.optim.grad_clip:
            for n in names:
                self.scaler.unscale_(self.optimizers[n].optimizer)
            torch.nn.utils.clip_grad_norm_(self._params_of(names), self.cfg.optim.grad_clip)
        for n in names:
            self.scaler.step(self.optimizers[n].optimizer)
            self._stepped.add(n)

    def _run_stage(self, losses: dict, step: tuple = ()) -> dict:
        """A step's `StepContext.end_stage`: backward now (staged, or when an optimizer must step before
        the next stage), then step the named optimizers and clear their gradients."""
        if not (self.staged or step):
            return losses
        self._backward(losses)
        self._step(list(step), mid_step=True)
        for n in step:
            self.optimizers[n].optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() if k.startswith("loss") and torch.is_tensor(v) else v for k, v in losses.items()}

    def step(self, batch: dict, it: int, want_debug: bool = False) -> tuple[dict, torch.Tensor]:
        """One training iteration on a device batch: schedules, forward + losses with a backward
        per stage (see `StepContext.end_stage`), every optimizer not stepped yet, the method's
        `after_step`. Returns the method's outputs and the summed loss (detached). `want_debug`:
        the method keeps the step's images in `self.debug_tensors` (empty on other steps)."""
        module = self.ddp if self.ddp is not None else self.method
        self._stepped = set()
        for o in self.optimizers.values():
            o.set_iteration(it)
            o.optimizer.zero_grad(set_to_none=True)
        if self.manual_sync:
            dist_utils.broadcast_buffers(self.method)  # as DDP does before each forward
        with self._autocast():
            ctx = StepContext(self._run_stage, want_debug=want_debug)
            out = module(batch, it, ctx)
        self.debug_tensors = ctx.debug
        total = sum(v.detach().float() for k, v in out.items() if k.startswith("loss"))
        self._backward(out)
        self._step([n for n in self.optimizers if n not in self._stepped])
        self.scaler.update()
        self.method.after_step(it)
        return out, total

    def train(self):
        tc = self.cfg.train
        self.logger.start(self.start_iter, tc.iters, self.progress)
        sums: dict[str, torch.Tensor] = {}
        n_acc = 0
        t0 = time.time()
        result = None
        self.method.train()
        threads = ThreadPolicy(tc.threads)
        threads.start()
        if self.provenance is not None:
            self.provenance.write(self.start_iter)
        try:
            for it in range(self.start_iter, tc.iters):
                step_started = time.perf_counter()
                batch = {k: move_to(next(s), self.device, tc.channels_last) for k, s in self.streams.items()}
                debug_step = bool(tc.debug_every) and self.is_main and (it + 1) % tc.debug_every == 0
                out, total = self.step(batch, it, want_debug=debug_step)
                if debug_step:
                    self.logger.log_debug(it + 1, self.debug_tensors)
                    self.debug_tensors = {}

                # accumulate on the device: no host sync per step
                out = {**out, "loss": total}
                for k, v in out.items():
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v.clone()
                n_acc += 1
                done = it + 1
                self.logger.step()
                threads.step()
                if self.provenance is not None:
                    self.provenance.add("train", time.perf_counter() - step_started)
                if done % tc.log_every == 0 or done == tc.iters or done % tc.ckpt_every == 0:
                    self._check_finite(sums, done)
                    means = {k: float(v) / n_acc for k, v in sums.items()}
                    lrs = {f"lr_{k}": o.optimizer.param_groups[0]["lr"] for k, o in self.optimizers.items()}
                    self.logger.log_train(done, {**means, **lrs}, (time.time() - t0) / n_acc)
                    sums, n_acc, t0 = {}, 0, time.time()
                if (tc.eval_every and done % tc.eval_every == 0 and done != tc.iters
                        and self.method.trains_segmenter):
                    self.evaluate(done)
                    self.method.train()
                if done % tc.ckpt_every == 0 or done == tc.iters:
                    self.save(done)
            if self.method.trains_segmenter:
                result = self.evaluate(tc.iters)
            if self.is_main:
                self.save(tc.iters, "final.pth")
                if result is not None:
                    result.save(self.out_dir, "results")
                self.method.on_train_end(self.out_dir)
                write_text_atomic(self.out_dir / "history.json", json.dumps(self.history, indent=1))
                self.provenance.write(tc.iters, finished=True)
        except KeyboardInterrupt:
            self.logger.close()
            where = (f"{self.out_dir / 'last.pth'} (iteration {self.last_good})" if self.last_good
                     else "none written yet")
            raise TrainingError(f"interrupted; last checkpoint: {where}; continue with --resume") from None
        finally:
            threads.stop()
            self.logger.close()
            for s in self.streams.values():
                s.close()
            self.release()
        return result


def train_from_config(cfg: Config, resume: Optional[str] = None, progress: bool = True, overwrite: bool = False,
                      config_file: Optional[dict] = None, command: Optional[list[str]] = None):
    """Train `cfg` into cfg.out_dir; a folder that holds a run needs `resume` (continue it) or
    `overwrite` (replace it). `config_file`: what the checkpoints record of the config file
    (`run_folder.config_file_record`). `command`: the command line provenance.json records
    (default: this process's)."""
    trainer = Trainer(cfg, resume=resume, progress=progress, overwrite=overwrite, config_file=config_file,
                      command=command)
    if trainer.is_main:
        try:
            write_text_atomic(trainer.out_dir / "config.yaml", dump_config(cfg))
            trainer.logger.log_config(cfg.to_dict())
        except BaseException:
            trainer.release()
            raise
    return trainer.train()

