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
from .ops import kmeans_assign
from .cluster import KMeans, Whitening, apply_whitening, fit_whitening, nearest_other
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


@dataclass
class RoundFit:
    """One round's clustering with what reproduces it on new data."""

    labels: dict[str, np.ndarray]  # clustering -> label of each of this rank's clips (``rows`` order)
    centroids: list[torch.Tensor]  # of each k-means call: [B, K, d]
    transforms: dict[str, dict]  # clustering -> {"inputs": modalities concatenated, "whitening", "centroids" [K, d]}
    points: dict[str, torch.Tensor]  # clustering -> this rank's clips after the transform, [n, d]


def cluster_round(features: dict[str, np.ndarray], variant_: Variant, spec: ClusteringSpec, seed: int,
                  round_index: int, rows: np.ndarray) -> tuple[dict[str, np.ndarray], list[torch.Tensor]]:
    """Labels of this rank's clips per clustering, and the centroids of each k-means call. ``rows`` numbers
    the rank's clips across the dataset (``video * clips_per_video + clip``); a clip that failed to
    decode is simply absent, on whichever rank. :func:`fit_round` also keeps the transforms."""
    fit = fit_round(features, variant_, spec, seed, round_index, rows)
    return fit.labels, fit.centroids


def fit_round(features: dict[str, np.ndarray], variant_: Variant, spec: ClusteringSpec, seed: int,
              round_index: int, rows: np.ndarray) -> RoundFit:
    """:func:`cluster_round`, keeping each clustering's whitening, centroids and whitened points.

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
    return RoundFit(labels, [km.centroids for km in fitted], transforms, points)


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


# ---- how sure each assignment is ---------------------------------------------------------------------

def assignment_measures(points: torch.Tensor, centroids: torch.Tensor, positions: np.ndarray, num_videos: int,
                        clips_per_video: int, clip_labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Labels, distances and margins of clips (``points [n, d]``, already transformed) against one
    clustering's ``centroids [K, d]``, per clip and per video. ``positions`` places each clip at
    ``video * clips_per_video + clip``; ``clip_labels`` are the labels when known (a round's own), else
    the nearest centroids are computed here.

    Per clip: ``distance`` is the squared distance to its own centroid, ``margin`` the distance to the
    second-nearest minus that (0: a tie). Per video: the label is the mode of its clips' (as training
    uses), ``distance`` the mean over its clips of their squared distance to the video's centroid and
    ``margin`` the mean of (nearest other centroid - that distance), which is negative for a clip that
    prefers another cluster, so a video whose clips disagree counts as uncertain. Missing clips and
    videos are -1 (labels) and NaN."""
    points = points.float()
    centroids = centroids.to(points.device).float()
    if clip_labels is None:
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


def round_measures(fit: RoundFit, rows: np.ndarray, num_videos: int, clips_per_video: int) -> dict[str, dict]:
    """:func:`assignment_measures` of every clustering of a round, over every rank's clips (each rank
    measures its own whole videos; the results are merged)."""
    mine = {name: assignment_measures(fit.points[name], transform["centroids"], rows, num_videos, clips_per_video,
                                      fit.labels[name])
            for name, transform in fit.transforms.items()}
    everyone = xdist.all_gather_objects(mine)
    merged = {}
    for name in mine:
        merged[name] = {}
        for key in mine[name]:
            parts = [other[name][key] for other in everyone]
            combined = parts[0].copy()
            for part in parts[1:]:  # ranks hold disjoint videos; the others' entries are -1 or NaN there
                taken = part >= 0 if part.dtype.kind == "i" else ~np.isnan(part)
                combined[taken] = part[taken]
            merged[name][key] = combined
    return merged


def encoder_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values: which weights produced some features."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- saved assignments -------------------------------------------------------------------------------

# Version 2 of RUN/clusters/round_NNN.pt adds what reproduces the round on new data (see save_round).
ROUND_FORMAT = 2


def save_round(path: Path, ids: list[str], clips_per_video: int, centroids: list[torch.Tensor],
               clip_labels: dict[str, np.ndarray], per_video: dict[str, np.ndarray], *,
               description: dict | None = None) -> None:
    """``RUN/clusters/round_NNN.pt``: ids, every clip's and every video's label per clustering, centroids,
    and, with ``description`` (from :func:`describe_round`), what reproduces the clustering on new data."""
    save_atomic({"ids": ids, "clips_per_video": clips_per_video, "centroids": centroids,
                 **{f"{m}_clip_labels": torch.from_numpy(v) for m, v in clip_labels.items()},
                 **{f"{m}_video_labels": torch.from_numpy(v) for m, v in per_video.items()},
                 **(description or {})}, path)


def encoders_file_of_round(round_index: int) -> str:
    """The checkpoint (relative to RUN) holding the encoders whose features round ``round_index``
    clustered: those of the start of the round, which are the end of the round before (the initial
    encoders, ``checkpoints/init.pt``, for round 0)."""
    return "checkpoints/init.pt" if round_index == 0 else f"checkpoints/round_{round_index - 1:03d}.pt"


def describe_round(fit: RoundFit, measures: dict[str, dict], *, variant_name: str, round_index: int, clip: dict,
                   pca_dim: int, fingerprint: str) -> dict:
    """The entries of a round file beyond its labels: per clustering the modalities it concatenates, the
    whitening (mean, projection, eps; None where ``pca_dim`` is 0: L2 only) and centroids; every clip's
    and video's distance and margin; the clip geometry; and which encoder weights gave the features."""
    return {"format": ROUND_FORMAT, "round": round_index, "variant": variant_name, "clip": dict(clip),
            "pca_dim": pca_dim, "encoders": encoders_file_of_round(round_index), "encoders_sha256": fingerprint,
            "clusterings": {name: {"inputs": list(t["inputs"]), **t["whitening"].to_dict(),
                                   "centroids": t["centroids"].detach().cpu()}
                            for name, t in fit.transforms.items()},
            **{f"{name}_{key}": torch.from_numpy(value) for name, values in measures.items()
               for key, value in values.items() if key in ("clip_distance", "clip_margin", "video_distance",
                                                           "video_margin")}}


@dataclass
class SavedRound:
    """A round file read back: labels, measures and transforms per clustering."""

    path: Path
    round: int
    ids: list[str]
    clips_per_video: int
    variant: str
    clip: dict
    encoders: str  # relative to the run
    encoders_sha256: str
    clusterings: dict[str, dict]  # name -> inputs, whitening (a Whitening), centroids
    saved: dict[str, dict[str, np.ndarray]]  # name -> clip_labels, video_labels, distances, margins

    @property
    def k(self) -> int:
        return int(next(iter(self.clusterings.values()))["centroids"].shape[0])


def round_path(run: str | Path, round_index: int | None = None) -> Path:
    """RUN/clusters/round_NNN.pt, the last one when ``round_index`` is None; an XdcError saying what exists
    when it is not there."""
    folder = Path(run) / "clusters"
    found = sorted(int(p.stem[len("round_"):]) for p in folder.glob("round_*.pt") if p.stem[len("round_"):].isdigit())
    if round_index is None:
        if not found:
            raise XdcError(f"{folder} holds no round_NNN.pt: {run} is not a pretraining run that clustered "
                           "(a run with --labels-from clusters nothing)")
        round_index = found[-1]
    path = folder / f"round_{round_index:03d}.pt"
    if not path.is_file():
        rounds = f"rounds {found[0]}..{found[-1]}" if found else "no round"
        raise XdcError(f"{path} does not exist ({run} has {rounds})")
    return path


def run_dataset(run: str | Path) -> Path:
    """The dataset a run trained on, as its config.yaml records it."""
    import yaml

    config = Path(run) / "config.yaml"
    dataset = (yaml.safe_load(config.read_text()) or {}).get("dataset") if config.is_file() else None
    if dataset is None:
        raise XdcError(f"{config} names no dataset; pass the run's dataset with --data")
    return Path(dataset)


def load_round(path: str | Path) -> SavedRound:
    """A round file with its transforms; an XdcError naming the file when it is not one, or when it was
    written before rounds kept their transforms (such a run can be labelled by training only)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ids = list(state["ids"])
    except Exception as error:  # noqa: BLE001 - any unreadable or foreign file gets the same clear message
        raise XdcError(f"{path} is not a round's assignments (RUN/clusters/round_NNN.pt): "
                       f"{type(error).__name__}: {error}") from None
    if "clusterings" not in state:
        raise XdcError(f"{path} holds no PCA-whitening transforms or centroids per clustering (it was written by an "
                       "older xdc-fast), so new data cannot be mapped to its clusters; pretrain again with this "
                       "version to get them")
    saved = {}
    for name in state["clusterings"]:
        saved[name] = {key: state[f"{name}_{key}"].numpy() for key in ("clip_labels", "video_labels", "clip_distance",
                                                                      "clip_margin", "video_distance", "video_margin")}
    clusterings = {name: {"inputs": list(c["inputs"]), "whitening": Whitening.from_dict(c),
                          "centroids": c["centroids"]} for name, c in state["clusterings"].items()}
    return SavedRound(path, int(state["round"]), ids, int(state["clips_per_video"]), state["variant"],
                      dict(state["clip"]), state["encoders"], state["encoders_sha256"], clusterings, saved)


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


# ---- mapping new clips to a saved round ---------------------------------------------------------------

def round_encoders(run: str | Path, saved: SavedRound) -> tuple[torch.nn.ModuleDict, dict]:
    """The encoders whose features ``saved`` clustered (see :func:`encoders_file_of_round`), checked
    against the fingerprint the round recorded, and the run's configuration."""
    from .checkpoint import build_encoder, checkpoint_arch, load_state, own_encoder_state, read_checkpoint

    path = Path(run) / saved.encoders
    if not path.is_file():
        raise XdcError(f"{path} does not exist: round {saved.round} clustered the features of the encoders saved "
                       "there, and without them new videos cannot be mapped to its clusters")
    state = read_checkpoint(path)
    if "encoders" not in state or encoder_fingerprint(state["encoders"]) != saved.encoders_sha256:
        raise XdcError(f"{path} does not hold the encoder weights round {saved.round} clustered with (its "
                       f"fingerprint differs from the one in {saved.path}); was it overwritten?")
    config = state.get("config", {})
    modalities = [m for m in ("video", "audio") if any(m in c["inputs"] for c in saved.clusterings.values())]
    encoders = torch.nn.ModuleDict({m: build_encoder(m, checkpoint_arch(state, path)) for m in modalities})
    for m in modalities:
        load_state(encoders[m], own_encoder_state(state, m, path), path)
    return encoders, config


def check_dataset_fits_round(items: list[dict], saved: SavedRound, modalities: tuple[str, ...], dataset) -> None:
    """A dataset whose clips would not be the clips the round's encoders saw is refused before encoding:
    missing modalities, or audio prepared at another sample rate than the run's clips (every window would
    fail to read)."""
    from .data.splits import DatasetError, check_sample_rate

    if "audio" in modalities:
        silent = [r["id"] for r in items if not r.get("has_audio")]
        if silent:
            raise DatasetError(f"round {saved.round} clusters audio, but {len(silent)} item(s) of {dataset} have no "
                               f"audio track (e.g. {silent[0]})")
        check_sample_rate(items, saved.clip.get("sample_rate"), dataset)
    if "video" in modalities and any(r.get("fps") is None for r in items):
        raise DatasetError(f"round {saved.round} clusters video, but {dataset} holds audio-only items")


def measure_dataset(saved: SavedRound, encoders: torch.nn.ModuleDict, run_config: dict, dataset: str | Path,
                    device: torch.device, *, batch_size: int | None = None, loader: str = "auto", workers: int = 0,
                    description: str | None = "encoding") -> tuple[list[dict], dict[str, dict]]:
    """Encode every item of ``dataset`` with the round's encoders (from :func:`round_encoders`;
    ``clips_per_video`` uniformly spaced clips each, the run's geometry), transform the features as the
    round did and measure them against its centroids: the manifest's items and
    :func:`assignment_measures` per clustering. Encoding is shared out across ranks under torchrun;
    every rank gets the whole result."""
    from .data.clips import CLIP_FIELDS, ClipConfig
    from .data.dataset import ClipDataset
    from .data.prepare import load_manifest
    from .engine import encode_clips

    encoders.to(device)
    items = load_manifest(dataset)
    modalities = tuple(encoders)
    check_dataset_fits_round(items, saved, modalities, dataset)
    cpv = saved.clips_per_video
    clip = ClipConfig(**{k: v for k, v in saved.clip.items() if k in CLIP_FIELDS}, eval_clips=cpv)
    clips = ClipDataset(dataset, clip, train=False, modalities=modalities)
    features, positions = encode_clips(encoders, clips, batch_size or run_config.get("batch_size", 8), device,
                                       workers=workers, loader=loader, description=description)
    measured = {}
    for name, clustering in saved.clusterings.items():
        joined = torch.cat([torch.from_numpy(features[m]) for m in clustering["inputs"]], dim=1).to(device)
        points = apply_whitening(joined, clustering["whitening"])
        measured[name] = assignment_measures(points, clustering["centroids"], positions, len(items), cpv)
    return items, measured
