"""Which form of the training step is fastest on this GPU, each on synthetic clips already on
the device, so only compute is timed: ``contiguous`` clips; ``engine``, the step as the commands run it
(video clips in ``engine.device_layout``); ``cudnn_benchmark``, with cuDNN's autotuner; ``channels_last``,
the weights in that layout too; ``compile``, the encoder under ``torch.compile``; and
``compile_channels_last``. The MFU column holds the model FLOPs (``FlopCounterMode``) against a bf16 GEMM
measured in the same run. Results: benchmarks/results/train_h200.md.

    python3 benchmarks/train_variants.py --json OUT.json [--arch r2plus1d_18] [--batch-size 32] [--variant V]

A variant that fails (a compiler error, say) is written down with its error, and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from xdc_fast import engine
from xdc_fast.bench.timing import gemm_rate, interleaved_best_times, machine
from xdc_fast.bench.train import _model, _synthetic, step_flops_per_clip

VARIANTS = ("contiguous", "engine", "cudnn_benchmark", "channels_last", "compile", "compile_channels_last")


def _prepare(variant: str, arch: str, modality: str, batch_size: int, dev: torch.device):
    torch.backends.cudnn.benchmark = variant not in ("contiguous", "engine")
    model, optimizer = _model(arch, modality, dev)
    inputs, targets = _synthetic(modality, batch_size, dev)  # in engine.device_layout
    if variant == "contiguous":
        inputs = {m: x.contiguous() for m, x in inputs.items()}
    if variant in ("channels_last", "compile_channels_last"):
        layout = torch.channels_last_3d if modality == "video" else torch.channels_last
        model = model.to(memory_format=layout)
        inputs = {m: x.contiguous(memory_format=layout) for m, x in inputs.items()}
    if variant.startswith("compile"):
        model.encoders[modality] = torch.compile(model.encoders[modality])
    return model, optimizer, inputs, targets


def measure(arch: str, modality: str, batch_size: int, steps: int, dev: torch.device, ceiling: float,
            variants=VARIANTS) -> list[dict]:
    rows = []
    flops = None
    for variant in variants:
        row = {"arch": arch, "modality": modality, "batch_size": batch_size, "variant": variant}
        t0 = time.perf_counter()
        try:
            model, optimizer, inputs, targets = _prepare(variant, arch, modality, batch_size, dev)
            if flops is None:
                flops = step_flops_per_clip(model, [optimizer], inputs, targets, batch_size)
            step = lambda: engine.supervised_step(model, [optimizer], inputs, targets)  # noqa: E731
            for _ in range(2):  # compilation and the autotuner's trials happen here, outside the timing
                step()
            seconds = interleaved_best_times({"step": step}, steps, dev)["step"]
            row.update(seconds_per_step=seconds, clips_per_s=batch_size / seconds, flops_per_clip=flops,
                       mfu=flops * batch_size / seconds / ceiling)
        except Exception as error:  # a variant that breaks is a finding, not the end of the run
            row["error"] = f"{type(error).__name__}: {error}"[:400]
        row["setup_and_timing_s"] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)
        rows.append(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", default=None)
    parser.add_argument("--batch-size", type=int, action="append", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variant", action="append", choices=VARIANTS, default=None)
    args = parser.parse_args()
    dev = torch.device(args.device)
    ceiling = gemm_rate(dev)["flops_per_s"]
    print(f"{machine(dev)}: bf16 GEMM 8192^3 at {ceiling / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for arch in args.arch or ["r2plus1d_18"]:
        for batch_size in args.batch_size or [32]:
            for modality in ("video", "audio"):
                rows += measure(arch, modality, batch_size, args.steps, dev, ceiling, args.variant or VARIANTS)
    with open(args.json, "w") as f:
        json.dump({"device": machine(dev), "bf16_tflops": ceiling / 1e12, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
