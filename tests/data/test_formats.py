import csv

import numpy as np
import pytest

from xdc_fast.data.formats import FormatError, list_dataset
from xdc_fast.data.prepare import load_manifest, prepare, read_jsonl
from xdc_fast.data.synthetic import write_media

from .conftest import place


def test_folder_labels_come_from_subfolders(tmp_path, small_video):
    place(small_video, tmp_path / "b_class" / "x.mp4")
    place(small_video, tmp_path / "a_class" / "deep" / "y.mkv")
    place(small_video, tmp_path / "loose.mp4")
    listing = list_dataset(tmp_path, "folder")
    by_id = {i.id: i for i in listing.items}
    assert listing.classes == ["a_class", "b_class"]
    assert by_id["a_class/deep/y"].label == 0 and by_id["b_class/x"].label == 1
    assert by_id["loose"].label is None


def test_ucf101_three_splits(tmp_path, small_video):
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    videos = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "Archery/v_Archery_g02_c01.avi",
              "Archery/v_Archery_g09_c01.avi"]
    for v in videos:
        place(small_video, tmp_path / "UCF-101" / v)
    for n in (1, 2, 3):
        train, test = videos[: n % 3 + 1], videos[n % 3 + 1 :]
        (lists / f"trainlist0{n}.txt").write_text("".join(f"{v} {1 + v.startswith('Archery')}\n" for v in train))
        (lists / f"testlist0{n}.txt").write_text("".join(f"{v}\n" for v in test))
    (lists / "testlist01.txt").write_text((lists / "testlist01.txt").read_text() + "Archery/v_Archery_g99_c09.avi\n")
    prepare(tmp_path, tmp_path / "out", fmt="ucf101", workers=1, progress=False, min_seconds=0.5)
    records = {r["id"]: r for r in load_manifest(tmp_path / "out")}
    assert records["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01"]["label"] == 0
    assert records["Archery/v_Archery_g02_c01"]["label"] == 1
    assert records["Archery/v_Archery_g02_c01"]["split"] == {"1": "train", "2": "train", "3": "test"}
    assert records["Archery/v_Archery_g09_c01"]["split"] == {"1": "test", "2": "train", "3": "test"}
    assert records["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01"]["split"] == {"1": "train", "2": "train", "3": "train"}
    (missing,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert missing["reason"].startswith("missing") and missing["path"].endswith("v_Archery_g99_c09.avi")


def test_hmdb51_tags(tmp_path, small_video):
    for video in ("brush_hair_a.avi", "brush_hair_b.avi"):
        place(small_video, tmp_path / "videos" / "brush_hair" / video)
    place(small_video, tmp_path / "videos" / "cartwheel" / "wheel_a.avi")
    splits = tmp_path / "splits"
    splits.mkdir()
    for n in (1, 2, 3):
        (splits / f"brush_hair_test_split{n}.txt").write_text(f"brush_hair_a.avi {1 if n != 2 else 2}\nbrush_hair_b.avi 0\n")
        (splits / f"cartwheel_test_split{n}.txt").write_text("wheel_a.avi 2 \n")
    listing = list_dataset(tmp_path, "hmdb51")
    by_id = {i.id: i for i in listing.items}
    assert listing.classes == ["brush_hair", "cartwheel"]
    assert by_id["brush_hair/brush_hair_a"].split == {"1": "train", "2": "test", "3": "train"}
    assert by_id["brush_hair/brush_hair_b"].split == {}  # tag 0: unused
    assert by_id["cartwheel/wheel_a"].label == 1 and by_id["cartwheel/wheel_a"].split["3"] == "test"


def test_esc50_audio_only_folds(tmp_path):
    rows = [("1-100-A-0.wav", 1, 0, "dog"), ("2-200-A-1.wav", 2, 1, "rooster"), ("5-300-B-0.wav", 5, 0, "dog")]
    (tmp_path / "meta").mkdir()
    with (tmp_path / "meta" / "esc50.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for name, fold, target, category in rows:
            writer.writerow([name, fold, target, category, "False", "x", "A"])
            tone = 0.3 * np.sin(np.arange(44100 * 5) / 44100 * 2 * np.pi * 440).astype(np.float32)
            _write_wav(tmp_path / "audio" / name, tone, 44100)
    prepare(tmp_path, tmp_path / "out", fmt="esc50", workers=1, progress=False)
    records = {r["id"]: r for r in load_manifest(tmp_path / "out")}
    assert records["2-200-A-1"]["label"] == 1 and records["2-200-A-1"]["label_name"] == "rooster"
    assert records["5-300-B-0"]["split"]["5"] == "test" and records["5-300-B-0"]["split"]["1"] == "train"
    r = records["1-100-A-0"]
    assert r["fps"] is None and r["has_audio"] and r["duration_s"] == pytest.approx(5.0, abs=0.01)
    assert r["audio_samples"] == pytest.approx(80000, abs=5)  # resampled from 44.1 kHz to 16 kHz


def test_kinetics_csv(tmp_path, small_video):
    place(small_video, tmp_path / "train" / "abseiling" / "abc123_000010_000020.mp4")
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                    "abseiling,abc123,10,20,train\nzumba,zzz999,0,10,val\n")
    listing = list_dataset(tmp_path, "kinetics-csv", tmp_path / "k.csv")
    by_id = {i.id: i for i in listing.items}
    assert listing.classes == ["abseiling", "zumba"]
    assert not by_id["abc123_000010_000020"].missing and by_id["abc123_000010_000020"].split == {"1": "train"}
    assert by_id["zzz999_000000_000010"].missing


def test_format_errors(tmp_path):
    with pytest.raises(FormatError, match="classInd.txt"):
        list_dataset(tmp_path, "ucf101")
    with pytest.raises(FormatError, match="esc50.csv"):
        list_dataset(tmp_path, "esc50")
    with pytest.raises(FormatError, match="unknown format"):
        list_dataset(tmp_path, "imagenet")


def _write_wav(path, samples, rate):
    import wave

    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())


def test_write_media_round_trip(tmp_path):
    # The helper every test above leans on: frames and sound come back.
    frames = np.zeros((20, 32, 32, 3), dtype=np.uint8)
    frames[:, :16] = 200
    write_media(tmp_path / "m.mp4", frames, 10, np.zeros((1, 16000), dtype=np.float32), 16000)
    listing = list_dataset(tmp_path, "folder")
    assert [i.id for i in listing.items] == ["m"]


# ---- malformed metadata: an error naming file and line, never a traceback ----------------------------

def _cli_prepare(*args):
    from click.testing import CliRunner

    from xdc_fast.cli import main

    return CliRunner().invoke(main, ["prepare", *map(str, args), "--workers", "0"])


@pytest.mark.parametrize("content, line, what", [
    ("1 ApplyEyeMakeup\n2\n", 2, "expected '<number> <class name>', got '2'"),
    ("1 ApplyEyeMakeup\nx Archery\n", 2, "expected '<number> <class name>'"),
    ("1 ApplyEyeMakeup\n\n1 Archery\n", 3, "class number 1 is given twice"),
])
def test_malformed_class_index(tmp_path, content, line, what):
    (tmp_path / "classInd.txt").write_text(content)
    (tmp_path / "trainlist01.txt").write_text("ApplyEyeMakeup/v_a.avi 1\n")
    with pytest.raises(FormatError) as caught:
        list_dataset(tmp_path, "ucf101")
    assert f"{tmp_path / 'classInd.txt'}, line {line}: {what}" in str(caught.value)
    result = _cli_prepare(tmp_path, "--out", tmp_path / "out", "--format", "ucf101")
    assert result.exit_code == 2 and result.output.startswith(f"Error: {tmp_path / 'classInd.txt'}, line {line}")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_ucf101_list_naming_an_unknown_class(tmp_path):
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\n")
    (tmp_path / "trainlist01.txt").write_text("ApplyEyeMakeup/v_a.avi 1\nArchery/v_b.avi 2\n")
    with pytest.raises(FormatError, match=rf"{tmp_path / 'trainlist01.txt'}, line 2: 'Archery/v_b.avi'"):
        list_dataset(tmp_path, "ucf101")


def test_a_binary_class_index_is_a_clear_error(tmp_path):
    (tmp_path / "classInd.txt").write_bytes(b"1 A\n\xff\xfe\x00garbage\n")
    with pytest.raises(FormatError, match="not a UTF-8 text file"):
        list_dataset(tmp_path, "ucf101")


@pytest.mark.parametrize("rows, line, what", [
    ("label,youtube_id,time_start,time_end\nabseiling,abc,x,10\n", 2, "time_start and time_end should be seconds"),
    ("label,youtube_id,time_start,time_end\nabseiling,abc,0,10\n,def,0,10\n", 3, "no value for label"),
    ("label,youtube_id,time_start\nabseiling,abc,0\n", 1, "the header lacks column(s) time_end"),
    ("label,youtube_id,time_start,time_end\nabseiling,abc,0,10\nzumba,abc,0,10\n", 3,
     "clip abc_000000_000010 is 'zumba' here but 'abseiling' on line 2"),
    ("label,youtube_id,time_start,time_end\nabseiling,abc,0\n", 2, "no value for time_end"),
])
def test_malformed_kinetics_rows(tmp_path, rows, line, what):
    (tmp_path / "k.csv").write_text(rows)
    with pytest.raises(FormatError) as caught:
        list_dataset(tmp_path, "kinetics-csv", tmp_path / "k.csv")
    assert f"{tmp_path / 'k.csv'}, line {line}: {what}" in str(caught.value)
    result = _cli_prepare(tmp_path, "--out", tmp_path / "out", "--format", "kinetics-csv", "--csv", tmp_path / "k.csv")
    assert result.exit_code == 2 and result.output.startswith(f"Error: {tmp_path / 'k.csv'}, line {line}")


def test_a_kinetics_clip_listed_twice_with_one_label_is_one_item(tmp_path, small_video):
    place(small_video, tmp_path / "abc_000000_000010.mp4")
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                    "abseiling,abc,0,10,train\nabseiling,abc,0.0,10.0,train\n")
    listing = list_dataset(tmp_path, "kinetics-csv", tmp_path / "k.csv")
    assert [i.id for i in listing.items] == ["abc_000000_000010"]


def test_malformed_esc50_and_hmdb51_rows(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text("filename,fold,target,category\n1-1-A-0.wav,1,0,dog\n"
                                                 "1-2-A-1.wav,1,dog,dog\n")
    with pytest.raises(FormatError, match=r"esc50.csv, line 3: target should be a class number, got 'dog'"):
        list_dataset(tmp_path, "esc50")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "wave_test_split1.txt").write_text("a.avi 1\nb.avi 7\n")
    with pytest.raises(FormatError, match=r"wave_test_split1.txt, line 2: expected '<video file> <0\|1\|2>'"):
        list_dataset(tmp_path, "hmdb51")


def test_the_excluded_folder_is_not_listed(tmp_path, small_video):
    place(small_video, tmp_path / "a" / "x.mp4")
    place(small_video, tmp_path / "ds" / "audio" / "a__x.wav")
    assert list_dataset(tmp_path, "folder").classes == ["a", "ds"]
    listing = list_dataset(tmp_path, "folder", exclude=tmp_path / "ds")
    assert listing.classes == ["a"] and [i.id for i in listing.items] == ["a/x"]


# ---- multi-label formats: VGGSound and AudioSet -------------------------------------------------------

AUDIOSET_INDEX = 'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,"Music"\n2,/m/0jbk,"Animal"\n'
AUDIOSET_HEADER = ("# Segments csv created Sun Mar  5 10:54:31 2017\n"
                   "# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=5\n"
                   "# YTID, start_seconds, end_seconds, positive_labels\n")


def test_vggsound_rows_become_segments_and_a_second_label_makes_an_item_multilabel(tmp_path, small_video):
    place(small_video, tmp_path / "video" / "abc_000030.mp4")
    place(small_video, tmp_path / "video" / "solo.mp4")  # one segment of that id: the file may be named <id>
    (tmp_path / "vggsound.csv").write_text('abc,30,dog barking,train\nsolo,0,"male speech, man speaking",test\n'
                                           "abc,30,people marching,train\nnothere,12,dog barking,test\n")
    listing = list_dataset(tmp_path, "vggsound")
    by_id = {i.id: i for i in listing.items}
    assert listing.classes == ["dog barking", "male speech, man speaking", "people marching"]
    assert by_id["abc_000030"].labels == [0, 2] and by_id["abc_000030"].label == 0
    assert by_id["abc_000030"].split == {"1": "train"} and not by_id["abc_000030"].missing
    assert by_id["solo_000000"].labels == [1] and by_id["solo_000000"].split == {"1": "test"}
    assert by_id["solo_000000"].path.name == "solo.mp4"
    assert by_id["nothere_000012"].missing


def test_audioset_segments_with_quoted_label_lists(tmp_path, small_video):
    (tmp_path / "class_labels_indices.csv").write_text(AUDIOSET_INDEX)
    (tmp_path / "eval_segments.csv").write_text(AUDIOSET_HEADER + '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/0jbk"\n')
    (tmp_path / "balanced_train_segments.csv").write_text(
        AUDIOSET_HEADER + '-0RWZT-miFs, 420.000, 430.000, "/m/04rlf"\n-1LrH01Ei1w, 0.000, 10.000, "/m/0jbk,/m/04rlf"\n')
    place(small_video, tmp_path / "eval" / "--PJHxphWEs_000030_000040.mp4")
    place(small_video, tmp_path / "train" / "-0RWZT-miFs_000420.mp4")
    listing = list_dataset(tmp_path, "audioset")
    by_id = {i.id: i for i in listing.items}
    assert listing.classes == ["Speech", "Music", "Animal"]
    assert by_id["--PJHxphWEs_000030"].labels == [0, 2] and by_id["--PJHxphWEs_000030"].split == {"1": "test"}
    assert by_id["--PJHxphWEs_000030"].path.name == "--PJHxphWEs_000030_000040.mp4"
    assert by_id["-0RWZT-miFs_000420"].labels == [1] and by_id["-0RWZT-miFs_000420"].label_name == "Music"
    assert by_id["-1LrH01Ei1w_000000"].missing and by_id["-1LrH01Ei1w_000000"].labels == [2, 1]
    # prepared: the manifest carries every label, and the first as `label` for single-label readers
    prepare(tmp_path, tmp_path / "out", fmt="audioset", workers=1, progress=False, min_seconds=0.5)
    records = {r["id"]: r for r in load_manifest(tmp_path / "out")}
    assert records["--PJHxphWEs_000030"]["labels"] == [0, 2] and records["--PJHxphWEs_000030"]["label"] == 0
    assert set(records) == {"--PJHxphWEs_000030", "-0RWZT-miFs_000420"}


VGGSOUND_BAD = [
    ("abc,30,dog barking,train\nabc,30,dog\n", 2, "expected 4 fields"),
    ("abc,30,dog barking,train\nxyz,half,dog,test\n", 2, "start should be a number"),
    ("abc,-3,dog barking,train\n", 1, "0 or more seconds"),
    ("abc,30,dog barking,val\n", 1, "train or test"),
    (",30,dog barking,train\n", 1, "must not be empty"),
    ("abc,30,dog barking,train\n\nabc,30,cat,test\n", 3, "must never train"),
    ("abc,30,male speech, man speaking,train\n", 1, "quote a label"),
]


@pytest.mark.parametrize("text, line, message", VGGSOUND_BAD)
def test_malformed_vggsound_rows_name_file_and_line(tmp_path, text, line, message):
    (tmp_path / "vggsound.csv").write_text(text)
    with pytest.raises(FormatError, match=rf"vggsound\.csv, line {line}: .*{message}"):
        list_dataset(tmp_path, "vggsound")


AUDIOSET_BAD = [
    ('a, 0.000, 10.000, /m/09x0r,/m/04rlf\n', "expected 4 fields"),
    ('a, 0.000, 10.000, "/m/nope"\n', "/m/nope is not in class_labels_indices.csv"),
    ('a, 10.000, 10.000, "/m/09x0r"\n', "not after start_seconds"),
    ('a, ten, 20.000, "/m/09x0r"\n', "start_seconds should be a number"),
    ('a, 0.000, 10.000, ""\n', "no label"),
]


@pytest.mark.parametrize("row, message", AUDIOSET_BAD)
def test_malformed_audioset_rows_name_file_and_line(tmp_path, row, message):
    (tmp_path / "class_labels_indices.csv").write_text(AUDIOSET_INDEX)
    (tmp_path / "eval_segments.csv").write_text(AUDIOSET_HEADER + 'ok, 0.000, 10.000, "/m/09x0r"\n' + row)
    with pytest.raises(FormatError, match=rf"eval_segments\.csv, line 5: .*{message}"):
        list_dataset(tmp_path, "audioset")


def test_audioset_class_index_and_file_names_are_checked(tmp_path):
    (tmp_path / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/a,A\n0,/m/b,B\n")
    with pytest.raises(FormatError, match=r"class_labels_indices\.csv, line 3: class index 0 is given twice"):
        list_dataset(tmp_path, "audioset")
    (tmp_path / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n")
    with pytest.raises(FormatError, match="should run 0 to 1; 1 is missing"):
        list_dataset(tmp_path, "audioset")
    (tmp_path / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/a,A\n")
    with pytest.raises(FormatError, match="no AudioSet segment CSV"):
        list_dataset(tmp_path, "audioset")
    (tmp_path / "my_segments.csv").write_text('x, 0, 10, "/m/a"\n')
    with pytest.raises(FormatError, match="cannot tell whether it lists training or evaluation"):
        list_dataset(tmp_path, "audioset")


def test_cli_malformed_csv_is_one_error_line(tmp_path):
    from click.testing import CliRunner

    from xdc_fast.cli import main

    (tmp_path / "vggsound.csv").write_text("abc,30,dog barking,train\nabc,x,dog,train\n")
    result = CliRunner().invoke(main, ["prepare", str(tmp_path), "--out", str(tmp_path / "out"),
                                       "--format", "vggsound", "--workers", "0"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "vggsound.csv, line 2" in errors[0] and "Traceback" not in result.output


def test_prepare_offers_exactly_the_table_of_layouts():
    from xdc_fast.cli import prepare as command
    from xdc_fast.data.formats import READERS

    option = next(p for p in command.params if p.name == "fmt")
    assert tuple(option.type.choices) == tuple(READERS)
    assert all(f"{name}: {reader.help}" in option.help for name, reader in READERS.items())
