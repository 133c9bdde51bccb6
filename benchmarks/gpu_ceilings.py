"""The GPU's own ceilings, measured in the same call as our kernels: fp32/TF32/BF16 GEMM and copy."""

from __future__ import annotations

import argparse
import json

import torch


def timed(fn, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = 8192
    rows = {}
    for name, dtype, tf32 in [("fp32 GEMM", torch.float32, False), ("tf32 GEMM", torch.float32, True),
                              ("bf16 GEMM", torch.bfloat16, False)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        seconds = timed(lambda: a @ b)
        rows[name] = 2 * n**3 / seconds / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    src = torch.empty(1 << 29, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src))
    rows["device copy"] = 2 * src.numel() * 4 / seconds / 1e12
    print(f"ceilings on {torch.cuda.get_device_name()} (torch {torch.__version__}):")
    print("| ceiling | measured |\n|---|---:|")
    for name, value in rows.items():
        unit = "TB/s (read + write)" if name == "device copy" else "TFLOP/s"
        print(f"| {name} | {value:.1f} {unit} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), **rows}, f, indent=2)


if __name__ == "__main__":
    main()
