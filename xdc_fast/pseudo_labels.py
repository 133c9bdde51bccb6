"""Pseudo-labels: one round's clustering of the features, the labels per video, the class-balanced
sampler, and how sure each assignment is. Which clusterings a round computes and which each encoder
learns is the variant's (:mod:`xdc_fast.variants`); what a round leaves on disk is :mod:`xdc_fast.rounds`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import distributed as xdist
from .ops import kmeans_assign
from .cluster import KMeans, apply_whitening, fit_whitening, nearest_other
from .errors import XdcError
from .seeds import seed_for
from .variants import Variant


# ---- one round's clustering ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusteringSpec:
    clusters: int  # k
    pca_dim: int  # 0: L2-normalisation only
    niter: int
    nredo: int
    clips_per_video: int
    max_points_per_centroid: int | None = None  # train on a sample of about k x this many clips; None: all
    balanced: bool = False  # labels from the balanced assignment (Sinkhorn) rather than the nearest centroid


# ---- the balanced assignment ------------------------------------------------------------------------------

SINKHORN_EPSILON = 0.05  # entropy weight against squared distances of L2-normalised points (range 0-4)
SINKHORN_ITERATIONS = 30


def _chunks_of(points, rows: int = 1 << 16):
    """Blocks of ``points``: a tensor, or a row file (``xdc_fast.features.RowFile``) read from disk."""
    if isinstance(points, torch.Tensor):
        for start in range(0, len(points), rows):
            yield points[start:start + rows].float()
    else:
        for _, block in points.chunks(rows):
            yield torch.from_numpy(block.astype(np.float32))


def _squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ centroids.T + centroids.pow(2).sum(1)[None]).clamp_min_(0)


def balanced_offsets(points, centroids: torch.Tensor, *, epsilon: float = SINKHORN_EPSILON,
                     iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """Per-centroid offsets ``o [K]`` such that labelling each clip ``argmin_j ||x - c_j||^2 + o_j`` splits
    every rank's clips (``points``: this rank's, a tensor or a row file) into clusters of about equal
    size while staying as near as it can to the centroids: the entropic optimal transport of the clips
    onto K equal shares, solved by Sinkhorn-Knopp's alternating scalings (SeLa, SwAV, SeLaVi).

    Only the K column scalings are kept: each pass normalises every clip's row exactly as it streams
    past and all-reduces the K column masses, so memory is one chunk whatever the number of clips, and
    the hard labels follow from the offsets alone (the assignment of new clips reproduces them)."""
    centroids = centroids.float()
    k = centroids.shape[0]
    total = float(xdist.all_reduce_sum(torch.tensor([_rows_of(points)], dtype=torch.float64))[0])
    log_scale = torch.zeros(k, dtype=torch.float64)
    for _ in range(iterations):
        mass = torch.zeros(k, dtype=torch.float64)
        for x in _chunks_of(points):
            logits = -_squared_distances(x, centroids).double() / epsilon + log_scale
            mass += torch.softmax(logits, dim=1).sum(0)
        mass = xdist.all_reduce_sum(mass)
        log_scale -= torch.log(mass.clamp_min(1e-300) * k / max(total, 1.0))
    return (-epsilon * (log_scale - log_scale.max())).float()


def offset_labels(points, centroids: torch.Tensor, offsets: torch.Tensor) -> np.ndarray:
    """Each clip's label under per-centroid ``offsets`` (see :func:`balanced_offsets`)."""
    centroids, offsets = centroids.float(), offsets.float()
    parts = [(_squared_distances(x, centroids) + offsets[None]).argmin(1) for x in _chunks_of(points)]
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.int64)


def _rows_of(points) -> int:
    return len(points) if isinstance(points, torch.Tensor) else points.rows


def balance_round(fit: "RoundFit") -> None:
    """Replace every clustering's labels of ``fit`` by the balanced assignment to its centroids, and keep
    the offsets in its transform (the round file stores them, so assigning new clips agrees)."""
    for name, transform in fit.transforms.items():
        offsets = balanced_offsets(fit.points[name], transform["centroids"])
        transform["offsets"] = offsets
        fit.labels[name] = offset_labels(fit.points[name], transform["centroids"], offsets)


class DatasetPermutationInit:
    """k-means init: the clips at the first k positions of a seeded permutation of the whole dataset's
    clips (``all_rows``, sorted global clip numbers), each contributed by the rank that holds it, so a
    sharded run starts (and ends) exactly as a single process would."""

    def __init__(self, rows_of_this_rank: np.ndarray, all_rows: np.ndarray, k: int):
        self.position = {int(g): i for i, g in enumerate(rows_of_this_rank)}
        self.all_rows, self.k = torch.from_numpy(np.asarray(all_rows, dtype=np.int64)), k

    def __call__(self, points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        chosen = self.all_rows[torch.randperm(len(self.all_rows), generator=generator)[: self.k]]
        init = torch.zeros(points.shape[0], self.k, points.shape[-1], device=points.device)
        for j, g in enumerate(chosen.tolist()):
            if g in self.position:
                init[:, j] = points[:, self.position[g]]
        return xdist.all_reduce_sum(init)


@dataclass
class RoundFit:
    """One round's clustering with what reproduces it on new data."""

    labels: dict[str, np.ndarray]  # clustering -> label of each of this rank's clips (``rows`` order)
    centroids: list[torch.Tensor]  # of each k-means call: [B, K, d]
    transforms: dict[str, dict]  # clustering -> {"inputs": modalities concatenated, "whitening", "centroids" [K, d]}
    points: dict[str, torch.Tensor]  # clustering -> this rank's clips after the transform, [n, d]


def fit_round(features: dict[str, np.ndarray], variant_: Variant, spec: ClusteringSpec, seed: int,
              round_index: int, rows: np.ndarray) -> RoundFit:
    """Labels of this rank's clips per clustering, the centroids of each k-means call, and what reproduces
    the round on new data: each clustering's whitening, centroids and whitened points. ``rows`` numbers
    the rank's clips across the dataset (``video * clips_per_video + clip``); a clip that failed to
    decode is simply absent, on whichever rank.

    Both modalities go through one batched k-means call (they have the same dimension after PCA); the
    concatenation, when the variant learns it, through a second one."""
    all_rows = np.sort(torch.cat(xdist.all_gather_tensors(torch.from_numpy(np.asarray(rows, dtype=np.int64)))).numpy())
    if len(all_rows) < spec.clusters:
        raise XdcError(f"only {len(all_rows)} clips decoded, fewer than the {spec.clusters} clusters asked for")
    init = DatasetPermutationInit(rows, all_rows, spec.clusters)

    def fit(points: torch.Tensor, which: int) -> KMeans:
        # Objectives are all-reduced inside KMeans, so every rank keeps the same restart of each problem.
        # The sample is drawn by the clips' global numbers: the same clips however the ranks share them.
        return KMeans(points.shape[-1], spec.clusters, niter=spec.niter, nredo=spec.nredo, init=init,
                      max_points_per_centroid=spec.max_points_per_centroid,
                      seed=seed_for(seed, "kmeans", round_index, which)).fit(points, ids=rows)

    names = list(variant_.modalities)
    stacked = torch.stack([torch.from_numpy(features[m]) for m in names])
    whitening = fit_whitening(stacked, spec.pca_dim)
    white = apply_whitening(stacked, whitening)
    fitted = [fit(white, 0)]
    labels = {m: fitted[0].labels[i].numpy() for i, m in enumerate(names)}
    transforms = {m: {"inputs": [m], "whitening": whitening.problem(i), "centroids": fitted[0].centroids[i]}
                  for i, m in enumerate(names)}
    points = {m: white[i] for i, m in enumerate(names)}
    if "concat" in variant_.clusterings:
        joined = torch.cat([torch.from_numpy(features[m]) for m in names], dim=1)
        joint_whitening = fit_whitening(joined, spec.pca_dim)
        joint = apply_whitening(joined, joint_whitening)
        fitted.append(fit(joint[None], 1))
        labels["concat"] = fitted[1].labels[0].numpy()
        transforms["concat"] = {"inputs": names, "whitening": joint_whitening, "centroids": fitted[1].centroids[0]}
        points["concat"] = joint
    round_fit = RoundFit(labels, [km.centroids for km in fitted], transforms, points)
    if spec.balanced:
        balance_round(round_fit)
    return round_fit


def fit_round_files(files: dict, variant_: Variant, spec: ClusteringSpec, seed: int, round_index: int,
                    rows: np.ndarray, folder) -> RoundFit:
    """:func:`fit_round` out of core: ``files`` hold this rank's raw features (one
    ``xdc_fast.features.RowFile`` per modality, ``rows`` order). Each whitening is fitted from all-reduced
    moments read chunk by chunk, the whitened points are written to float16 files under ``folder`` (the
    RoundFit's ``points``), and k-means trains on the seeded sample of about ``clusters x
    max_points_per_centroid`` clips and then assigns every clip in a stream. No pass holds more than the
    sample and one chunk; the planner (``xdc-fast plan``) counts these buffers."""
    from pathlib import Path

    from .features import fit_streamed, fit_whitening_files, whiten_files

    count = int(xdist.all_reduce_sum(torch.tensor([len(rows)], dtype=torch.long))[0])
    if count < spec.clusters:
        raise XdcError(f"only {count} clips decoded, fewer than the {spec.clusters} clusters asked for")
    folder = Path(folder)
    rank = xdist.rank()
    names = list(variant_.modalities)

    def fit(points: list, which: int):
        return fit_streamed(points, np.asarray(rows, dtype=np.int64), spec.clusters, niter=spec.niter, nredo=spec.nredo,
                            seed=seed_for(seed, "kmeans", round_index, which),
                            max_points_per_centroid=spec.max_points_per_centroid, init=DatasetPermutationInit)

    whitenings = {m: fit_whitening_files([files[m]], spec.pca_dim) for m in names}
    points = {m: whiten_files([files[m]], whitenings[m], folder / f"rank{rank}_{m}_white.npy") for m in names}
    if len({p.cols for p in points.values()}) != 1:
        raise XdcError(f"the encoders' whitened widths differ ({', '.join(str(p.cols) for p in points.values())}); "
                       "set pca_dim to at most the narrower encoder's width")
    fitted = [fit([points[m] for m in names], 0)]
    labels = {m: fitted[0].labels[i] for i, m in enumerate(names)}
    transforms = {m: {"inputs": [m], "whitening": whitenings[m], "centroids": fitted[0].centroids[i]}
                  for i, m in enumerate(names)}
    if "concat" in variant_.clusterings:
        joint_whitening = fit_whitening_files([files[m] for m in names], spec.pca_dim)
        points["concat"] = whiten_files([files[m] for m in names], joint_whitening,
                                        folder / f"rank{rank}_concat_white.npy")
        fitted.append(fit([points["concat"]], 1))
        labels["concat"] = fitted[1].labels[0]
        transforms["concat"] = {"inputs": names, "whitening": joint_whitening, "centroids": fitted[1].centroids[0]}
    round_fit = RoundFit(labels, [f.centroids for f in fitted], transforms, points)
    if spec.balanced:
        balance_round(round_fit)
    return round_fit


def video_labels(clip_labels: np.ndarray, clips_per_video: int) -> np.ndarray:
    """One label per video: the most frequent over its clips (the lowest on a tie), ignoring clips
    labelled -1 (not decoded); -1 for a video none of whose clips decoded."""
    per_video = np.asarray(clip_labels, dtype=np.int64).reshape(-1, clips_per_video)
    valid = per_video >= 0
    # How many of its video's decoded clips share each clip's label (clips_per_video is small: C^2 per video).
    votes = ((per_video[:, :, None] == per_video[:, None, :]) & valid[:, None, :]).sum(2)
    # Most votes first, then the lowest label; a clip that did not decode never wins.
    score = np.where(valid, votes * (int(per_video.max(initial=0)) + 2) - per_video, -1)
    best = np.take_along_axis(per_video, score.argmax(1)[:, None], 1)[:, 0]
    return np.where(valid.any(1), best, -1).astype(np.int64)


def gather_by_video(videos: np.ndarray, labels: dict[str, np.ndarray], num_videos: int, rows_per_video: int,
                    *, root_only: bool = False) -> dict | None:
    """Every rank's labels placed at their global positions (``rows_per_video`` rows per video). Each rank
    sends its own videos' rows as tensors; with ``root_only`` only rank 0 receives them (None elsewhere)."""
    gather = xdist.gather_tensors if root_only else xdist.all_gather_tensors
    got_videos = gather(torch.from_numpy(np.asarray(videos, dtype=np.int64)))
    got = {m: gather(torch.from_numpy(np.ascontiguousarray(v))) for m, v in labels.items()}
    if got_videos is None:
        return None
    full = {m: np.zeros(num_videos * rows_per_video, dtype=np.int64) for m in labels}
    for r, other_videos in enumerate(got_videos):
        rows = (other_videos.numpy()[:, None] * rows_per_video + np.arange(rows_per_video)).ravel()
        for m in labels:
            full[m][rows] = got[m][r].numpy()
    return full


def balanced_indices(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """DeepCluster's sampler: each draw picks a non-empty cluster uniformly, then one of its items
    (items labelled -1, whose clips did not decode, are never drawn)."""
    members = [np.flatnonzero(labels == c) for c in np.unique(labels) if c >= 0]
    if not members:
        raise XdcError("no video of this rank has a pseudo-label to train on (every fixed clip failed to decode)")
    which = rng.integers(0, len(members), size=count)
    return np.array([members[c][rng.integers(0, len(members[c]))] for c in which], dtype=np.int64)


def cluster_sizes(per_video: dict[str, np.ndarray], k: int = 0) -> dict:
    """Sizes, empty clusters and faiss's imbalance factor of each clustering."""
    out = {}
    for m, labels in per_video.items():
        sizes = np.bincount(labels[labels >= 0], minlength=k)
        out[m] = {"sizes": sizes.tolist(), "empty": int((sizes == 0).sum()),
                  "imbalance_factor": float(len(sizes) * (sizes**2).sum() / max(sizes.sum(), 1) ** 2)}
    return out


# ---- how sure each assignment is ---------------------------------------------------------------------

def assignment_measures(points: torch.Tensor, centroids: torch.Tensor, positions: np.ndarray, num_videos: int,
                        clips_per_video: int, clip_labels: np.ndarray | None = None,
                        offsets: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Labels, distances and margins of clips (``points [n, d]``, already transformed) against one
    clustering's ``centroids [K, d]``, per clip and per video. ``positions`` places each clip at
    ``video * clips_per_video + clip``; ``clip_labels`` are the labels when known (a round's own), else
    the nearest centroids are computed here (with a balanced round's ``offsets``, the labels that
    assignment gives: :func:`offset_labels`).

    Per clip: ``distance`` is the squared distance to its own centroid, ``margin`` the distance to the
    second-nearest minus that (0: a tie). Per video: the label is the mode of its clips' (as training
    uses), ``distance`` the mean over its clips of their squared distance to the video's centroid and
    ``margin`` the mean of (nearest other centroid - that distance), which is negative for a clip that
    prefers another cluster, so a video whose clips disagree counts as uncertain. Missing clips and
    videos are -1 (labels) and NaN."""
    points = points.float()
    centroids = centroids.to(points.device).float()
    if clip_labels is None and offsets is not None:
        labels = torch.from_numpy(offset_labels(points.cpu(), centroids.cpu(), offsets)).to(points.device)
    elif clip_labels is None:
        labels, _ = kmeans_assign(points, centroids)
    else:
        labels = torch.as_tensor(np.asarray(clip_labels), dtype=torch.long, device=points.device)
    positions = np.asarray(positions, dtype=np.int64)

    def spread(values, fill, dtype) -> np.ndarray:
        full = np.full(num_videos * clips_per_video, fill, dtype=dtype)
        full[positions] = values
        return full

    own = (points - centroids[labels]).pow(2).sum(1)
    _, second = nearest_other(points, centroids, labels)
    clip_label = spread(labels.cpu().numpy(), -1, np.int64)
    per_video = video_labels(clip_label, clips_per_video)
    # Each clip against its video's centroid: the same as against its own for the clips that agree.
    video_of_clip = torch.from_numpy(positions // clips_per_video).to(points.device)
    wanted = torch.from_numpy(per_video).to(points.device)[video_of_clip]
    to_video = (points - centroids[wanted]).pow(2).sum(1)
    other = second.clone()
    disagree = (wanted != labels).nonzero().flatten()
    if len(disagree):
        other[disagree] = nearest_other(points[disagree], centroids, wanted[disagree])[1]
    sums = np.zeros((2, num_videos))
    counts = np.bincount(positions // clips_per_video, minlength=num_videos)
    np.add.at(sums[0], positions // clips_per_video, to_video.double().cpu().numpy())
    np.add.at(sums[1], positions // clips_per_video, (other - to_video).double().cpu().numpy())
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (sums / counts).astype(np.float32)
    return {"clip_labels": clip_label, "clip_distance": spread(own.cpu().numpy(), np.nan, np.float32),
            "clip_margin": spread((second - own).clamp_min(0).cpu().numpy(), np.nan, np.float32),
            "video_labels": per_video, "video_distance": means[0], "video_margin": means[1]}


def _measures_in_chunks(points, centroids: torch.Tensor, positions: np.ndarray, num_videos: int,
                        clips_per_video: int, clip_labels: np.ndarray, chunk_rows: int | None = None) -> dict:
    """:func:`assignment_measures` of points in a row file (``xdc_fast.features.RowFile``), read a chunk
    of whole videos at a time: a video's measures need all its clips, which lie next to each other."""
    from .features import CHUNK_ROWS

    chunk_rows = chunk_rows or CHUNK_ROWS
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) > 1 and not (np.diff(positions) > 0).all():
        raise ValueError("_measures_in_chunks: the clips should be in position order")
    if not len(positions):  # a rank none of whose clips decoded
        return assignment_measures(torch.zeros(0, points.cols), centroids, positions, num_videos, clips_per_video,
                                   np.asarray(clip_labels))
    video = positions // clips_per_video
    out: dict[str, np.ndarray] = {}
    start = 0
    while start < len(positions):
        stop = min(start + chunk_rows, len(positions))
        if stop < len(positions):  # end the chunk where a video ends
            stop = max(int(np.searchsorted(video, video[stop], side="left")), start + 1)
            stop = int(np.searchsorted(video, video[stop - 1], side="right"))
        first, last = int(video[start]), int(video[stop - 1])
        part = assignment_measures(torch.from_numpy(points.read(start, stop).astype(np.float32)), centroids,
                                   positions[start:stop] - first * clips_per_video, last - first + 1, clips_per_video,
                                   np.asarray(clip_labels)[start:stop])
        for key, value in part.items():
            width = clips_per_video if key.startswith("clip_") else 1
            if key not in out:
                out[key] = np.full(num_videos * width, -1 if value.dtype.kind == "i" else np.nan, dtype=value.dtype)
            out[key][first * width:(last + 1) * width] = value
        start = stop
    return out


def round_measures(fit: RoundFit, rows: np.ndarray, num_videos: int, clips_per_video: int) -> dict[str, dict] | None:
    """:func:`assignment_measures` of every clustering of a round, over every rank's clips: each rank
    measures its own whole videos, and rank 0 receives them as tensors of each rank's own videos (None on
    the other ranks)."""
    rows = np.asarray(rows, dtype=np.int64)
    videos = np.unique(rows // clips_per_video)  # this rank's videos with a decoded clip
    local = np.searchsorted(videos, rows // clips_per_video) * clips_per_video + rows % clips_per_video
    measure = lambda points, *args: (assignment_measures(points, *args) if isinstance(points, torch.Tensor)  # noqa: E731
                                     else _measures_in_chunks(points, *args))
    mine = {name: measure(fit.points[name], transform["centroids"], local, len(videos), clips_per_video,
                          fit.labels[name])
            for name, transform in fit.transforms.items()}
    got_videos = xdist.gather_tensors(torch.from_numpy(videos))
    got = {name: {key: xdist.gather_tensors(torch.from_numpy(value)) for key, value in values.items()}
           for name, values in mine.items()}
    if got_videos is None:
        return None
    merged = {}
    for name, values in mine.items():
        merged[name] = {}
        for key, value in values.items():
            per_clip = key.startswith("clip_")
            width = clips_per_video if per_clip else 1
            full = np.full(num_videos * width, -1 if value.dtype.kind == "i" else np.nan, dtype=value.dtype)
            for r, other_videos in enumerate(got_videos):
                at = (other_videos.numpy()[:, None] * width + np.arange(width)).ravel()
                full[at] = got[name][key][r].numpy()
            merged[name][key] = full
    return merged
