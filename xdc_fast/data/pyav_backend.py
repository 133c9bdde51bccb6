"""CPU decoding with PyAV: frame-accurate clips of video, and audio windows from the extracted WAV.

Seeking is frame accurate: seek to the keyframe at or before the first wanted frame, decode forward,
and keep frames by their presentation time, so the clip holds exactly the frames asked for whatever
the keyframe spacing. Resizing happens in swscale while converting to RGB.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np

# A path, or the bytes of a file in memory (a shard's member).
Media = str | Path | io.IOBase


def _source(media: Media):
    return str(media) if isinstance(media, (str, Path)) else media


def decode_frames(path: Media, times: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """The frames shown at each of ``times`` (seconds on the file's timeline), as uint8 ``[T, H, W, 3]``.

    A time maps to the source frame shown then, ``floor(time * fps)``; times past the end repeat the
    last frame. ``size`` is (width, height) after resizing, or None for the stored size.
    """
    import av

    with av.open(_source(path)) as container:
        stream, fps = _video_stream(container)
        # The frame shown at time t started at or before t (the epsilon absorbs float error).
        wanted = np.floor(np.asarray(times) * fps + 1e-6).astype(np.int64)
        return _decode(container, stream, fps, wanted, size, path)


def decode_frame_indices(path: Media, wanted, size: tuple[int, int] | None = None) -> np.ndarray:
    """Source frames ``wanted`` (indices at the stream's frame rate) as uint8 ``[T, H, W, 3]``; indices
    past the end repeat the last frame."""
    import av

    with av.open(_source(path)) as container:
        stream, fps = _video_stream(container)
        return _decode(container, stream, fps, np.asarray(wanted, dtype=np.int64), size, path)


# Below this many pixels a frame decodes faster in one thread than the decoder's threads can be set up
# and fed: 25 frames of 228x128 (a clip shard's) took 6.3 ms in one thread, 8.4 ms with frame threads.
SINGLE_THREAD_PIXELS = 320 * 240


def _video_stream(container):
    stream = container.streams.video[0]
    context = stream.codec_context
    stream.thread_type = "NONE" if context.width * context.height < SINGLE_THREAD_PIXELS else "AUTO"
    return stream, float(stream.average_rate or stream.guessed_rate)


def _decode(container, stream, fps: float, wanted: np.ndarray, size, path) -> np.ndarray:
    base = stream.start_time or 0
    container.seek(base + int(int(wanted.min()) / fps / stream.time_base), stream=stream, backward=True,
                   any_frame=False)
    targets = sorted(set(int(i) for i in wanted))
    images: dict[int, np.ndarray] = {}
    converted: dict[int, np.ndarray] = {}  # by source frame index: each frame converts once

    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()

    def rgb(frame, index: int) -> np.ndarray:
        if index not in converted:
            converted[index] = _to_rgb(frame, size, reformatter)
        return converted[index]

    next_target, previous, previous_index = 0, None, -1
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        index = int(round(float((frame.pts - base) * stream.time_base) * fps))
        # Every target at or before this frame is now settled: this frame if it is the one,
        # else the frame shown until now (a gap in the stream), else this first frame.
        while next_target < len(targets) and targets[next_target] <= index:
            target = targets[next_target]
            if index == target or previous is None:
                images[target] = rgb(frame, index)
            else:
                images[target] = rgb(previous, previous_index)
            next_target += 1
        if next_target == len(targets):
            break
        previous, previous_index = frame, index
    if previous is None and not images:
        raise RuntimeError(f"no frame decodes from {path} at frame {int(wanted.min())}")
    for target in targets[next_target:]:  # past the end: repeat the last frame (DALI's pad_mode="edge")
        images[target] = rgb(previous, previous_index)
    return np.stack([images[int(i)] for i in wanted])


def _to_rgb(frame, size, reformatter=None):
    if size is None:
        return frame.to_ndarray(format="rgb24")
    if reformatter is None:
        return frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
    # One reformatter for every frame of a clip keeps swscale's context: a frame's own reformat builds a
    # new one each time, 0.69 against 0.14 ms per 228x128 frame (PyAV 18), five times the decoding.
    return reformatter.reformat(frame, format="rgb24", width=size[0], height=size[1]).to_ndarray()


def read_audio_window(path: Media, start: float, seconds: float, sample_rate: int) -> np.ndarray:
    """``seconds`` of mono float32 audio from ``start`` (may be negative), zero-padded outside the file.

    Reads only the window (WAV allows random access), so long files cost no more than short ones.
    """
    count = int(round(seconds * sample_rate))
    first = int(round(start * sample_rate))
    out = np.zeros(count, dtype=np.float32)
    with wave.open(_source(path), "rb") as w:
        if w.getframerate() != sample_rate or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected mono 16-bit WAV at {sample_rate} Hz (as prepare writes), got "
                             f"{w.getnchannels()} channel(s), {8 * w.getsampwidth()} bit, {w.getframerate()} Hz")
        total = w.getnframes()
        lo, hi = max(0, first), min(total, first + count)
        if hi > lo:
            w.setpos(lo)
            data = np.frombuffer(w.readframes(hi - lo), dtype="<i2").astype(np.float32) / 32768.0
            out[lo - first : lo - first + len(data)] = data
    return out
