"""Golden training steps: every packaged config, shrunk to a tiny model on the tiny synthetic
benchmark, runs a few iterations through the real Trainer; the losses, logged values and a
checksum of all weights and optimizer state are recorded. Refactors must leave them unchanged
(`tests/test_golden_steps.py`; regenerate with `python -m tests.golden_steps --write` only when
a change of behaviour is intended and said so).

The overrides below use only keys that are stable across refactors of the method sections
(data, model, train and a few method keys that name files or the bank-initialisation length).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

GOLDEN_FILE = Path(__file__).parent / "data" / "golden_steps.json"
ITERATIONS = (0, 1, 2, 3500)  # three first steps and one after every method's switch-on iteration
TOTAL_ITERS = 4000


def machine_fingerprint() -> str:
    """Same fingerprint, same float sums: bit-identical results are expected only then."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split()
                                        if f.startswith(("avx", "fma", "amx", "sse4"))))
                break
    except OSError:
        pass
    return f"{platform.machine()} torch {torch.__version__} {flags}"


def _model_overrides(model) -> list[str]:
    o = ["model.pretrained=null"]
    if model.arch == "deeplabv2":
        return o + ["model.backbone=resnet18", "model.base_width=8"]
    if model.backbone.startswith("mit_"):
        return o + ["model.backbone=mit_b0", "model.embed_dims=[8,16,40,64]", "model.head_channels=16"]
    if model.backbone.startswith("dinov2_"):
        return o + ["model.embed_dims=[24]", "model.vit_depth=4", "model.vit_heads=2",
                    "model.out_indices=[0,1,2,3]", "model.head_channels=16"]
    return o  # mobilenetv2: the published widths only


CUT_KEYS = ("ngf", "n_blocks", "ndf", "n_layers_d", "nce_layers", "num_patches", "nce_dim")


def cut_folder(work: Path, cut: dict) -> Path:
    """A CUT folder (G, D, F, seeded) for CONFETI stage 1 (and its G for stage 2)."""
    from segadapt.models.cut import CUTModel

    kw = {k: cut[k] for k in CUT_KEYS}
    folder = work / ("cut_" + "_".join(str(v) for v in kw.values()).replace(" ", ""))
    if not folder.is_dir():
        torch.manual_seed(123)
        CUTModel(**kw).save_weights(folder)
    return folder


def adain_decoder(work: Path) -> Path:
    """An AdaIN decoder file for the seeded random encoder (online restyling variants)."""
    from segadapt.models.adain import AdaINStylizer, save_decoder

    path = work / "adain_decoder.pth"
    if not path.is_file():
        torch.manual_seed(7)
        save_decoder(AdaINStylizer(), path)
    return path


# (packaged config, extra overrides): behaviour no packaged config switches on
VARIANTS = {
    "variant/minent_online_style": ("synthetic/minent", ["method.style.mode=online", "method.style.prob=0.5",
                                                         "method.style.num_styles=2", "method.style.size=[64,32]"]),
    "variant/advent_online_style": ("synthetic/advent", ["method.style.mode=online", "method.style.num_styles=2",
                                                         "method.style.size=[64,32]"]),
    "variant/dacs_confident": ("synthetic/dacs", ["method.teacher.pseudo_threshold=0.1"]),
    "variant/mic_daformer_confident": ("synthetic/mic_daformer", ["method.teacher.pseudo_threshold=0.1"]),
    "variant/confeti_single_confident": ("gta5_cityscapes/confeti_single", ["method.teacher.pseudo_threshold=0.1"]),
}


def config_overrides(name: str, synth: Path, work: Path) -> list[str]:
    from segadapt.config import load_config

    name, extra = VARIANTS.get(name, (name, []))
    if any(e.startswith("method.style.") for e in extra):
        extra = extra + [f"method.style.decoder={adain_decoder(work)}"]
    cfg = load_config(name)
    o = [f"out_dir={work / 'runs' / name.replace('/', '_')}_{len(extra)}", "synthetic.auto=false",
         f"train.iters={TOTAL_ITERS}", "train.batch_source=2", "train.batch_target=2", "train.num_workers=0",
         "train.seed=3", "train.init_from=null", "train.amp=none", "train.channels_last=false",
         "train.compile=false", "optim.warmup_iters=0" if cfg.optim.warmup_iters == 0 else "optim.warmup_iters=2"]
    for key in ("source", "target"):
        split = "source" if key == "source" else "target"
        kind = "gta5" if key == "source" else "cityscapes"
        listing = "list_file=train.txt" if key == "source" else "split=train"
        o += [f"{key}.kind={kind}", f"{key}.root={synth / split}", f"{key}.{listing}", f"{key}.resize=[128,64]",
              f"{key}.resize_keep_ratio=false", f"{key}.crop=[64,64]", f"{key}.cache=false"]
    o += [f"eval.data.root={synth / 'target'}", "eval.data.kind=cityscapes", "eval.data.split=val"]
    o += _model_overrides(cfg.model)
    if cfg.model.hrda.enabled:
        o += ["model.hrda.detail_crop=[32,32]"]
    m = cfg.method
    if m.name == "cfcontra":
        o += ["method.contrast.init_source_batches=2", "method.contrast.init_target_batches=2"]
    if m.name == "confeti":
        folder = cut_folder(work, vars(m.cut))
        o += [f"method.cut.init={folder if m.stage == 1 else folder / 'latest_net_G.pth'}"]
    return o + extra


def run_config(name: str, synth: Path, work: Path, debug: bool = False) -> dict:
    """Steps at ITERATIONS of `name` (a fresh Trainer, seeded): per step every output as float,
    then sums of all weights, buffers and optimizer state. `debug`: every step a debug step
    (`train.debug_every`), what it kept under "debug" (one dict per step)."""
    from segadapt.config import load_config
    from segadapt.engine.trainer import Trainer, move_to

    torch.manual_seed(0)
    cfg = load_config(VARIANTS.get(name, (name,))[0], config_overrides(name, synth, work))
    trainer = Trainer(cfg, progress=False, overwrite=True)
    steps, kept = [], []
    try:
        trainer.method.train()
        for it in ITERATIONS:
            batch = {k: move_to(next(s), trainer.device) for k, s in trainer.streams.items()}
            out, total = trainer.step(batch, it, want_debug=debug)
            kept.append(trainer.debug_tensors)
            steps.append({k: float(v.detach()) for k, v in sorted(out.items())} | {"total": float(total)})
        weights = sum(float(v.double().sum()) for v in trainer.method.state_dict().values()
                      if torch.is_tensor(v) and v.is_floating_point())
        opt = 0.0
        for o in trainer.optimizers.values():
            for slots in o.optimizer.state_dict()["state"].values():
                opt += sum(float(v.double().sum()) for v in slots.values() if torch.is_tensor(v))
    finally:
        for s in trainer.streams.values():
            s.close()
        trainer.release()
    record = {"steps": steps, "weights": weights, "optimizer_state": opt}
    return {**record, "debug": kept} if debug else record


def describe_difference(ref: dict, got: dict) -> list[str]:
    """What differs between two records: per step the keys with both values, then the checksums."""
    if ref is None:
        return ["no golden record"]
    out = []
    for it, a, b in zip(ITERATIONS, ref["steps"], got["steps"]):
        out += [f"step {it} {k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    out += [f"{k}: {ref[k]} -> {got[k]}" for k in ("weights", "optimizer_state") if ref[k] != got[k]]
    return out


def golden_config_names() -> list[str]:
    from segadapt.config import packaged_config_names

    return packaged_config_names() + sorted(VARIANTS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--write", action="store_true", help="record the current behaviour as golden")
    p.add_argument("--work", default="/tmp/segadapt_golden")
    p.add_argument("names", nargs="*")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from segadapt.data.synthetic import SynthParams, generate

    from .conftest import TINY_SYNTH

    work = Path(args.work)
    synth = work / "bench"
    if not synth.is_dir():
        generate(synth, SynthParams(**{**TINY_SYNTH, "size": (128, 64)}, workers=1))
    names = args.names or golden_config_names()
    golden = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.is_file() else {"configs": {}}
    same_machine = golden.get("machine") == machine_fingerprint()
    failures = 0
    for name in names:
        got = run_config(name, synth, work)
        if args.write:
            golden["configs"][name] = got
            print(f"{name}: recorded", flush=True)
            continue
        ref = golden["configs"].get(name)
        ok = ref == got
        failures += not ok
        print(f"{name}: {'identical' if ok else 'DIFFERENT'}{'' if same_machine else ' (other machine)'}",
              flush=True)
        if not ok:
            print("  " + "; ".join(describe_difference(ref, got))[:2000])
    if args.write:
        golden["machine"] = machine_fingerprint()
        GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
