"""DDP under torchrun with 2 CPU processes on gloo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_cpu_processes(tiny_synth, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "segadapt", "train", "--no-progress",
           *tiny_overrides(tiny_synth, out, **{"train.iters": 4, "train.ckpt_every": 4, "train.device": "cpu"})]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # both streams: a rank's own message may sit in stdout, torchrun's summary fills stderr
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    # rank-0 logging only: one results table printed
    assert p.stdout.count("mIoU") >= 1 and p.stdout.count("results written") == 1
    ddp_result = json.loads((out / "results.json").read_text())
    # the all-reduced confusion matrix over both ranks' shards equals a single-process evaluation
    single = subprocess.run([sys.executable, "-m", "segadapt", "test", str(out / "final.pth"), "--no-progress",
                             "--out", str(tmp_path / "single")], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    single_result = json.loads((tmp_path / "single" / "results.json").read_text())
    assert ddp_result["confusion"] == single_result["confusion"]
    assert ddp_result["miou"] == pytest.approx(single_result["miou"], abs=1e-12)
    assert ddp_result["meta"]["num_images"] == 4


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_staged_backward_under_torchrun_equals_ddp(tiny_synth, tmp_path):
    """Staged backward averages gradients over ranks by hand: the same weights as DDP's hooks."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    finals = []
    for staged in ("true", "false"):
        out = tmp_path / staged
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "segadapt", "train", "--no-progress", "-c", "synthetic/dacs",
               *tiny_overrides(tiny_synth, out, **{"train.iters": 2, "train.ckpt_every": 2, "train.device": "cpu",
                                                   "train.staged_backward": staged})]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        finals.append(torch.load(out / "final.pth", weights_only=False)["model"])
    for k, v in finals[0].items():
        assert torch.allclose(v.float(), finals[1][k].float(), rtol=1e-4, atol=1e-6), k
