"""What every benchmark shares: the interleaved timer, the machine's description, the checks made
before a run and the JSON writer."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import XdcError


def synchronize(device: torch.device) -> None:
    # CUDA kernels return before they finish; without this the timer would measure the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_best_times(jobs: dict[str, Callable[[], object]], repeats: int,
                           device: torch.device) -> dict[str, float]:
    """Best time of each job over ``repeats`` rounds, the jobs taking turns within every round, so a
    slow spell of a shared machine hits every contender alike instead of one of them."""
    for fn in jobs.values():  # warm-up: first-touch allocations, lazy initialisation, kernel caches
        fn()
    synchronize(device)
    best = {name: float("inf") for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def machine(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's and the thread count torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def check_device(device: str) -> None:
    """Refuse ``cuda`` up front where there is none, rather than fail deep inside a benchmark."""
    if device == "cuda" and not torch.cuda.is_available():
        raise XdcError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")


def memory_budget(device: str) -> int:
    """Bytes one copy of the benchmark's data may take: a quarter of RAM, or of the GPU's memory
    (contenders make copies of their own)."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return 1 << 34


def write_json(obj: dict | list, path: str | Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def gemm_rate(device: torch.device | str, dtype: torch.dtype | None = None, size: int | None = None,
              repeats: int = 5) -> dict:
    """The FLOP/s of one square ``torch.mm`` (2·n³ FLOPs) timed with ``interleaved_best_times``: the
    ceiling a model's FLOP/s is held against. Default: bf16 at n=8192 on CUDA (tensor cores), fp32 at
    n=1024 on the CPU (small enough for a quick run). Returns ``{"dtype", "size", "flops_per_s"}``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    size = size or (8192 if cuda else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = interleaved_best_times({"mm": lambda: torch.mm(a, b)}, repeats, device)["mm"]
    return {"dtype": str(dtype).removeprefix("torch."), "size": size, "flops_per_s": 2 * size ** 3 / seconds}
