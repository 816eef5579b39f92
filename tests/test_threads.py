"""train.threads and the busy-CPU policy (segadapt/utils/threads.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segadapt.cli import main
from segadapt.utils import threads as threads_mod
from segadapt.utils.threads import ThreadPolicy, prefer_passive_waiting, runnable_others, threads_for

from .conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def test_the_rule_leaves_busy_cores_to_their_tasks_until_none_is_free():
    assert [threads_for(2, b) for b in (0, 1, 2, 3)] == [2, 1, 2, 2]
    assert [threads_for(8, b) for b in (0, 3, 7, 8, 20)] == [8, 5, 1, 8, 8]


def test_runnable_others_reads_the_kernel_count(tmp_path):
    f = tmp_path / "loadavg"
    f.write_text("0.61 0.63 0.44 3/92 4417\n")
    assert runnable_others(str(f)) == 2  # less the reading thread
    f.write_text("garbage\n")
    assert runnable_others(str(f)) is None
    assert runnable_others(str(tmp_path / "absent")) is None


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def own_threads(monkeypatch):
    """A machine of 2 cores all ours, passive waiting, no OMP_NUM_THREADS; torch's count restored."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(threads_mod.os, "cpu_count", lambda: 2)
    yield
    torch.set_num_threads(before)


def test_auto_adapts_to_other_work_and_gives_the_count_back(own_threads):
    before = torch.get_num_threads()
    others = [1]
    clock = FakeClock()
    policy = ThreadPolicy("auto", cores=2, sample=lambda: others[0], clock=clock, recheck=5.0)
    assert policy.start() == 1 and policy.adaptive and torch.get_num_threads() == 1  # one busy neighbour
    others[0] = 0  # it ended

    def steps_for(seconds):  # one iteration a second
        for _ in range(seconds):
            clock.t += 1.0
            policy.step()

    steps_for(6)  # one decision (at 5 s): not yet
    assert policy.threads == 1
    steps_for(5)  # the second in a row (at 10 s): both cores again
    assert policy.threads == 2 and torch.get_num_threads() == 2
    others[0] = 3  # no core free: keep both (the larger fair share)
    steps_for(20)
    assert policy.threads == 2
    others[0] = 1  # a passing spike is not followed: one decision, then back
    steps_for(5)
    others[0] = 0
    steps_for(10)
    assert policy.threads == 2
    policy.stop()
    assert torch.get_num_threads() == before


def test_an_explicit_choice_wins(own_threads, monkeypatch):
    policy = ThreadPolicy(3, cores=2, sample=lambda: 1)
    assert policy.start() == 3 and not policy.adaptive and torch.get_num_threads() == 3
    policy.stop()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the environment (the test suite, torchrun) chose
    policy = ThreadPolicy("auto", cores=2, sample=lambda: 0)
    assert policy.start() == 1 and not policy.adaptive
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # spinning threads would count as other work
    policy = ThreadPolicy("auto", cores=2, sample=lambda: 1)
    assert policy.start() == 2 and not policy.adaptive
    policy.stop()


def test_usable_cores_follow_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(threads_mod.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(threads_mod, "_cgroup_cpu_quota", lambda: 2.5)
    assert threads_mod.usable_cores() == 3
    monkeypatch.setattr(threads_mod, "_cgroup_cpu_quota", lambda: None)
    assert threads_mod.usable_cores() == 16


def test_passive_waiting_is_set_before_torch_loads_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k not in threads_mod.WAIT_POLICY_VARIABLES}
    env["PYTHONPATH"] = str(REPO)
    probe = "import os, sys, segadapt.cli; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[1] == "False"  # set (or not) before torch loads
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.split()[0] == "ACTIVE"
    assert prefer_passive_waiting() is False  # torch is loaded here: too late to matter, left alone


def test_passive_waiting_only_beside_other_work(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as in the CLI before torch loads (restored after)
    for var in threads_mod.WAIT_POLICY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert prefer_passive_waiting(sample=lambda: 0) is False and "OMP_WAIT_POLICY" not in os.environ
    looks = iter([1, 0, 1])  # one quiet look: the machine has a free moment, no neighbour
    assert prefer_passive_waiting(sample=lambda: next(looks)) is False
    assert prefer_passive_waiting(sample=lambda: 1) is True and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert prefer_passive_waiting(sample=lambda: 3) is False and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("value", ["0", "-2", "many", "true", "1.5"])
def test_bad_thread_counts_are_one_line(value, tiny_synth, tmp_path, capsys):
    code = main(["train", "--no-progress", *tiny_overrides(tiny_synth, tmp_path / "run"), f"train.threads={value}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "train.threads" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_run_with_a_fixed_thread_count_leaves_torchs_count_alone(tiny_synth, tmp_path):
    before = torch.get_num_threads()
    assert main(["train", "--no-progress", *tiny_overrides(tiny_synth, tmp_path / "run", **{
        "train.iters": 2, "train.ckpt_every": 2, "train.threads": 2})]) == 0
    assert torch.get_num_threads() == before
    # and a resumed run may change it (it does not change the trajectory)
    assert main(["train", "--no-progress", "--resume", str(tmp_path / "run"), "train.iters=3",
                 "train.threads=auto"]) == 0
