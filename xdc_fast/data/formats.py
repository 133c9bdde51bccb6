"""Which files make a dataset, with their labels and splits, for each supported layout.

A split is a dict from split number (as a string: "1", "2", ...) to "train", "test" or another
name; an item not used by a split simply lacks that key. Labels are class indices in sorted class-
name order, except where the dataset defines its own numbering (UCF101's classInd.txt, ESC-50's
target column).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import XdcError

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3"}
FORMATS = ("folder", "ucf101", "hmdb51", "esc50", "kinetics-csv")


class FormatError(XdcError):
    """The folder does not look like the requested format (a user error, reported without traceback)."""


@dataclass
class Item:
    path: Path  # absolute
    id: str  # stable, unique: the path relative to ROOT without its extension
    label: int | None = None
    label_name: str | None = None
    split: dict[str, str] = field(default_factory=dict)
    missing: bool = False  # listed by the dataset's metadata but not on disk


@dataclass
class Listing:
    items: list[Item]
    classes: list[str]
    audio_only: bool = False


def media_files(root: Path, extensions: set[str]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def _item_id(root: Path, path: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def list_dataset(root: Path, fmt: str, csv_path: Path | None = None) -> Listing:
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {"folder": _folder, "ucf101": _ucf101, "hmdb51": _hmdb51, "esc50": _esc50,
            "kinetics-csv": lambda r: _kinetics(r, csv_path)}[fmt](root)


def _folder(root: Path) -> Listing:
    """``ROOT/<class>/.../<file>`` gives labels; files directly in ROOT have none."""
    files = media_files(root, VIDEO_EXTENSIONS | AUDIO_EXTENSIONS)
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for p in files:
        parts = p.relative_to(root).parts
        name = parts[0] if len(parts) > 1 else None
        items.append(Item(p, _item_id(root, p), index.get(name), name))
    audio_only = bool(files) and all(p.suffix.lower() in AUDIO_EXTENSIONS for p in files)
    return Listing(items, classes, audio_only)


def _find_one(root: Path, pattern: str, what: str) -> Path:
    found = sorted(root.rglob(pattern))
    if not found:
        raise FormatError(f"no {what} ({pattern}) under {root}")
    return found[0]


def _ucf101(root: Path) -> Listing:
    class_index = _find_one(root, "classInd.txt", "UCF101 class index")
    lists = class_index.parent
    classes_by_number = {}
    for line in class_index.read_text().split("\n"):
        if line.strip():
            number, name = line.split()
            classes_by_number[int(number)] = name
    classes = [classes_by_number[n] for n in sorted(classes_by_number)]
    index = {name: i for i, name in enumerate(classes)}
    on_disk = {p.relative_to(root).as_posix(): p for p in media_files(root, VIDEO_EXTENSIONS)}
    by_name = {Path(rel).name: p for rel, p in on_disk.items()}
    items: dict[str, Item] = {}
    for split in ("1", "2", "3"):
        for kind in ("train", "test"):
            listing = lists / f"{kind}list0{split}.txt"
            if not listing.exists():
                continue
            for line in listing.read_text().split("\n"):
                if not line.strip():
                    continue
                rel = line.split()[0]
                name = rel.split("/")[0]
                item = items.get(rel)
                if item is None:
                    path = on_disk.get(rel) or by_name.get(Path(rel).name)
                    item = Item(path or root / rel, Path(rel).with_suffix("").as_posix(), index.get(name), name,
                                missing=path is None)
                    items[rel] = item
                item.split[split] = kind
    if not items:
        raise FormatError(f"no UCF101 train/test lists (trainlist01.txt, ...) beside {class_index}")
    return Listing(sorted(items.values(), key=lambda i: i.id), classes)


_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<n>\d)\.txt$")


def _hmdb51(root: Path) -> Listing:
    split_files = [p for p in sorted(root.rglob("*_test_split*.txt")) if _HMDB_SPLIT.match(p.name)]
    if not split_files:
        raise FormatError(f"no HMDB51 split files (<class>_test_split<N>.txt) under {root}")
    classes = sorted({_HMDB_SPLIT.match(p.name)["cls"] for p in split_files})
    index = {name: i for i, name in enumerate(classes)}
    by_name = {p.name: p for p in media_files(root, VIDEO_EXTENSIONS)}
    tags = {"1": "train", "2": "test"}  # 0 = not used by that split
    items: dict[str, Item] = {}
    for listing in split_files:
        match = _HMDB_SPLIT.match(listing.name)
        name, split = match["cls"], match["n"]
        for line in listing.read_text().split("\n"):
            fields = line.split()
            if len(fields) != 2:
                continue
            video, tag = fields
            item = items.get(video)
            if item is None:
                path = by_name.get(video)
                item = Item(path or root / name / video, f"{name}/{Path(video).stem}", index[name], name,
                            missing=path is None)
                items[video] = item
            if tag in tags:
                item.split[split] = tags[tag]
    return Listing(sorted(items.values(), key=lambda i: i.id), classes)


def _esc50(root: Path) -> Listing:
    meta = root / "meta" / "esc50.csv"
    if not meta.exists():
        raise FormatError(f"no ESC-50 metadata at {meta}")
    rows = list(csv.DictReader(meta.open()))
    names = {int(r["target"]): r["category"] for r in rows}
    classes = [names.get(i, f"class-{i}") for i in range(max(names) + 1)] if names else []
    items = []
    for r in rows:
        path = root / "audio" / r["filename"]
        fold = r["fold"]
        split = {str(f): ("test" if str(f) == fold else "train") for f in range(1, 6)}
        items.append(Item(path, Path(r["filename"]).stem, int(r["target"]), r["category"], split,
                          missing=not path.exists()))
    return Listing(items, classes, audio_only=True)


def _kinetics(root: Path, csv_path: Path | None) -> Listing:
    if csv_path is None:
        candidates = sorted(root.glob("*.csv"))
        if len(candidates) != 1:
            raise FormatError(f"kinetics-csv needs --csv FILE (found {len(candidates)} CSV files in {root})")
        csv_path = candidates[0]
    rows = list(csv.DictReader(Path(csv_path).open()))
    classes = sorted({r["label"] for r in rows})
    index = {name: i for i, name in enumerate(classes)}
    on_disk = {p.stem: p for p in media_files(root, VIDEO_EXTENSIONS)}
    items = []
    for r in rows:
        stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        path = on_disk.get(stem)
        items.append(Item(path or root / f"{stem}.mp4", stem, index[r["label"]], r["label"],
                          {"1": r.get("split", "train")}, missing=path is None))
    return Listing(items, classes)
