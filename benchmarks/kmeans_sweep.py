"""Sweep `xdc-fast bench kmeans` over sizes and write one markdown table (and the raw JSON).

    python benchmarks/kmeans_sweep.py --out benchmarks/results/kmeans_cpu.md
    python benchmarks/kmeans_sweep.py --device cuda --sizes 1000000x256x1024 --out results.md

Each size is one side-by-side run (same data, same threads); ratios are only compared within a run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from xdc_fast.bench.kmeans import bench_kmeans, format_kmeans_table

CPU_SIZES = ["100000x64x256", "400000x256x1024", "50000x256x8192"]


def parse_size(text: str) -> tuple[int, int, int]:
    n, d, k = (int(v) for v in text.lower().split("x"))
    return n, d, k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", nargs="+", default=CPU_SIZES, help="NxDxK triples")
    parser.add_argument("--b", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="*", default=["avx512", "avx2", "portable"],
                        help="our CPU engines also timed forced, beside the default call (absent ones are noted)")
    parser.add_argument("--out", required=True, help="markdown file; the JSON goes beside it")
    args = parser.parse_args()

    sections, raw = [], []
    for size in args.sizes:
        n, d, k = parse_size(size)
        print(f"... N={n} D={d} K={k}", file=sys.stderr, flush=True)
        engines = args.engines if args.device == "cpu" else []
        result = bench_kmeans(device=args.device, b=args.b, n=n, d=d, k=k, repeats=args.repeats, engines=engines)
        table = format_kmeans_table(result)
        print(table, flush=True)
        sections.append(table)
        raw.append(result.to_json())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(args.out, "w") as f:
        f.write(f"# k-means benchmark ({args.device}), {stamp}\n\n")
        f.write("Produced by `benchmarks/kmeans_sweep.py`; best of the repeats after a warm-up.\n\n")
        f.write("\n\n".join(sections) + "\n")
    with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(raw, f, indent=2)


if __name__ == "__main__":
    main()
