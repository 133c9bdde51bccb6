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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_best_times(jobs: dict[str, Callable[[], object]], repeats: int,
                            device: torch.device) -> dict[str, float]:
    """Best time of each job over ``repeats`` rounds, the jobs taking turns within every round, so a
    slow spell of a shared machine hits every contender alike instead of one of them."""
    for fn in jobs.values():  # warm-up: first-touch allocations, lazy initialisation, kernel caches
        fn()
    _sync(device)
    best = {name: float("inf") for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


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

    def ours_assign(xx, cc):
        return ops.kmeans_assign(xx, cc, check_finite_input=False)

    contenders: list[Contender] = [
        ("xdc-fast", "fused kernels" if ops.HAS_EXTENSION else "extension missing: plain-torch fallback",
         lambda: ours_assign(x, centroids),
         lambda: _lloyd_step(ours_assign, ops.kmeans_update, x, centroids, k)),
        ("torch mm+argmin", f"{reference.default_chunk_rows(dev, k)}-row chunks, index_add_ update",
         lambda: reference.kmeans_assign_reference(x, centroids),
         lambda: _lloyd_step(reference.kmeans_assign_reference, reference.kmeans_update_reference, x, centroids, k)),
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
    best = _interleaved_best_times(jobs, repeats, dev)
    result = KMeansBenchResult(device=str(dev), b=b, n=n, d=d, k=k, threads=threads, repeats=repeats,
                               machine=_machine(dev), torch_version=torch.__version__,
                               sgemm_gflops=peak_flops / best["gemm peak"] / 1e9,
                               shape_gemm_gflops=shape_flops / best["gemm shape"] / 1e9)
    for name, note, assign, _ in contenders:
        if assign is None:
            result.rows.append(Row(name, None, None, note))
        else:
            result.rows.append(Row(name, best[f"{name} assign"], best[f"{name} lloyd"], note))
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


# ---- loader ---------------------------------------------------------------------------------------

@dataclass
class LoaderRow:
    name: str
    workers: int
    clips: int
    seconds: float
    skipped: int = 0

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds


def _naive_clip(record: dict, plan, sample_rate: int, audio_seconds: float):
    """What a first attempt does: decode video and audio from the start of the file up to the clip."""
    import av

    wanted = set(plan.frame_indices)
    frames = []
    with av.open(record["path"]) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                frames.append(frame.to_ndarray(format="rgb24", width=plan.size[0], height=plan.size[1]))
            if index >= max(wanted):
                break
    end = plan.audio_start + audio_seconds
    audio = []
    with av.open(record["path"]) as container:
        if container.streams.audio:
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=sample_rate)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    audio.append(out.to_ndarray()[0])
                if frame.pts is not None and float(frame.pts * frame.time_base) > end:
                    break
    return frames, audio


def bench_loader(dataset: str | None = None, workers: tuple[int, ...] = (0, 2), clips: int = 48, seed: int = 0,
                 codec: str = "h264", progress: Callable[[str], None] | None = None) -> list[LoaderRow]:
    """Clips/s of each available backend and worker count, and of decoding from the file's start."""
    import tempfile

    from .data.clips import ClipConfig
    from .data.dataset import ClipDataset, collate_clips

    say = progress or (lambda _msg: None)
    config = ClipConfig(frames=16, stride=1, resize_short=128, crop=112)
    workdir = None
    if dataset is None:
        from .data.prepare import prepare
        from .data.synthetic import SyntheticSpec, make_synthetic_dataset

        workdir = tempfile.TemporaryDirectory(prefix="xdc-fast-loader-")
        say(f"writing a synthetic dataset ({codec}, 320x240, 10 s videos)")
        make_synthetic_dataset(f"{workdir.name}/media", SyntheticSpec(classes=4, videos_per_class=2, seconds=10.0,
                                                                      fps=25, width=320, height=240, seed=seed,
                                                                      codec=codec))
        prepare(f"{workdir.name}/media", f"{workdir.name}/dataset", workers=2, progress=False)
        dataset = f"{workdir.name}/dataset"
    try:
        data = ClipDataset(dataset, config, seed=seed)
        order = [i % len(data) for i in range(clips)]
        rows = []
        for count in workers:
            say(f"pyav backend, {count} worker(s)")
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, order), batch_size=8,
                                                 num_workers=count, collate_fn=collate_clips)
            t0 = time.perf_counter()
            skipped = sum(batch["skipped"] for batch in loader)
            rows.append(LoaderRow("pyav (seek + WAV window)", count, clips, time.perf_counter() - t0, skipped))
        say("naive baseline: decode from the start")
        t0 = time.perf_counter()
        for i in order:
            record, plan = data.plan(i)
            _naive_clip(record, plan, config.sample_rate, config.audio_seconds)
        rows.append(LoaderRow("naive (decode from start)", 0, clips, time.perf_counter() - t0))
        rows.append(_dali_row(data, order, say))
        return rows
    finally:
        if workdir is not None:
            workdir.cleanup()


def _dali_row(data, order: list[int], say) -> LoaderRow:
    from .data.dali_backend import DaliClipLoader, dali_available

    if not dali_available():
        return LoaderRow("dali: not installed (pip install nvidia-dali-cuda130)", 0, 0, float("nan"))
    if torch.cuda.is_available():
        device = "gpu"
    elif all(r["video_codec"] in ("vp8", "vp9", "mjpeg") for r in data.items):
        device = "cpu"
    else:
        return LoaderRow("dali: H.264 needs NVDEC on a GPU (DALI's CPU decoder reads VP8/VP9/MJPEG)", 0, 0,
                         float("nan"))
    say(f"dali backend on the {device}")
    loader = DaliClipLoader(data, 8, device=device, num_threads=2, indices=order)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return LoaderRow(f"dali ({'NVDEC + GPU' if device == 'gpu' else 'CPU graph'})", 2, len(order),
                     time.perf_counter() - t0)


def format_loader_table(rows: list[LoaderRow]) -> str:
    naive = next(r for r in rows if r.name.startswith("naive"))
    lines = ["| loader | workers | clips | clips/s | vs naive |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if not r.clips:
            lines.append(f"| {r.name} | – | – | – | – |")
            continue
        lines.append(f"| {r.name} | {r.workers} | {r.clips} | {r.clips_per_second:.1f} | "
                     f"{r.clips_per_second / naive.clips_per_second:.2f}x |")
    lines.append("")
    lines.append("Clips of 16 frames (stride 1) resized to a 128 short side and cropped to 112, plus 1 s of "
                 "audio as a log-mel; 'vs naive' is clips/s over the naive baseline's.")
    return "\n".join(lines)


# ---- training ---------------------------------------------------------------------------------------

@dataclass
class TrainRow:
    arch: str
    modality: str
    batch_size: int
    seconds_per_step: float

    @property
    def clips_per_second(self) -> float:
        return self.batch_size / self.seconds_per_step


def bench_train(device: str = "cpu", archs: tuple[str, ...] = ("tiny",), batch_size: int = 4, steps: int = 3,
                round_shares: bool = True, progress: Callable[[str], None] | None = None) -> tuple[list[TrainRow], dict]:
    """Clips/s of one SGD step (forward, backward, update) per encoder and arch on ``device``; and,
    from one tiny pretraining round on synthetic data, the share of a round each phase takes."""
    import tempfile

    from torch import nn

    from .data.clips import ClipConfig
    from .models import build_audio_encoder, build_video_encoder
    from .pretrain import PretrainConfig, pretrain

    say = progress or (lambda _msg: None)
    dev = torch.device(device)
    clip = ClipConfig()
    mel_frames = int(clip.audio_seconds * 1000 / clip.hop_ms) + 1
    rows = []
    for arch in archs:
        for modality in ("video", "audio"):
            say(f"{arch} {modality} encoder")
            encoder = (build_video_encoder(arch) if modality == "video" else build_audio_encoder(arch)).to(dev)
            head = nn.Linear(encoder.feature_dim, 256).to(dev)
            optimizer = torch.optim.SGD(list(encoder.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
            shape = (batch_size, 3, clip.frames, clip.crop, clip.crop) if modality == "video" else \
                (batch_size, 1, clip.n_mels, mel_frames)
            inputs = torch.randn(shape, device=dev)
            target = torch.randint(0, 256, (batch_size,), device=dev)

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    logits = head(encoder(inputs).float())
                loss = nn.functional.cross_entropy(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            best = _interleaved_best_times({"step": step}, steps, dev)["step"]
            rows.append(TrainRow(arch, modality, batch_size, best))
    shares = {}
    if round_shares:
        from .data.prepare import prepare
        from .data.synthetic import SyntheticSpec, make_synthetic_dataset

        say("one tiny pretraining round on synthetic data")
        with tempfile.TemporaryDirectory(prefix="xdc-fast-train-") as work:
            make_synthetic_dataset(f"{work}/media", SyntheticSpec(classes=4, videos_per_class=4, seconds=3.0))
            prepare(f"{work}/media", f"{work}/ds", workers=2, progress=False)
            (record,) = pretrain(f"{work}/ds", f"{work}/run", PretrainConfig(clusters=4, epochs=1, device=device),
                                 log=lambda *_: None)
        total = sum(record["seconds"].values())
        shares = {phase: seconds / total for phase, seconds in record["seconds"].items()}
    return rows, shares


def format_train_table(rows: list[TrainRow], shares: dict, device: str) -> str:
    lines = [f"training step on {device} (forward + backward + SGD, bf16 autocast on CUDA)", "",
             "| arch | encoder | batch | s/step | clips/s |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.arch} | {r.modality} | {r.batch_size} | {r.seconds_per_step:.3f} | {r.clips_per_second:.1f} |")
    if shares:
        lines += ["", "share of one tiny pretraining round: " +
                  ", ".join(f"{phase} {100 * share:.0f}%" for phase, share in shares.items())]
    return "\n".join(lines)
