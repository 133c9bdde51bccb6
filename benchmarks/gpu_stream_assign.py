"""The streamed assignment of a round on a GPU: N float16 rows resident in GPU memory (20M x 256 is
10 GB) assigned to k centroids chunk by chunk, seconds per full pass.

    python3 benchmarks/gpu_stream_assign.py --json OUT.jsonl [--n 20000000] [--k 1024 8192] [--deadline-s 240]

One JSON line per result, flushed as it comes, so a run cut short by its time limit keeps every row it
finished; no new row starts after ``--deadline-s`` from the start. Rows per k: the fused kernel on float32
copies of each chunk (as ``xdc_fast.features.assign_stream`` does), the kernel fed the float16 chunk
directly (its autocast path), and the pass with margins (``nearest_other``, second-nearest centroid).
TFLOP/s counts 2·N·D·K per pass (twice that with margins).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--chunk-rows", type=int, default=1 << 20)
    parser.add_argument("--deadline-s", type=float, default=240.0)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script on a small --n")
    parser.add_argument("--json", required=True, help="JSON lines, one per result")
    args = parser.parse_args()
    start = time.perf_counter()

    from xdc_fast.cluster import nearest_other
    from xdc_fast.ops import kmeans_assign

    out = open(args.json, "w")

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(args.n, args.d, dtype=torch.float16, device=device)
    for begin in range(0, args.n, args.chunk_rows):  # filled chunk by chunk: no float32 copy of all rows
        rows = min(args.chunk_rows, args.n - begin)
        x[begin : begin + rows] = torch.nn.functional.normalize(
            torch.randn(rows, args.d, device=device, generator=gen), dim=1).half()
    emit({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "n": args.n, "d": args.d,
          "chunk_rows": args.chunk_rows, "resident_gib": x.numel() * 2 / 2**30})

    def one_pass(centroids: torch.Tensor, mode: str) -> float:
        sync()
        t0 = time.perf_counter()
        for begin in range(0, args.n, args.chunk_rows):
            block = x[begin : begin + args.chunk_rows]
            if mode == "half input":
                kmeans_assign(block, centroids.half())
            else:
                labels, _ = kmeans_assign(block.float(), centroids)
                if mode == "with margins":
                    nearest_other(block.float(), centroids, labels)
        sync()
        return time.perf_counter() - t0

    for k in args.k:
        centroids = x[torch.randperm(args.n, device=device, generator=gen)[:k]].float()
        for mode in ("float32 chunks", "half input", "with margins"):
            if time.perf_counter() - start > args.deadline_s:
                emit({"k": k, "mode": mode, "skipped": "past the deadline"})
                continue
            try:
                one_pass(centroids, mode)  # warm-up (and the first pass's allocations)
                seconds = one_pass(centroids, mode)
            except Exception as error:  # noqa: BLE001 - a row that fails is reported, the others still run
                emit({"k": k, "mode": mode, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
                continue
            flop = 2 * args.n * args.d * k * (2 if mode == "with margins" else 1)
            emit({"k": k, "mode": mode, "seconds_per_pass": seconds, "rows_per_s": args.n / seconds,
                  "tflops": flop / seconds / 1e12})
    out.close()


if __name__ == "__main__":
    main()
