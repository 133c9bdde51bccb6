"""The tensor-core assignment on a GPU: the Triton kernel's pass (bf16 and tf32) against the
card's own ceilings and the contenders, all timed in one run, plus the certified labels checked against
float64 on a sample of rows.

    python3 benchmarks/tensor_core_assign.py --json OUT.json [--sizes 1000000x256x1024 ...]

Per size and contender: milliseconds (``triton.testing.do_bench``'s median), TFLOP/s counted as 2·N·D·K,
and that rate over the bf16 (or TF32) 8192³ GEMM rate measured in the same run. Contenders: the Triton
pass (bf16, tf32), xdc-fast's fp32 kernel (``ops.kmeans_assign``, when the extension is built), torch
``mm`` + ``argmin`` in fp32 and with TF32 allowed, and cuBLAS's bf16 GEMM of the same shape (no argmin).
Then the end-to-end certified assignment (``certified_assign`` with the Triton pass: rounding, the pass,
the certification and the exact re-check, which still run on the host), timed once per size while the
deadline allows; and on ``--check-rows`` rows the fraction re-checked and whether every label equals the
exact nearest centroid (``certified.exact_nearest``, float64 in blocks with rational re-checks of near
ties: no N x K x D temporary).

Needs no build (``PYTHONPATH=.``): the fp32 kernel's row is left out without the extension. One JSON line
is printed and flushed per row, the 1M shape before the 10M one, and ``--deadline-s`` stops before a
size or an end-to-end row that would start after it, so a cut run keeps every finished row.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DEADLINE = [float("inf")]  # perf_counter() past which nothing new starts


def gemm_tflops(dtype: torch.dtype, tf32: bool = False) -> float:
    from triton.testing import do_bench

    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = do_bench(lambda: torch.mm(a, b), return_mode="median")
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def measure(n: int, d: int, k: int, check_rows: int, ceilings: dict) -> list[dict]:
    from triton.testing import do_bench as triton_bench

    from xdc_fast import ops
    from xdc_fast.certified import certified_assign, exact_nearest, gaussian_mixture, round_to_precision
    from xdc_fast.triton_assign import launch_top2, triton_top2

    def do_bench(fn):
        return triton_bench(fn, return_mode="median")

    generator = torch.Generator().manual_seed(0)
    sample_x, c = gaussian_mixture(check_rows, d, k, noise=2.0, generator=generator)
    exact = exact_nearest(sample_x, c)
    # The timed rows: the sample repeated with a little noise, L2-normalised like the features k-means
    # sees; made on the GPU (10M x 256 is 10 GB).
    x = sample_x.cuda().repeat((n + check_rows - 1) // check_rows, 1)[:n]
    x = torch.nn.functional.normalize(x.add_(0.01 * torch.randn_like(x)), dim=-1)
    c = c.cuda()
    flops = 2.0 * n * d * k
    rows = []

    def row(impl, precision, ms, base, **extra):
        rows.append({"impl": impl, "precision": precision, "n": n, "d": d, "k": k, "assign_ms": ms,
                     "tflops": flops / (ms * 1e-3) / 1e12, "of_ceiling": flops / (ms * 1e-3) / 1e12 / ceilings[base],
                     **extra})
        print(json.dumps(rows[-1]), flush=True)

    centre = c.mean(0, keepdim=True)
    for precision in ("bf16", "tf32"):
        xr, cr = round_to_precision(x - centre, precision), round_to_precision(c - centre, precision)
        c_sq = cr.square().sum(-1)[None].contiguous()
        if precision == "bf16":
            xk, ck, mode = xr.to(torch.bfloat16)[None].contiguous(), cr.to(torch.bfloat16)[None].contiguous(), "tf32"
        else:
            xk, ck, mode = xr[None].contiguous(), cr[None].contiguous(), "tf32"
        ms = do_bench(lambda: launch_top2(xk, ck, c_sq, mode))
        del xk, ck
        result = certified_assign(sample_x, c.cpu(), precision, top2=triton_top2(precision))
        row("triton top-2 pass", precision, ms, "bf16_tflops" if precision == "bf16" else "tf32_tflops",
            rechecked_fraction=float(result.rechecked.double().mean()),
            labels_exact=bool(torch.equal(result.labels, exact)))
    if ops.HAS_CUDA_KERNELS:
        ms = do_bench(lambda: ops.kmeans_assign(x[None], c[None]))
        row("xdc-fast fp32 kernel", "fp32", ms, "fp32_tflops")
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        c_sq = c.square().sum(-1)
        ms = do_bench(lambda: (c_sq - 2 * x @ c.T).argmin(-1))
        row("torch mm+argmin", "tf32" if tf32 else "fp32", ms, "tf32_tflops" if tf32 else "fp32_tflops")
    torch.backends.cuda.matmul.allow_tf32 = False
    xb, cb = x.to(torch.bfloat16), c.to(torch.bfloat16)
    ms = do_bench(lambda: xb @ cb.T)
    row("cuBLAS bf16 GEMM (no argmin)", "bf16", ms, "bf16_tflops")
    del xb, cb
    for precision in ("bf16", "tf32"):
        if time.perf_counter() > DEADLINE[0] - 120:
            print(json.dumps({"skipped": f"end to end {precision} at {n}x{d}x{k}: too close to the deadline"}), flush=True)
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = certified_assign(x, c, precision, top2=triton_top2(precision))
        torch.cuda.synchronize()
        row("certified end to end (certification on the host)", precision, 1e3 * (time.perf_counter() - t0),
            "bf16_tflops" if precision == "bf16" else "tf32_tflops",
            rechecked_fraction=float(result.rechecked.double().mean()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1000000x256x1024", "10000000x256x1024", "1000000x128x1024",
                                                       "1000000x256x256"])
    parser.add_argument("--check-rows", type=int, default=4096)
    parser.add_argument("--deadline-s", type=float, default=float("inf"),
                        help="start nothing new after this many seconds")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    DEADLINE[0] = time.perf_counter() + args.deadline_s
    ceilings = {"bf16_tflops": gemm_tflops(torch.bfloat16), "tf32_tflops": gemm_tflops(torch.float32, tf32=True),
                "fp32_tflops": gemm_tflops(torch.float32)}
    print(json.dumps({"device": torch.cuda.get_device_name(), **ceilings}), flush=True)
    rows = []
    for size in args.sizes:
        if time.perf_counter() > DEADLINE[0]:
            print(json.dumps({"skipped": f"{size}: past the deadline"}), flush=True)
            continue
        n, d, k = (int(v) for v in size.split("x"))
        rows += measure(n, d, k, args.check_rows, ceilings)
        with open(args.json, "w") as f:  # after every size: a cut run keeps what it measured
            json.dump({"device": torch.cuda.get_device_name(), **ceilings, "rows": rows}, f, indent=1)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
