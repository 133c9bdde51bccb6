"""``xdc-fast report RUN``: PNG figures of what a pretraining run learned.

Written to RUN/report/ by default:

    curves.png              per-epoch loss and pseudo-label accuracy of every head, NMI to the true
                            classes, between modalities and to the previous round, and each head's
                            accuracy above chance (held-out at each round's end); round boundaries dashed
    cluster_sizes.png       the last round's cluster sizes per modality, largest first
    montage_<modality>.png  the middle frames of a few videos of the largest clusters, one row per
                            cluster, so a person can see what a cluster means

Montages need the dataset (its manifest and media). Without it, or for an audio-only dataset, they are
skipped with a logged warning rather than failing the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator

from .data.prepare import load_manifest, read_jsonl
from .data.pyav_backend import decode_frame_indices
from .errors import PrepareError, ReportError
from .files import make_folder, writing
from .rounds import metrics_path, read_round, run_dataset, saved_rounds

logger = logging.getLogger(__name__)


@dataclass
class Curves:
    epochs: np.ndarray
    rounds: np.ndarray
    panels: dict[str, dict[str, np.ndarray]]  # panel title -> line name -> value per epoch (NaN: absent)


@dataclass
class Clusters:
    """A round's video-level assignments, as saved in RUN/clusters/round_NNN.pt."""

    round: int
    ids: list[str]
    labels: dict[str, np.ndarray]  # modality -> one label per id
    k: int


@dataclass
class Tile:
    item_id: str
    title: str
    image: np.ndarray | None  # uint8 [H, W, 3]; None when the frame could not be decoded


@dataclass
class MontageRow:
    cluster: int
    size: int
    tiles: list[Tile]


def write_report(run: str | Path, dataset: str | Path | None = None, out: str | Path | None = None,
                 montage_clusters: int = 4, montage_videos: int = 6) -> list[Path]:
    """Draw the report's figures; returns the PNG paths written (default ``out``: RUN/report/).

    ``dataset`` defaults to the one named in RUN/config.yaml."""
    run = Path(run)
    if montage_clusters < 1 or montage_videos < 1:
        raise ReportError("a montage needs at least one cluster and one video per cluster")
    curves = read_curves(run)
    out = make_folder(Path(out) if out is not None else run / "report")
    written = [draw_curves(curves, out / "curves.png")]

    clusters = latest_clusters(run)
    if clusters is None:
        # A run trained with labels_from learns saved assignments and clusters nothing itself.
        logger.warning("%s has no cluster files (RUN/clusters/round_NNN.pt): cluster sizes and montages skipped",
                       run)
        return written
    written.append(draw_cluster_sizes(clusters, out / "cluster_sizes.png"))

    items = montage_items(run, dataset)
    if items is not None:
        for modality, labels in clusters.labels.items():
            rows = montage_tiles(labels, clusters.ids, items, montage_clusters, montage_videos)
            written.append(draw_montage(rows, f"{modality} clusters of round {clusters.round}",
                                        out / f"montage_{modality}.png"))
    return written


# ===== reading the run =====


def read_curves(run: str | Path) -> Curves:
    """The per-epoch series of RUN/metrics.jsonl, in epoch order."""
    path = metrics_path(run)
    if not path.exists():
        raise ReportError(f"{run} is not a pretraining run: no metrics.jsonl")
    # A run resumed after a kill can log an epoch twice; the later line is the one the run went on from.
    by_epoch = {record["epoch"]: record for record in read_jsonl(path)}
    if not by_epoch:
        raise ReportError(f"{path} holds no finished epoch yet")
    records = [by_epoch[epoch] for epoch in sorted(by_epoch)]

    def series(values_of) -> dict[str, np.ndarray]:
        names = list(dict.fromkeys(name for record in records for name in values_of(record)))
        return {name: np.array([_number(values_of(record).get(name)) for record in records]) for name in names}

    panels = {
        "training loss": series(lambda r: r.get("loss") or {}),
        "pseudo-label accuracy": series(lambda r: r.get("pseudo_label_acc") or {}),
        "NMI to true classes": series(lambda r: {m: q.get("nmi") for m, q in (r.get("vs_true_labels") or {}).items()}),
        "NMI video vs audio": series(lambda r: {"video-audio": r["nmi_video_audio"]} if "nmi_video_audio" in r else {}),
        "NMI to previous round": series(lambda r: r.get("nmi_to_previous") or {}),
        "is it learning? pseudo-label accuracy above chance (0: chance, 1: perfect)": series(_lifts),
    }
    return Curves(epochs=np.array([r["epoch"] for r in records]), rounds=np.array([r["round"] for r in records]),
                  panels={title: lines for title, lines in panels.items() if lines})


def _lifts(record: dict) -> dict[str, float]:
    """Each head's lift over chance: on the training clips every epoch, on the held-out ones at a round's end."""
    from .learning import round_signal

    lifts = {f"{head} (training)": s["lift"] for head, s in round_signal({**record, "heldout": None}).items()}
    lifts.update({f"{head} (held-out)": s["lift"] for head, s in round_signal(record).items() if s["on"] == "held-out"})
    return lifts


def round_boundaries(curves: Curves) -> list[float]:
    """x positions between the last epoch of a round and the first of the next."""
    changes = np.flatnonzero(curves.rounds[1:] != curves.rounds[:-1]) + 1
    return [float(curves.epochs[i]) - 0.5 for i in changes]


def latest_clusters(run: str | Path) -> Clusters | None:
    """The assignments of the highest-numbered round saved in RUN/clusters/, or None if there is none."""
    saved = saved_rounds(run)
    if not saved:
        return None
    last = read_round(saved[max(saved)])
    # k counts empty clusters too (the centroids say it), so they show as zero bars.
    return Clusters(round=last.round, ids=last.ids, labels=last.video_labels(), k=last.k)


def montage_items(run: str | Path, dataset: str | Path | None) -> list[dict] | None:
    """The manifest to draw montages from, or None (with a warning) when they cannot be drawn."""
    if dataset is None:
        dataset = run_dataset(run)
        if dataset is None:
            logger.warning("no dataset given and %s names none: montages skipped", Path(run) / "config.yaml")
            return None
    try:
        items = load_manifest(dataset)
    except PrepareError as error:
        logger.warning("montages skipped: %s", error)
        return None
    if not any(item.get("fps") and item.get("num_frames") for item in items):
        logger.warning("montages skipped: the items of %s are audio-only (no frames to show)", dataset)
        return None
    return items


# ===== choosing what to show =====


def sorted_sizes(labels: np.ndarray, k: int) -> np.ndarray:
    """Videos per cluster, largest first; clusters 0..k-1 that are empty count as 0."""
    return np.sort(np.bincount(labels, minlength=k))[::-1]


def largest_clusters(labels: np.ndarray, count: int) -> list[tuple[int, int]]:
    """(cluster id, size) of the ``count`` largest non-empty clusters, largest first."""
    clusters, sizes = np.unique(labels, return_counts=True)
    order = np.lexsort((clusters, -sizes))  # ties go to the lower id, so the rows do not shuffle between reports
    return [(int(clusters[i]), int(sizes[i])) for i in order[:count]]


def montage_tiles(labels: np.ndarray, ids: list[str], items: list[dict], clusters: int,
                  videos: int) -> list[MontageRow]:
    """One row per largest cluster: the middle frames of its first ``videos`` members (in ``ids`` order)."""
    by_id = {item["id"]: item for item in items}
    rows = []
    for cluster, size in largest_clusters(labels, clusters):
        members = np.flatnonzero(labels == cluster)[:videos]
        rows.append(MontageRow(cluster, size, [_tile(ids[i], by_id.get(ids[i])) for i in members]))
    return rows


def middle_frame(item: dict) -> np.ndarray | None:
    """The item's middle frame as uint8 [H, W, 3], or None if it has no frames or cannot be decoded."""
    if not item.get("fps") or not item.get("num_frames"):
        return None
    try:
        return decode_frame_indices(item["path"], [item["num_frames"] // 2], size=None)[0]
    except Exception as error:  # one broken or moved file should cost one tile, not the whole report
        logger.warning("could not decode a frame of %s: %s", item["path"], error)
        return None


def _tile(item_id: str, item: dict | None) -> Tile:
    if item is None:
        logger.warning("%s is not in the dataset's manifest: blank tile", item_id)
        return Tile(item_id, "", None)
    return Tile(item_id, item.get("label_name") or "", middle_frame(item))


def _number(value) -> float:
    return float("nan") if value is None else float(value)


# ===== drawing =====


def pyplot():
    # Agg draws without a display (servers, CI); chosen before pyplot is first imported.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    plt = pyplot()
    try:
        with writing(path):
            figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    logger.info("wrote %s", path)
    return path


def draw_curves(curves: Curves, path: Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(len(curves.panels), 1, sharex=True, squeeze=False,
                                figsize=(7, 2.4 * len(curves.panels)))
    boundaries = round_boundaries(curves)
    for ax, (title, lines) in zip(axes[:, 0], curves.panels.items()):
        for name, values in lines.items():
            ax.plot(curves.epochs, values, marker="o", markersize=3, label=name)  # markers: a 1-epoch run shows
        for x in boundaries:
            ax.axvline(x, color="0.6", linestyle="--", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("epoch (dashed: a new round, i.e. a re-clustering)")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return save_figure(figure, path)


def draw_cluster_sizes(clusters: Clusters, path: Path) -> Path:
    plt = pyplot()
    names = list(clusters.labels)
    figure, axes = plt.subplots(1, len(names), squeeze=False, figsize=(4 * len(names), 3))
    for ax, name in zip(axes[0], names):
        sizes = sorted_sizes(clusters.labels[name], clusters.k)
        ax.bar(np.arange(len(sizes)), sizes, color="tab:blue")
        ax.set_title(f"{name}: {int((sizes == 0).sum())} empty of {len(sizes)}", fontsize=10)
        ax.set_xlabel("cluster rank (largest first)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("videos")
    figure.suptitle(f"cluster sizes, round {clusters.round}")
    figure.tight_layout()
    return save_figure(figure, path)


def draw_montage(rows: list[MontageRow], title: str, path: Path) -> Path:
    plt = pyplot()
    columns = max(len(row.tiles) for row in rows)
    figure, axes = plt.subplots(len(rows), columns, squeeze=False, figsize=(1.8 * columns + 0.6, 1.9 * len(rows)))
    for r, row in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            if c >= len(row.tiles):
                ax.axis("off")
                continue
            tile = row.tiles[c]
            if tile.image is None:
                ax.set_facecolor("0.85")
                ax.text(0.5, 0.5, "no frame", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                ax.imshow(tile.image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(tile.title, fontsize=8)
        axes[r, 0].set_ylabel(f"cluster {row.cluster}\n{row.size} videos", fontsize=9)
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def draw_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix; class names on the axes while they stay legible."""
    plt = pyplot()
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = min(4 + 0.25 * len(classes), 20)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 30:
        axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
        axes.set_yticks(range(len(classes)), classes, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    return save_figure(figure, path)
