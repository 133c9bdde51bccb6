"""``xdc-fast bench``: speed of our kernels against what people would otherwise use, in one run.

Every contender sees the same data, the same thread count and the same timer; times are the best of
``repeats`` after one warm-up, and ratios are taken against ours measured in the same process. These
machines are shared, so compare ratios within one table, not absolute times across tables.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import ops, reference


@dataclass
class Row:
    name: str
    assign_s: float | None
    lloyd_s: float | None
    note: str = ""


@dataclass
class KMeansBenchResult:
    device: str
    b: int
    n: int
    d: int
    k: int
    threads: int
    repeats: int
    machine: str
    torch_version: str
    sgemm_gflops: float
    shape_gemm_gflops: float = 0.0
    rows: list[Row] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return 2.0 * self.b * self.n * self.d * self.k

    def to_json(self) -> dict:
        out = asdict(self)
        out["flops_per_assignment"] = self.flops
        for row in out["rows"]:
            row["assign_gflops"] = self.flops / row["assign_s"] / 1e9 if row["assign_s"] else None
        return out


def _best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: first-touch allocations, lazy initialisation, kernel caches
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _lloyd_step(assign, update, x, centroids, k):
    labels, _ = assign(x, centroids)
    sums, counts = update(x, labels, k)
    return sums / counts.clamp_min(1).unsqueeze(-1)


def _sgemm_peak(device: torch.device, repeats: int) -> float:
    """The machine's fp32 GEMM rate through torch.mm on a large square product (2048^3 on the CPU,
    8192^3 on a GPU): the ceiling an assignment's GEMM could reach."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    seconds = _best_time(lambda: torch.mm(a, b, out=out), repeats, device)
    return 2.0 * n**3 / seconds / 1e9


def _shape_gemm_rate(x: torch.Tensor, centroids: torch.Tensor, repeats: int) -> float:
    """torch.mm on this problem's own shape, the GEMM half of what a user's mm + argmin costs.

    The rows go in blocks, so it measures arithmetic rather than writing an N x K result to memory
    (which would not fit for large N): 4096 rows on the CPU, and on the GPU as many as the plain-torch
    reference takes at once (at least 4096).
    """
    B, N, D = x.shape
    K = centroids.shape[1]
    rows = min(N, reference.default_chunk_rows(x.device, K))
    out = torch.empty(rows, K, device=x.device)
    full_blocks = N // rows

    def run():
        for b in range(B):
            for block in range(full_blocks):
                torch.mm(x[b, block * rows : (block + 1) * rows], centroids[b].T, out=out)

    seconds = _best_time(run, repeats, x.device)
    return 2.0 * B * full_blocks * rows * D * K / seconds / 1e9


def _faiss_rows(x: torch.Tensor, centroids: torch.Tensor, threads: int, repeats: int) -> list[Row]:
    try:
        import faiss
    except ImportError:
        return [Row("faiss", None, None, "not installed (pip install faiss-cpu)")]
    if x.device.type != "cpu":
        return [Row("faiss", None, None, "CPU build only in this comparison")]
    faiss.omp_set_num_threads(threads)
    B, _, D = x.shape
    K = centroids.shape[1]
    xs = [x[b].contiguous().numpy() for b in range(B)]
    cs = [centroids[b].contiguous().numpy() for b in range(B)]

    def assign():
        for xb, cb in zip(xs, cs):
            index = faiss.IndexFlatL2(D)
            index.add(cb)
            index.search(xb, 1)

    def lloyd():
        for xb, cb in zip(xs, cs):
            km = faiss.Kmeans(D, K, niter=1, seed=1, max_points_per_centroid=1 << 30, min_points_per_centroid=1)
            km.train(xb, init_centroids=cb)

    return [Row("faiss", _best_time(assign, repeats, x.device), _best_time(lloyd, repeats, x.device),
                f"faiss {faiss.__version__}, IndexFlatL2.search / Kmeans(niter=1)")]


def _sklearn_rows(x: torch.Tensor, centroids: torch.Tensor, threads: int, repeats: int) -> list[Row]:
    try:
        import numpy as np
        import sklearn
        from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense
    except ImportError:
        return [Row("scikit-learn", None, None, "not installed, or its Lloyd kernel moved")]
    if x.device.type != "cpu":
        return [Row("scikit-learn", None, None, "CPU only")]
    B, N, D = x.shape
    K = centroids.shape[1]
    xs = [np.ascontiguousarray(x[b].numpy()) for b in range(B)]
    cs = [np.ascontiguousarray(centroids[b].numpy()) for b in range(B)]
    weights = np.ones(N, dtype=np.float32)

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return [Row("scikit-learn", None, None, "needs threadpoolctl (as scikit-learn itself does)")]

    def step(update_centers: bool):
        # As scikit-learn's own KMeans does: its threads call BLAS, which must not spawn threads too.
        with threadpool_limits(limits=1, user_api="blas"):
            _step(update_centers)

    def _step(update_centers: bool):
        for xb, cb in zip(xs, cs):
            new = np.empty_like(cb)
            lloyd_iter_chunked_dense(xb, weights, cb, new, np.zeros(K, dtype=np.float32),
                                     np.empty(N, dtype=np.int32), np.zeros(K, dtype=np.float32), threads,
                                     update_centers=update_centers)

    return [Row("scikit-learn", _best_time(lambda: step(False), repeats, x.device),
                _best_time(lambda: step(True), repeats, x.device),
                f"scikit-learn {sklearn.__version__}, its Lloyd kernel (lloyd_iter_chunked_dense)")]


def bench_kmeans(device: str = "cpu", b: int = 1, n: int = 400_000, d: int = 256, k: int = 1024,
                 repeats: int = 3, seed: int = 0, threads: int | None = None,
                 progress: Callable[[str], None] | None = None) -> KMeansBenchResult:
    """Time one assignment and one full Lloyd iteration for every contender on the same data."""
    dev = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen, device=dev)
    # Centroids from the data, as Lloyd's first iteration would have them.
    centroids = x[:, torch.randperm(n, generator=gen, device=dev)[:k]].clone()
    say = progress or (lambda _msg: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 ceiling, as our default mode is fp32-exact

    result = KMeansBenchResult(device=str(dev), b=b, n=n, d=d, k=k, threads=threads, repeats=repeats,
                               machine=_machine(dev), torch_version=torch.__version__, sgemm_gflops=0.0)
    say("measuring the fp32 GEMM rate (torch.mm)")
    result.sgemm_gflops = _sgemm_peak(dev, repeats)
    result.shape_gemm_gflops = _shape_gemm_rate(x, centroids, repeats)

    def ours_assign(xx, cc):
        return ops.kmeans_assign(xx, cc, check_finite_input=False)

    say("timing xdc-fast")
    result.rows.append(Row(
        "xdc-fast",
        _best_time(lambda: ours_assign(x, centroids), repeats, dev),
        _best_time(lambda: _lloyd_step(ours_assign, ops.kmeans_update, x, centroids, k), repeats, dev),
        "fused kernels" if ops.HAS_EXTENSION else "extension missing: plain-torch fallback",
    ))
    say("timing plain torch (mm + argmin)")
    result.rows.append(Row(
        "torch mm+argmin",
        _best_time(lambda: reference.kmeans_assign_reference(x, centroids), repeats, dev),
        _best_time(lambda: _lloyd_step(reference.kmeans_assign_reference, reference.kmeans_update_reference,
                                       x, centroids, k), repeats, dev),
        f"{reference.default_chunk_rows(dev, k)}-row chunks, index_add_ update",
    ))
    say("timing faiss")
    result.rows.extend(_faiss_rows(x, centroids, threads, repeats))
    say("timing scikit-learn")
    result.rows.extend(_sklearn_rows(x, centroids, threads, repeats))
    return result


def _machine(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def format_kmeans_table(result: KMeansBenchResult) -> str:
    ours = result.rows[0]
    lines = [
        f"k-means on {result.device} ({result.machine}): B={result.b} N={result.n} D={result.d} K={result.k}, "
        f"{result.threads} threads, best of {result.repeats}",
        f"fp32 GEMM rate (torch.mm): {result.sgemm_gflops:.1f} GFLOP/s on a large square product "
        f"(the % column's base); {result.shape_gemm_gflops:.1f} GFLOP/s on this problem's shape",
        "",
        "| implementation | assign (s) | assign GFLOP/s | % of GEMM rate | Lloyd iter (s) | assign vs ours | Lloyd vs ours | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result.rows:
        if row.assign_s is None:
            lines.append(f"| {row.name} | – | – | – | – | – | – | {row.note} |")
            continue
        gflops = result.flops / row.assign_s / 1e9
        lines.append(
            f"| {row.name} | {row.assign_s:.4f} | {gflops:.1f} | {100 * gflops / result.sgemm_gflops:.0f}% "
            f"| {row.lloyd_s:.4f} | {row.assign_s / ours.assign_s:.2f}x | {row.lloyd_s / ours.lloyd_s:.2f}x "
            f"| {row.note} |"
        )
    lines.append("")
    lines.append("'vs ours' is the contender's time over ours: above 1 means xdc-fast is faster.")
    return "\n".join(lines)


def write_json(result: KMeansBenchResult, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result.to_json(), f, indent=2)
