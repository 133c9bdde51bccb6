"""A prepared dataset's items held column by column: numpy arrays and string tables, no object per item.

Why: a DataLoader worker is a fork of its parent, and reading a Python object writes its reference
count, so every page of a list of dicts that a worker walks becomes the worker's own copy. Over an
epoch of 10⁷ items each worker grows toward a full copy of the manifest. Numbers in numpy arrays and
strings packed into one byte buffer per field are read without being written: the pages stay shared.

Every field of the records becomes one column whose kind follows from the values it holds: booleans,
integers and floats as typed arrays, strings as a string table (one byte buffer and offsets; a field
with few distinct values, such as a class name or a codec, as codes into its distinct values), and
anything else (a split's dict) as the JSON of each value in a string table. A record comes back as the
same dict it was built from, keys absent from it absent again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

# A string field with at most this share of distinct values is stored as codes into its distinct values.
CATEGORICAL_SHARE = 0.5


class StringTable:
    """Strings packed in one byte buffer: ``offsets[i]:offsets[i + 1]`` holds string ``i`` (UTF-8;
    surrogate escapes kept, as file names that are not UTF-8 carry them)."""

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray):
        self.buffer = buffer
        self.offsets = offsets

    @classmethod
    def of(cls, strings: Sequence[str]) -> "StringTable":
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes().decode("utf-8", "surrogateescape")

    def take(self, indices: np.ndarray) -> "StringTable":
        lengths = self.offsets[indices + 1] - self.offsets[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Gather every selected byte at once: each output byte's source is its string's start plus its
        # position within the string.
        starts = np.repeat(self.offsets[indices], lengths)
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        return StringTable(self.buffer[starts + within], offsets)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes


_ABSENT = object()


class Column:
    """One field: ``present`` (the record has the key), ``null`` (its value is None) and the values;
    strings (and the JSON of other values) as codes into their distinct values where they repeat."""

    def __init__(self, kind: str, values, present: np.ndarray, null: np.ndarray, categories: list | None = None):
        self.kind = kind  # bool, int, float, str or json
        self.values = values  # an array, a StringTable, or codes into ``categories``
        self.present = present
        self.null = null
        self.categories = categories

    @classmethod
    def of(cls, key: str, records: Sequence[dict]) -> "Column":
        raw = [r.get(key, _ABSENT) for r in records]
        present = np.fromiter((v is not _ABSENT for v in raw), dtype=bool, count=len(raw))
        null = np.fromiter((v is None or v is _ABSENT for v in raw), dtype=bool, count=len(raw))
        types = set(map(type, raw)) - {type(None), object}
        filled = raw if not null.any() else [None if v is _ABSENT else v for v in raw]
        if types == {bool}:
            return cls("bool", np.array([bool(v) for v in filled], dtype=bool), present, null)
        if types == {int}:
            return cls("int", np.array([0 if v is None else v for v in filled], dtype=np.int64), present, null)
        if types == {float} or not types:  # a field that is None everywhere reads as NaN in field()
            return cls("float", np.array([0.0 if v is None else v for v in filled], dtype=np.float64), present, null)
        if types == {str}:
            return cls._strings("str", ["" if v is None else v for v in filled], present, null)
        return cls._strings("json", [json.dumps(v) for v in filled], present, null)

    @classmethod
    def _strings(cls, kind: str, strings: list[str], present: np.ndarray, null: np.ndarray) -> "Column":
        categories = sorted(set(strings))
        if len(categories) <= max(1, CATEGORICAL_SHARE * len(strings)):
            lookup = {c: code for code, c in enumerate(categories)}
            return cls(kind, np.array([lookup[s] for s in strings], dtype=np.int32), present, null, categories)
        return cls(kind, StringTable.of(strings), present, null)

    def value(self, index: int):
        if self.null[index]:
            return None
        if self.kind in ("str", "json"):
            text = self.categories[self.values[index]] if self.categories is not None else self.values[index]
            return json.loads(text) if self.kind == "json" else text
        return self.values[index].item()  # a Python bool, int or float, as JSON gave

    def take(self, indices: np.ndarray) -> "Column":
        values = self.values.take(indices) if isinstance(self.values, StringTable) else self.values[indices]
        return Column(self.kind, values, self.present[indices], self.null[indices], self.categories)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.present.nbytes + self.null.nbytes


class Manifest(Sequence):
    """The items of a dataset as columns; indexing gives a record (a new dict each time), slicing and
    :meth:`take` give a manifest of the selected items."""

    def __init__(self, columns: dict[str, Column], length: int):
        self.columns = columns
        self._length = length

    @classmethod
    def of(cls, records: Iterable[dict] | "Manifest") -> "Manifest":
        if isinstance(records, Manifest):
            return records
        records = list(records)
        keys: dict[str, None] = {}
        for record in records:
            keys.update(dict.fromkeys(record))
        return cls({key: Column.of(key, records) for key in keys}, len(records))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(self._length)[index])
        index = int(index)
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"item {index} of a manifest of {self._length}")
        return {key: column.value(index) for key, column in self.columns.items() if column.present[index]}

    def __iter__(self) -> Iterator[dict]:
        for index in range(self._length):
            yield self[index]

    def take(self, indices) -> "Manifest":
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < -self._length or indices.max() >= self._length):
            raise IndexError(f"items out of range for a manifest of {self._length}")
        indices = np.where(indices < 0, indices + self._length, indices)
        return Manifest({key: column.take(indices) for key, column in self.columns.items()}, len(indices))

    def field(self, key: str) -> np.ndarray:
        """A numeric or boolean field of every item as an array (NaN, or False, where absent or None)."""
        column = self.columns.get(key)
        if column is None:
            return np.full(self._length, np.nan)
        if column.kind not in ("bool", "int", "float"):
            raise TypeError(f"{key} holds {column.kind} values, not numbers")
        missing = column.null | ~column.present
        if column.kind == "bool":
            return column.values & ~missing
        return np.where(missing, np.nan, column.values.astype(np.float64))

    def strings(self, key: str) -> list[str | None]:
        """A field of every item as a list (for the few whole-dataset uses, such as a round's ids)."""
        column = self.columns[key]
        return [column.value(i) if column.present[i] else None for i in range(self._length)]

    @property
    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.columns.values())

    def __repr__(self) -> str:
        return f"Manifest({self._length} items, fields {list(self.columns)}, {self.nbytes / 1e6:.1f} MB)"
