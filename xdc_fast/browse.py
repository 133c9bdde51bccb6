"""``xdc-fast browse``: a static web site to watch and listen to a round's clusters.

``DIR/index.html`` lists every cluster of every clustering of the round (size, purity and majority class
when the data has labels, and how far the video and audio clusterings agree), sortable by column and
filtered by clustering with a few lines of inline JavaScript. ``DIR/cluster_<clustering>_<id>.html``
shows a cluster's most central members (smallest distance to its centroid) and its most uncertain ones
(smallest margin to the next centroid), each as a still frame, a short animated GIF and a WAV snippet.
Nothing else is needed: no server, no network, every file referenced by a relative path.

Without ``--data`` the run's own videos are shown with the assignments the round saved; with it, the
videos of that dataset are first assigned to the round's clusters (as ``xdc-fast assign`` does). Media
are written only for the members shown (at most ``members`` per list), once per video, and kept between
runs, so a large run costs a page per cluster and a few files per shown video.
"""

from __future__ import annotations

import html
import logging
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import distributed as xdist, metrics
from .data.prepare import load_manifest
from .files import OutputError, make_folder, output_lock, write_text_atomic
from .progress import progress
from .rounds import (RoundFile, check_dataset_fits_round, dataset_of_run, load_round, measure_dataset,
                     round_encoders, round_path)

log_ = logging.getLogger(__name__)

GIF_FRAMES = 10  # frames of the animated clip, spread over CLIP_SECONDS around the video's middle
CLIP_SECONDS = 2.0
GIF_SIDE = 128  # short side of the animated clip and the still, in pixels
AUDIO_SECONDS = 2.0


@dataclass
class Cluster:
    clustering: str
    id: int
    members: np.ndarray  # item indices, most central first
    purity: float | None  # share of its members in its majority class (labelled data only)
    majority: str | None  # that class's name
    agreement: float | None  # share of its members that the other modality also puts together

    @property
    def page(self) -> str:
        return f"cluster_{self.clustering}_{self.id:03d}.html"


def browse(run: str | Path, out: str | Path, round_index: int | None = None, dataset: str | Path | None = None, *,
           members: int = 12, device: str = "auto", loader: str = "auto", workers: int = 0, log=print) -> Path:
    """Write the site under ``out``; returns the path of its index.html."""
    out = Path(out)
    saved = load_round(round_path(run, round_index))
    # The output is taken (and found writable) before the videos are encoded, not after.
    with output_lock(out):
        return _browse(run, out, saved, dataset, members, device, loader, workers, log)


def _browse(run, out: Path, saved: RoundFile, dataset, members: int, device: str, loader: str, workers: int,
            log) -> Path:
    if dataset is None:
        dataset = dataset_of_run(run)
        items, measured = _saved_measures(saved, dataset)
        source = f"the run's own videos ({dataset})"
    else:
        encoders, run_config = round_encoders(run, saved)
        check_dataset_fits_round(load_manifest(dataset), saved, tuple(encoders), dataset)
        items, measured = measure_dataset(saved, encoders, run_config, dataset, xdist.setup_device(device),
                                          loader=loader, workers=workers, description="assigning")
        source = f"{dataset}, assigned to the round's clusters"
    if not xdist.is_main_process():
        return out / "index.html"
    # Audio paths in a manifest are relative to its dataset; the snippets are cut from those files.
    items = [{**r, "audio": str(Path(dataset) / r["audio"])} if r.get("audio") else r for r in items]
    clusters = describe_clusters(items, measured, saved.k)
    make_folder(out / "media")
    shown = {c.page: _shown(c, measured[c.clustering], members) for c in clusters}
    wanted = sorted({int(i) for central, uncertain in shown.values() for i in (*central, *uncertain)}
                    | {int(c.members[0]) for c in clusters})
    media = {}
    for i in progress(wanted, "media", len(wanted), unit="video"):
        media[i] = write_media(items[i], out / "media")
    for c in clusters:
        central, uncertain = shown[c.page]
        write_text_atomic(out / c.page, cluster_page(c, items, measured[c.clustering], central, uncertain, media,
                                                     saved))
    write_text_atomic(out / "index.html", index_page(clusters, items, measured, media, saved, run, source))
    log(f"wrote {out / 'index.html'}: {len(clusters)} clusters, media of {len(wanted)} videos")
    return out / "index.html"


def _saved_measures(saved: RoundFile, dataset: Path) -> tuple[list[dict], dict[str, dict]]:
    """The run's items in the round's order, with the measures the round saved."""
    from .errors import PrepareError

    by_id = {r["id"]: r for r in load_manifest(dataset)}
    missing = [i for i in saved.ids if i not in by_id]
    if missing:
        raise PrepareError(f"{dataset} lacks {len(missing)} of the run's items (e.g. {missing[0]}); pass the "
                           "dataset to show with --data")
    return [by_id[i] for i in saved.ids], saved.assignments


# ---- what to show -----------------------------------------------------------------------------------

def describe_clusters(items: list[dict], measured: dict[str, dict], k: int) -> list[Cluster]:
    """Every non-empty cluster of every clustering, members most central first."""
    labelled = all(r.get("label") is not None for r in items)
    truth = np.array([r["label"] if labelled else -1 for r in items])
    names = {r["label"]: r.get("label_name") or str(r["label"]) for r in items if r.get("label") is not None}
    other = {"video": "audio", "audio": "video"}
    clusters = []
    for name, m in measured.items():
        labels = m["video_labels"]
        partner = measured.get(other.get(name, ""), {}).get("video_labels")
        for c in range(k):
            members = np.flatnonzero(labels == c)
            if not len(members):
                continue
            members = members[np.argsort(m["video_distance"][members], kind="stable")]
            purity = majority = agreement = None
            if labelled:
                counts = np.bincount(truth[members])
                purity, majority = float(counts.max() / len(members)), names.get(int(counts.argmax()))
            if partner is not None:
                theirs = partner[members]
                theirs = theirs[theirs >= 0]
                agreement = float(np.bincount(theirs).max() / len(theirs)) if len(theirs) else None
            clusters.append(Cluster(name, c, members, purity, majority, agreement))
    return clusters


def _shown(cluster: Cluster, measures: dict, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``cap`` most central members and the ``cap`` most uncertain (smallest margin) ones."""
    central = cluster.members[:cap]
    margins = measures["video_margin"][cluster.members]
    uncertain = cluster.members[np.argsort(margins, kind="stable")][:cap]
    return central, uncertain


# ---- media ------------------------------------------------------------------------------------------

def media_name(item_id: str) -> str:
    """A file name for an id: readable, and unique (ids hold slashes; a checksum keeps two ids that differ
    only there apart)."""
    import zlib

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in item_id)
    # surrogateescape: an id from a file name that was not UTF-8 is checksummed as the bytes it stands for.
    return f"{safe}-{zlib.crc32(item_id.encode('utf-8', 'surrogateescape')):08x}"


def write_media(item: dict, folder: Path) -> dict[str, str]:
    """Still (JPEG), animated clip (GIF) and audio snippet (WAV) of an item, each written once: the paths,
    relative to the site, of those it has. A file that cannot be decoded costs its media, never the site."""
    base = media_name(item["id"])
    wanted = {}
    if item.get("fps") and item.get("num_frames"):
        wanted.update(still=folder / f"{base}.jpg", clip=folder / f"{base}.gif")
    if item.get("audio"):
        wanted["audio"] = folder / f"{base}.wav"
    try:
        if "clip" in wanted and not (wanted["still"].exists() and wanted["clip"].exists()):
            _write_pictures(item, wanted["still"], wanted["clip"])
        if "audio" in wanted and not wanted["audio"].exists():
            _write_snippet(item, wanted["audio"])
    except OutputError:  # a full disk or an unwritable folder: every later file would fail the same way
        raise
    except Exception as error:  # noqa: BLE001 - one broken file must not stop the site
        log_.warning("media of %s incomplete: %s: %s", item["id"], type(error).__name__, error)
    return {kind: f"{folder.name}/{path.name}" for kind, path in wanted.items() if path.exists()}


def _write_pictures(item: dict, still: Path, gif: Path) -> None:
    from PIL import Image

    from .data.clips import resized_size
    from .data.pyav_backend import decode_frame_indices

    fps, count = item["fps"], item["num_frames"]
    middle = count // 2
    span = min(count - 1, int(round(CLIP_SECONDS * fps)))
    indices = np.unique(np.linspace(middle - span // 2, middle + span // 2, GIF_FRAMES).round().astype(int)
                        .clip(0, count - 1))
    size = resized_size(item["width"], item["height"], GIF_SIDE)
    frames = decode_frame_indices(item["path"], indices, size)
    pictures = [Image.fromarray(f) for f in frames]
    with _atomic(still) as tmp:
        pictures[len(pictures) // 2].save(tmp, format="JPEG", quality=85)
    with _atomic(gif) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], loop=0,
                         duration=max(20, int(1000 * CLIP_SECONDS / len(pictures))))


def _write_snippet(item: dict, path: Path) -> None:
    from .data.pyav_backend import read_audio_window

    rate = int(item.get("sample_rate") or 16000)
    duration = item.get("duration_s") or item.get("audio_samples", 0) / rate
    start = max(0.0, duration / 2 - AUDIO_SECONDS / 2)
    samples = read_audio_window(item["audio"], start, min(AUDIO_SECONDS, duration), rate)
    with _atomic(path) as tmp, wave.open(str(tmp), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes())


def _atomic(path: Path):
    from .files import atomic_path

    return atomic_path(path)


# ---- pages ------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }
th[data-key] { cursor: pointer; text-decoration: underline dotted; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.thumb { height: 40px; margin-right: 2px; vertical-align: middle; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 6px; width: 300px; font-size: 13px; }
.card img.clip, .card img.still { height: 96px; max-width: 142px; object-fit: cover; }
.card img.still { margin-right: 4px; }
.card audio { width: 100%; height: 32px; }
.note { color: #666; }
"""

SCRIPT = """
function sortBy(key) {
  const body = document.querySelector('#clusters tbody');
  const rows = Array.from(body.rows);
  const dir = body.dataset.key === key && body.dataset.dir === 'desc' ? 'asc' : 'desc';
  rows.sort((a, b) => {
    const x = parseFloat(a.dataset[key]), y = parseFloat(b.dataset[key]);
    const d = (isNaN(x) ? -1 : x) - (isNaN(y) ? -1 : y);
    return dir === 'asc' ? d : -d;
  });
  rows.forEach(r => body.appendChild(r));
  body.dataset.key = key; body.dataset.dir = dir;
}
function filterBy(value) {
  document.querySelectorAll('#clusters tbody tr').forEach(r => {
    r.style.display = value === 'all' || r.dataset.clustering === value ? '' : 'none';
  });
}
document.querySelectorAll('th[data-key]').forEach(th => th.addEventListener('click', () => sortBy(th.dataset.key)));
document.getElementById('clustering').addEventListener('change', e => filterBy(e.target.value));
"""


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n"
            + (f"<script>{script}</script>\n" if script else "") + "</body></html>\n")


def index_page(clusters: list[Cluster], items: list[dict], measured: dict, media: dict, saved: RoundFile, run,
               source: str) -> str:
    agreement = ""
    if "video" in measured and "audio" in measured:
        both = (measured["video"]["video_labels"] >= 0) & (measured["audio"]["video_labels"] >= 0)
        nmi = metrics.nmi(measured["video"]["video_labels"][both], measured["audio"]["video_labels"][both])
        agreement = (f"<p>Agreement of the video and audio clusterings: NMI {nmi:.2f}; per cluster, the share of "
                     "its members the other modality also puts together.</p>")
    options = "".join(f"<option value=\"{n}\">{n}</option>" for n in measured)
    rows = []
    for c in clusters:
        thumbs = "".join(f"<img class=\"thumb\" src=\"{media[int(i)]['still']}\" alt=\"\">" for i in c.members[:1]
                         if "still" in media.get(int(i), {}))
        rows.append(
            f"<tr data-clustering=\"{c.clustering}\" data-size=\"{len(c.members)}\" "
            f"data-purity=\"{'' if c.purity is None else c.purity}\" "
            f"data-agreement=\"{'' if c.agreement is None else c.agreement}\">"
            f"<td>{c.clustering}</td><td><a href=\"{c.page}\">{c.id}</a></td><td>{thumbs}</td>"
            f"<td class=\"num\">{len(c.members)}</td><td class=\"num\">{_percent(c.purity)}</td>"
            f"<td>{html.escape(c.majority or '–')}</td><td class=\"num\">{_percent(c.agreement)}</td></tr>")
    body = (f"<h1>Clusters of round {saved.round}</h1>\n"
            f"<p>Run <code>{html.escape(str(run))}</code>, variant {saved.variant}, k = {saved.k}; "
            f"{len(items)} videos: {html.escape(source)}.</p>\n{agreement}\n"
            f"<p><label>Clustering <select id=\"clustering\"><option value=\"all\">all</option>{options}</select>"
            "</label> <span class=\"note\">Click a dotted header to sort.</span></p>\n"
            "<table id=\"clusters\"><thead><tr><th>clustering</th><th>cluster</th><th>most central</th>"
            "<th data-key=\"size\">size</th><th data-key=\"purity\">purity</th><th>majority class</th>"
            "<th data-key=\"agreement\">agreement</th></tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody></table>")
    return _page(f"Clusters of round {saved.round}", body, SCRIPT)


def cluster_page(cluster: Cluster, items: list[dict], measures: dict, central: np.ndarray, uncertain: np.ndarray,
                 media: dict, saved: RoundFile) -> str:
    def cards(indices: np.ndarray) -> str:
        out = []
        for i in indices.tolist():
            item, files = items[i], media.get(i, {})
            parts = [f"<img class=\"still\" src=\"{files['still']}\" alt=\"still\">" if "still" in files else "",
                     f"<img class=\"clip\" src=\"{files['clip']}\" alt=\"clip\" loading=\"lazy\">"
                     if "clip" in files else "",
                     f"<br><audio controls preload=\"none\" src=\"{files['audio']}\"></audio>" if "audio" in files
                     else "",
                     f"<br><b>{html.escape(item['id'])}</b>",
                     f"<br>class: {html.escape(str(item.get('label_name') or item.get('label')))}"
                     if item.get("label") is not None else "",
                     f"<br>distance {measures['video_distance'][i]:.3f}, margin {measures['video_margin'][i]:.3f}"]
            out.append("<div class=\"card\">" + "".join(parts) + "</div>")
        return "<div class=\"cards\">" + "\n".join(out) + "</div>"

    size = len(cluster.members)
    left_out = size - len(central)
    note = (f"<p class=\"note\">{len(central)} of {size} members shown; {left_out} left out.</p>" if left_out
            else f"<p class=\"note\">All {size} members shown.</p>")
    body = (f"<p><a href=\"index.html\">← all clusters</a></p>\n<h1>{cluster.clustering} cluster {cluster.id}</h1>\n"
            f"<p>Round {saved.round}; {size} videos; purity {_percent(cluster.purity)}"
            f" ({html.escape(cluster.majority or 'no labels')}); agreement with the other modality "
            f"{_percent(cluster.agreement)}.</p>\n{note}\n"
            "<h2>Most central</h2><p class=\"note\">Smallest distance to the centroid.</p>\n" + cards(central)
            + "\n<h2>Most uncertain</h2><p class=\"note\">Smallest margin to the next centroid (negative: its clips "
            "lean elsewhere).</p>\n" + cards(uncertain))
    return _page(f"{cluster.clustering} cluster {cluster.id}", body)


__all__ = ["browse", "describe_clusters", "write_media"]
