"""Every packaged config (and a few variants) gives the recorded losses, logged values and
weight/optimizer checksums over four training steps (see `tests/golden_steps.py`).

Bit-identical on the machine type that recorded them (same CPU features and torch); elsewhere
float sums may be ordered differently, so there the values must agree to 1e-3 relative.
"""
import json
import math

import pytest

from . import golden_steps

GOLDEN = json.loads(golden_steps.GOLDEN_FILE.read_text())
SAME_MACHINE = GOLDEN["machine"] == golden_steps.machine_fingerprint()


@pytest.fixture(scope="module")
def golden_work(tmp_path_factory):
    from segadapt.data.synthetic import SynthParams, generate

    from .conftest import TINY_SYNTH

    work = tmp_path_factory.mktemp("golden")
    generate(work / "bench", SynthParams(**{**TINY_SYNTH, "size": (128, 64)}, workers=1))
    return work


def test_every_packaged_config_has_a_golden_record():
    assert sorted(GOLDEN["configs"]) == sorted(golden_steps.golden_config_names())


def _close(a, b) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)


@pytest.mark.parametrize("name", golden_steps.golden_config_names())
def test_golden_steps(name, golden_work):
    ref = GOLDEN["configs"][name]
    got = golden_steps.run_config(name, golden_work / "bench", golden_work)
    if SAME_MACHINE:
        assert got == ref
        return
    assert [sorted(s) for s in got["steps"]] == [sorted(s) for s in ref["steps"]]
    for i, (s_got, s_ref) in enumerate(zip(got["steps"], ref["steps"])):
        bad = {k: (s_got[k], v) for k, v in s_ref.items() if not _close(s_got[k], v)}
        assert not bad, f"step {golden_steps.ITERATIONS[i]}: {bad}"
    assert _close(got["weights"], ref["weights"]) and _close(got["optimizer_state"], ref["optimizer_state"])
