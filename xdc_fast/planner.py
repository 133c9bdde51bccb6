"""What one clustering round costs before it runs: memory per rank, disk, collectives and k-means work.

The figures follow the round as :mod:`xdc_fast.features` runs it: each rank writes its clips' raw
features (float32) to disk, PCA-whitens them into float16 files, trains k-means on a sample of about
``k * max_points_per_centroid`` points of all ranks (held as float32) and assigns every clip in chunks;
labels, distances and margins (16 B per clip and clustering) stay in memory, per-video labels of every
video are gathered on every rank, and rank 0 gathers every clip's measures for the round file.

Measured inputs (the rest is counting bytes): the process's own resident memory at the time of planning
(``baseline``: the interpreter, torch and the run's manifest), and the assignment rate, in FLOP/s, of the
fused kernels: 35e12 on an H200 (1M x 256 at k = 1024, benchmarks/results/kmeans_h200.md) and 5.4e11
on a 2-core CPU (200k x 256 at k = 1024).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from .cluster import MAX_POINTS_PER_CENTROID
from .errors import XdcError
from .features import CHUNK_ROWS, RAW_CHUNK_ROWS
from .models.archs import ARCHS

# Encoder output width per architecture (the feature size before PCA).
FEATURE_DIM = {name: arch.feature_dim for name, arch in ARCHS.items()}
# Assignment FLOP/s of the fused kernels, measured (see the module docstring).
ASSIGN_RATE = {"cpu": 5.4e11, "cuda": 35e12}


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_bytes() -> int | None:
    """Memory the machine can still give (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


@dataclass
class Plan:
    """One round's costs; bytes unless named otherwise."""

    clips: int  # clustered, all ranks
    clips_per_rank: int
    clusterings: int
    width: int  # the points' dimension after PCA (the raw width when pca_dim is 0)
    sample: int  # points k-means trains on, all ranks
    features_disk_per_rank: int  # raw float32 + whitened float16 files
    features_memory_per_rank: int  # the training sample (float32) and the chunk buffers
    labels_memory_per_rank: int  # clip labels, distances, margins of the rank's clips + every video's labels
    centroids_memory: int
    round_file_memory_rank0: int  # every clip's measures gathered on rank 0 for the round file
    collectives_per_rank: int  # received per round: per-video labels, centroid sums each iteration
    baseline: int  # the process before the round (measured)
    peak_per_rank: int  # baseline + the round's own (rank 0's, the largest)
    peak_per_node: int
    round_file_disk: int
    kmeans_flop_per_iter: int  # on the sample, all ranks
    assign_flop: int  # the streamed assignment with margins, all ranks
    seconds_per_round: float  # k-means iterations + the streamed assignment at ASSIGN_RATE, per rank
    ranks_on_node: int

    def lines(self) -> list[str]:
        g = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        return [
            f"plan: {self.clips:,} clips ({self.clips_per_rank:,} per rank), {self.clusterings} clustering(s) "
            f"of width {self.width}, k-means trained on {self.sample:,} points",
            f"  per rank: features {g(self.features_memory_per_rank)} in memory, {g(self.features_disk_per_rank)} "
            f"on disk; labels {g(self.labels_memory_per_rank)}; centroids {g(self.centroids_memory)}; "
            f"collectives {g(self.collectives_per_rank)} received",
            f"  rank 0 also gathers the round file: {g(self.round_file_memory_rank0)} in memory, "
            f"{g(self.round_file_disk)} on disk",
            f"  peak memory: {g(self.peak_per_rank)} per rank (process before the round {g(self.baseline)}, "
            f"measured), {g(self.peak_per_node)} per node",
            f"  k-means: {self.kmeans_flop_per_iter / 1e12:.3g} TFLOP per iteration, assignment "
            f"{self.assign_flop / 1e12:.3g} TFLOP; about {self.seconds_per_round:.3g} s of clustering per round",
        ]

    def to_json(self) -> dict:
        return asdict(self)


def plan_round(videos: int, clips_per_video: int, world: int, *, arch: str = "r2plus1d_18", pca_dim: int = 256,
               clusters: int = 1024, niter: int = 20, modalities: int = 2, concat: bool = False,
               max_points_per_centroid: int | None = MAX_POINTS_PER_CENTROID, ranks_per_node: int = 8,
               device: str = "cuda", baseline: int | None = None, streamed: bool = True) -> Plan:
    """The costs of one round of ``videos x clips_per_video`` clips on ``world`` ranks (see the module).

    ``streamed`` False prices the round as ``pretrain`` runs it today: each rank holds its clips' raw
    features (float32, as extracted, and the copy stacked for the batched whitening) and their whitened
    points (float32, and the copy the whitening computes them in) in memory, and only the k-means
    training is sampled."""
    if min(videos, clips_per_video, world, clusters, modalities, ranks_per_node) < 1:
        raise XdcError("plan: videos, clips per video, world, clusters and ranks per node should all be at least 1")
    if arch not in FEATURE_DIM:
        raise XdcError(f"plan: unknown arch {arch!r}; choose one of {', '.join(FEATURE_DIM)}")
    raw = FEATURE_DIM[arch]
    width = min(pca_dim, raw) if pca_dim else raw
    clips = videos * clips_per_video
    per_rank = math.ceil(videos / world) * clips_per_video
    clusterings = modalities + (1 if concat else 0)
    cap = clips if max_points_per_centroid is None else min(clips, clusters * max_points_per_centroid)
    concat_width = (min(pca_dim, raw * modalities) if pca_dim else raw * modalities) if concat else 0
    widths = [width] * modalities + ([concat_width] if concat else [])

    disk = per_rank * (raw * 4 * modalities + 2 * sum(widths))
    passes = round_passes(per_rank, math.ceil(cap / world), widths, raw * modalities)
    if not streamed:
        passes = {"in_memory": per_rank * (raw * modalities * 4 * 2 + sum(widths) * 4 * 2) + passes["fit"]}
        disk = 0
    labels_memory = per_rank * 16 * clusterings + videos * 8 * clusterings * 2
    centroids = clusters * sum(widths) * 4 * 3
    round_file = clips * 16 * clusterings + videos * 16 * clusterings
    collectives = videos * 8 * clusterings + niter * clusters * (max(widths) + 1) * 8 * clusterings
    baseline = resident_bytes() if baseline is None else baseline
    peak = baseline + max(passes.values()) + labels_memory + centroids + round_file
    node = peak + (min(world, ranks_per_node) - 1) * (peak - round_file)
    kmeans_flop = 2 * cap * clusters * sum(widths)
    assign_flop = 2 * 2 * clips * clusters * sum(widths)
    seconds = (niter * kmeans_flop + assign_flop) / world / ASSIGN_RATE[device]
    return Plan(clips, per_rank, clusterings, width, cap, disk, max(passes.values()), labels_memory, centroids,
                round_file, collectives, baseline, peak, node, round_file, kmeans_flop, assign_flop, seconds,
                min(world, ranks_per_node))


def round_passes(points_per_rank: int, sample_per_rank: int, widths: list[int], raw_width: int = 0,
                 chunk_rows: int = CHUNK_ROWS) -> dict[str, int]:
    """Working memory of each pass over a rank's files, which run one after another (so a round needs
    the largest), counted from the buffers :mod:`xdc_fast.features` allocates:

    - ``whiten``: a chunk of raw rows read (4 B per value), joined (4 B), widened to float64 for the
      moments (8 B); then whitened: the centred copy, the projection, its normalisation (4 B per output
      value each) and its float16 copy written (2 + 2 B).
    - ``fit``: the sample as float32 with its labels (8 B) and distances (4 B) per point and problem, the
      initialisation's index of the sampled ids (a Python dict, about 100 B a point), one float16 chunk
      read to pick sample rows from, and the hashes that drew the sample (32 B per point of the rank):
      freed before the sample is read, but kept by the C allocator's heap (measured: without them the
      plan fell 5-8% short of the peak at 10^6 points per rank).
    - ``assign``: one float16 chunk, its float32 copy, the margin pass's copy of the rows of each
      excluded centroid (4 B per value), and labels, distances and margins of the chunk (about 40 B a row).
    """
    widest = max(widths)
    return {"whiten": RAW_CHUNK_ROWS * (raw_width * 16 + widest * 16) if raw_width else 0,
            "fit": sample_per_rank * (sum(w * 4 + 12 for w in widths) + 100) + chunk_rows * widest * 2
            + points_per_rank * 32,
            "assign": chunk_rows * (widest * 10 + 40)}


def check_fits(plan: Plan, available: int | None = None) -> None:
    """Refuse a round whose memory beyond what the node's ranks already hold exceeds the machine's
    available memory (that memory is already counted as used)."""
    available = available_bytes() if available is None else available
    more = plan.peak_per_node - plan.ranks_on_node * plan.baseline
    if available is not None and more > available:
        raise XdcError(f"a clustering round needs about {more / 2**30:.1f} GiB more per node (see the plan above), "
                       f"more than the {available / 2**30:.1f} GiB available; keep the features on disk "
                       "(--round-features disk, if not already), lower clips_per_video (or "
                       "kmeans_max_points_per_centroid), or run on more nodes")


__all__ = ["Plan", "plan_round", "round_passes", "check_fits", "resident_bytes", "available_bytes", "FEATURE_DIM", "ASSIGN_RATE"]
