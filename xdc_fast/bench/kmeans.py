"""``xdc-fast bench kmeans``: one assignment and one full Lloyd iteration of our kernels against plain
torch, faiss and scikit-learn on the same data, with torch.mm's GEMM rate as the ceiling."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .. import ops, reference
from .timing import interleaved_best_times, machine


@dataclass
class ContenderTimes:
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
    cpu_isa: str | None = None  # the CPU engine the default call took
    fma_peak_gflops: float | None = None  # that engine's register-only multiply-add rate, all threads
    rows: list[ContenderTimes] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return 2.0 * self.b * self.n * self.d * self.k

    def to_json(self) -> dict:
        out = asdict(self)
        out["flops_per_assignment"] = self.flops
        for row in out["rows"]:
            row["assign_gflops"] = self.flops / row["assign_s"] / 1e9 if row["assign_s"] else None
        return out


def _lloyd_step(assign, update, x, centroids, k):
    labels, _ = assign(x, centroids)
    sums, counts = update(x, labels, k)
    return sums / counts.clamp_min(1).unsqueeze(-1)


def _sgemm_peak_job(device: torch.device) -> tuple[Callable[[], object], float]:
    """torch.mm on a large square product (2048^3 on the CPU, 8192^3 on a GPU): the machine's fp32
    GEMM rate, the ceiling an assignment's GEMM could reach. Returns (job, flops)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def _shape_gemm_job(x: torch.Tensor, centroids: torch.Tensor) -> tuple[Callable[[], object], float]:
    """torch.mm on this problem's own shape: the GEMM half of what a user's mm + argmin costs.

    The rows go in blocks, so it measures arithmetic rather than writing an N x K result to memory
    (which would not fit for large N): 4096 rows on the CPU, and on the GPU as many as the plain-torch
    reference takes at once (at least 4096). Returns (job, flops).
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

    return run, 2.0 * B * full_blocks * rows * D * K


Contender = tuple[str, str, Callable[[], object] | None, Callable[[], object] | None]  # name, note, assign, lloyd


@contextlib.contextmanager
def _forced_cpu_isa(isa: str) -> Iterator[None]:
    before = os.environ.get(ops.CPU_ISA_VARIABLE)
    os.environ[ops.CPU_ISA_VARIABLE] = isa
    try:
        yield
    finally:
        if before is None:
            del os.environ[ops.CPU_ISA_VARIABLE]
        else:
            os.environ[ops.CPU_ISA_VARIABLE] = before


def _engine_contender(isa: str, x: torch.Tensor, centroids: torch.Tensor, k: int) -> Contender:
    """Our default call with the CPU engine forced to ``isa``, for a comparison of engines in one run."""
    name = f"xdc-fast {isa}"
    if x.device.type != "cpu":
        return (name, "CPU engines only", None, None)
    if isa not in ops.cpu_isas():
        return (name, f"this CPU or build has no {isa} engine (here: {', '.join(ops.cpu_isas()) or 'none'})",
                None, None)

    def assign():
        with _forced_cpu_isa(isa):
            ops.kmeans_assign(x, centroids)

    def lloyd():
        with _forced_cpu_isa(isa):
            _lloyd_step(ops.kmeans_assign, ops.kmeans_update, x, centroids, k)

    return (name, f"{ops.CPU_ISA_VARIABLE}={isa}", assign, lloyd)


def _faiss_contender(x: torch.Tensor, centroids: torch.Tensor, threads: int) -> Contender:
    try:
        import faiss
    except ImportError:
        return ("faiss", "not installed (pip install faiss-cpu)", None, None)
    if x.device.type != "cpu":
        return ("faiss", "CPU build only in this comparison", None, None)
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

    return ("faiss", f"faiss {faiss.__version__}, IndexFlatL2.search / Kmeans(niter=1)", assign, lloyd)


def _sklearn_contender(x: torch.Tensor, centroids: torch.Tensor, threads: int) -> Contender:
    try:
        import numpy as np
        import sklearn
        from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense
        from threadpoolctl import threadpool_limits
    except ImportError:
        return ("scikit-learn", "not installed (with threadpoolctl), or its Lloyd kernel moved", None, None)
    if x.device.type != "cpu":
        return ("scikit-learn", "CPU only", None, None)
    B, N, D = x.shape
    K = centroids.shape[1]
    xs = [np.ascontiguousarray(x[b].numpy()) for b in range(B)]
    cs = [np.ascontiguousarray(centroids[b].numpy()) for b in range(B)]
    weights = np.ones(N, dtype=np.float32)

    def step(update_centers: bool):
        # As scikit-learn's own KMeans does: its threads call BLAS, which must not spawn threads too.
        with threadpool_limits(limits=1, user_api="blas"):
            for xb, cb in zip(xs, cs):
                lloyd_iter_chunked_dense(xb, weights, cb, np.empty_like(cb), np.zeros(K, dtype=np.float32),
                                         np.empty(N, dtype=np.int32), np.zeros(K, dtype=np.float32), threads,
                                         update_centers=update_centers)

    return ("scikit-learn", f"scikit-learn {sklearn.__version__}, its Lloyd kernel (lloyd_iter_chunked_dense)",
            lambda: step(False), lambda: step(True))


def bench_kmeans(device: str = "cpu", b: int = 1, n: int = 400_000, d: int = 256, k: int = 1024,
                 repeats: int = 3, seed: int = 0, threads: int | None = None,
                 progress: Callable[[str], None] | None = None, engines: Sequence[str] = ()) -> KMeansBenchResult:
    """Time one assignment and one full Lloyd iteration for every contender on the same data; ``engines``
    adds rows of our CPU assignment forced to those engines (``avx512``, ``avx2``, ``portable``)."""
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

    # The call users make, with its defaults: the finite check included (the kernels fold it in).
    ours_assign = ops.kmeans_assign

    contenders: list[Contender] = [
        ("xdc-fast", ("fused kernels" if ops.HAS_EXTENSION else "extension missing: plain-torch fallback")
         + ", default call (finite check on)",
         lambda: ours_assign(x, centroids),
         lambda: _lloyd_step(ours_assign, ops.kmeans_update, x, centroids, k)),
        ("torch mm+argmin", f"{reference.default_chunk_rows(dev, k)}-row chunks, index_add_ update",
         lambda: reference.kmeans_assign_reference(x, centroids),
         lambda: _lloyd_step(reference.kmeans_assign_reference, reference.kmeans_update_reference, x, centroids, k)),
        *(_engine_contender(isa, x, centroids, k) for isa in engines),
        _faiss_contender(x, centroids, threads),
        _sklearn_contender(x, centroids, threads),
    ]
    peak_job, peak_flops = _sgemm_peak_job(dev)
    shape_job, shape_flops = _shape_gemm_job(x, centroids)
    jobs = {"gemm peak": peak_job, "gemm shape": shape_job}
    for name, _, assign, lloyd in contenders:
        if assign is not None:
            jobs[f"{name} assign"], jobs[f"{name} lloyd"] = assign, lloyd
    say(f"timing {', '.join(c[0] for c in contenders if c[2] is not None)} and torch.mm, "
        f"{repeats} interleaved rounds")
    best = interleaved_best_times(jobs, repeats, dev)
    result = KMeansBenchResult(device=str(dev), b=b, n=n, d=d, k=k, threads=threads, repeats=repeats,
                               machine=machine(dev), torch_version=torch.__version__,
                               sgemm_gflops=peak_flops / best["gemm peak"] / 1e9,
                               shape_gemm_gflops=shape_flops / best["gemm shape"] / 1e9)
    if dev.type == "cpu" and ops.HAS_EXTENSION:
        result.cpu_isa = ops.cpu_isa()
        result.fma_peak_gflops = ops.cpu_fma_flops(result.cpu_isa) / 1e9 or None
    for name, note, assign, _ in contenders:
        if assign is None:
            result.rows.append(ContenderTimes(name, None, None, note))
        else:
            result.rows.append(ContenderTimes(name, best[f"{name} assign"], best[f"{name} lloyd"], note))
    return result


def format_kmeans_table(result: KMeansBenchResult) -> str:
    ours = result.rows[0]
    lines = [
        f"k-means on {result.device} ({result.machine}): B={result.b} N={result.n} D={result.d} K={result.k}, "
        f"{result.threads} threads, best of {result.repeats}",
        f"fp32 GEMM rate (torch.mm): {result.sgemm_gflops:.1f} GFLOP/s on a large square product "
        f"(the % column's base); {result.shape_gemm_gflops:.1f} GFLOP/s on this problem's shape",
        *_engine_lines(result),
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


def _engine_lines(result: KMeansBenchResult) -> list[str]:
    if result.cpu_isa is None:
        return []
    line = (f"CPU engine of the default call: {result.cpu_isa} (best this CPU has; "
            f"{ops.CPU_ISA_VARIABLE}=avx512|avx2|portable forces one)")
    if result.fma_peak_gflops is None:
        return [line + "; its speed is the BLAS library's"]
    ours = result.rows[0]
    share = f"; xdc-fast's assignment runs at {100 * result.flops / ours.assign_s / 1e9 / result.fma_peak_gflops:.0f}% of it" \
        if ours.assign_s else ""
    return [line, f"FMA peak of that engine: {result.fma_peak_gflops:.1f} GFLOP/s, an estimate of cores x FMA width x 2 "
                  f"x clock measured by a register-only multiply-add loop on all {result.threads} threads{share}"]
