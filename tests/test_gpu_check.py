"""benchmarks/gpu_check.py: the tiny CPU path end to end, the threshold search, the skip without CUDA."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from segadapt.config import load_config
from segadapt.engine import trainer as trainer_mod

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

TINY = ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0"]


def _table_row(text: str, config: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {config} |")]
    assert len(rows) == 1, text
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_tiny_cpu_check_reports_every_config(tmp_path, monkeypatch, capsys):
    # the check swaps the trainer's dataset builder for random tensors; pytest restores it regardless
    monkeypatch.setattr(trainer_mod, "build_dataset", trainer_mod.build_dataset)
    original = trainer_mod.build_dataset
    out = tmp_path / "check.md"
    assert gpu_check.main([*TINY, "--configs", "minent,dacs", "--out", str(out)]) == 0
    assert trainer_mod.build_dataset is original  # the check put it back itself
    text = out.read_text()
    assert text in capsys.readouterr().out
    header = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| config |"))
              .strip("|").split("|")]
    for config in ("minent", "dacs"):
        cells = dict(zip(header, _table_row(text, config)))
        assert cells["finite"] == "yes"
        assert float(cells["fp32 ms/step"]) > 0 and float(cells["bf16+CL ms/step"]) > 0
        assert float(cells["slide eval ms"]) > 0
        assert cells["fp32 peak GiB"] == "-"  # no CUDA allocator on a CPU
        assert float(cells["bf16 vs fp32 loss rel. diff"].rstrip("%")) < 5
    assert "Full-run estimate" not in text  # neither config has a published cost


def test_zero_tolerance_fails_the_check(monkeypatch, capsys):
    monkeypatch.setattr(trainer_mod, "build_dataset", trainer_mod.build_dataset)
    # bf16 rounding always moves the loss a little: a zero tolerance must fail and say so
    assert gpu_check.main([*TINY, "--configs", "source_only", "--tolerance", "0"]) == 1
    captured = capsys.readouterr()
    assert "(over)" in _table_row(captured.out, "source_only")[5]
    assert "gpu_check: FAILED: source_only" in captured.err


def test_steps_start_past_every_switch_on_threshold():
    stage1 = load_config("gta5_cityscapes/confeti_stage1").method
    assert gpu_check.first_iteration(stage1) == 3001  # contrast_start / cross_domain_start 3000
    single = load_config("gta5_cityscapes/confeti_single").method
    assert gpu_check.first_iteration(single) == 3001  # consistency_start 1000, cam_mix_start 2000
    cfcontra = load_config("gta5_cityscapes/cfcontra", ["method.contrast.start_iter=500"]).method
    assert gpu_check.first_iteration(cfcontra) == 501  # nested: method.contrast.start_iter
    assert gpu_check.first_iteration(load_config("gta5_cityscapes/minent").method) == 1


def test_unknown_config_is_one_line(capsys):
    assert gpu_check.main([*TINY, "--configs", "minent,no_such_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: ") and "no_such_config" in err[0]


def test_without_cuda_the_script_skips_cleanly():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == gpu_check.SKIP_LINE
