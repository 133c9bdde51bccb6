"""Pseudo-labels: which clusters each encoder learns (the variants), one round's clustering, the
class-balanced sampler, and the assignments saved for ``--labels-from``.

The variants of the XDC paper differ only in which clustering each encoder's heads learn; the table
below is that difference, as data. The CLI's choices, the modalities a run needs and the docstring
table are all read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as xdist
from .cluster import KMeans, pca_whiten
from .errors import XdcError
from .files import save_atomic
from .seeds import seed_for


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    learns: dict[str, tuple[str, ...]]  # encoder -> the clusterings its heads learn, one head each

    @property
    def modalities(self) -> tuple[str, ...]:
        """Encoders the variant trains (and whose features it clusters), video first."""
        return tuple(m for m in ("video", "audio") if m in self.learns)

    @property
    def clusterings(self) -> tuple[str, ...]:
        """Clusterings one round computes: each trained modality's, and the concatenation when learnt."""
        wanted = {c for sources in self.learns.values() for c in sources}
        return self.modalities + (("concat",) if "concat" in wanted else ())

    def targets(self, labels: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        """Each encoder's targets, one array per head, from the round's labels per clustering."""
        return {m: [labels[c] for c in sources] for m, sources in self.learns.items()}


VARIANTS = {v.name: v for v in (
    Variant("xdc", "video learns the audio clusters, audio learns the video clusters",
            {"video": ("audio",), "audio": ("video",)}),
    Variant("mdc", "each encoder has two heads: its own modality's clusters and the other's",
            {"video": ("video", "audio"), "audio": ("audio", "video")}),
    Variant("cdc", "both learn the clusters of the concatenated features [f_v ; f_a]",
            {"video": ("concat",), "audio": ("concat",)}),
    Variant("sdc-video", "the video encoder learns its own clusters", {"video": ("video",)}),
    Variant("sdc-audio", "the audio encoder learns its own clusters", {"audio": ("audio",)}),
)}

__doc__ += "\n".join(f"    {v.name:<10} {v.summary}" for v in VARIANTS.values()) + "\n"


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise XdcError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


# ---- one round's clustering ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusteringSpec:
    clusters: int  # k
    pca_dim: int  # 0: L2-normalisation only
    niter: int
    nredo: int
    clips_per_video: int


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


def cluster_round(features: dict[str, np.ndarray], variant_: Variant, spec: ClusteringSpec, seed: int,
                  round_index: int, rows: np.ndarray) -> tuple[dict[str, np.ndarray], list[torch.Tensor]]:
    """Labels of this rank's clips per clustering, and the centroids of each k-means call. ``rows`` numbers
    the rank's clips across the dataset (``video * clips_per_video + clip``); a clip that failed to
    decode is simply absent, on whichever rank.

    Both modalities go through one batched k-means call (they have the same dimension after PCA); the
    concatenation, when the variant learns it, through a second one."""
    all_rows = np.sort(np.concatenate(xdist.all_gather_objects(np.asarray(rows, dtype=np.int64))))
    if len(all_rows) < spec.clusters:
        raise XdcError(f"only {len(all_rows)} clips decoded, fewer than the {spec.clusters} clusters asked for")
    init = DatasetPermutationInit(rows, all_rows, spec.clusters)

    def fit(points: torch.Tensor, which: int) -> KMeans:
        # Objectives are all-reduced inside KMeans, so every rank keeps the same restart of each problem.
        return KMeans(points.shape[-1], spec.clusters, niter=spec.niter, nredo=spec.nredo, init=init,
                      seed=seed_for(seed, "kmeans", round_index, which)).fit(points)

    names = list(variant_.modalities)
    white = pca_whiten(torch.stack([torch.from_numpy(features[m]) for m in names]), spec.pca_dim)
    fitted = [fit(white, 0)]
    labels = {m: fitted[0].labels[i].numpy() for i, m in enumerate(names)}
    if "concat" in variant_.clusterings:
        joint = pca_whiten(torch.cat([torch.from_numpy(features[m]) for m in names], dim=1), spec.pca_dim)
        fitted.append(fit(joint[None], 1))
        labels["concat"] = fitted[1].labels[0].numpy()
    return labels, [km.centroids for km in fitted]


def video_labels(clip_labels: np.ndarray, clips_per_video: int) -> np.ndarray:
    """One label per video: the most frequent over its clips (the lowest on a tie), ignoring clips
    labelled -1 (not decoded); -1 for a video none of whose clips decoded."""
    per_video = clip_labels.reshape(-1, clips_per_video)
    return np.array([np.bincount(row[row >= 0]).argmax() if (row >= 0).any() else -1 for row in per_video],
                    dtype=np.int64)


def gather_by_video(videos: np.ndarray, labels: dict[str, np.ndarray], num_videos: int, rows_per_video: int) -> dict:
    """Every rank's labels placed at their global positions (``rows_per_video`` rows per video)."""
    full = {m: np.zeros(num_videos * rows_per_video, dtype=np.int64) for m in labels}
    for other_videos, other in xdist.all_gather_objects((videos, labels)):
        rows = (np.asarray(other_videos)[:, None] * rows_per_video + np.arange(rows_per_video)).ravel()
        for m, v in other.items():
            full[m][rows] = v
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


# ---- saved assignments -------------------------------------------------------------------------------

def save_round(path: Path, ids: list[str], clips_per_video: int, centroids: list[torch.Tensor],
               clip_labels: dict[str, np.ndarray], per_video: dict[str, np.ndarray]) -> None:
    """``RUN/clusters/round_NNN.pt``: ids, every clip's and every video's label per clustering, centroids."""
    save_atomic({"ids": ids, "clips_per_video": clips_per_video, "centroids": centroids,
                 **{f"{m}_clip_labels": torch.from_numpy(v) for m, v in clip_labels.items()},
                 **{f"{m}_video_labels": torch.from_numpy(v) for m, v in per_video.items()}}, path)


def load_saved_labels(path: str | Path, ids: list[str]) -> dict[str, np.ndarray]:
    """Per-video assignments saved by a round, reordered to ``ids``; every id must be there."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        position = {item: i for i, item in enumerate(saved["ids"])}
    except Exception as error:  # noqa: BLE001 - any unreadable or foreign file gets the same clear message
        raise XdcError(f"--labels-from {path} is not a round's assignments (RUN/clusters/round_NNN.pt): "
                       f"{type(error).__name__}: {error}") from None
    missing = [item for item in ids if item not in position]
    if missing:
        raise XdcError(f"{path} has no assignment for {len(missing)} item(s) of this dataset (e.g. {missing[0]})")
    order = np.array([position[item] for item in ids])
    return {key[: -len("_video_labels")]: value.numpy()[order] for key, value in saved.items()
            if key.endswith("_video_labels")}
