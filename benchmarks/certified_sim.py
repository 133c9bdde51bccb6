"""How many rows would the certified tensor-core assignment re-check? A CPU simulation.

    python benchmarks/certified_sim.py [--n 20000] [--noise 1 2 4] [--seed 0]

For L2-normalised Gaussian-mixture features and k-means centroids (xdc_fast.certified.gaussian_mixture),
prints the fraction of rows whose best/second-best gap the bf16 or tf32 pass cannot certify, i.e. the
rows a kernel would re-decide in fp32. The fraction drives the choice of the default precision: every
re-checked row costs a full fp32 pass over K. Runs on one thread in well under a minute.
"""

from __future__ import annotations

import argparse
import time

import torch

from xdc_fast.certified import gaussian_mixture, rechecked_fraction

SHAPES = [(256, 1024), (128, 256)]  # (D, K): the README's main shape and a smaller one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                        help="noise norm relative to the unit cluster direction; larger overlaps more")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print("| N | D | K | noise | bf16 re-checked | tf32 re-checked |")
    print("|---:|---:|---:|---:|---:|---:|")
    started = time.perf_counter()
    for noise in args.noise:
        for d, k in SHAPES:
            generator = torch.Generator().manual_seed(args.seed)
            x, centroids = gaussian_mixture(args.n, d, k, noise=noise, generator=generator)
            fractions = [rechecked_fraction(x, centroids, precision) for precision in ("bf16", "tf32")]
            cells = " | ".join(f"{fraction:.3%}" for fraction in fractions)
            print(f"| {args.n} | {d} | {k} | {noise:g} | {cells} |", flush=True)
    print(f"({time.perf_counter() - started:.0f} s, one thread)")


if __name__ == "__main__":
    main()
