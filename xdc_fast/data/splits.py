"""Which items train and which test, and whether a dataset carries the modality a command needs.

Splits come from the manifest when it has them (UCF101/HMDB51 splits 1-3, ESC-50 test folds 1-5,
Kinetics ``train``/``val``); a labelled dataset without any gets a seeded stratified split whose test ids
are written down with the results, so a score can always be traced to the videos it was measured on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError


@dataclass
class Split:
    """Which videos train and which test, and how that was decided (written with the results)."""

    train: list[dict]
    test: list[dict]
    description: dict


def check_modality(items: list[dict], modality: str, needed_by: str | None = None, way_out: str = "") -> None:
    """Every item must carry ``modality``: audio-only datasets have no frames, silent videos no sound.
    ``needed_by`` says who needs it (default: the ``--modality`` flag), ``way_out`` what to do instead."""
    needed_by = needed_by or f"--modality {modality}"
    if modality == "audio":
        silent = [r["id"] for r in items if not r.get("has_audio")]
        if silent:
            raise DatasetError(f"{needed_by}, but {len(silent)} item(s) have no audio track (e.g. {silent[0]})"
                               + (f"; {way_out}" if way_out else ""))
    elif any(r.get("fps") is None for r in items):
        raise DatasetError(f"{needed_by}, but this dataset holds audio-only items; "
                           + (way_out or "use --modality audio"))


def check_sample_rate(items: list[dict], rate: int, dataset, whose: str = "run's") -> None:
    """Audio prepared at another rate than the clips take would fail every window it is asked for, one
    skipped clip at a time; it is refused before any work, with the way out."""
    other = sorted({r.get("sample_rate") for r in items if r.get("has_audio")} - {None, rate})
    if other:
        raise DatasetError(f"the clip geometry of {dataset} differs from the {whose} clips': its audio was prepared at "
                           f"{', '.join(map(str, other))} Hz, the clips take {rate} Hz (clip.sample_rate); prepare it "
                           f"again with --sample-rate {rate}")


def is_multilabel(items: list[dict]) -> bool:
    """Whether some item carries several labels (``labels`` of a vggsound/audioset manifest)."""
    return any(len(r.get("labels") or ()) > 1 for r in items)


def label_matrix(items: list[dict], num_classes: int) -> np.ndarray:
    """``[items, num_classes]`` booleans: which classes each item carries (``labels``, else ``label``)."""
    matrix = np.zeros((len(items), num_classes), dtype=bool)
    for row, r in enumerate(items):
        matrix[row, r.get("labels") or [r["label"]]] = True
    return matrix


def refuse_multilabel(items: list[dict], what: str) -> None:
    """Commands that score one label per item stop here rather than score only each item's first label."""
    if is_multilabel(items):
        several = sum(len(r.get("labels") or ()) > 1 for r in items)
        raise DatasetError(f"this dataset is multi-label ({several} item(s) carry several labels), and {what} scores "
                           "one label per item; score it with `xdc-fast evaluate --protocol linear` (mAP)")


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean test mask with ``test_fraction`` of every class (at least one item)."""
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: max(1, int(round(test_fraction * len(members))))]] = True
    return test


def choose_split(items: list[dict], split: int, test_fraction: float, rng: np.random.Generator,
                 seed: int | None = None) -> Split:
    """The manifest's split ``split`` when the dataset has splits, else a stratified one drawn from ``rng``
    (``seed`` is only recorded)."""
    unlabelled = [r["id"] for r in items if r.get("label") is None]
    if unlabelled:
        raise DatasetError(f"{len(unlabelled)} item(s) have no label (e.g. {unlabelled[0]}); this needs a labelled "
                           "dataset (prepare it with class folders or an official split format)")
    if any(r.get("split") for r in items):
        key = str(split)
        parts = {r.get("split", {}).get(key) for r in items} - {None}
        if not parts:
            available = sorted({k for r in items for k in r.get("split", {})})
            raise DatasetError(f"--split {split} is not in this dataset; it has split(s) {', '.join(available)}")
        test_part = "test" if "test" in parts else "val"  # Kinetics-style CSVs name their held-out part val
        train = [r for r in items if r.get("split", {}).get(key) == "train"]
        test = [r for r in items if r.get("split", {}).get(key) == test_part]
        if not train or not test:
            raise DatasetError(f"split {split} needs both train and {test_part} items; found {len(train)} and "
                               f"{len(test)}")
        return Split(train, test, {"kind": "manifest", "split": split, "test_part": test_part})
    if split != 1:
        # Without splits in the manifest every --split N would be the same seeded split: three "splits"
        # averaged would be one result counted three times.
        raise DatasetError(f"--split {split}: this dataset has no splits (its manifest names none), so there is only "
                           "the seeded stratified split (split 1; change it with --seed)")
    labels = np.array([r["label"] for r in items])
    if min(np.bincount(labels)[np.unique(labels)]) < 2:
        raise DatasetError("every class needs at least 2 videos for a stratified train/test split")
    test_mask = stratified_split(labels, test_fraction, rng)
    if test_mask.all():
        raise DatasetError(f"test_fraction {test_fraction} leaves no training video (each class has at most "
                           f"{max(np.bincount(labels))} videos); lower it")
    return Split([r for r, t in zip(items, test_mask) if not t], [r for r, t in zip(items, test_mask) if t],
                 {"kind": "stratified", "seed": seed, "test_fraction": test_fraction,
                  "test_ids": [r["id"] for r, t in zip(items, test_mask) if t]})


def class_names(dataset: str | Path, items: list[dict]) -> list[str]:
    """Names in label order: ``classes.json`` when prepare wrote one, else the label numbers."""
    path = Path(dataset) / "classes.json"
    if path.exists():
        return list(json.loads(path.read_text()))
    return [str(c) for c in range(1 + max(r["label"] for r in items))]
