import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from xdc_fast.data.clips import ClipConfig
from xdc_fast.data.dataset import ClipDataset
from xdc_fast.data.manifest import Manifest, StringTable
from xdc_fast.data.prepare import load_manifest


def record_like(i: int, rng: np.random.Generator) -> dict:
    """A record shaped like prepare's, with the variety real manifests have: audio-only items without
    video fields, labels that are None, a split dict, names that are not UTF-8."""
    record = {"id": f"class_{i % 7}/video_{i:07d}\udce9", "path": f"/data/videos/class_{i % 7}/video_{i:07d}.mp4",
              "label": None if i % 11 == 0 else i % 7, "label_name": f"class_{i % 7}",
              "split": {"1": "train" if i % 3 else "test"}, "duration_s": float(rng.uniform(1, 30)),
              "has_audio": bool(i % 5), "audio": f"audio/v{i}.wav" if i % 5 else None}
    if i % 4:
        record |= {"fps": 30.0, "num_frames": int(rng.integers(30, 900)), "width": 640, "height": 360,
                   "video_codec": "h264"}
    return record


def test_records_come_back_as_they_went_in():
    rng = np.random.default_rng(0)
    records = [record_like(i, rng) for i in range(500)]
    manifest = Manifest.of(records)
    assert len(manifest) == 500
    assert list(manifest) == records
    assert manifest[-1] == records[-1] and manifest[123] == records[123]
    for key, value in manifest[0].items():  # the types JSON gave, not numpy's
        assert type(value) is type(records[0][key])
    # Few distinct class names: codes into them; many distinct paths: a string table.
    assert manifest.columns["label_name"].categories is not None
    assert manifest.columns["path"].kind == "str" and manifest.columns["path"].categories is None
    assert manifest.columns["split"].kind == "json" and len(manifest.columns["split"].categories) == 2
    with pytest.raises(IndexError):
        manifest[500]


def test_selections_equal_the_same_selection_of_the_list():
    rng = np.random.default_rng(1)
    records = [record_like(i, rng) for i in range(300)]
    manifest = Manifest.of(records)
    picks = rng.permutation(300)[:97]
    assert list(manifest.take(picks)) == [records[i] for i in picks]
    assert list(manifest[5:200:7]) == records[5:200:7]
    assert list(manifest.take(np.array([], dtype=np.int64))) == []
    assert list(manifest.take([-1, 0])) == [records[-1], records[0]]
    # Taking from a taken manifest composes.
    assert list(manifest.take(picks).take([3, 1])) == [records[picks[3]], records[picks[1]]]


def test_fields_as_arrays():
    rng = np.random.default_rng(2)
    records = [record_like(i, rng) for i in range(50)]
    manifest = Manifest.of(records)
    labels = manifest.field("label")
    expected = np.array([np.nan if r["label"] is None else r["label"] for r in records])
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(manifest.field("fps"), [r.get("fps", np.nan) for r in records])
    assert manifest.strings("id") == [r["id"] for r in records]
    with pytest.raises(TypeError):
        manifest.field("path")
    assert np.isnan(manifest.field("no_such_field")).all()
    none_everywhere = Manifest.of([{"id": "a", "label": None}, {"id": "b", "label": None}])
    assert np.isnan(none_everywhere.field("label")).all() and none_everywhere[1] == {"id": "b", "label": None}


def test_string_table_gathers_bytes_exactly():
    strings = ["", "a", "ünïcode", "x" * 1000, "\udcff", "last"]
    table = StringTable.of(strings)
    assert [table[i] for i in range(len(table))] == strings
    taken = table.take(np.array([3, 0, 2, 2, 5]))
    assert [taken[i] for i in range(len(taken))] == [strings[i] for i in (3, 0, 2, 2, 5)]


def test_clip_dataset_holds_its_items_as_columns(prepared):
    data = ClipDataset(prepared, ClipConfig(frames=4, stride=2, resize_short=40, crop=32, audio_seconds=0.5, n_mels=20))
    assert isinstance(data.items, Manifest)
    assert list(data.items) == load_manifest(prepared)
    data.items = list(data.items)[:2]  # a list assigned is held as columns too
    assert isinstance(data.items, Manifest) and len(data) == 2


def unique_memory() -> int:
    """This process's unique set size: the pages no other process shares (Linux)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Private_Clean", "Private_Dirty"):
                fields[name] = int(rest.split()[0]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


class RecordsRead(Dataset):
    """Reads every field of the planned item, as a loader does, and reports the worker's unique memory
    at the start and end of its part of the epoch."""

    def __init__(self, clips: ClipDataset, batches: int):
        self.clips = clips
        self.batches = batches

    def __len__(self):
        return len(self.clips.items)

    def __getitems__(self, indices):
        total = sum(sum(value is not None for value in self.clips.items[i].values()) for i in indices)
        return [(torch.utils.data.get_worker_info().id, unique_memory(), total)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps_rollup"), reason="needs Linux's smaps_rollup")
def test_workers_memory_stays_flat_over_an_epoch_of_a_million_items(prepared):
    """A million items, 4 workers reading every field of all of them: each worker's unique memory stays
    under 64 MB and grows by less than 24 MB (measured: 6 MB, growing under 1 MB). The same records as a
    list of dicts, as json gives them, grew each worker by 372 MB: a quarter of the manifest each."""
    clips = ClipDataset(prepared, ClipConfig())
    rng = np.random.default_rng(3)
    template = [record_like(i, rng) for i in range(1000)]
    n = 1_000_000
    columns = Manifest.of(template)
    # A million items from a thousand distinct records: take() repeats rows as a million-line
    # manifest's columns would hold them, without building a million dicts here.
    clips.items = columns.take(np.arange(n) % 1000)
    batch = 5000
    loader = DataLoader(RecordsRead(clips, math.ceil(n / batch)), batch_size=batch, num_workers=4,
                        collate_fn=lambda x: x[0], shuffle=False, persistent_workers=False)
    seen: dict[int, list[int]] = {}
    fields_read = 0
    for worker, uss, total in loader:
        seen.setdefault(worker, []).append(uss)
        fields_read += total
    assert sorted(seen) == [0, 1, 2, 3]
    fields = sum(sum(value is not None for value in r.values()) for r in template)
    assert fields_read == fields * (n // 1000)  # every item was read
    bound = 24 * 2**20
    for worker, samples in seen.items():
        growth = max(samples) - samples[0]
        print(f"worker {worker}: unique memory {samples[0] / 2**20:.0f} MB, grew {growth / 2**20:.1f} MB")
        assert growth < bound, f"worker {worker}'s unique memory grew by {growth / 2**20:.0f} MB over the epoch"
        assert max(samples) < 64 * 2**20
