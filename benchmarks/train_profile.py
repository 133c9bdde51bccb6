"""Where the GPU time of one training step goes (R(2+1)D-18 reached 12% MFU, 17% compiled; the
target is 35%): the step as the commands run it, under ``torch.profiler``, with the CUDA kernel time
grouped into convolution, normalisation, elementwise, layout copies, optimizer and the rest, and the
top kernels by time. Writes JSON and prints a table.

    python3 benchmarks/train_profile.py --json OUT.json [--arch r2plus1d_18] [--batch-size 32] [--compile]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch

from xdc_fast import engine
from xdc_fast.bench.train import _model, _synthetic

CATEGORIES = (  # first match wins; kernel names as cuDNN, cuBLAS, ATen and Inductor give them
    ("convolution", r"conv|xmma|implicit|wgrad|dgrad|fprop|sm90_|cutlass|gemm|winograd"),
    ("normalisation", r"batch_norm|batchnorm|bn_|welford|native_batch"),
    ("layout copy", r"copy|transpose|nchw|nhwc|permute|contiguous"),
    ("optimizer", r"multi_tensor|foreach|sgd|momentum"),
    ("elementwise", r"elementwise|vectorized|relu|threshold|add|mul|triton_poi|triton_red"),
)


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="r2plus1d_18")
    parser.add_argument("--modality", default="video", choices=("video", "audio"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    dev = torch.device("cuda")
    model, optimizer = _model(args.arch, args.modality, dev)
    engine.video_weights_channels_last(model)
    engine.compile_encoders(model.encoders, args.compile)
    inputs, targets = _synthetic(args.modality, args.batch_size, dev)
    step = lambda: engine.supervised_step(model, [optimizer], inputs, targets)  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = defaultdict(float)
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] += event.device_time / 1e3 / args.steps  # ms per step
    total = sum(kernels.values())
    shares = defaultdict(float)
    for name, ms in kernels.items():
        shares[category(name)] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
    record = {"arch": args.arch, "modality": args.modality, "batch_size": args.batch_size, "compile": args.compile,
              "kernel_ms_per_step": total, "by_category_ms": dict(shares),
              "top_kernels": [{"name": n[:160], "ms": ms, "category": category(n)} for n, ms in top]}
    print(f"{args.arch} {args.modality}, batch {args.batch_size}{', compiled' if args.compile else ''}: "
          f"{total:.2f} ms of kernels per step")
    for label, ms in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<14} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
    for item in record["top_kernels"][:10]:
        print(f"  {item['ms']:7.2f} ms  {item['category']:<13} {item['name'][:100]}")
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
