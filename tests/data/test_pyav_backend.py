import numpy as np
import pytest

from xdc_fast.data.pyav_backend import decode_frames, read_audio_window
from xdc_fast.data.synthetic import indexed_frames, read_index, write_media


@pytest.fixture(scope="module")
def indexed_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("indexed") / "indexed.mp4"
    write_media(path, indexed_frames(120), fps=25, keyframe_interval=25)  # seeking must decode forward
    return path


@pytest.mark.parametrize("first,stride", [(0, 1), (1, 2), (24, 1), (25, 3), (26, 2), (63, 4), (99, 1)])
def test_seek_is_frame_accurate(indexed_video, first, stride):
    times = (first + stride * np.arange(8)) / 25
    frames = decode_frames(indexed_video, times)
    assert [read_index(f) for f in frames] == [first + stride * i for i in range(8)]


def test_times_between_frames_give_the_frame_shown(indexed_video):
    frames = decode_frames(indexed_video, np.array([10.5, 11.99, 40.01]) / 25)
    assert [read_index(f) for f in frames] == [10, 11, 40]


def test_past_the_end_repeats_the_last_frame(indexed_video):
    frames = decode_frames(indexed_video, (116 + 2 * np.arange(4)) / 25)
    assert [read_index(f) for f in frames] == [116, 118, 119, 119]


def test_resize_happens_while_decoding(indexed_video):
    frames = decode_frames(indexed_video, np.arange(3) / 25, size=(48, 32))
    assert frames.shape == (3, 32, 48, 3) and frames.dtype == np.uint8


def test_audio_window_reads_and_pads(tmp_path):
    import wave

    path = tmp_path / "ramp.wav"
    ramp = (np.arange(1600) * 16).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(ramp.tobytes())
    window = read_audio_window(path, -0.01, 0.02, 16000)  # 160 samples before the start, 160 inside
    assert window.shape == (320,)
    assert np.all(window[:160] == 0)
    np.testing.assert_allclose(window[160:] * 32768, ramp[:160])
    tail = read_audio_window(path, 0.09, 0.02, 16000)
    np.testing.assert_allclose(tail[:160] * 32768, ramp[1440:])
    assert np.all(tail[160:] == 0)
