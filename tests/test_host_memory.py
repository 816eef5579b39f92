import sys

import pytest

from segadapt.engine import host_memory


class FakeLibc:
    def __init__(self):
        self.calls = []
        outer = self

        class Mallopt:
            argtypes = restype = None

            def __call__(self, param, value):
                outer.calls.append((param, value))
                return 1

        self.mallopt = Mallopt()


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(host_memory, "_state", {"done": False, "tuned": False})
    monkeypatch.setattr(sys, "platform", "linux")
    for name in ("SEGADAPT_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    libc = FakeLibc()
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: libc)
    return libc


def test_tune_malloc_sets_both_thresholds_once(fresh):
    assert host_memory.tune_malloc() is True
    assert fresh.calls == [(-3, 64 << 20), (-1, 512 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert host_memory.tune_malloc() is True and len(fresh.calls) == 2  # once per process


@pytest.mark.parametrize("env", [("SEGADAPT_MALLOC_TUNING", "0"), ("MALLOC_MMAP_THRESHOLD_", "65536"),
                                 ("MALLOC_TRIM_THRESHOLD_", "0")])
def test_tune_malloc_leaves_malloc_alone_when_asked(fresh, monkeypatch, env):
    monkeypatch.setenv(*env)
    assert host_memory.tune_malloc() is False and fresh.calls == []


def test_tune_malloc_without_glibc(fresh, monkeypatch):
    def no_libc(name):
        raise OSError("no such library")

    monkeypatch.setattr(host_memory.ctypes, "CDLL", no_libc)
    assert host_memory.tune_malloc() is False
    monkeypatch.setattr(host_memory, "_state", {"done": False, "tuned": False})
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory.tune_malloc() is False
