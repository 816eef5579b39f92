"""Staged backward: a backward per stage of a method's step gives the gradients of one
backward on the sum of all losses, and frees each stage's graph before the next forward."""
import pytest
import torch

from segadapt.config import load_config
from segadapt.engine.trainer import Trainer, move_to
from segadapt.methods import StepContext

from .conftest import tiny_overrides

CONFETI = {"method.cut.init": "null", "method.cut.ngf": 4, "method.cut.ndf": 4, "method.cut.n_blocks": 2,
           "method.cut.nce_layers": "[0, 4]", "method.cut.num_patches": 16, "method.cut.nce_dim": 8,
           "method.cam_mix_start": 1, "method.contrast_start": 1, "method.cross_domain_start": 2,
           "method.rcs.min_pixels": 8}
CASES = {
    "minent": ("synthetic/minent", {}),
    "advent": ("synthetic/advent", {}),
    "cfcontra": ("synthetic/cfcontra", {"method.contrast.start_iter": 0, "method.contrast.init_source_batches": 2,
                                        "method.contrast.init_target_batches": 2}),
    "dacs": ("synthetic/dacs", {}),
    "daformer": ("synthetic/daformer", {"method.rcs.min_pixels": 8}),
    "confeti_joint_d": ("synthetic/confeti_stage1", {**CONFETI, "method.cut.d_step": "joint"}),
    "confeti_d_first": ("synthetic/confeti_stage1", CONFETI),
}


def _grads_after_forward(tiny_synth, out, name, extra, staged: bool, it: int = 3):
    cfg = load_config(name, tiny_overrides(tiny_synth, out, **{**extra, "train.staged_backward": str(staged).lower()}))
    trainer = Trainer(cfg, progress=False)
    try:
        batch = {k: move_to(next(s), trainer.device) for k, s in trainer.streams.items()}
        trainer.method.train()
        for o in trainer.optimizers.values():
            o.set_iteration(it)
            o.optimizer.zero_grad(set_to_none=True)
        out_losses = trainer.method(batch, it, StepContext(trainer._run_stage))
        pending = {k for k, v in out_losses.items() if k.startswith("loss") and v.requires_grad}
        trainer._backward(out_losses)
        grads = {n: p.grad.clone() for n, p in trainer.method.named_parameters() if p.grad is not None}
        losses = {k: float(v.detach()) for k, v in out_losses.items() if k.startswith("loss")}
        return grads, losses, pending, set(out_losses)
    finally:
        for s in trainer.streams.values():
            s.close()
        trainer.release()


@pytest.mark.parametrize("case", list(CASES))
def test_staged_gradients_equal_one_backward(tiny_synth, tmp_path, case):
    name, extra = CASES[case]
    staged, loss_s, pending_s, keys_s = _grads_after_forward(tiny_synth, tmp_path / "s", name, extra, True)
    single, loss_1, pending_1, keys_1 = _grads_after_forward(tiny_synth, tmp_path / "1", name, extra, False)
    assert keys_s == keys_1 and loss_s == pytest.approx(loss_1, rel=1e-6, abs=1e-7)
    assert staged.keys() == single.keys() and len(staged) > 10
    for n in staged:
        assert torch.allclose(staged[n], single[n], rtol=1e-5, atol=1e-8), n
    # staging happened: the source losses were back-propagated inside the step, not at its end
    assert any(k.startswith(("loss_seg", "loss_src")) for k in pending_1)
    assert not any(k.startswith(("loss_seg", "loss_src")) for k in pending_s)
    assert pending_s < pending_1


def test_staged_run_equals_single_backward_run_for_dacs(tiny_synth, tmp_path):
    """Two graphs (source, mix) meeting only at the parameters: staging adds each parameter's two
    gradient parts in the other order, and float addition of two numbers commutes."""
    finals = []
    for staged in (True, False):
        cfg = load_config("synthetic/dacs", tiny_overrides(tiny_synth, tmp_path / str(staged), **{
            "train.iters": 3, "train.ckpt_every": 3, "train.staged_backward": str(staged).lower()}))
        trainer = Trainer(cfg, progress=False)
        trainer.train()
        finals.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
