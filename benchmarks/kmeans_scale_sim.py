"""A clustering round at 10^8-clip scale, simulated on one machine (see ``xdc_fast.bench.scale``).

    python benchmarks/kmeans_scale_sim.py --out benchmarks/results/kmeans_scale_cpu.md

N points of a Gaussian mixture in float16 files (2M x 256 is 1 GB, as one modality's features), two gloo
ranks, k = 1024: k-means trained on a sample of k x max_points_per_centroid points and assigned in a
stream, against the full in-memory fit from the same initial centroids. The bars: objective within 1%,
NMI between the two labelings at least 0.95, each rank's peak resident memory within 10% of the plan.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile

from xdc_fast.bench.scale import format_result, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--max-points-per-centroid", type=int, default=256)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--folder", default=None, help="where the points files go (default: a temporary folder)")
    parser.add_argument("--out", required=True, help="markdown file; the JSON goes beside it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        result = simulate(args.folder or scratch, n=args.n, d=args.d, k=args.k, world=args.world, niter=args.niter,
                          mppc=args.max_points_per_centroid, spread=args.spread,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    table = format_result(result)
    print(table, flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bars = (f"Bars: objective gap within 1% ({'met' if abs(result['objective_gap']) <= 0.01 else 'NOT met'}), "
            f"NMI >= 0.95 ({'met' if result['nmi'] >= 0.95 else 'NOT met'}), peak RSS within 10% of the plan "
            f"({'met' if all(abs(r - 1) <= 0.10 for r in result['rss_over_plan']) else 'NOT met'}).")
    with open(args.out, "w") as f:
        f.write(f"# A clustering round at scale, simulated on the CPU, {stamp}\n\n")
        f.write("Produced by `benchmarks/kmeans_scale_sim.py` on a 2-core machine (one thread per rank). The plan is "
                "`xdc_fast.planner.round_passes` (the largest pass) plus the labels, distances and margins and the "
                "rank's resident memory measured just before the round.\n\n")
        f.write(table + "\n\n" + bars + "\n")
    with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
