"""The training checkpoint format (what `--resume` reads); the file helpers are in
`segadapt.utils.checkpoint`."""
from __future__ import annotations

from pathlib import Path

from ..config import CONFIG_FORMAT
from ..errors import CheckpointError

FORMAT = "segadapt"
# 2: method sections typed, components under their own keys (fd.imagenet.*, CONFETI stage 2's cut.G.*);
# 3: reference defaults for ClassMix, colour jitter, ignored rows, CONFETI's CAM bias, mmcv resizing
VERSION = CONFIG_FORMAT


def rename_state_keys(state: dict, renamed: dict) -> dict:
    """Method state of an older checkpoint with its renamed key prefixes (old -> new) replaced."""
    out = {}
    for k, v in state.items():
        old = next((o for o in renamed if k.startswith(o)), None)
        out[renamed[old] + k[len(old):] if old else k] = v
    return out


# what a resume reads besides the iteration (each a dict); `method_extra`, `history` and
# `eval_model` are optional
RESUME_KEYS = ("config", "model", "method", "optimizers", "scaler", "rng", "streams")


def load_checkpoint(path) -> dict:
    """Load a segadapt training checkpoint (full state)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    from ..models.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path)  # one line for an empty, truncated or foreign file
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "iteration" not in ckpt:
        raise CheckpointError(f"{path} is not a segadapt training checkpoint (cannot resume from it; "
                              "use train.init_from or model.pretrained for weights only)")
    # a hand-made or cut-down dict: say so, not KeyError deep in the resume
    missing = [repr(k) for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} of a segadapt training checkpoint (it holds "
                              f"{', '.join(map(repr, list(ckpt)[:8]))}): cannot resume from it; use "
                              "train.init_from or model.pretrained for weights only")
    wrong = [f"{k!r} is a {type(ckpt[k]).__name__}" for k in RESUME_KEYS if not isinstance(ckpt[k], dict)]
    if wrong:
        raise CheckpointError(f"{path} is a damaged segadapt training checkpoint ({', '.join(wrong)}, not a "
                              "mapping): cannot resume from it")
    return ckpt
