"""``xdc-fast evaluate`` over every split of UCF101-, HMDB51- and ESC-50-shaped folders.

Each layout is made here from synthetic media, under the official file names and split files, then
prepared with ``xdc-fast prepare --format ...`` and evaluated with the defaults (every split or fold).
Which videos each split tests is known from the split files written here, so every result's recorded
test set is checked against them, not against what prepare read.
"""

import csv
import hashlib
import json
import shutil
import wave

import numpy as np
import pytest
from click.testing import CliRunner

from xdc_fast.checkpoint import load_encoder
from xdc_fast.files import save_atomic
from xdc_fast.cli import main
from xdc_fast.config import EvaluateConfig
from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset
from xdc_fast.evaluate import evaluate

# Outcomes of training, clustering or probing, which the CPU's float path can move: CI runs these again
# on other paths (docs/testing.md).
pytestmark = pytest.mark.training_outcome

CLIP = {"frames": 4, "resize_short": 32, "crop": 28, "audio_seconds": 0.5, "n_mels": 20}
SPEC = SyntheticSpec(classes=3, videos_per_class=4, seconds=1.5, fps=8, width=32, height=32, seed=3)
UCF_CLASSES = ("ApplyEyeMakeup", "Archery", "BabyCrawling")
HMDB_CLASSES = ("brush_hair", "cartwheel", "catch")


def prepare_cli(root, out, fmt):
    result = CliRunner().invoke(main, ["prepare", str(root), "--out", str(out), "--format", fmt, "--workers", "0"])
    assert result.exit_code == 0, result.output
    return out


def config(**overrides):
    return EvaluateConfig(**{"clips_per_video": 2, "clip": CLIP, "batch_size": 8, "device": "cpu", "loader": "pyav",
                             **overrides})


def ids_sha256(ids):
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Synthetic videos ``<class>/<class>_<i>.mp4``, 4 per class, and their class order."""
    root = tmp_path_factory.mktemp("media")
    make_synthetic_dataset(root, SPEC)
    return sorted(p for p in root.iterdir() if p.is_dir())


# ---- UCF101: UCF-101/<Class>/v_<Class>_g<GG>_c<CC>.avi, ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt

@pytest.fixture(scope="module")
def ucf101(media, tmp_path_factory):
    """Three groups per class (g01-g03, one clip each, plus g04 in every training list); split N tests group N,
    as UCF101's splits hold out groups of clips."""
    root = tmp_path_factory.mktemp("ucf")
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(UCF_CLASSES, 1)))
    names = {}
    for number, (folder, name) in enumerate(zip(media, UCF_CLASSES), 1):
        for group, video in enumerate(sorted(folder.iterdir()), 1):
            rel = f"{name}/v_{name}_g{group:02d}_c01.avi"
            (root / "UCF-101" / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(video, root / "UCF-101" / rel)
            names[rel] = (number, group)
    expected_test = {}
    for split in (1, 2, 3):
        train = [rel for rel, (_, group) in names.items() if group != split]
        test = [rel for rel, (_, group) in names.items() if group == split]
        (lists / f"trainlist0{split}.txt").write_text("".join(f"{rel} {names[rel][0]}\n" for rel in train))
        (lists / f"testlist0{split}.txt").write_text("".join(f"{rel}\n" for rel in test))
        expected_test[str(split)] = [rel.removesuffix(".avi") for rel in test]
    return prepare_cli(root, tmp_path_factory.mktemp("ucf-ds") / "ds", "ucf101"), expected_test


def check_every_split(document, expected_test, protocols_run):
    """Every split evaluated, each result's test set the expected one, and the summary their mean ± std."""
    assert document["splits"] == sorted(expected_test)
    for r in document["results"]:
        assert r["fingerprint"]["split"]["test_ids_sha256"] == ids_sha256(expected_test[r["split"]])
    seen = {(r["checkpoint"], r["protocol"], r["split"]) for r in document["results"]}
    checkpoints = {r["checkpoint"] for r in document["results"]}
    assert seen == {(c, p, s) for c in checkpoints for p in protocols_run for s in expected_test}
    for s in document["summary"]:
        values = [r["scores"][s["metric"]] for split in sorted(expected_test) for r in document["results"]
                  if (r["checkpoint"], r["protocol"], r["split"]) == (s["checkpoint"], s["protocol"], split)]
        assert s["values"] == values and s["splits"] == sorted(expected_test)
        assert s["mean"] == pytest.approx(np.mean(values))
        assert s["std"] == (pytest.approx(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def test_ucf101_layout_every_protocol_over_its_three_splits(ucf101, tmp_path):
    dataset, expected_test = ucf101
    document = evaluate(dataset, tmp_path / "o", config(), log=quiet)
    check_every_split(document, expected_test, ("linear", "knn", "retrieval", "svm", "clustering"))
    assert document["classes"] == list(UCF_CLASSES)
    for r in document["results"]:
        scores = r["scores"]
        if r["protocol"] in ("linear", "svm"):
            assert scores["num_test_videos"] == 3
        if r["protocol"] == "clustering":
            assert scores["num_items"] == 12  # the split's training and test videos, each once
    rows = (tmp_path / "o" / "results.md").read_text().splitlines()[2:]
    assert len(rows) == 5 and all(row.endswith("| 3 |") for row in rows)  # 5 protocols, each over 3 splits


def test_checkpoints_and_random_in_one_run_give_the_cells_of_single_runs(ucf101, tmp_path):
    dataset, _ = ucf101
    checkpoints = []
    for seed in (11, 12):
        encoder, _ = load_encoder("random", "video", None, 1e-5, seed)
        checkpoints.append(str(tmp_path / f"encoder{seed}.pt"))
        save_atomic({"encoders": {f"video.{k}": v for k, v in encoder.state_dict().items()},
                     "config": {"arch": "tiny"}}, checkpoints[-1])
    one_clip = {"clips_per_video": 1}  # the property does not depend on it; one clip per video keeps it fast
    together = evaluate(dataset, tmp_path / "together", config(checkpoints=[*checkpoints, "random"], **one_clip),
                        log=quiet)
    table = (tmp_path / "together" / "results.md").read_text().splitlines()
    assert len(table) == 2 + 3 * 5
    for i, name in enumerate([*checkpoints, "random"]):
        alone = evaluate(dataset, tmp_path / f"alone{i}", config(checkpoints=[name], **one_clip), log=quiet)
        assert [line for line in table if line.startswith(f"| {name} |")] == \
            (tmp_path / f"alone{i}" / "results.md").read_text().splitlines()[2:]
        mine = [s for s in together["summary"] if s["checkpoint"] == name]
        assert mine == alone["summary"]  # every metric, not just the headline of the table
    # three different encoders: the cells are not one encoder's thrice
    linear_clip = [s["values"] for s in together["summary"] if (s["protocol"], s["metric"]) == ("linear", "clip_acc")]
    assert len({tuple(values) for values in linear_clip}) == 3


# ---- HMDB51: <class>/<video>.avi and <class>_test_split<N>.txt with tags 1 (train), 2 (test), 0 (unused)

def test_hmdb51_layout_every_split_and_unused_videos_left_out(media, tmp_path):
    root = tmp_path / "hmdb"
    (root / "splits").mkdir(parents=True)
    expected_test = {"1": [], "2": [], "3": []}
    for folder, name in zip(media, HMDB_CLASSES):
        videos = sorted(folder.iterdir())
        for i, video in enumerate(videos):
            (root / "videos" / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(video, root / "videos" / name / f"{name}_{i}.avi")
        for split in (1, 2, 3):
            # video split-1 tests; video 3 is unused by split 1 (tag 0), trains in splits 2 and 3
            tags = [2 if i == split - 1 else 0 if (i == 3 and split == 1) else 1 for i in range(len(videos))]
            (root / "splits" / f"{name}_test_split{split}.txt").write_text(
                "".join(f"{name}_{i}.avi {tag} \n" for i, tag in enumerate(tags)))
            expected_test[str(split)] += [f"{name}/{name}_{i}" for i, tag in enumerate(tags) if tag == 2]
    dataset = prepare_cli(root, tmp_path / "ds", "hmdb51")
    document = evaluate(dataset, tmp_path / "o", config(protocols=["knn", "clustering", "svm"]), log=quiet)
    check_every_split(document, expected_test, ("knn", "clustering", "svm"))
    items = {r["split"]: r["scores"]["num_items"] for r in document["results"] if r["protocol"] == "clustering"}
    assert items == {"1": 9, "2": 12, "3": 12}  # split 1 leaves its three tag-0 videos out


# ---- ESC-50: audio/<fold>-<source>-<take>-<target>.wav and meta/esc50.csv, 5 folds

def write_tone(path, pitch, seed, seconds=1.2, rate=16000):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    samples = 0.4 * np.sin(2 * np.pi * pitch * t) + 0.05 * rng.normal(size=t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_esc50_layout_audio_over_its_five_folds(tmp_path):
    root = tmp_path / "esc"
    categories = ("dog", "rooster")
    expected_test = {str(f): [] for f in range(1, 6)}
    (root / "meta").mkdir(parents=True)
    with (root / "meta" / "esc50.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for fold in range(1, 6):
            for target, category in enumerate(categories):
                for take in "AB":
                    name = f"{fold}-{100 * fold + target}-{take}-{target}.wav"
                    seed = 10 * fold + 2 * target + "AB".index(take)
                    write_tone(root / "audio" / name, (440, 1760)[target], seed)
                    writer.writerow([name, fold, target, category, "True", str(100 * fold + target), take])
                    expected_test[str(fold)].append(name.removesuffix(".wav"))
    dataset = prepare_cli(root, tmp_path / "ds", "esc50")
    document = evaluate(dataset, tmp_path / "o", config(modality="audio", protocols=["svm", "knn", "retrieval"]),
                        log=quiet)
    check_every_split(document, expected_test, ("svm", "knn", "retrieval"))
    assert all(r["fingerprint"]["modality"] == "audio" for r in document["results"])
    assert {r["scores"]["num_test_videos"] for r in document["results"] if r["protocol"] == "svm"} == {4}
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["splits"] == ["1", "2", "3", "4", "5"]


# ---- AudioSet: segment CSVs with several labels per segment, names from class_labels_indices.csv

@pytest.fixture(scope="module")
def audioset(media, tmp_path_factory):
    """Each synthetic class is one AudioSet class; even-numbered videos also carry "Music" (a second label),
    and "Unused" is carried by nobody. The first video of each class is in eval_segments.csv."""
    root = tmp_path_factory.mktemp("audioset")
    names = ["Speech", "Dog", "Vehicle", "Music", "Unused"]
    mids = ["/m/09x0r", "/m/0bt9lr", "/m/07yv9", "/m/04rlf", "/m/0unused"]
    (root / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},{mid},"{name}"\n' for i, (mid, name) in enumerate(zip(mids, names))))
    rows = {"eval": [], "balanced_train": []}
    truth = {}
    for label, folder in enumerate(media):
        for i, video in enumerate(sorted(folder.iterdir())):
            youtube_id = f"yt{label}x{i}"
            carried = [label] + ([3] if i % 2 == 0 else [])
            rows["eval" if i == 0 else "balanced_train"].append(
                f'{youtube_id}, {10 * i}.000, {10 * i + 10}.000, "{",".join(mids[c] for c in carried)}"\n')
            shutil.copyfile(video, root / f"{youtube_id}_{10 * i:06d}_{10 * i + 10:06d}.mp4")
            truth[f"{youtube_id}_{10 * i:06d}"] = (carried, i == 0)
    for part, lines in rows.items():
        (root / f"{part}_segments.csv").write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                                                   + "".join(lines))
    return prepare_cli(root, tmp_path_factory.mktemp("audioset-ds") / "ds", "audioset"), truth


def test_audioset_layout_linear_probe_is_scored_by_map(audioset, tmp_path):
    dataset, truth = audioset
    document = evaluate(dataset, tmp_path / "o", config(protocols=["linear", "retrieval"]), log=quiet)
    expected_test = {"1": [i for i, (_, tested) in truth.items() if tested]}
    check_every_split(document, expected_test, ("linear", "retrieval"))
    linear = next(r for r in document["results"] if r["protocol"] == "linear")
    # classes with a positive test video: the three classes, and Music (every first video carries it)
    assert linear["scores"]["num_classes_scored"] == 4 and linear["scores"]["num_test_videos"] == 3
    assert 0.0 < linear["scores"]["map"] <= 1.0 and "video_acc" not in linear["scores"]
    assert "one-vs-rest" in linear["fingerprint"]["params"]["model"]
    assert "| linear | map |" in (tmp_path / "o" / "results.md").read_text()


def test_single_label_protocols_refuse_a_multilabel_dataset(audioset, tmp_path):
    dataset, _ = audioset
    result = CliRunner().invoke(main, ["evaluate", "--data", str(dataset), "--out", str(tmp_path / "o"),
                                       "--protocol", "linear", "--protocol", "knn", "--device", "cpu"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "multi-label" in errors[0] and "knn" in errors[0]
    assert not (tmp_path / "o" / "results.json").exists()
    result = CliRunner().invoke(main, ["finetune", "--data", str(dataset), "--out", str(tmp_path / "f"),
                                       "--mode", "linear", "--device", "cpu"])
    assert result.exit_code == 2 and "multi-label" in result.output and "Traceback" not in result.output
