"""The certified assignment's tensor-core pass as a Triton kernel.

One program takes ``BLOCK_N`` rows of one problem, streams the centroids through in tiles of
``BLOCK_K``, scores each tile with ``tl.dot`` over ``BLOCK_D``-wide slices of D (fp32 accumulation),
``s = ||c~_k||^2 - 2 x~.c~_k``, and keeps per row only what the certification needs: the best score,
its index (lowest on ties), the second-best score and whether every score was finite. The N x K score
matrix is never stored. ``certified.certified_assign(..., top2=triton_top2)`` then certifies the rows
and re-decides the rest exactly, so the labels are exact whatever the kernel's summation order.

Inputs are rounded by ``certified.round_problem`` (round to nearest even, done once), so the kernel
multiplies exactly the values the bound describes:

- on a GPU, bf16 inputs are handed over as ``torch.bfloat16`` and tf32 inputs as float32 holding tf32
  values, with ``input_precision="tf32"`` (the hardware drops low bits that are already zero);
- under ``TRITON_INTERPRET=1`` (the development machine has no GPU) the interpreter would multiply
  bf16 bit patterns as integers and ignores ``input_precision``, so both formats go in as float32
  holding the rounded values, multiplied in float32 ("ieee"): the same products, exact in float32, and
  an accumulation order the bound covers (its unit is the hardware's, twice float32's).
"""

from __future__ import annotations

import os

import torch

from .certified import RoundedProblem

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _row_offsets(problem, stride_problem, rows, stride_row):
        """Element offsets of ``rows`` of one problem, in 64 bits: at N = 10M rows of D = 256 a row offset
        reaches 2.6e9, and a second problem starts past it, both beyond 32-bit integers."""
        return problem.to(tl.int64) * stride_problem + rows.to(tl.int64) * stride_row

    @triton.jit
    def _top2_kernel(x_ptr, c_ptr, c_sq_ptr, winner_ptr, best_ptr, second_ptr, finite_ptr,
                     n, k, d,
                     stride_xb, stride_xn, stride_cb, stride_ck, stride_sqb, stride_ob,
                     INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, K_TILES: tl.constexpr, D_TILES: tl.constexpr):
        # The loop counts are compile-time (one compilation per K and D, fixed within a fit): the
        # interpreter cannot take a runtime bound under numpy 2.5 (it converts a 1-element array).
        problem = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        second = tl.full((BLOCK_N,), float("inf"), tl.float32)
        winner = tl.zeros((BLOCK_N,), tl.int32)
        finite = tl.full((BLOCK_N,), 1, tl.int1)
        x_rows = x_ptr + _row_offsets(problem, stride_xb, rows, stride_xn)
        c_base = c_ptr + problem.to(tl.int64) * stride_cb
        for k_tile in range(0, K_TILES):
            cols = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = cols < k
            dots = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d_tile in range(0, D_TILES):
                dims = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
                dim_ok = dims < d
                x_tile = tl.load(x_rows[:, None] + dims[None, :],
                                 mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
                c_tile = tl.load(c_base + cols[None, :] * stride_ck + dims[:, None],
                                 mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
                dots = tl.dot(x_tile, c_tile, dots, input_precision=INPUT_PRECISION)
            c_sq = tl.load(c_sq_ptr + problem * stride_sqb + cols, mask=col_ok, other=0.0)
            scores = c_sq[None, :] - 2.0 * dots
            finite = finite & (tl.sum(((scores != scores) | (tl.abs(scores) == float("inf")))
                                      & col_ok[None, :], axis=1) == 0)
            scores = tl.where(col_ok[None, :], scores, float("inf"))
            tile_best = tl.min(scores, axis=1)
            # The lowest column holding the tile's minimum: the lowest index on ties.
            tile_winner = tl.min(tl.where(scores == tile_best[:, None], cols[None, :], k), axis=1)
            tile_second = tl.min(tl.where(cols[None, :] == tile_winner[:, None], float("inf"), scores), axis=1)
            # Tiles arrive in ascending column order, so an equal score keeps the earlier winner.
            takes = tile_best < best
            second = tl.where(takes, tl.minimum(best, tile_second), tl.minimum(second, tile_best))
            winner = tl.where(takes, tile_winner, winner)
            best = tl.where(takes, tile_best, best)
        out = _row_offsets(problem, stride_ob, rows, 1)
        tl.store(winner_ptr + out, winner, mask=row_ok)
        tl.store(best_ptr + out, best, mask=row_ok)
        tl.store(second_ptr + out, second, mask=row_ok)
        tl.store(finite_ptr + out, finite.to(tl.int8), mask=row_ok)


if triton is not None:

    @triton.jit
    def _row_offsets_probe(out_ptr, problem, stride_problem, first_row, stride_row, BLOCK: tl.constexpr):
        """The kernel's row offsets for rows ``first_row + [0, BLOCK)``, stored: what a test checks at
        shapes too large to allocate."""
        rows = first_row + tl.arange(0, BLOCK)
        tl.store(out_ptr + tl.arange(0, BLOCK), _row_offsets(problem, stride_problem, rows, stride_row))


def row_offsets(problem: int, stride_problem: int, first_row: int, stride_row: int, count: int = 8,
                device: str = "cpu") -> torch.Tensor:
    """``count`` row offsets as the kernel computes them (int64), for checking its addressing."""
    out = torch.empty(count, dtype=torch.int64, device=device)
    _row_offsets_probe[(1,)](out, problem, stride_problem, first_row, stride_row, BLOCK=count)
    return out


def _kernel_inputs(problem: RoundedProblem, precision: str, device: torch.device):
    """What the kernel multiplies, and how (see the module docstring)."""
    x, c = problem.x.to(device), problem.c.to(device)
    if interpreted() or device.type != "cuda":
        return x.contiguous(), c.contiguous(), "ieee"
    if precision == "bf16":
        # input_precision matters only for float32 operands; "tf32" is the default, ignored for bf16.
        return x.to(torch.bfloat16).contiguous(), c.to(torch.bfloat16).contiguous(), "tf32"
    return x.contiguous(), c.contiguous(), "tf32"


# Tiles (rows, centroids, D) and warps: small under the interpreter (numpy per tile); on Hopper the
# largest that ptxas compiles without spilling (benchmarks/triton_compile_gate.py, compiled here for
# sm_90: 128 x 128 spilled 360 bytes with bf16; tf32 operands, twice the bytes, take half the D slice).
# Not yet timed on a GPU.
INTERPRETER_TILES = dict(BLOCK_N=32, BLOCK_K=32, BLOCK_D=32, num_warps=4, num_stages=1)
GPU_TILES = {"bf16": dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=64, num_warps=8, num_stages=3),
             "tf32": dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=32, num_warps=8, num_stages=3)}


def launch_top2(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, input_precision: str,
                tiles: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel on tensors already where it runs: x [B, N, D], c [B, K, D] (bf16, or float32 holding
    rounded values), c_sq [B, K] float32. Returns (winner int32, best, second float32, finite int8),
    each [B, N], on the same device."""
    if tiles is None:
        tiles = INTERPRETER_TILES if interpreted() else GPU_TILES["bf16" if x.dtype == torch.bfloat16 else "tf32"]
    batch, n, d = x.shape
    k = c.shape[1]
    winner = torch.empty(batch, n, dtype=torch.int32, device=x.device)
    best = torch.empty(batch, n, dtype=torch.float32, device=x.device)
    second = torch.empty(batch, n, dtype=torch.float32, device=x.device)
    finite = torch.empty(batch, n, dtype=torch.int8, device=x.device)
    grid = (triton.cdiv(n, tiles["BLOCK_N"]), batch)
    _top2_kernel[grid](x, c, c_sq, winner, best, second, finite, n, k, d,
                       x.stride(0), x.stride(1), c.stride(0), c.stride(1), c_sq.stride(0), winner.stride(0),
                       INPUT_PRECISION=input_precision, K_TILES=triton.cdiv(k, tiles["BLOCK_K"]),
                       D_TILES=triton.cdiv(d, tiles["BLOCK_D"]), **tiles)
    return winner, best, second, finite


def triton_top2(precision: str, device: str | torch.device | None = None):
    """A ``certified.Top2`` running the Triton kernel, for ``certified_assign(..., top2=...)``: on
    ``device`` (default: CUDA when there is one, else the interpreter's CPU)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" and not interpreted():
        raise RuntimeError("the Triton kernel runs on CUDA, or on the CPU under TRITON_INTERPRET=1")

    def top2(problem: RoundedProblem):
        x, c, input_precision = _kernel_inputs(problem, precision, device)
        # ||c~_k||^2 summed in float32 (any order): the bound's accumulation term covers it.
        c_sq = problem.c.to(device).float().square().sum(-1).contiguous()
        winner, best, second, finite = launch_top2(x, c, c_sq, input_precision)
        return winner.long().cpu(), best.cpu(), second.cpu(), finite.bool().cpu()

    return top2
