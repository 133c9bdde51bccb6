"""The run folder: where a pretraining run keeps its checkpoints and rounds, and the round file itself.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (``init.pt``, ``round_NNN.pt``,
``last.pt``) and ``clusters/round_NNN.pt``; the helpers below are the only place those names are spelt.
A round file (:class:`RoundFile`) keeps every clip's and video's label per clustering, the centroids
and, since format 2, what maps new clips to its clusters: each clustering's inputs, whitening and
centroids, the clip geometry, and the fingerprint of the encoders whose features it clustered.
``report``, ``browse``, ``assign`` and ``export`` read rounds through this module, and
``pretrain --labels-from`` takes its targets from one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cluster import Whitening, apply_whitening
from .errors import DatasetError, RoundError
from .files import save_atomic
from .pseudo_labels import RoundFit, assignment_measures

# Version 2 of the round file adds what reproduces the round on new data (the transforms).
ROUND_FORMAT = 2
# Per clustering: labels always; distances and margins in a round file of format 2.
ASSIGNMENT_KEYS = ("clip_labels", "video_labels", "clip_distance", "clip_margin", "video_distance", "video_margin")


# ---- the run folder ------------------------------------------------------------------------------------

def checkpoint_path(run: str | Path, which: str | int = "last") -> Path:
    """RUN/checkpoints/<which>.pt: ``last``, ``init`` (the encoders before training), or the end of
    round ``which`` (an int)."""
    name = f"round_{which:03d}" if isinstance(which, int) else which
    return Path(run) / "checkpoints" / f"{name}.pt"


def round_checkpoints(run: str | Path) -> list[Path]:
    """The end-of-round checkpoints a run kept, in round order."""
    return sorted((Path(run) / "checkpoints").glob("round_*.pt"))


def round_file(run: str | Path, round_index: int) -> Path:
    """RUN/clusters/round_NNN.pt."""
    return Path(run) / "clusters" / f"round_{round_index:03d}.pt"


def metrics_path(run: str | Path) -> Path:
    return Path(run) / "metrics.jsonl"


def saved_rounds(run: str | Path) -> dict[int, Path]:
    """Every round file of a run, by round index."""
    folder = Path(run) / "clusters"
    return {int(p.stem[len("round_"):]): p for p in sorted(folder.glob("round_*.pt")) if p.stem[len("round_"):].isdigit()}


def round_path(run: str | Path, round_index: int | None = None) -> Path:
    """RUN/clusters/round_NNN.pt, the last one when ``round_index`` is None; a RoundError saying what
    exists when it is not there."""
    found = sorted(saved_rounds(run))
    if round_index is None:
        if not found:
            raise RoundError(f"{Path(run) / 'clusters'} holds no round_NNN.pt: {run} is not a pretraining run that "
                             "clustered (a run with --labels-from clusters nothing)")
        round_index = found[-1]
    path = round_file(run, round_index)
    if not path.is_file():
        rounds = f"rounds {found[0]}..{found[-1]}" if found else "no round"
        raise RoundError(f"{path} does not exist ({run} has {rounds})")
    return path


def encoders_of_round(round_index: int) -> str:
    """The checkpoint (relative to RUN) holding the encoders whose features round ``round_index``
    clustered: those of the start of the round, which are the end of the round before (the initial
    encoders for round 0)."""
    path = checkpoint_path("", "init" if round_index == 0 else round_index - 1)
    return path.as_posix()


def run_dataset(run: str | Path) -> Path | None:
    """The dataset a run trained on, as its config.yaml records it (None when it names none)."""
    import yaml

    config = Path(run) / "config.yaml"
    dataset = (yaml.safe_load(config.read_text()) or {}).get("dataset") if config.is_file() else None
    return None if dataset is None else Path(dataset)


def dataset_of_run(run: str | Path) -> Path:
    """:func:`run_dataset`, or a RoundError asking for ``--data``."""
    dataset = run_dataset(run)
    if dataset is None:
        raise RoundError(f"{Path(run) / 'config.yaml'} names no dataset; pass the run's dataset with --data")
    return dataset


def encoder_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values: which weights produced some features."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- the round file ------------------------------------------------------------------------------------

@dataclass
class RoundFile:
    """One round's assignments (``assignments[clustering][key]``, keys of :data:`ASSIGNMENT_KEYS`, over
    every clip or video of ``ids``) and, when ``clusterings`` is set, what maps new clips to them."""

    ids: list[str]
    clips_per_video: int
    centroids: list[torch.Tensor]  # of each k-means call: [B, K, d]
    assignments: dict[str, dict[str, np.ndarray]]
    round: int | None = None
    variant: str | None = None
    clip: dict | None = None
    pca_dim: int | None = None
    encoders: str | None = None  # relative to the run
    encoders_sha256: str | None = None
    clusterings: dict[str, dict] | None = None  # name -> inputs, whitening (a Whitening), centroids [K, d]
    path: Path | None = field(default=None, compare=False)

    @property
    def k(self) -> int:
        """The number of clusters, empty ones included (the centroids say it; labels only do when every
        cluster is used)."""
        from_labels = [int(v["video_labels"].max()) + 1 for v in self.assignments.values() if len(v["video_labels"])]
        return max([int(c.shape[-2]) for c in self.centroids] + from_labels + [0])

    def video_labels(self) -> dict[str, np.ndarray]:
        return {name: values["video_labels"] for name, values in self.assignments.items()}

    def to_dict(self) -> dict:
        """The mapping ``torch.save`` writes (tensors and plain values only: it loads with weights_only)."""
        state = {"ids": list(self.ids), "clips_per_video": self.clips_per_video, "centroids": list(self.centroids),
                 **{f"{name}_{key}": torch.from_numpy(np.asarray(value)) for name, values in self.assignments.items()
                    for key, value in values.items()}}
        if self.clusterings is not None:
            state.update({"format": ROUND_FORMAT, "round": self.round, "variant": self.variant, "clip": dict(self.clip),
                          "pca_dim": self.pca_dim, "encoders": self.encoders, "encoders_sha256": self.encoders_sha256,
                          "clusterings": {name: {"inputs": list(c["inputs"]), **c["whitening"].to_dict(),
                                                 "centroids": c["centroids"].detach().cpu(),
                                                 **({"offsets": c["offsets"].detach().cpu()}
                                                    if c.get("offsets") is not None else {})}
                                          for name, c in self.clusterings.items()}})
        return state

    @classmethod
    def from_dict(cls, state: dict, path: Path | None = None) -> "RoundFile":
        names = [key[: -len("_video_labels")] for key in state if key.endswith("_video_labels")]
        assignments = {name: {key: state[f"{name}_{key}"].numpy() for key in ASSIGNMENT_KEYS if f"{name}_{key}" in state}
                       for name in names}
        clusterings = None
        if "clusterings" in state:
            clusterings = {name: {"inputs": list(c["inputs"]), "whitening": Whitening.from_dict(c),
                                  "centroids": c["centroids"], "offsets": c.get("offsets")}
                           for name, c in state["clusterings"].items()}
        return cls(list(state["ids"]), int(state.get("clips_per_video", 1)), list(state.get("centroids", [])), assignments,
                   int(state["round"]) if "round" in state else None, state.get("variant"),
                   dict(state["clip"]) if "clip" in state else None, state.get("pca_dim"), state.get("encoders"),
                   state.get("encoders_sha256"), clusterings, path)

    def save(self, path: str | Path) -> None:
        save_atomic(self.to_dict(), path)


def describe_fit(fit: RoundFit, measures: dict[str, dict], *, ids: list[str], clips_per_video: int,
                 clip_labels: dict[str, np.ndarray], video_labels: dict[str, np.ndarray], variant_name: str,
                 round_index: int, clip: dict, pca_dim: int, fingerprint: str) -> RoundFile:
    """The round file of a pretraining round: every rank's labels, the distances and margins of
    ``measures``, each clustering's transform, the clip geometry, and which encoder weights gave the
    features."""
    assignments = {name: {"clip_labels": clip_labels[name], "video_labels": video_labels[name],
                          **{key: measures[name][key] for key in ASSIGNMENT_KEYS[2:]}} for name in clip_labels}
    clusterings = {name: {"inputs": list(t["inputs"]), "whitening": t["whitening"], "centroids": t["centroids"],
                          "offsets": t.get("offsets")} for name, t in fit.transforms.items()}
    return RoundFile(ids, clips_per_video, fit.centroids, assignments, round_index, variant_name, dict(clip), pca_dim,
                     encoders_of_round(round_index), fingerprint, clusterings)


def read_round(path: str | Path, what: str = "") -> RoundFile:
    """Any round file (format 1 or 2); a RoundError naming the file when it is not one."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = RoundFile.from_dict(state, path)
    except Exception as error:  # noqa: BLE001 - any unreadable or foreign file gets the same clear message
        raise RoundError(f"{what}{path} is not a round's assignments (RUN/clusters/round_NNN.pt): "
                         f"{type(error).__name__}: {error}") from None
    if saved.round is None and path.stem.startswith("round_") and path.stem[len("round_"):].isdigit():
        saved.round = int(path.stem[len("round_"):])
    return saved


def load_round(path: str | Path) -> RoundFile:
    """A round file with its transforms; a RoundError naming the file when it is not one, or when it was
    written before rounds kept their transforms (such a run can be labelled by training only)."""
    saved = read_round(path)
    if saved.clusterings is None:
        raise RoundError(f"{path} holds no PCA-whitening transforms or centroids per clustering (it was written by "
                         "an older xdc-fast), so new data cannot be mapped to its clusters; pretrain again with this "
                         "version to get them")
    return saved


def load_saved_labels(path: str | Path, ids: list[str]) -> dict[str, np.ndarray]:
    """Per-video assignments saved by a round, reordered to ``ids``; every id must be there."""
    saved = read_round(path, what="--labels-from ")
    position = {item: i for i, item in enumerate(saved.ids)}
    missing = [item for item in ids if item not in position]
    if missing:
        raise DatasetError(f"{path} has no assignment for {len(missing)} item(s) of this dataset (e.g. {missing[0]})")
    order = np.array([position[item] for item in ids])
    return {name: labels[order] for name, labels in saved.video_labels().items()}


# ---- mapping new clips to a saved round ---------------------------------------------------------------

def round_encoders(run: str | Path, saved: RoundFile) -> tuple[torch.nn.ModuleDict, dict]:
    """The encoders whose features ``saved`` clustered (see :func:`encoders_of_round`), checked
    against the fingerprint the round recorded, and the run's configuration."""
    from .checkpoint import build_encoder, checkpoint_arch, load_state, own_encoder_state, read_checkpoint
    from .choices import MODALITIES

    path = Path(run) / saved.encoders
    if not path.is_file():
        raise RoundError(f"{path} does not exist: round {saved.round} clustered the features of the encoders saved "
                         "there, and without them new videos cannot be mapped to its clusters")
    state = read_checkpoint(path)
    if "encoders" not in state or encoder_fingerprint(state["encoders"]) != saved.encoders_sha256:
        raise RoundError(f"{path} does not hold the encoder weights round {saved.round} clustered with (its "
                         f"fingerprint differs from the one in {saved.path}); was it overwritten?")
    config = state.get("config", {})
    modalities = [m for m in MODALITIES if any(m in c["inputs"] for c in saved.clusterings.values())]
    encoders = torch.nn.ModuleDict({m: build_encoder(m, checkpoint_arch(state, path)) for m in modalities})
    for m in modalities:
        load_state(encoders[m], own_encoder_state(state, m, path), path)
    return encoders, config


def check_dataset_fits_round(items: list[dict], saved: RoundFile, modalities: tuple[str, ...], dataset) -> None:
    """A dataset whose clips would not be the clips the round's encoders saw is refused before encoding:
    missing modalities, or audio prepared at another sample rate than the run's clips (every window would
    fail to read)."""
    from .data.splits import check_modality, check_sample_rate

    for modality in modalities:
        check_modality(items, modality, f"round {saved.round} clusters {modality}, but {dataset}")
    if "audio" in modalities:
        check_sample_rate(items, saved.clip.get("sample_rate"), dataset)


def measure_dataset(saved: RoundFile, encoders: torch.nn.ModuleDict, run_config: dict, dataset: str | Path,
                    device: torch.device, *, batch_size: int | None = None, loader: str = "auto", workers: int = 0,
                    description: str | None = "encoding") -> tuple[list[dict], dict[str, dict]]:
    """Encode every item of ``dataset`` with the round's encoders (from :func:`round_encoders`;
    ``clips_per_video`` uniformly spaced clips each, the run's geometry), transform the features as the
    round did and measure them against its centroids: the manifest's items and
    :func:`~xdc_fast.pseudo_labels.assignment_measures` per clustering. Encoding is shared out across
    ranks under torchrun; every rank gets the whole result."""
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
        measured[name] = assignment_measures(points, clustering["centroids"], positions, len(items), cpv,
                                             offsets=clustering.get("offsets"))
    return items, measured
