"""A clustering round at scale, simulated on one machine: a Gaussian mixture of N points in float16 files
(one per rank), k-means trained on a sample across gloo ranks and assigned in a stream, against the full
in-memory fit of the same points from the same initial centroids.

Reports the objective of each (the sum of squared distances of every point to its centroid), the NMI
between the two labelings, each rank's peak resident memory during the round and the planner's figure
for it (:func:`xdc_fast.planner.round_passes` plus the process's resident memory before the round).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

# Points generated per block: block j is a function of (seed, j) alone, so the data is the same however
# many ranks share it.
BLOCK = 65536


def mixture_block(j: int, n: int, d: int, components: int, seed: int, spread: float) -> np.ndarray:
    """Points ``j * BLOCK ...`` of the mixture: centres ~ N(0, 1) per coordinate, points ~ centre + N(0, spread^2)."""
    centres = torch.randn(components, d, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + j + 1)
    rows = min(BLOCK, n - j * BLOCK)
    which = torch.randint(components, (rows,), generator=gen)
    return (centres[which] + spread * torch.randn(rows, d, generator=gen)).half().numpy()


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


def write_points(path: Path, n: int, d: int, begin: int, end: int, components: int, seed: int, spread: float):
    from xdc_fast.features import RowFile

    target = RowFile.create(path, end - begin, d, np.float16)
    for j in range(begin // BLOCK, (end - 1) // BLOCK + 1):
        block = mixture_block(j, n, d, components, seed, spread)
        lo, hi = max(begin, j * BLOCK), min(end, j * BLOCK + len(block))
        target.write(lo - begin, block[lo - j * BLOCK : hi - j * BLOCK])
    return target


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    # Linux: writing 5 resets VmHWM to the current resident set, so the peak is the round's own.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class ChosenInit:
    """Initial centroids at the first k positions of a seeded permutation of the sample's ids (pretraining's
    rule), contributed by the rank that holds each, and the ids chosen (for the in-memory fit)."""

    def __init__(self, folder: Path, rank: int):
        self.folder, self.rank = folder, rank

    def __call__(self, mine: np.ndarray, all_rows: np.ndarray, k: int):
        from xdc_fast import distributed as xdist

        position = {int(g): i for i, g in enumerate(mine)}
        all_rows_t = torch.from_numpy(all_rows)

        def init(points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            chosen = all_rows_t[torch.randperm(len(all_rows_t), generator=generator)[:k]]
            if self.rank == 0:
                np.save(self.folder / "init_ids.npy", chosen.numpy())
            out = torch.zeros(points.shape[0], k, points.shape[-1])
            for j, g in enumerate(chosen.tolist()):
                if g in position:
                    out[:, j] = points[:, position[g]]
            return xdist.all_reduce_sum(out)

        return init


def _rank(rank: int, world: int, folder: str, args: dict) -> None:
    import torch.distributed as dist

    from xdc_fast import features, planner

    torch.set_num_threads(args["threads"])
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        n, d, k = args["n"], args["d"], args["k"]
        begin, end = rank_range(n, rank, world)
        t0 = time.perf_counter()
        f = write_points(folder / f"points_rank{rank}.npy", n, d, begin, end, args["components"], args["seed"],
                         args["spread"])
        t_write = time.perf_counter() - t0
        ids = np.arange(begin, end, dtype=np.int64)
        dist.barrier()
        _reset_peak()
        baseline = planner.resident_bytes()
        t0 = time.perf_counter()
        fit = features.fit_streamed([f], ids, k, niter=args["niter"], seed=args["seed"],
                                    max_points_per_centroid=args["mppc"], init=ChosenInit(folder, rank),
                                    chunk_rows=args["chunk_rows"])
        seconds = time.perf_counter() - t0
        peak = _peak_rss()
        passes = planner.round_passes(end - begin, int(np.ceil(fit.sample_size / world)), [d], 0, args["chunk_rows"])
        # This rank's share of the sample varies by about its square root: the plan takes the one drawn.
        planned = baseline + max(passes.values()) + (end - begin) * 16 + k * d * 4 * 3
        np.save(folder / f"labels_rank{rank}.npy", fit.labels[0])
        np.save(folder / f"distance_rank{rank}.npy", fit.distance[0])
        if rank == 0:
            torch.save(fit.centroids, folder / "centroids.pt")
        with open(folder / f"rank{rank}.json", "w") as out:
            json.dump({"rank": rank, "points": end - begin, "sample_size": fit.sample_size, "write_s": t_write,
                       "round_s": seconds, "baseline_rss": baseline, "peak_rss": peak, "planned_rss": planned,
                       "passes": passes}, out)
    finally:
        dist.destroy_process_group()


def simulate(folder: str | Path, *, n: int, d: int = 256, k: int = 1024, world: int = 2, niter: int = 10,
             mppc: int = 256, components: int | None = None, spread: float = 1.0, seed: int = 0,
             threads: int = 1, chunk_rows: int = 65536, full: bool = True, log=print) -> dict:
    """Run the simulation in ``folder`` (its files are left there) and return its figures."""
    import torch.multiprocessing as mp
    from sklearn.metrics import normalized_mutual_info_score

    from xdc_fast import KMeans
    from xdc_fast.ops import kmeans_assign

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rendezvous*"):
        old.unlink()
    args = {"n": n, "d": d, "k": k, "niter": niter, "mppc": mppc, "components": components or k, "spread": spread,
            "seed": seed, "threads": threads, "chunk_rows": chunk_rows}
    log(f"sampled fit + streamed assignment: N={n} d={d} k={k} on {world} gloo ranks ...")
    mp.spawn(_rank, args=(world, str(folder), args), nprocs=world, join=True)
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]
    labels = np.concatenate([np.load(folder / f"labels_rank{r}.npy") for r in range(world)])
    sampled_obj = float(sum(np.load(folder / f"distance_rank{r}.npy").astype(np.float64).sum() for r in range(world)))
    result = {"n": n, "d": d, "k": k, "world": world, "niter": niter, "max_points_per_centroid": mppc,
              "components": args["components"], "spread": spread, "sample_size": ranks[0]["sample_size"],
              "sampled_objective": sampled_obj, "ranks": ranks}
    if full:
        log(f"full in-memory fit of all {n} points ...")
        x = torch.from_numpy(np.concatenate([np.load(folder / f"points_rank{r}.npy") for r in range(world)])).float()
        init = x[torch.from_numpy(np.load(folder / "init_ids.npy"))]
        t0 = time.perf_counter()
        km = KMeans(d, k, niter=niter, seed=seed).fit(x, init_centroids=init)
        result["full_s"] = time.perf_counter() - t0
        full_labels, full_dist = kmeans_assign(x, km.centroids)
        result["full_objective"] = float(full_dist.double().sum())
        result["objective_gap"] = sampled_obj / result["full_objective"] - 1
        result["nmi"] = float(normalized_mutual_info_score(full_labels.numpy(), labels))
    result["rss_over_plan"] = [r["peak_rss"] / r["planned_rss"] for r in ranks]
    return result


def format_result(result: dict) -> str:
    lines = [f"N = {result['n']:,} points of d = {result['d']} (float16 files, one per rank), k = {result['k']}, "
             f"{result['world']} gloo ranks, {result['niter']} iterations, max_points_per_centroid "
             f"{result['max_points_per_centroid']} (sample of {result['sample_size']:,} points); a mixture of "
             f"{result['components']} Gaussians (spread {result['spread']})", ""]
    if "full_objective" in result:
        lines += ["| fit | objective over all points | seconds |", "|---|---:|---:|",
                  f"| sampled + streamed ({result['world']} ranks) | {result['sampled_objective']:.6g} | "
                  f"{max(r['round_s'] for r in result['ranks']):.1f} |",
                  f"| full, in memory (1 process) | {result['full_objective']:.6g} | {result['full_s']:.1f} |", "",
                  f"objective gap: {100 * result['objective_gap']:+.3f}%; NMI between the labelings: "
                  f"{result['nmi']:.4f}", ""]
    lines += ["| rank | points | peak RSS (MiB) | planned (MiB) | peak / plan |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['rank']} | {r['points']:,} | {r['peak_rss'] / 2**20:.0f} | {r['planned_rss'] / 2**20:.0f} | "
              f"{r['peak_rss'] / r['planned_rss']:.3f} |" for r in result["ranks"]]
    return "\n".join(lines)


__all__ = ["simulate", "format_result", "mixture_block"]
