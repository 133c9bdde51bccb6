"""A small labelled audio-video dataset written with PyAV alone, deterministic by seed.

Each class is carried by **both** modalities: what is seen (a class-specific shape moving along a
class-specific path, as an action has its objects and its motion) and what is heard (a class-specific
pitch, beeping at a class-specific rate). Everything else is nuisance drawn per video: colours of shape
and background, pixel noise, size, speed and phase of the motion, loudness, timbre (harmonic mix), noise
floor and the timing of the beeps. So colour or loudness statistics say nothing about the class; shape,
motion and pitch do, and they agree across modalities, which is what cross-modal clustering needs to find.

A second family, ``motion``, is for evaluation only (no setting of the project was chosen on it; the
demo's settings were tuned on ``shapes``). Its cues are of another kind: what is seen is the drift of a
random texture (direction and speed; a single frame shows only a per-video texture and two distractor
blobs that wander at random), and what is heard is a rhythm (the timing of the beeps), played at a pitch
drawn per video from one range for every class. So neither a frame alone nor the pitch alone says
anything about the class; motion over time and rhythm do.

Also here: test media whose frame index is drawn into the pixels, and whose audio clicks at chosen
instants, for frame-accuracy and alignment tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FAMILIES = ("shapes", "motion")
CLASS_NAMES = ("disc-horizontal-low", "square-vertical-mid", "plus-diagonal-high", "diamond-circle-shrill",
               "disc-zigzag-bass", "square-still-chirp")
# Pitch of each class's beep (Hz) and beeps per second: distinct, and well inside 16 kHz audio.
CLASS_PITCH = (330.0, 660.0, 1320.0, 2640.0, 165.0, 990.0)
CLASS_BEEP_RATE = (1.0, 2.0, 3.0, 1.5, 2.5, 4.0)

# The motion family. Drift of the texture in pixels per frame (x right, y down). Training flips clips
# left-right, so no two classes are mirror images of each other (no "left" beside "right").
MOTION_CLASS_NAMES = ("right-slow-steady", "up-fast-pairs", "still-roll", "down-slow-triplets",
                      "right-fast-sparse", "up-slow-gallop")
MOTION_DRIFT = ((1.2, 0.0), (0.0, -3.0), (0.0, 0.0), (0.0, 1.2), (3.0, 0.0), (0.0, -1.2))
# Beep onsets within one bar, as fractions of the bar, and the bar's length in seconds: every pattern
# repeats within the 1 s audio window of the tiny clips.
MOTION_RHYTHM = (((0.0,), 0.3), ((0.0, 0.2), 0.5), ((0.0,), 0.12), ((0.0, 0.15, 0.3), 0.6),
                 ((0.0,), 0.8), ((0.0, 0.3, 0.45), 0.5))
MOTION_PITCH_RANGE = (250.0, 2500.0)  # Hz, log-uniform per video, whatever the class


def class_names(family: str = "shapes") -> tuple[str, ...]:
    return CLASS_NAMES if family == "shapes" else MOTION_CLASS_NAMES


# The codecs synthetic media are written in, with their container: H.264 as most footage comes, VP9 for
# the DALI graph's CPU decoder (which reads VP8/VP9/MJPEG only).
CODECS = {"h264": "mp4", "vp9": "webm"}


@dataclass(frozen=True)
class SyntheticSpec:
    classes: int = 4
    videos_per_class: int = 8
    seconds: float = 4.0
    fps: int = 16
    width: int = 80
    height: int = 64
    sample_rate: int = 16000
    audio_channels: int = 2  # stereo with different channels, so a downmix by mean is exercised
    codec: str = "h264"  # or "vp9" (webm), which DALI's CPU decoder can read
    seed: int = 0
    family: str = "shapes"  # or "motion" (evaluation only; see the module's docstring)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family should be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if not 1 <= self.classes <= len(class_names(self.family)):
            raise ValueError(f"classes should be between 1 and {len(class_names(self.family))}, got {self.classes}")
        if self.codec not in CODECS:
            raise ValueError(f"codec should be one of {', '.join(CODECS)}, got {self.codec!r}")


def make_synthetic_dataset(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> list[Path]:
    """Write ``spec.classes * spec.videos_per_class`` videos as ``root/<class>/<class>_<i>.<ext>``.

    Returns the paths written. Existing files are overwritten, so a fixed seed always gives the same
    media (bit-exact for a given PyAV/FFmpeg build).
    """
    root = Path(root)
    paths = []
    ext = CODECS[spec.codec]
    for label in range(spec.classes):
        name = class_names(spec.family)[label]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(spec.videos_per_class):
            rng = np.random.default_rng([spec.seed, label, i])
            if spec.family == "shapes":
                frames, audio = _class_video(label, spec, rng), _class_audio(label, spec, rng)
            else:
                frames, audio = _motion_video(label, spec, rng), _rhythm_audio(label, spec, rng)
            path = root / name / f"{name}_{i:03d}.{ext}"
            write_media(path, frames, spec.fps, audio, spec.sample_rate, codec=spec.codec)
            paths.append(path)
    return paths



def prepare_synthetic(media: str | Path, dataset: str | Path, spec: SyntheticSpec = SyntheticSpec(),
                      workers: int = 2) -> Path:
    """The built-in media of ``spec`` written under ``media`` and prepared into ``dataset`` (returned): what
    the demo, the benchmarks and the tests start from."""
    from .prepare import prepare

    make_synthetic_dataset(media, spec)
    prepare(media, dataset, workers=workers, progress=False)
    return Path(dataset)


def _class_video(label: int, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    n = int(round(spec.seconds * spec.fps))
    h, w = spec.height, spec.width
    background = rng.uniform(0, 255, size=3)
    colour = rng.uniform(0, 255, size=3)
    # Keep the shape visible whatever the draw: push it away from the background colour.
    colour = np.where(np.abs(colour - background) < 80, (background + 128) % 256, colour)
    speed = rng.uniform(0.6, 1.4)
    phase = rng.uniform(0, 2 * math.pi)
    radius = max(3, int(min(h, w) * rng.uniform(0.12, 0.18)))
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        s = 2 * math.pi * speed * t / spec.fps + phase
        cx, cy = _path(label, s)
        px, py = (0.5 + 0.35 * cx) * (w - 1), (0.5 + 0.35 * cy) * (h - 1)
        mask = _shape_mask(label, xx - px, yy - py, radius)
        frame = np.broadcast_to(background, (h, w, 3)) + rng.normal(0, 12, size=(h, w, 3))
        frame[mask] = colour
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def _shape_mask(label: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels covered by class ``label``'s shape of size ``r``, at offsets (dx, dy) from its centre."""
    kind = label % 4
    if kind == 0:  # disc
        return dx**2 + dy**2 <= r**2
    if kind == 1:  # square
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == 2:  # plus
        return ((np.abs(dx) <= 1.6 * r) & (np.abs(dy) <= r / 2.5)) | ((np.abs(dy) <= 1.6 * r) & (np.abs(dx) <= r / 2.5))
    return (np.abs(dx) + np.abs(dy) <= 1.3 * r) & (np.abs(dx) + np.abs(dy) >= 0.6 * r)  # diamond outline


def _path(label: int, s: float) -> tuple[float, float]:
    """Unit-square trajectory of class ``label`` at phase ``s``."""
    if label == 0:
        return math.sin(s), 0.0
    if label == 1:
        return 0.0, math.sin(s)
    if label == 2:
        return math.sin(s), math.sin(s)
    if label == 3:
        return math.cos(s), math.sin(s)
    if label == 4:
        return math.sin(s), math.sin(3 * s) * 0.8
    return 0.1 * math.sin(7 * s), 0.1 * math.cos(5 * s)


def _class_audio(label: int, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    sr = spec.sample_rate
    n = int(round(spec.seconds * sr))
    t = np.arange(n) / sr
    pitch = CLASS_PITCH[label] * rng.uniform(0.97, 1.03)
    # Timbre varies, but the fundamental stays the strongest partial: pitch is the class.
    harmonics = np.array([1.0, *rng.uniform(0.0, 0.5, size=2)])
    harmonics /= harmonics.sum()
    tone = sum(a * np.sin(2 * math.pi * pitch * (k + 1) * t + rng.uniform(0, 2 * math.pi))
               for k, a in enumerate(harmonics))
    # Beeps at the class's rate with jittered onsets and lengths.
    envelope = np.zeros(n)
    period = 1.0 / CLASS_BEEP_RATE[label]
    start = rng.uniform(0, period)
    while start < spec.seconds:
        length = period * rng.uniform(0.3, 0.6)
        a, b = int(start * sr), min(n, int((start + length) * sr))
        envelope[a:b] = 1.0
        start += period * rng.uniform(0.85, 1.15)
    loudness = rng.uniform(0.2, 0.6)
    noise = rng.normal(0, rng.uniform(0.01, 0.05), size=(spec.audio_channels, n))
    balance = rng.uniform(0.7, 1.0, size=(spec.audio_channels, 1))
    return (loudness * balance * (tone * envelope)[None, :] + noise).astype(np.float32)


def _motion_video(label: int, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """A smooth random texture drifting at the class's velocity (wrapping around), two distractor blobs
    wandering in random directions over it, and pixel noise."""
    n = int(round(spec.seconds * spec.fps))
    h, w = spec.height, spec.width
    # Texture: coarse noise (cells of 4 px, so it survives the codec and resizing) in two random colours.
    cells = rng.random((h // 4 + 2, w // 4 + 2))
    texture = np.kron(cells, np.ones((4, 4)))[: h, : w]
    low, high = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    high = np.where(np.abs(high - low) < 90, (low + 128) % 256, high)
    pattern = low + texture[..., None] * (high - low)
    speed = rng.uniform(0.85, 1.15)
    vx, vy = (speed * v * 16 / spec.fps for v in MOTION_DRIFT[label])  # the same drift per second at any fps
    offset_x, offset_y = rng.uniform(0, w), rng.uniform(0, h)
    blobs = [(rng.uniform(0, w), rng.uniform(0, h), *rng.normal(0, 1.5, size=2), rng.uniform(0, 255, size=3),
              max(2, int(min(h, w) * rng.uniform(0.08, 0.12)))) for _ in range(2)]
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        frame = np.roll(pattern, (int(round(offset_y + vy * t)), int(round(offset_x + vx * t))), axis=(0, 1))
        frame = frame + rng.normal(0, 8, size=(h, w, 3))
        for x0, y0, bx, by, colour, radius in blobs:
            px, py = (x0 + bx * t) % w, (y0 + by * t) % h
            frame[(xx - px) ** 2 + (yy - py) ** 2 <= radius**2] = colour
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def _rhythm_audio(label: int, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Short beeps at the onsets of the class's rhythm, at a pitch, timbre and loudness drawn per video."""
    sr = spec.sample_rate
    n = int(round(spec.seconds * sr))
    t = np.arange(n) / sr
    low, high = np.log(MOTION_PITCH_RANGE)
    pitch = float(np.exp(rng.uniform(low, high)))
    harmonics = np.array([1.0, *rng.uniform(0.0, 0.5, size=2)])
    harmonics /= harmonics.sum()
    tone = sum(a * np.sin(2 * math.pi * pitch * (k + 1) * t + rng.uniform(0, 2 * math.pi))
               for k, a in enumerate(harmonics) if pitch * (k + 1) < sr / 2)
    onsets, bar = MOTION_RHYTHM[label]
    bar *= rng.uniform(0.93, 1.07)  # tempo varies a little; the pattern does not
    envelope = np.zeros(n)
    start = -rng.uniform(0, bar)
    while start < spec.seconds:
        for onset in onsets:
            a = int((start + onset * bar) * sr)
            b = a + int(0.045 * sr)
            envelope[max(a, 0) : max(min(b, n), 0)] = 1.0
        start += bar
    loudness = rng.uniform(0.2, 0.6)
    noise = rng.normal(0, rng.uniform(0.01, 0.05), size=(spec.audio_channels, n))
    balance = rng.uniform(0.7, 1.0, size=(spec.audio_channels, 1))
    return (loudness * balance * (tone * envelope)[None, :] + noise).astype(np.float32)


def write_media(path: str | Path, frames: np.ndarray | None, fps: int, audio: np.ndarray | None = None,
                sample_rate: int = 16000, codec: str = "h264", keyframe_interval: int | None = None) -> None:
    """Encode ``frames`` ``[T, H, W, 3] uint8`` and/or ``audio`` ``[C, S] float32`` into one file.

    H.264 + AAC in mp4, or VP9 + Opus in webm. A keyframe every ``keyframe_interval`` frames
    (default: one per second), so seeking has real work to do.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = None
        if frames is not None:
            video = container.add_stream("libx264" if codec == "h264" else "libvpx-vp9", rate=fps)
            video.height, video.width = frames.shape[1], frames.shape[2]
            video.pix_fmt = "yuv420p"
            gop = str(keyframe_interval or fps)
            video.options = {"g": gop, "keyint_min": gop, "bf": "0"} if codec == "h264" else {"g": gop}
            if codec == "h264":
                video.options["crf"] = "18"
        sound = None
        if audio is not None:
            layout = "mono" if audio.shape[0] == 1 else "stereo"
            sound = container.add_stream("aac" if codec == "h264" else "libopus", rate=sample_rate, layout=layout)
        if video is not None:
            for image in frames:
                for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                    container.mux(packet)
            for packet in video.encode():
                container.mux(packet)
        if sound is not None:
            chunk = 1024
            for start in range(0, audio.shape[1], chunk):
                block = np.ascontiguousarray(audio[:, start : start + chunk], dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=sound.layout.name)
                frame.sample_rate = sample_rate
                frame.pts = start
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)


# ---- test media -------------------------------------------------------------------------------------

INDEX_BITS = 10
INDEX_CELL = 8  # pixels per bit cell: large enough to survive lossy compression


def indexed_frames(count: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Frames whose index is drawn as a row of black/white cells (bit i = cell i, LSB first)."""
    if width < INDEX_BITS * INDEX_CELL or height < INDEX_CELL:
        raise ValueError("frames too small to carry the index")
    frames = np.full((count, height, width, 3), 96, dtype=np.uint8)
    for t in range(count):
        for bit in range(INDEX_BITS):
            value = 255 if (t >> bit) & 1 else 0
            frames[t, :INDEX_CELL, bit * INDEX_CELL : (bit + 1) * INDEX_CELL] = value
    return frames


def read_index(frame: np.ndarray) -> int:
    """Inverse of :func:`indexed_frames` on a decoded ``[H, W, 3]`` (or ``[3, H, W]``) frame."""
    if frame.shape[0] == 3 and frame.shape[-1] != 3:
        frame = np.moveaxis(frame, 0, -1)
    value = 0
    for bit in range(INDEX_BITS):
        cell = frame[1 : INDEX_CELL - 1, bit * INDEX_CELL + 1 : (bit + 1) * INDEX_CELL - 1]
        if float(np.mean(cell)) > 127:
            value |= 1 << bit
    return value
