"""Which files make a dataset, with their labels and splits, for each supported layout.

A split is a dict from split number (as a string: "1", "2", ...) to "train", "test" or another
name; an item not used by a split simply lacks that key. Labels are class indices in sorted class-
name order, except where the dataset defines its own numbering (UCF101's classInd.txt, ESC-50's
target column).

Multi-label datasets (``vggsound``, ``audioset``) give each item ``labels``, every class index it carries
in the order its metadata lists them, and ``label``, the first of them: readers that know one label per
item keep working, and a dataset whose every item has one label is an ordinary single-label one.

A metadata line that cannot be read (a class index without its number, a CSV row without its times)
is a :class:`FormatError` naming the file and the line, never a guess: a skipped or misread line
would silently drop or mislabel videos.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import FormatError

# Every container FFmpeg (PyAV) reads that datasets ship in; a file that does not decode is rejected
# with the reason, never skipped unseen.
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".opus"}


@dataclass
class Item:
    path: Path  # absolute
    id: str  # stable, unique: the path relative to ROOT without its extension
    label: int | None = None
    label_name: str | None = None
    split: dict[str, str] = field(default_factory=dict)
    missing: bool = False  # listed by the dataset's metadata but not on disk
    labels: list[int] | None = None  # multi-label formats: every class of the item, ``label`` being the first


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
        # Hidden files and folders (.DS_Store, ._clip.mp4 of macOS, .git) are not the dataset's.
        subfolders[:] = [d for d in subfolders if not d.startswith(".")
                         and (exclude is None or Path(folder, d) != exclude)]
        found.extend(Path(folder, f) for f in files if os.path.splitext(f)[1].lower() in extensions
                     and not f.startswith(".") and _file_or_dangling(os.path.join(folder, f)))
    return sorted(found)


def _file_or_dangling(path: str) -> bool:
    """A file, or a symbolic link whose target is gone: listed, so prepare rejects it with the reason
    instead of skipping it unseen."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


def _item_id(root: Path, path: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def list_dataset(root: Path, fmt: str, csv_path: Path | None = None, exclude: Path | None = None) -> Listing:
    """The items of ``root`` in layout ``fmt``; media under the folder ``exclude`` are never listed."""
    if fmt not in READERS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(READERS)}")
    return READERS[fmt].read(root, csv_path, exclude)


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


# ---- multi-label audio-visual datasets: one row per YouTube segment ------------------------------------

@dataclass
class _Segment:
    youtube_id: str
    start: int  # whole seconds, as the datasets' own file names use them
    end: int | None
    split: str
    labels: list[str]
    where: str  # "file, line N" of its first row, for messages about a later contradicting row

    @property
    def id(self) -> str:
        return f"{self.youtube_id}_{self.start:06d}"


def _seconds(path: Path, line: int, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad_row(path, line, f"{what} should be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise _bad_row(path, line, f"{what} should be 0 or more seconds, got {text!r}")
    return value


def _add_segment(segments: dict[str, _Segment], segment: _Segment, path: Path, line: int) -> None:
    """One item per segment: a segment listed again adds its labels, but may not change its split."""
    first = segments.get(segment.id)
    if first is None:
        segments[segment.id] = segment
        return
    if first.split != segment.split:
        raise _bad_row(path, line, f"segment {segment.id} is in the {segment.split} part here but in the "
                                   f"{first.split} part at {first.where}: a test item must never train")
    first.labels += [name for name in segment.labels if name not in first.labels]


def _segment_items(root: Path, segments: dict[str, _Segment], classes: list[str], exclude: Path | None
                   ) -> list[Item]:
    """Items of ``segments``, each found as ``<id>_<start:06d>_<end:06d>``, ``<id>_<start:06d>`` or, for a
    YouTube id with one segment only, ``<id>`` (any video or audio extension, anywhere under ROOT)."""
    index = {name: i for i, name in enumerate(classes)}
    on_disk = {p.stem: p for p in media_files(root, VIDEO_EXTENSIONS | AUDIO_EXTENSIONS, exclude)}
    per_video = Counter(s.youtube_id for s in segments.values())
    items = []
    for segment in segments.values():
        stems = [f"{segment.id}_{segment.end:06d}"] if segment.end is not None else []
        stems.append(segment.id)
        if per_video[segment.youtube_id] == 1:
            stems.append(segment.youtube_id)
        path = next((on_disk[stem] for stem in stems if stem in on_disk), None)
        labels = [index[name] for name in segment.labels]
        items.append(Item(path or root / f"{segment.id}.mp4", segment.id, labels[0], segment.labels[0],
                          {"1": segment.split}, missing=path is None, labels=labels))
    return sorted(items, key=lambda i: i.id)


def _audio_only(items: list[Item]) -> bool:
    found = [i.path for i in items if not i.missing]
    return bool(found) and all(p.suffix.lower() in AUDIO_EXTENSIONS for p in found)


def _vggsound(root: Path, csv_path: Path | None, exclude: Path | None) -> Listing:
    """VGGSound's ``vggsound.csv``: rows ``YouTube id, start seconds, label, train|test``, no header."""
    path = Path(csv_path) if csv_path else _find_one(root, "vggsound.csv", "VGGSound CSV")
    reader = csv.reader(io.StringIO(_read_text(path)))
    segments: dict[str, _Segment] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 4:
            raise _bad_row(path, line, f"expected 4 fields (YouTube id, start seconds, label, train|test), got "
                                       f"{len(row)}: {','.join(row)[:80]!r} (quote a label that holds a comma)")
        youtube_id, start, label, split = (cell.strip() for cell in row)
        if not youtube_id or not label:
            raise _bad_row(path, line, "the YouTube id and the label must not be empty")
        if split not in ("train", "test"):
            raise _bad_row(path, line, f"the split should be train or test, got {split!r}")
        segment = _Segment(youtube_id, int(_seconds(path, line, start, "the start")), None, split, [label],
                           f"{path.name}, line {line}")
        _add_segment(segments, segment, path, line)
    if not segments:
        raise FormatError(f"{path} lists no segment")
    classes = sorted({name for s in segments.values() for name in s.labels})
    items = _segment_items(root, segments, classes, exclude)
    return Listing(items, classes, _audio_only(items))


_AUDIOSET_PARTS = (("eval", "test"), ("test", "test"), ("train", "train"))


def _audioset_classes(path: Path) -> tuple[list[str], dict[str, str]]:
    """Display names in index order and the name of each mid, from ``class_labels_indices.csv``."""
    by_index: dict[int, tuple[str, str]] = {}
    for line, row in _csv_rows(path, ("index", "mid", "display_name")):
        if not row["index"].strip().isdigit():
            raise _bad_row(path, line, f"index should be a class number, got {row['index']!r}")
        number, mid, name = int(row["index"]), row["mid"].strip(), row["display_name"].strip()
        if number in by_index:
            raise _bad_row(path, line, f"class index {number} is given twice")
        if any(mid == other for other, _ in by_index.values()):
            raise _bad_row(path, line, f"mid {mid} is given twice")
        by_index[number] = (mid, name)
    if sorted(by_index) != list(range(len(by_index))):
        gap = min(set(range(len(by_index))) - set(by_index))
        raise FormatError(f"{path}: class indices should run 0 to {len(by_index) - 1}; {gap} is missing")
    return [by_index[i][1] for i in range(len(by_index))], {mid: name for mid, name in by_index.values()}


def _audioset(root: Path, csv_path: Path | None, exclude: Path | None) -> Listing:
    """AudioSet's segment CSVs (``# YTID, start_seconds, end_seconds, positive_labels`` with the labels a
    quoted comma list of mids) and ``class_labels_indices.csv``; a file whose name holds ``eval`` (or
    ``test``) is the test part, one holding ``train`` the training part."""
    classes, name_of = _audioset_classes(_find_one(root, "class_labels_indices.csv", "AudioSet class index"))
    files = [Path(csv_path)] if csv_path else [p for p in sorted(root.rglob("*segments*.csv"))
                                               if exclude is None or exclude not in p.parents]
    if not files:
        raise FormatError(f"no AudioSet segment CSV (*segments*.csv, e.g. eval_segments.csv) under {root}")
    segments: dict[str, _Segment] = {}
    for path in files:
        split = next((part for word, part in _AUDIOSET_PARTS if word in path.name.lower()), None)
        if split is None:
            raise FormatError(f"{path}: cannot tell whether it lists training or evaluation segments; name it "
                              "as AudioSet does (balanced_train_segments.csv, eval_segments.csv, ...)")
        for line, text in enumerate(_read_text(path).split("\n"), 1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            row = next(csv.reader([text], skipinitialspace=True))
            if len(row) != 4:
                raise _bad_row(path, line, "expected 4 fields (YTID, start_seconds, end_seconds, "
                                           f"\"positive_labels\"), got {len(row)}: {text.strip()[:80]!r} (the "
                                           "labels need their quotes)")
            youtube_id, start, end, mids = (cell.strip() for cell in row)
            start_s, end_s = _seconds(path, line, start, "start_seconds"), _seconds(path, line, end, "end_seconds")
            if not youtube_id:
                raise _bad_row(path, line, "the YTID must not be empty")
            if end_s <= start_s:
                raise _bad_row(path, line, f"end_seconds {end} is not after start_seconds {start}")
            labels = [mid.strip() for mid in mids.split(",") if mid.strip()]
            if not labels:
                raise _bad_row(path, line, "no label (positive_labels is empty)")
            unknown = [mid for mid in labels if mid not in name_of]
            if unknown:
                raise _bad_row(path, line, f"label {unknown[0]} is not in class_labels_indices.csv")
            segment = _Segment(youtube_id, int(start_s), int(end_s), split, [name_of[mid] for mid in labels],
                               f"{path.name}, line {line}")
            _add_segment(segments, segment, path, line)
    if not segments:
        raise FormatError(f"{', '.join(str(p) for p in files)} list no segment")
    items = _segment_items(root, segments, classes, exclude)
    return Listing(items, classes, _audio_only(items))


# ---- the table of layouts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reader:
    """One layout ``prepare --format`` reads: how to list it, and one line of help for the flag."""

    name: str
    help: str
    list: Callable[[Path, Path | None, Path | None], Listing]  # (root, csv, exclude)

    def read(self, root: Path, csv_path: Path | None, exclude: Path | None) -> Listing:
        return self.list(root, csv_path, exclude)


READERS = {r.name: r for r in (
    Reader("folder", "ROOT/<class>/<file> gives labels (flat: none)", lambda root, _, x: _folder(root, x)),
    Reader("ucf101", "the official split files, all 3 splits", lambda root, _, x: _ucf101(root, x)),
    Reader("hmdb51", "the official split files, all 3 splits", lambda root, _, x: _hmdb51(root, x)),
    Reader("esc50", "audio only, meta/esc50.csv, 5 folds", lambda root, _, x: _esc50(root, x)),
    Reader("kinetics-csv", "--csv rows (label,youtube_id,time_start,time_end,split)", _kinetics),
    Reader("vggsound", "vggsound.csv; a row's media is <id>_<start:06d>[_<end:06d>].<ext> or <id>.<ext>", _vggsound),
    Reader("audioset", "*segments*.csv + class_labels_indices.csv (multi-label); media named as for vggsound",
           _audioset),
)}
FORMAT_HELP = "; ".join(f"{r.name}: {r.help}" for r in READERS.values()) + "."
