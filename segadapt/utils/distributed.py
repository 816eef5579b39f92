"""torchrun / DDP helpers. Single-process runs never touch torch.distributed."""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> torch.device:
    """Initialise the process group when launched by torchrun; return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return resolve_device(device)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks this rank's GPU when present; asking for CUDA without it is a user error."""
    from ..errors import ConfigError

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device}: CUDA is not available on this machine (use cpu)")
    if device == "cuda" and is_dist():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def barrier() -> None:
    if is_dist():
        dist.barrier()


def share_error(error: Optional[BaseException], src: int = 0) -> None:
    """Every rank stops when rank `src` met `error` (say, a run folder it could not lock): `src`
    raises it, the others raise PeerError with its message instead of waiting in a collective
    for a peer that has left (a traceback wall from each rank). Call on every rank."""
    from ..errors import PeerError

    if not is_dist():
        if error is not None:
            raise error
        return
    message = [None if error is None else (str(error) or type(error).__name__)]
    dist.broadcast_object_list(message, src=src)
    if rank() == src and error is not None:
        raise error
    if message[0] is not None:
        raise PeerError(message[0])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup(wait_for_peers: bool = True) -> bool:
    """Tear the group down only once every rank got here: a rank that exits while rank 0 still
    writes results can abort in gloo's teardown ("terminate called without an active exception").
    Returns whether there was a group."""
    if not is_dist():
        return False
    try:
        if wait_for_peers:
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return True


def exit_now(code: int) -> None:
    """End a torchrun rank without the interpreter's teardown: C++ threads of the communication
    backend still alive then can abort the process (exit -6) after a run that succeeded. Every
    file is already closed and synced; only stdio needs flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Start every rank from rank `src`'s parameters and buffers (what DDP's constructor does)."""
    if is_dist():
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank hold rank `src`'s buffers (BN statistics drift apart under DDP)."""
    if is_dist():
        for b in module.buffers():
            dist.broadcast(b, src)


def average_gradients(params) -> None:
    """Average .grad over ranks in one flat all-reduce per dtype (what DDP's hooks do, for steps
    that run several backward passes). A missing gradient counts as zeros on that rank."""
    if not is_dist():
        return
    world = dist.get_world_size()
    by_dtype: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
