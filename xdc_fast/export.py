"""``xdc-fast export``: a round's clusters as a labelled dataset, for ``finetune`` and ``evaluate``.

The new dataset folder holds what ``xdc-fast prepare`` writes, pointing at the same media (no copy):

  manifest.jsonl  the run's items with ``label`` = cluster id and ``label_name`` its name; the audio path
                  is made absolute (the WAVs stay in the run's dataset); each record keeps the item's
                  original label as ``source_label``/``source_label_name`` and the assignment's
                  ``cluster_distance`` and ``cluster_margin``
  classes.json    one name per cluster, in cluster order (``cluster_00``, ...). Edit it to name the
                  clusters: finetune and evaluate read class names from it, and exporting again into
                  the same folder keeps the names found there
  rejects.jsonl   the run's items left out, with the reason (unassigned, or a margin below --min-margin)
  export.json     where the labels came from: run, round, clustering, --min-margin, counts
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data.prepare import load_manifest
from .errors import ConfigError, PrepareError
from .files import RunLock, write_text_atomic
from .rounds import dataset_of_run, load_round, round_path


def export(run: str | Path, out: str | Path, modality: str, round_index: int | None = None, *,
           min_margin: float | None = None, dataset: str | Path | None = None, log=print) -> dict:
    """Write the dataset ``out`` and return its export.json record."""
    run, out = Path(run), Path(out)
    saved = load_round(round_path(run, round_index))
    if modality not in saved.clusterings:
        raise ConfigError(f"round {saved.round} of {run} has no {modality} clustering (it has "
                          f"{', '.join(saved.clusterings)})")
    dataset = Path(dataset) if dataset is not None else dataset_of_run(run)
    if out.resolve() == dataset.resolve():
        raise ConfigError(f"--out {out} is the run's dataset; export into a new folder")
    refuse_foreign(out)
    items = {r["id"]: r for r in load_manifest(dataset)}
    missing = [i for i in saved.ids if i not in items]
    if missing:
        raise PrepareError(f"{dataset} lacks {len(missing)} of the run's items (e.g. {missing[0]}); pass the "
                           "dataset the run trained on with --data")
    measures = saved.assignments[modality]
    labels, margins, distances = measures["video_labels"], measures["video_margin"], measures["video_distance"]
    names = cluster_names(out / "classes.json", saved.k)

    kept, rejects = [], []
    for i, item_id in enumerate(saved.ids):
        item = items[item_id]
        if labels[i] < 0:
            rejects.append({"id": item_id, "path": item["path"], "reason": f"no {modality} cluster: none of its "
                            f"clips decoded in round {saved.round}"})
        elif min_margin is not None and not margins[i] >= min_margin:
            rejects.append({"id": item_id, "path": item["path"],
                            "reason": f"margin {margins[i]:.4f} below --min-margin {min_margin}"})
        else:
            kept.append(relabelled(item, dataset, int(labels[i]), names, float(distances[i]), float(margins[i])))
    if not kept:
        raise ConfigError(f"--min-margin {min_margin} leaves no item (the largest margin is "
                          f"{np.nanmax(margins):.4f}); lower it")
    sizes = np.bincount([r["label"] for r in kept], minlength=saved.k)
    record = {"run": str(run.resolve()), "round": saved.round, "clustering": modality, "min_margin": min_margin,
              "source_dataset": str(dataset.resolve()), "items": len(kept), "left_out": len(rejects),
              "cluster_sizes": sizes.tolist()}
    with RunLock(out):
        write_text_atomic(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        write_text_atomic(out / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
        write_text_atomic(out / "classes.json", json.dumps(names, indent=1) + "\n")
        write_text_atomic(out / "export.json", json.dumps(record, indent=1) + "\n")
    log(f"wrote {out}: {len(kept)} items in {int((sizes > 0).sum())} clusters of round {saved.round} ({modality})"
        + (f", {len(rejects)} left out (see rejects.jsonl)" if rejects else ""))
    small = [c for c in range(saved.k) if 0 < sizes[c] < 2]
    if small:
        log(f"note: cluster(s) {', '.join(map(str, small))} hold a single item; finetune's stratified split needs "
            "at least 2 per class")
    return record


def refuse_foreign(out: Path) -> None:
    """Export writes manifest.jsonl, classes.json and rejects.jsonl over what the folder holds: only a
    folder it wrote itself (export.json), or an empty or new one, may be written into. Anything else (a
    prepared dataset, a run) would lose its files, and its class names would be taken for the clusters'."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; export writes a dataset folder")
    if (out / "export.json").is_file():
        return
    held = sorted(p.name for p in out.iterdir() if p.name != ".xdc-fast.lock")
    if held:
        raise ConfigError(f"--out {out} already holds files that export did not write (e.g. {held[0]}), and they "
                          "would be replaced; export into a new folder")


def cluster_names(path: Path, k: int) -> list[str]:
    """The names in an existing classes.json (a person may have edited them), else ``cluster_NN``."""
    if not path.is_file():
        return [f"cluster_{c:0{max(2, len(str(k - 1)))}d}" for c in range(k)]
    try:
        names = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); fix it or delete it to get default names") from None
    if not isinstance(names, list) or len(names) != k or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{path} should hold a list of {k} non-empty names, one per cluster in cluster order")
    return names


def relabelled(item: dict, dataset: Path, cluster: int, names: list[str], distance: float, margin: float) -> dict:
    record = dict(item)
    if "labels" in record:  # a multi-label source: its labels would make the export multi-label too
        record["source_labels"] = record.pop("labels")
    if record.get("audio") and not Path(record["audio"]).is_absolute():
        record["audio"] = str((dataset / record["audio"]).resolve())
    record.update(label=cluster, label_name=names[cluster], source_label=item.get("label"),
                  source_label_name=item.get("label_name"), cluster_distance=round(distance, 6),
                  cluster_margin=round(margin, 6))
    return record
