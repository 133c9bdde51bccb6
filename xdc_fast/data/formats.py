"""Which files make a dataset, with their labels and splits, for each supported layout.

A split is a dict from split number (as a string: "1", "2", ...) to "train", "test" or another
name; an item not used by a split simply lacks that key. Labels are class indices in sorted class-
name order, except where the dataset defines its own numbering (UCF101's classInd.txt, ESC-50's
target column).

A metadata line that cannot be read (a class index without its number, a CSV row without its times)
is a :class:`FormatError` naming the file and the line, never a guess: a skipped or misread line
would silently drop or mislabel videos.
"""

from __future__ import annotations

import csv
import io
import os
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


def media_files(root: Path, extensions: set[str], exclude: Path | None = None) -> list[Path]:
    """Files under ``root`` with one of ``extensions``, sorted; nothing under the folder ``exclude``.

    ``exclude`` is where prepare writes (an ``--out`` inside ROOT): its WAVs are outputs, and read as
    input they would make a phantom class of the output folder's name."""
    found = []
    for folder, subfolders, files in os.walk(root):
        if exclude is not None:
            subfolders[:] = [d for d in subfolders if Path(folder, d) != exclude]
        found.extend(Path(folder, f) for f in files if os.path.splitext(f)[1].lower() in extensions
                     and os.path.isfile(os.path.join(folder, f)))
    return sorted(found)


def _item_id(root: Path, path: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def list_dataset(root: Path, fmt: str, csv_path: Path | None = None, exclude: Path | None = None) -> Listing:
    """The items of ``root`` in layout ``fmt``; media under the folder ``exclude`` are never listed."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {"folder": _folder, "ucf101": _ucf101, "hmdb51": _hmdb51, "esc50": _esc50,
            "kinetics-csv": lambda r, x: _kinetics(r, csv_path, x)}[fmt](root, exclude)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise FormatError(f"{path} is not a UTF-8 text file ({error.reason} at byte {error.start}); "
                          "point prepare at the original metadata file") from None


def _csv_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a CSV file with a header naming at least ``required``."""
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    missing = [name for name in required if name not in (reader.fieldnames or [])]
    if missing:
        raise FormatError(f"{path}, line 1: the header lacks column(s) {', '.join(missing)} "
                          f"(needs {','.join(required)}; found {','.join(reader.fieldnames or []) or 'nothing'})")
    rows = []
    for row in reader:
        if not any((value or "").strip() for key, value in row.items() if key is not None):
            continue
        empty = [name for name in required if not (row.get(name) or "").strip()]
        if empty:
            raise FormatError(f"{path}, line {reader.line_num}: no value for {', '.join(empty)}")
        rows.append((reader.line_num, row))
    return rows


def _bad_row(path: Path, line: int, what: str) -> FormatError:
    return FormatError(f"{path}, line {line}: {what}; fix or delete that line")


def _folder(root: Path, exclude: Path | None) -> Listing:
    """``ROOT/<class>/.../<file>`` gives labels; files directly in ROOT have none."""
    files = media_files(root, VIDEO_EXTENSIONS | AUDIO_EXTENSIONS, exclude)
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


def _ucf101(root: Path, exclude: Path | None) -> Listing:
    class_index = _find_one(root, "classInd.txt", "UCF101 class index")
    lists = class_index.parent
    classes_by_number: dict[int, str] = {}
    for number, line in enumerate(_read_text(class_index).split("\n"), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise _bad_row(class_index, number, f"expected '<number> <class name>', got {line.strip()!r}")
        if int(fields[0]) in classes_by_number:
            raise _bad_row(class_index, number, f"class number {fields[0]} is given twice")
        classes_by_number[int(fields[0])] = fields[1]
    classes = [classes_by_number[n] for n in sorted(classes_by_number)]
    index = {name: i for i, name in enumerate(classes)}
    on_disk = {p.relative_to(root).as_posix(): p for p in media_files(root, VIDEO_EXTENSIONS, exclude)}
    by_name = {Path(rel).name: p for rel, p in on_disk.items()}
    items: dict[str, Item] = {}
    for split in ("1", "2", "3"):
        for kind in ("train", "test"):
            listing = lists / f"{kind}list0{split}.txt"
            if not listing.exists():
                continue
            for number, line in enumerate(_read_text(listing).split("\n"), 1):
                if not line.strip():
                    continue
                rel = line.split()[0]
                name = rel.split("/")[0]
                if name not in index:
                    raise _bad_row(listing, number, f"{rel!r} is not under a class folder of {class_index.name} "
                                                    "(expected '<class>/<file>')")
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


def _hmdb51(root: Path, exclude: Path | None) -> Listing:
    split_files = [p for p in sorted(root.rglob("*_test_split*.txt")) if _HMDB_SPLIT.match(p.name)]
    if not split_files:
        raise FormatError(f"no HMDB51 split files (<class>_test_split<N>.txt) under {root}")
    classes = sorted({_HMDB_SPLIT.match(p.name)["cls"] for p in split_files})
    index = {name: i for i, name in enumerate(classes)}
    by_name = {p.name: p for p in media_files(root, VIDEO_EXTENSIONS, exclude)}
    tags = {"1": "train", "2": "test"}  # 0 = not used by that split
    items: dict[str, Item] = {}
    for listing in split_files:
        match = _HMDB_SPLIT.match(listing.name)
        name, split = match["cls"], match["n"]
        for number, line in enumerate(_read_text(listing).split("\n"), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise _bad_row(listing, number, f"expected '<video file> <0|1|2>', got {line.strip()!r}")
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


def _esc50(root: Path, exclude: Path | None) -> Listing:
    meta = root / "meta" / "esc50.csv"
    if not meta.exists():
        raise FormatError(f"no ESC-50 metadata at {meta}")
    rows = []
    names: dict[int, str] = {}
    for line, r in _csv_rows(meta, ("filename", "fold", "target", "category")):
        if not r["target"].strip().isdigit():
            raise _bad_row(meta, line, f"target should be a class number, got {r['target']!r}")
        if r["fold"].strip() not in ("1", "2", "3", "4", "5"):
            raise _bad_row(meta, line, f"fold should be 1 to 5, got {r['fold']!r}")
        if names.setdefault(int(r["target"]), r["category"]) != r["category"]:
            raise _bad_row(meta, line, f"target {r['target']} is {r['category']!r} here but "
                                       f"{names[int(r['target'])]!r} on an earlier line")
        rows.append(r)
    classes = [names.get(i, f"class-{i}") for i in range(max(names) + 1)] if names else []
    items = []
    for r in rows:
        path = root / "audio" / r["filename"]
        fold = r["fold"].strip()
        split = {str(f): ("test" if str(f) == fold else "train") for f in range(1, 6)}
        items.append(Item(path, Path(r["filename"]).stem, int(r["target"]), r["category"], split,
                          missing=not path.exists()))
    return Listing(items, classes, audio_only=True)


def _kinetics(root: Path, csv_path: Path | None, exclude: Path | None) -> Listing:
    if csv_path is None:
        candidates = sorted(root.glob("*.csv"))
        if len(candidates) != 1:
            raise FormatError(f"kinetics-csv needs --csv FILE (found {len(candidates)} CSV files in {root})")
        csv_path = candidates[0]
    csv_path = Path(csv_path)
    clips: dict[str, tuple[int, dict]] = {}
    for line, r in _csv_rows(csv_path, ("label", "youtube_id", "time_start", "time_end")):
        try:
            start, end = int(float(r["time_start"])), int(float(r["time_end"]))
        except ValueError:
            raise _bad_row(csv_path, line, f"time_start and time_end should be seconds, got "
                                           f"{r['time_start']!r} and {r['time_end']!r}") from None
        stem = f"{r['youtube_id'].strip()}_{start:06d}_{end:06d}"
        if stem in clips:
            first_line, first = clips[stem]
            if first["label"] != r["label"]:
                raise _bad_row(csv_path, line, f"clip {stem} is {r['label']!r} here but {first['label']!r} "
                                               f"on line {first_line}")
            continue  # the same clip listed twice: one item
        clips[stem] = (line, r)
    classes = sorted({r["label"] for _, r in clips.values()})
    index = {name: i for i, name in enumerate(classes)}
    on_disk = {p.stem: p for p in media_files(root, VIDEO_EXTENSIONS, exclude)}
    items = []
    for stem, (_, r) in clips.items():
        path = on_disk.get(stem)
        items.append(Item(path or root / f"{stem}.mp4", stem, index[r["label"]], r["label"],
                          {"1": (r.get("split") or "train").strip() or "train"}, missing=path is None))
    return Listing(items, classes)
