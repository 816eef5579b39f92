"""How hard does each loss pull? Gradient norm of every named loss of a method, per parameter group.

    python benchmarks/loss_gradients.py -c synthetic/cfcontra --checkpoint runs/synthetic_cfcontra/seed0/last.pth

Restores the run's checkpoint (weights, memory banks, teachers) into the config's method, draws
`--batches` training batches and, for each `loss*` entry of the method's output, takes the
gradient of that entry alone (its configured weight included) with respect to:
  backbone    the segmenter's feature extractor
  classifier  the segmenter's head (ASPP classifiers)
  method      the method's own trainable modules (projection heads, style nets, ...)
Prints the mean L2 norm over the batches. A loss whose backbone gradient is orders of magnitude
below the segmentation loss's cannot move the features in a run of this length: a diagnostic
for an ablation that shows no effect, before anyone tunes a weight.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segadapt.config import load_config  # noqa: E402
from segadapt.engine import trainer as trainer_mod  # noqa: E402
from segadapt.errors import SegadaptError  # noqa: E402


def parameter_groups(method) -> dict[str, list[torch.nn.Parameter]]:
    groups = method.model.param_groups()
    seg_ids = {id(p) for p in method.model.parameters()}
    own = [p for p in method.parameters() if p.requires_grad and id(p) not in seg_ids]
    return {"backbone": groups["backbone"], "classifier": groups["head"], "method": own}


def loss_gradient_norms(method, batch: dict, it: int) -> dict[str, dict[str, float]]:
    """{loss name: {group: gradient L2 norm, 'value': loss}} for one batch."""
    groups = parameter_groups(method)
    flat = [p for ps in groups.values() for p in ps]
    out = method(batch, it)  # without the trainer's step context every loss keeps its graph
    losses = {k: v for k, v in out.items() if k.startswith("loss") and v.requires_grad}
    result = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
        row, i = {"value": float(loss.detach())}, 0
        for g_name, ps in groups.items():
            gs = [g for g in grads[i:i + len(ps)] if g is not None]
            row[g_name] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gs]))) if gs else 0.0
            i += len(ps)
        result[name] = row
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--checkpoint", required=True, help="a run's last.pth / final.pth")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--iteration", type=int, default=None,
                    help="iteration number passed to the method (default: the checkpoint's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, f"out_dir={tempfile.mkdtemp(prefix='lossgrad_')}",
                                    "train.num_workers=0", "train.tensorboard=false"])
    t = trainer_mod.Trainer(cfg, resume=args.checkpoint, progress=False)
    it = t.start_iter if args.iteration is None else args.iteration
    t.method.train()
    sums: dict[str, dict[str, float]] = {}
    for _ in range(args.batches):
        batch = {k: trainer_mod.move_to(next(s), t.device) for k, s in t.streams.items()}
        for name, row in loss_gradient_norms(t.method, batch, it).items():
            acc = sums.setdefault(name, dict.fromkeys(row, 0.0))
            for k, v in row.items():
                acc[k] += v / args.batches
    cols = ["value", "backbone", "classifier", "method"]
    print(f"{args.config} at iteration {it}, mean over {args.batches} batches (weights included)")
    print(f"{'loss':30s}" + "".join(f"{c:>12s}" for c in cols))
    for name, row in sums.items():
        print(f"{name:30s}" + "".join(f"{row[c]:12.3e}" for c in cols))


if __name__ == "__main__":
    try:
        main()
    except SegadaptError as e:  # a missing checkpoint, a config typo: one line, not a traceback
        sys.exit(f"loss_gradients: error: {e}")
