"""torch.distributed helpers: every function is a no-op (or the trivial answer) without a process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def _communicable(t: torch.Tensor) -> torch.Tensor:
    # gloo reduces CPU tensors only; NCCL wants them on the GPU.
    if dist.get_backend() == "gloo" and t.device.type != "cpu":
        return t.cpu()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    buf = _communicable(t).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` as held by rank ``src``, on every rank."""
    if not is_distributed():
        return t
    buf = _communicable(t).contiguous().clone()
    dist.broadcast(buf, src=src)
    return buf.to(t.device)


def init_from_torchrun(use_cuda: bool) -> bool:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); False when not under torchrun."""
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def setup_device(name: str) -> torch.device:
    """The device a command asked for ("auto": CUDA when there is one), after joining torchrun's process
    group when torchrun launched this process (each rank then works on its own GPU)."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          ("cpu" if name == "auto" else name))
    if init_from_torchrun(device.type == "cuda") and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device
