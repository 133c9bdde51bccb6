"""``xdc-fast assign``: map the videos of any prepared dataset to the clusters of a pretraining round.

A round keeps what reproduces its clustering (``RUN/clusters/round_NNN.pt``): the PCA-whitening of each
clustering, its centroids, and which checkpoint's encoders produced the features it clustered (those
of the round's start: ``checkpoints/round_{N-1}.pt``, or ``checkpoints/init.pt`` for round 0). Each
video is encoded as the run encoded its own (``clips_per_video`` uniformly spaced clips, the run's clip
geometry), transformed, and assigned to the nearest centroid by the k-means kernels; the video's
cluster is the mode of its clips', as in training. Run on the run's own dataset, it gives back the
round's saved assignments.

Output (``--out``): ``.json`` with every video and every clip, or ``.csv`` with one row per video::

    id, label, <clustering>_cluster, <clustering>_distance, <clustering>_margin, ...

``distance`` is the squared distance to the cluster's centroid in the whitened space, ``margin`` how
much nearer that centroid is than the next one (mean over the video's clips; small or negative:
uncertain). Format details: docs/clusters.md.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from . import distributed as xdist
from .files import output_lock, write_text_atomic
from .data.prepare import load_manifest
from .errors import ConfigError
from .rounds import check_dataset_fits_round, load_round, measure_dataset, round_encoders, round_path

OUTPUT_SUFFIXES = (".json", ".csv")


def assign(run: str | Path, dataset: str | Path, out: str | Path, round_index: int | None = None, *,
           device: str = "auto", loader: str = "auto", workers: int = 0, batch_size: int | None = None,
           log=print) -> dict:
    """Write ``out`` and return what it holds (the JSON layout, whichever the file's format)."""
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out should end in .json or .csv, got {out.name}")
    if out.exists():  # as finetune and evaluate refuse to replace their results
        raise ConfigError(f"{out} already exists; choose another --out (or delete it)")
    # Everything that can be wrong with the run or the dataset is said before any work.
    saved = load_round(round_path(run, round_index))
    encoders, run_config = round_encoders(run, saved)
    check_dataset_fits_round(load_manifest(dataset), saved, tuple(encoders), dataset)
    with output_lock(out):
        torch_device = xdist.setup_device(device)
        log(f"assigning the items of {dataset} to the {saved.k} clusters of round {saved.round} of {run} "
            f"({', '.join(saved.clusterings)}; encoders of {saved.encoders})")
        items, measured = measure_dataset(saved, encoders, run_config, dataset, torch_device, batch_size=batch_size,
                                          loader=loader, workers=workers, description="assigning")
        result = assignment_table(run, saved, dataset, items, measured)
        if xdist.is_main_process():
            write_text_atomic(out, to_json(result) if out.suffix == ".json" else to_csv(result))
            undecoded = [v["id"] for v in result["videos"] if all(v[n]["cluster"] < 0 for n in result["clusterings"])]
            if undecoded:
                log(f"{len(undecoded)} item(s) gave no clip and have cluster -1, e.g. {undecoded[0]}")
            log(f"wrote {out}: {len(items)} items")
    return result


def assignment_table(run, saved, dataset, items: list[dict], measured: dict[str, dict]) -> dict:
    """The JSON layout: the round, then one record per video, then every clip's cluster, distance and
    margin per clustering (video-major, ``clips_per_video`` per video; -1 and None where a clip did not
    decode)."""

    def number(value) -> float | None:
        return None if np.isnan(value) else round(float(value), 6)

    videos = []
    for i, item in enumerate(items):
        record = {"id": item["id"], "label": item.get("label"), "label_name": item.get("label_name")}
        for name, m in measured.items():
            record[name] = {"cluster": int(m["video_labels"][i]), "distance": number(m["video_distance"][i]),
                            "margin": number(m["video_margin"][i])}
        videos.append(record)
    clips = {name: {"cluster": m["clip_labels"].tolist(),
                    "distance": [number(v) for v in m["clip_distance"]],
                    "margin": [number(v) for v in m["clip_margin"]]} for name, m in measured.items()}
    return {"run": str(run), "round": saved.round, "dataset": str(dataset), "k": saved.k,
            "clusterings": list(measured), "clips_per_video": saved.clips_per_video, "encoders": saved.encoders,
            "videos": videos, "clips": clips}


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1) + "\n"


def to_csv(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = result["clusterings"]
    writer.writerow(["id", "label"] + [f"{n}_{key}" for n in names for key in ("cluster", "distance", "margin")])
    for video in result["videos"]:
        writer.writerow([video["id"], "" if video["label"] is None else video["label"]]
                        + ["" if video[n][key] is None else video[n][key] for n in names
                           for key in ("cluster", "distance", "margin")])
    return buffer.getvalue()
