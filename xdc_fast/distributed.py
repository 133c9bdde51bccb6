"""torch.distributed helpers: every function is a no-op (or the trivial answer) without a process group.

A rank that stalls (a stuck filesystem, a stopped process) would leave the others waiting for the
backend's default timeout with no word of why; the process group is made with the command's
``dist_timeout_s`` instead, and every collective here names the phase it belongs to when it fails.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

from .errors import StalledError, XdcError

_phase = "starting"


@contextlib.contextmanager
def phase(name: str):
    """Name what the ranks are doing, for the message when one of them stops answering."""
    global _phase
    previous, _phase = _phase, name
    try:
        yield
    finally:
        _phase = previous


def abandon(code: int) -> None:
    """Exit at once with ``code``, after a ``StalledError`` has been reported. A process group whose peer
    stalled cannot be torn down: the normal interpreter exit would wait on it or, when gloo's threads
    are destroyed mid-operation, abort with "terminate called" (a core dump instead of the exit code)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stalled(error: BaseException) -> StalledError:
    return StalledError(f"rank {rank()}: the other ranks did not answer within the distributed timeout while "
                        f"{_phase} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); a rank stalled "
                        "(a stuck filesystem, a stopped process) or died, see its log; continue with --resume")


def _is_stall(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(
        sign in text for sign in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe"))


@contextlib.contextmanager
def collective():
    """Turn a collective that another rank left unanswered into one clear StalledError."""
    try:
        yield
    except RuntimeError as error:
        if is_distributed() and _is_stall(error):
            raise stalled(error) from None
        raise


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
    # gloo reduces CPU tensors only; under "cpu:gloo,cuda:nccl" each tensor finds its own backend.
    if dist.get_backend() == "gloo" and t.device.type != "cpu":
        return t.cpu()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    buf = _communicable(t).clone()
    with collective():
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` as held by rank ``src``, on every rank."""
    if not is_distributed():
        return t
    buf = _communicable(t).contiguous().clone()
    with collective():
        dist.broadcast(buf, src=src)
    return buf.to(t.device)


def init_from_torchrun(use_cuda: bool, timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes (NCCL for CUDA tensors and gloo for CPU ones on GPUs, gloo
    on CPUs), with collectives that give
    up after ``timeout_s``; False when not under torchrun."""
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # Without it NCCL reports a timeout only through its watchdog, after the process is gone.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    # On GPUs, CUDA tensors go over NCCL and the small CPU ones (counts, checks, objects) over gloo: NCCL
    # alone refuses a CPU tensor.
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, store=_store_of_this_attempt(timeout), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), **({"timeout": timeout} if timeout else {}))
    atexit.register(_leave_group)
    return True


def _leave_group() -> None:
    """Tear the group down before the interpreter does: left to the interpreter's exit, gloo's threads may be
    destroyed while still joinable and the rank aborts ("terminate called without an active exception")
    after its work is done. A stalled group never gets here: ``abandon`` leaves by ``os._exit``."""
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_together() -> None:
    """After a command succeeded on every rank: wait for the others, then tear the group down. A rank whose
    work ended first (one that only sent its share to rank 0) would otherwise tear down its side of the
    connections while rank 0 still reads from them, and a rank can then abort at exit ("terminate called
    without an active exception") though the command succeeded. Not on failure: the others may be waiting
    in a collective this rank will never join, so a failing rank leaves at once (``_leave_group``)."""
    if not is_distributed():
        return
    with phase("leaving: every rank done"):
        barrier()
    dist.destroy_process_group()


def _store_of_this_attempt(timeout: datetime.timedelta | None):
    """torchrun's store, under a prefix of its own for each restart of the workers. torchrun's elastic
    agent keeps one store across restarts, so without it a restarted rank may read the address a dead
    rank of the previous attempt published, before its successor replaces it, and fail to connect
    ("Gloo connectFullMesh failed ... Connection refused")."""
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", **({"timeout": timeout} if timeout else {})))
    return dist.PrefixStore(f"xdc-fast/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    with collective():
        dist.all_gather_object(gathered, obj)
    return gathered


def _padded(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``t`` (CPU) padded along dim 0 to the longest rank's length, and every rank's length."""
    length = torch.tensor([t.shape[0]], dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(world_size())]
    with collective():
        dist.all_gather(lengths, length)
    sizes = [int(n) for n in lengths]
    buf = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype)
    buf[: t.shape[0]] = t.cpu()
    return buf, sizes


def all_gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same dtype and trailing shape, any length along dim 0), in rank order, on every
    rank: sent as tensors, not pickles, so a rank receives what the others hold and no more (a pickled
    all-gather of full-length arrays receives N from each of W ranks)."""
    if not is_distributed():
        return [t]
    buf, sizes = _padded(t)
    out = [torch.empty_like(buf) for _ in sizes]
    with collective():
        dist.all_gather(out, buf)
    return [o[:n] for o, n in zip(out, sizes)]


def gather_tensors(t: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
    """:func:`all_gather_tensors` received by rank ``dst`` only (None on the others)."""
    if not is_distributed():
        return [t]
    buf, sizes = _padded(t)
    out = [torch.empty_like(buf) for _ in sizes] if rank() == dst else None
    with collective():
        dist.gather(buf, out, dst=dst)
    return None if out is None else [o[:n] for o, n in zip(out, sizes)]


def barrier() -> None:
    if is_distributed():
        with collective():
            dist.barrier()


def setup_device(name: str, timeout_s: float | None = None) -> torch.device:
    """The device a command asked for ("auto": CUDA when there is one), after joining torchrun's process
    group when torchrun launched this process (each rank then works on its own GPU)."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          ("cpu" if name == "auto" else name))
    if name == "cuda" and not torch.cuda.is_available():
        raise XdcError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu or auto")
    if init_from_torchrun(device.type == "cuda", timeout_s) and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device
