import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import prepared_synthetic
from xdc_fast.data.prepare import load_manifest, read_jsonl
from xdc_fast.data.pyav_backend import decode_frame_indices
from xdc_fast.config import PretrainConfig
from xdc_fast.pretrain import pretrain
from xdc_fast.report import (ReportError, largest_clusters, latest_clusters, montage_tiles, read_curves,
                             round_boundaries, sorted_sizes, write_report)

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome

FAST = dict(clusters=3, epochs=2, epochs_per_round=1, batch_size=4, frames=4, resize_short=40, crop=32, pca_dim=8, audio_seconds=0.5,
            n_mels=20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real two-round run (one epoch per round) and its dataset."""
    root = tmp_path_factory.mktemp("report")
    prepared_synthetic(root, classes=3, videos_per_class=2, seconds=2.0, fps=12, width=48, height=48, seed=2)
    pretrain(root / "ds", root / "run", PretrainConfig.from_dict(FAST), log=lambda *a: None)
    return root / "run", root / "ds"


def _write_manifest(path, items):
    path.mkdir(parents=True)
    (path / "manifest.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))


def _assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width > 0 and height > 0
        assert np.asarray(image.convert("L")).std() > 0  # something was drawn, not a blank canvas


def test_report_writes_every_figure_as_a_png(trained, tmp_path):
    run, _ = trained
    paths = write_report(run, out=tmp_path / "report")  # the dataset comes from RUN/config.yaml
    assert sorted(p.name for p in paths) == ["cluster_sizes.png", "curves.png", "montage_audio.png",
                                            "montage_video.png"]
    for path in paths:
        assert path.parent == tmp_path / "report" and path.exists()
        _assert_png(path)


def test_default_output_is_the_runs_report_folder(trained):
    run, dataset = trained
    paths = write_report(run, dataset=dataset)
    assert paths and all(p.parent == run / "report" and p.exists() for p in paths)


def test_curves_follow_the_epochs_of_metrics_jsonl(trained, tmp_path):
    run, _ = trained
    records = read_jsonl(run / "metrics.jsonl")
    curves = read_curves(run)
    assert curves.epochs.tolist() == [0, 1] and curves.rounds.tolist() == [0, 1]
    assert round_boundaries(curves) == [0.5]
    assert set(curves.panels["training loss"]) == {"video_0", "audio_0"}
    for key, values in curves.panels["training loss"].items():
        assert values.tolist() == pytest.approx([r["loss"][key] for r in records])
    assert curves.panels["NMI to true classes"]["video"].tolist() == pytest.approx(
        [r["vs_true_labels"]["video"]["nmi"] for r in records])
    previous = curves.panels["NMI to previous round"]["audio"]  # round 0 has no previous clustering
    assert np.isnan(previous[0]) and previous[1] == pytest.approx(records[1]["nmi_to_previous"]["audio"])

    # Lines out of order, and an epoch logged twice by a resumed run: epoch order, the later line wins.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    again = {**records[0], "loss": {"video_0": 9.0, "audio_0": None}}
    lines = [records[1], records[0], again]
    (shuffled / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    curves = read_curves(shuffled)
    assert curves.epochs.tolist() == [0, 1]
    assert curves.panels["training loss"]["video_0"].tolist() == pytest.approx([9.0, records[1]["loss"]["video_0"]])
    assert np.isnan(curves.panels["training loss"]["audio_0"][0])


def test_largest_clusters_agree_with_bincount():
    rng = np.random.default_rng(0)
    labels = rng.choice(10, size=200, p=np.arange(1, 11) / 55)
    labels[labels == 4] = 3  # cluster 4 empty: it must never be chosen
    counts = np.bincount(labels, minlength=10)
    chosen = largest_clusters(labels, 4)
    assert [size for _, size in chosen] == sorted(counts, reverse=True)[:4]
    assert all(counts[cluster] == size for cluster, size in chosen)
    assert 4 not in [cluster for cluster, _ in largest_clusters(labels, 10)]
    assert largest_clusters(np.array([2, 0, 2, 0, 1]), 3) == [(0, 2), (2, 2), (1, 1)]  # ties: lower id first
    assert sorted_sizes(np.array([2, 2, 0]), 4).tolist() == [2, 1, 0, 0]


def test_latest_clusters_is_the_last_round(trained):
    run, _ = trained
    clusters = latest_clusters(run)
    saved = torch.load(run / "clusters" / "round_001.pt", weights_only=True)
    assert clusters.round == 1 and clusters.ids == saved["ids"] and clusters.k == 3
    assert set(clusters.labels) == {"video", "audio"}
    for modality, labels in clusters.labels.items():
        assert labels.tolist() == saved[f"{modality}_video_labels"].tolist()


def test_montage_rows_are_the_largest_clusters_showing_their_middle_frames(trained):
    run, dataset = trained
    clusters = latest_clusters(run)
    items = {item["id"]: item for item in load_manifest(dataset)}
    labels = clusters.labels["video"]
    counts = np.bincount(labels)
    rows = montage_tiles(labels, clusters.ids, list(items.values()), clusters=2, videos=1)
    assert len(rows) == min(2, int((counts > 0).sum()))
    assert [row.size for row in rows] == sorted(counts, reverse=True)[: len(rows)]
    for row in rows:
        assert counts[row.cluster] == row.size and len(row.tiles) == 1
        tile = row.tiles[0]
        assert labels[clusters.ids.index(tile.item_id)] == row.cluster
        item = items[tile.item_id]
        assert tile.title == item["label_name"] and tile.title
        expected = decode_frame_indices(item["path"], [item["num_frames"] // 2], size=None)[0]
        np.testing.assert_array_equal(tile.image, expected)
    # A whole row: every member of the largest cluster, in the run's id order.
    (full,) = montage_tiles(labels, clusters.ids, list(items.values()), clusters=1, videos=100)
    assert [t.item_id for t in full.tiles] == [i for i, c in zip(clusters.ids, labels) if c == full.cluster]


def test_a_video_that_cannot_be_decoded_gets_a_blank_tile(trained, tmp_path):
    run, dataset = trained
    clusters = latest_clusters(run)
    items = [{**item, "path": str(tmp_path / "moved.mp4")} for item in load_manifest(dataset)]
    rows = montage_tiles(clusters.labels["video"], clusters.ids, items, clusters=3, videos=6)
    assert sum(len(row.tiles) for row in rows) == len(clusters.ids)
    assert all(tile.image is None for row in rows for tile in row.tiles)
    _write_manifest(tmp_path / "broken", items)
    paths = write_report(run, dataset=tmp_path / "broken", out=tmp_path / "report")
    assert "montage_video.png" in [p.name for p in paths]


def test_run_without_metrics_is_refused(tmp_path):
    with pytest.raises(ReportError, match="not a pretraining run: no metrics.jsonl"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_missing_dataset_skips_only_the_montages(trained, tmp_path, caplog):
    run, _ = trained
    with caplog.at_level(logging.WARNING, logger="xdc_fast.report"):
        paths = write_report(run, dataset=tmp_path / "nowhere", out=tmp_path / "report")
    assert sorted(p.name for p in paths) == ["cluster_sizes.png", "curves.png"]
    assert "montages skipped" in caplog.text
    assert not list((tmp_path / "report").glob("montage_*"))


def test_audio_only_items_skip_the_montages(trained, tmp_path, caplog):
    run, dataset = trained
    items = [{**item, "fps": None, "num_frames": None} for item in load_manifest(dataset)]
    _write_manifest(tmp_path / "audio_only", items)
    with caplog.at_level(logging.WARNING, logger="xdc_fast.report"):
        paths = write_report(run, dataset=tmp_path / "audio_only", out=tmp_path / "report")
    assert sorted(p.name for p in paths) == ["cluster_sizes.png", "curves.png"]
    assert "audio-only" in caplog.text


def test_run_without_cluster_files_draws_the_curves_only(trained, tmp_path, caplog):
    run, dataset = trained
    transfer = tmp_path / "transfer"  # what a labels_from run leaves: metrics but no clusters
    transfer.mkdir()
    shutil.copy(run / "metrics.jsonl", transfer / "metrics.jsonl")
    with caplog.at_level(logging.WARNING, logger="xdc_fast.report"):
        paths = write_report(transfer, dataset=dataset)
    assert [p.name for p in paths] == ["curves.png"]
    assert "no cluster files" in caplog.text


def test_curves_show_each_heads_accuracy_above_chance(trained):
    """The "is it learning?" panel: (accuracy - chance) / (1 - chance) per head and epoch, from metrics.jsonl."""
    run, _ = trained
    records = list(read_jsonl(run / "metrics.jsonl"))
    panel = next(lines for title, lines in read_curves(run).panels.items() if title.startswith("is it learning?"))
    for head in ("video_0", "audio_0"):
        expected = [(r["pseudo_label_acc"][head] - r["chance"][head]["accuracy"]) / (1 - r["chance"][head]["accuracy"])
                    for r in records]
        np.testing.assert_allclose(panel[f"{head} (training)"], expected)
