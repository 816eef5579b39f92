"""One-command GPU check of every gta5_cityscapes config, at the configs' full sizes.

    python benchmarks/gpu_check.py                       # every config on CUDA (budget: 8 min on one H200)
    python benchmarks/gpu_check.py --configs daformer,dacs --steps 10 --out gpu_check.md
    python benchmarks/gpu_check.py --device cpu --size 64 64 --tiny   # logic smoke test on a CPU

For each config: the real trainer on random input of the config's training sizes (batch sizes
of the config; the DACS family's 512x512 crops, the ADVENT family's GTA5 1280x720 and Cityscapes
1024x512 resizes), in fp32 and in bf16 autocast with channels-last. Both modes start from the same
initial state (the fp32 trainer's state dict, copied before its first step) and take their first
step on the same seeded batch at the same iteration: the relative difference of the summed loss
must stay under --tolerance. Every loss term of every step must be finite. Then a
sliding-window evaluation (bf16 + channels-last) of one 2048x1024 image. Prints ms/step (mean
of the timed steps after the warm-up) and peak memory (CUDA max allocated, reset per mode) as a
Markdown table, and the hours a full run's iterations would take at that speed next to the
published figures. Exits non-zero when a check fails; without CUDA (and no --device cpu) it
prints one line and exits 0.

Steps run at an iteration past every switch-on threshold of the method (e.g. CONFETI's contrast
at 3000), so the timed step is the expensive one. Rare class sampling is off (it only chooses
which images are drawn, and random input has no class statistics); CFContra's one-off prototype
bank pass runs over 1 + 1 batches instead of 300 + 1600; CONFETI's stylizer is a randomly
initialised CUT generator written in CUT's file layout (latest_net_G.pth) in a temp folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train_step import _patch_random_data, _sync  # noqa: E402
from segadapt.config import load_config, resolve_config_path  # noqa: E402
from segadapt.engine import trainer as trainer_mod  # noqa: E402
from segadapt.engine.inference import predict_logits  # noqa: E402

BENCHMARK = "gta5_cityscapes"
CONFIGS = ["source_only", "oracle", "minent", "advent", "cfcontra", "cut", "dacs", "daformer",
           "confeti_stage1", "confeti_stage2", "confeti_single",
           "daformer_mitb5", "mic_daformer_mitb5", "confeti_mitb5", "daformer_dinov2_vitl"]
MODES = (("fp32", ["train.amp=none", "train.channels_last=false"]),
         ("bf16+CL", ["train.amp=bf16", "train.channels_last=true"]))
SKIP_LINE = "gpu_check: no CUDA device; skipped"
# published training cost, next to the hour estimates
DAFORMER_COST = "DAFormer: 16 h and 9.7 GB for 40k iterations on one 11 GB GPU"
CONFETI_COST = "CONFETI: a DeepLabV2 run about 20 h on one A100"
PUBLISHED = {"daformer": DAFORMER_COST, "confeti_stage1": CONFETI_COST, "confeti_stage2": CONFETI_COST,
             "confeti_single": CONFETI_COST}
SLIDE_CROP, SLIDE_STRIDE = (512, 512), (341, 341)  # DAFormer's slide inference, when the config has none


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated gta5_cityscapes config names")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode after the compared first step")
    ap.add_argument("--size", type=int, nargs=2, metavar=("W", "H"),
                    help="training input size for every config (default: each config's crop or resize)")
    ap.add_argument("--eval-size", type=int, nargs=2, metavar=("W", "H"), default=[2048, 1024],
                    help="the image of the sliding-window evaluation")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true",
                    help="narrow networks (ResNet-18 of width 16, small CUT/projections): a CPU smoke test")
    ap.add_argument("--tolerance", type=float, default=0.05, help="allowed bf16 vs fp32 relative loss difference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=390.0,
                    help="seconds; configs not started by then are reported as skipped")
    ap.add_argument("--out", help="also write the Markdown report here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.tiny and args.size is None:
        args.size = [64, 64]
    if args.tiny and args.eval_size == [2048, 1024]:
        args.eval_size = [2 * args.size[0], args.size[1]]
    return args


# --------------------------------------------------------------------------- config
def _overrides(name: str, args, workdir: Path) -> tuple[list[str], list[str]]:
    """Config overrides for the check and the notes that say what they change."""
    plain = load_config(f"{BENCHMARK}/{name}")
    m = plain.method
    method = m.name
    over = [f"out_dir={workdir / 'run'}", "train.num_workers=0", "train.eval_every=0",
            f"train.device={args.device}"]
    notes = []
    if method in ("daformer", "confeti"):
        over.append("method.rcs=false")
        notes.append("RCS off")
    if method == "cfcontra":
        over += ["method.contrast.init_source_batches=1", "method.contrast.init_target_batches=1"]
        notes.append("bank init 1+1 batches")
    if method == "confeti":
        over.append(f"method.cut.init={workdir / 'stylizer'}")
        notes.append("random CUT G")
    if plain.train.amp != "none":
        notes.append(f"config's amp: {plain.train.amp}")
    if args.tiny:
        if plain.model.arch == "encoder_decoder" and plain.model.backbone.startswith("dinov2_"):
            over += ["model.embed_dims=[32]", "model.vit_depth=4", "model.vit_heads=2", "model.head_channels=16",
                     "model.pretrained=null"]
        elif plain.model.arch == "encoder_decoder":
            over += ["model.backbone=mit_b0", "model.embed_dims=[8,16,40,64]", "model.head_channels=16",
                     "model.pretrained=null"]
        else:
            over += ["model.backbone=resnet18", "model.base_width=16", "model.pretrained=null"]
        small_cut = ["ngf=8", "ndf=16", "num_patches=32", "nce_dim=32"]
        if method == "confeti":
            over += [f"method.cut.{kv}" for kv in small_cut] + ["method.proj_dim=32"]
            if m.proj_hidden:
                over.append("method.proj_hidden=32")
        elif method == "cut":
            over += [f"method.cut.{kv}" for kv in small_cut]
        elif method == "advent":
            over.append("method.disc_width=16")
    return over, notes


def _write_stylizer(cfg, folder: Path) -> None:
    """A random generator of the configured width, in CUT's file layout (G only, as published releases)."""
    from segadapt.models.cut import ResnetGenerator, save_cut_weights

    folder.mkdir(parents=True, exist_ok=True)
    save_cut_weights(folder, G=ResnetGenerator(cfg.method.cut.ngf, cfg.method.cut.n_blocks))


def build_trainer(name: str, mode_overrides: list[str], args, workdir: Path):
    over, notes = _overrides(name, args, workdir)
    cfg = load_config(f"{BENCHMARK}/{name}", [*over, *mode_overrides])
    if args.size:
        for dcfg in (cfg.source, cfg.target):
            dcfg.crop = list(args.size)
    if cfg.method.name == "confeti" and not (workdir / "stylizer").is_dir():
        torch.manual_seed(args.seed)
        _write_stylizer(cfg, workdir / "stylizer")
    shutil.rmtree(workdir / "run", ignore_errors=True)
    _patch_random_data(cfg)
    return trainer_mod.Trainer(cfg, progress=False), notes


def first_iteration(mcfg) -> int:
    """One past the largest switch-on threshold (`*_start`, `start_iter`) anywhere in the method config."""
    def starts(d):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from starts(v)
            elif (k.endswith("_start") or k == "start_iter") and isinstance(v, int) and not isinstance(v, bool):
                yield v
    return 1 + max(starts(dataclasses.asdict(mcfg)), default=0)


# --------------------------------------------------------------------------- measuring
def _losses(out: dict) -> torch.Tensor:
    return torch.stack([v.detach().float().reshape(()) for k, v in out.items() if k.startswith("loss")])


def _fresh(batch: dict) -> dict:
    """A new dict per step (a method may replace entries); the tensors are shared."""
    return {k: dict(v) for k, v in batch.items()}


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def slide_eval(t, args) -> tuple[float, object, bool]:
    """ms, peak GiB and finiteness of one sliding-window prediction (bf16 autocast, channels-last)."""
    ev, device = t.cfg.eval, t.device
    if args.tiny:
        crop = (args.size[0], args.size[1])
        stride = (max(crop[0] * 2 // 3, 1), max(crop[1] * 2 // 3, 1))
    else:
        crop = tuple(ev.crop) if ev.mode == "slide" and ev.crop else SLIDE_CROP
        stride = tuple(ev.stride) if ev.mode == "slide" and ev.stride else SLIDE_STRIDE
    w, h = args.eval_size
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(args.seed)).to(device)
    image = image.contiguous(memory_format=torch.channels_last)
    model = t.method.eval_model()
    was_training = model.training
    model.eval()
    try:
        _reset_peak(device)
        times = []
        for _ in range(2):  # the first call warms up
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                logits = predict_logits(model, image, (h, w), mode="slide", crop=crop, stride=stride,
                                        num_classes=t.cfg.model.num_classes, align_corners=ev.align_corners)
            _sync(device)
            times.append(time.perf_counter() - t0)
        finite = bool(torch.isfinite(logits).all())
    finally:
        model.train(was_training)
    return times[-1] * 1000, _peak_gib(device), finite


def check_config(name: str, args, device) -> dict:
    """Both modes of one config; a row of the report."""
    row = {"config": name, "notes": [], "finite": True, "ok": True}
    workdir = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_"))
    snapshot = cpu_batch = None
    first = {}
    try:
        for mode, mode_overrides in MODES:
            _reset_peak(device)
            t, notes = build_trainer(name, mode_overrides, args, workdir)
            try:
                if snapshot is None:
                    row["notes"] = notes
                    row["iters"] = t.cfg.train.iters
                    snapshot = {k: v.detach().to("cpu", copy=True) for k, v in t.method.state_dict().items()}
                    cpu_batch = {k: next(s) for k, s in t.streams.items()}
                else:
                    t.method.load_state_dict(snapshot)
                batch = {k: trainer_mod.move_to(v, t.device, t.cfg.train.channels_last) for k, v in cpu_batch.items()}
                start = first_iteration(t.method.mcfg)
                row["iteration"] = start
                t.method.train()
                trainer_mod.seed_everything(args.seed)
                out, total = t.step(_fresh(batch), start)
                first[mode] = {k: float(v.detach()) for k, v in out.items() if k.startswith("loss")}
                first[mode]["total"] = float(total.detach())
                step_losses = [_losses(out)]
                times = []
                for i in range(args.warmup + args.steps):
                    _sync(t.device)
                    t0 = time.perf_counter()
                    out, _ = t.step(_fresh(batch), start + 1 + i)
                    _sync(t.device)
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
                    step_losses.append(_losses(out))
                row["finite"] &= bool(torch.isfinite(torch.cat(step_losses)).all())
                row[f"{mode} ms"] = 1000 * sum(times) / len(times) if times else float("nan")
                row[f"{mode} GiB"] = _peak_gib(t.device)
                if mode == MODES[-1][0]:
                    row["slide ms"], row["slide GiB"], slide_finite = slide_eval(t, args)
                    row["finite"] &= slide_finite
            finally:
                t.release()
                t = batch = out = None  # free this mode's device memory before the next mode's peak
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        ref, low = (first[m] for m, _ in MODES)
        rel = {k: abs(low[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref}
        row["rel diff"] = rel.pop("total")
        if rel:  # for information only: a small term may differ more without mattering to training
            worst = max(rel, key=rel.get)
            row["notes"].append(f"largest term diff {worst} {_percent(rel[worst])}")
        row["ok"] = row["finite"] and row["rel diff"] <= args.tolerance
    except Exception as exc:  # one config's failure is reported, the others still run
        message = str(exc).strip().splitlines()
        row.update(ok=False, finite=None, error=f"{type(exc).__name__}: {message[0] if message else ''}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return row


# --------------------------------------------------------------------------- report
def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _percent(x: float) -> str:
    return f"{100 * x:.3g}%"


def report(rows: list[dict], args, device, elapsed: float) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({torch.get_num_threads()} threads)"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"GPU check: {where}, torch {torch.__version__}, {now}; {args.warmup} warm-up + {args.steps} timed "
             f"steps per mode after the compared first step; bf16 vs fp32 tolerance {args.tolerance:.0%} on the "
             f"summed loss of that first step; slide eval: one {args.eval_size[0]}x{args.eval_size[1]} image, "
             f"bf16 + channels-last; {elapsed:.0f} s in all.", "",
             "| config | fp32 ms/step | fp32 peak GiB | bf16+CL ms/step | bf16+CL peak GiB "
             "| bf16 vs fp32 loss rel. diff | finite | slide eval ms | slide eval peak GiB | notes |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        notes = list(r.get("notes", []))
        if "iteration" in r:
            notes.insert(0, f"steps from it {r['iteration']}")
        if "error" in r:
            notes.append(f"FAILED: {r['error']}")
        elif "skipped" in r:
            notes.append(f"skipped: {r['skipped']}")
        rel = r.get("rel diff")
        rel_cell = "-" if rel is None else _percent(rel) + ("" if rel <= args.tolerance else " (over)")
        finite = {True: "yes", False: "NO", None: "-"}[r.get("finite")]
        lines.append(f"| {r['config']} | {_fmt(r.get('fp32 ms'), '.1f')} | {_fmt(r.get('fp32 GiB'), '.2f')} "
                     f"| {_fmt(r.get('bf16+CL ms'), '.1f')} | {_fmt(r.get('bf16+CL GiB'), '.2f')} | {rel_cell} "
                     f"| {finite} | {_fmt(r.get('slide ms'), '.1f')} | {_fmt(r.get('slide GiB'), '.2f')} "
                     f"| {'; '.join(notes)} |")
    estimates = [r for r in rows if r["config"] in PUBLISHED and "bf16+CL ms" in r]
    if estimates:
        lines += ["", "Full-run estimate: the config's iterations x the measured ms/step (training steps only: "
                      "no data loading, evaluation or checkpoints).", "",
                  "| config | iterations | fp32 h | bf16+CL h | bf16+CL peak GiB | published |",
                  "|---|---:|---:|---:|---:|---|"]
        hours = {r["config"]: {m: r[f"{m} ms"] * r["iters"] / 3.6e6 for m, _ in MODES} for r in estimates}
        for r in estimates:
            h = hours[r["config"]]
            lines.append(f"| {r['config']} | {r['iters']} | {h['fp32']:.1f} | {h['bf16+CL']:.1f} "
                         f"| {_fmt(r.get('bf16+CL GiB'), '.2f')} | {PUBLISHED[r['config']]} |")
        if "confeti_stage1" in hours and "confeti_stage2" in hours:
            both = {m: hours["confeti_stage1"][m] + hours["confeti_stage2"][m] for m, _ in MODES}
            lines.append(f"| confeti_stage1 + confeti_stage2 | | {both['fp32']:.1f} | {both['bf16+CL']:.1f} | "
                         f"| {CONFETI_COST} |")
    return "\n".join(lines)


def run_check(args) -> tuple[list[dict], str, bool]:
    """Rows, the Markdown report, and whether every check passed."""
    device = torch.device(args.device)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for n in names:
        resolve_config_path(f"{BENCHMARK}/{n}")  # an unknown name fails before any work
    t0 = time.perf_counter()
    rows = []
    for n in names:
        elapsed = time.perf_counter() - t0
        if elapsed > args.time_limit:
            rows.append({"config": n, "ok": True, "finite": None, "skipped": f"time limit ({args.time_limit:.0f} s)"})
            continue
        original_build = trainer_mod.build_dataset  # _patch_random_data replaces it for the process
        try:
            rows.append(check_config(n, args, device))
        finally:
            trainer_mod.build_dataset = original_build
        r = rows[-1]
        status = "ok" if r["ok"] else f"FAILED {r.get('error', '')}".rstrip()
        print(f"[{time.perf_counter() - t0:6.0f} s] {n}: fp32 {_fmt(r.get('fp32 ms'), '.0f')} ms, "
              f"bf16+CL {_fmt(r.get('bf16+CL ms'), '.0f')} ms, {status}", flush=True)
    text = report(rows, args, device, time.perf_counter() - t0)
    return rows, text, all(r["ok"] for r in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(SKIP_LINE)
        return 0
    try:
        rows, text, ok = run_check(args)
    except Exception as exc:  # e.g. an unknown config name
        print(f"gpu_check: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not ok:
        print("gpu_check: FAILED: " + ", ".join(r["config"] for r in rows if not r["ok"]), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
