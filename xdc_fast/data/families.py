"""A family of families: labelled audio-video datasets drawn from a seed, to judge settings on data that
no one chose them on.

The built-in ``shapes`` family carries its class in a shape, a path and a pitch; a setting tuned there
may only have learnt those. Here a family's seed draws which factor carries the class in the video
(direction, speed, rotation, pulsation, blinking, trajectory shape or the drift of a texture) and in the
audio (musical interval, pulse rate, chirp shape, timbre, rhythm or the width of a noise band), and
which values of it the classes take. Everything else is drawn per video as nuisance: colours and
texture of the scene, size and position of the object, wandering distractors, pixel noise, base pitch,
loudness, timbre (unless timbre is the class), noise floor, tempo. So a single frame, or the pitch alone,
says nothing of the class (tests check both); what changes over time, and how the sound is organised,
does, and the two modalities agree on the class, which is what cross-modal clustering needs.

Families whose seed is below :data:`TUNING_FAMILIES` may be used to choose a setting; the others are
for judging only and must never be looked at while tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_FACTORS = ("direction", "speed", "rotation", "pulsation", "blinking", "trajectory", "texture_drift")
AUDIO_FACTORS = ("interval", "pulse_rate", "chirp", "timbre", "rhythm", "noise_band")
TUNING_FAMILIES = 8  # seeds 0..7: tuning; 8 and above: evaluation only

# Candidate values of each factor, of which a family takes one per class. Training flips clips left-right,
# so no two directions are mirror images (θ and 180° - θ), and rotation and drift senses are nuisance.
VIDEO_LEVELS = {
    "direction": (0.0, 30.0, 60.0, 90.0, 270.0, 300.0, 330.0),  # degrees, y up
    "speed": (0.25, 0.5, 0.9, 1.4, 2.0, 2.8, 3.8),  # pixels per frame at 16 fps, direction per video
    "rotation": (0.0, 3.0, 6.0, 10.0, 15.0, 22.0, 30.0),  # degrees per frame, sense per video
    "pulsation": (0.0, 0.75, 1.25, 2.0, 3.0, 4.0, 5.0),  # size oscillations per second
    "blinking": (0.0, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.75),  # seconds shown then hidden (0: never hides)
    "trajectory": ("still", "horizontal", "vertical", "circle", "figure8", "zigzag", "diagonal"),
    "texture_drift": (0.0, 0.6, 1.2, 2.0, 3.0, 4.2, 5.5),  # background drift, pixels per frame, direction per video
}
AUDIO_LEVELS = {
    "interval": (0, 2, 4, 5, 7, 9, 12),  # semitones between two alternating tones
    "pulse_rate": (1.0, 1.5, 2.2, 3.2, 4.5, 6.5, 9.0),  # beeps per second
    "chirp": ("flat", "up", "down", "up-down", "down-up", "vibrato", "staircase"),
    "timbre": ("pure", "odd", "saw", "octaves", "bright", "bell", "hollow"),
    "rhythm": ((0.0,), (0.0, 0.5), (0.0, 0.25), (0.0, 0.25, 0.5), (0.0, 0.125, 0.25, 0.375), (0.0, 0.375),
               (0.0, 0.5, 0.75)),  # onsets as fractions of a bar
    "noise_band": (0.05, 0.15, 0.35, 0.7, 1.3, 2.3, 3.5),  # band width in octaves, centre per video
}
TIMBRES = {  # harmonic amplitudes (partial k+1 of the base pitch); "bell" is inharmonic
    "pure": (1.0,), "odd": (1.0, 0.0, 0.33, 0.0, 0.2, 0.0, 0.14), "saw": (1.0, 0.5, 0.33, 0.25, 0.2, 0.17),
    "octaves": (1.0, 0.6, 0.0, 0.4), "bright": (0.3, 0.2, 0.5, 0.7, 0.6, 0.5), "bell": (1.0, 0.6, 0.4, 0.3),
    "hollow": (1.0, 0.0, 0.0, 0.0, 0.5),
}
BELL_PARTIALS = (1.0, 2.76, 5.4, 8.93)
BAR_SECONDS = 0.8  # one rhythm bar: every pattern repeats within a clip's audio window


@dataclass(frozen=True)
class Family:
    seed: int
    video_factor: str
    audio_factor: str
    video_levels: tuple  # the class factor's value of each class
    audio_levels: tuple

    @property
    def classes(self) -> int:
        return len(self.video_levels)

    @property
    def tuning(self) -> bool:
        """Whether settings may be chosen on this family."""
        return self.seed < TUNING_FAMILIES

    @property
    def name(self) -> str:
        return f"family{self.seed:03d}-{self.video_factor}-{self.audio_factor}"

    def class_names(self) -> list[str]:
        return [f"{_label(v)}-{_label(a)}" for v, a in zip(self.video_levels, self.audio_levels)]


def _label(level) -> str:
    if isinstance(level, tuple):
        return "r" + "_".join(f"{x:g}" for x in level)
    return f"{level:g}" if isinstance(level, (int, float)) else str(level)


def draw_family(seed: int, classes: int = 6) -> Family:
    """The family of ``seed``: its class factors and the value each class takes (in a drawn order, so a
    class index says nothing of magnitude)."""
    if not 2 <= classes <= 7:
        raise ValueError(f"a family has 2 to 7 classes, got {classes}")
    rng = np.random.default_rng([seed, 0xFA])
    video_factor = VIDEO_FACTORS[int(rng.integers(len(VIDEO_FACTORS)))]
    audio_factor = AUDIO_FACTORS[int(rng.integers(len(AUDIO_FACTORS)))]

    def levels(candidates) -> tuple:
        chosen = rng.choice(len(candidates), size=classes, replace=False)
        return tuple(candidates[int(i)] for i in chosen)

    return Family(seed, video_factor, audio_factor, levels(VIDEO_LEVELS[video_factor]),
                  levels(AUDIO_LEVELS[audio_factor]))


@dataclass(frozen=True)
class FamilySpec:
    """The media of one dataset drawn from a family (``seed``: of the videos, not of the family)."""

    family_seed: int
    classes: int = 6
    videos_per_class: int = 16
    seconds: float = 4.0
    fps: int = 16
    width: int = 80
    height: int = 64
    sample_rate: int = 16000
    seed: int = 0


def render_video(family: Family, label: int, spec: FamilySpec, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[frames, height, width, 3]``: a textured scene, an object whose behaviour is the class
    factor's value for ``label``, two wandering distractors and pixel noise."""
    n, h, w = int(round(spec.seconds * spec.fps)), spec.height, spec.width
    factor, level = family.video_factor, family.video_levels[label]
    per_second = 16.0 / spec.fps  # motion levels are per frame at 16 fps
    cells = rng.random((h // 4 + 2, w // 4 + 2))
    texture = np.kron(cells, np.ones((4, 4)))[:h, :w]
    low, high = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    scene = low + texture[..., None] * (high - low) * rng.uniform(0.3, 0.8)
    colour = rng.uniform(0, 255, size=3)
    radius = min(h, w) * rng.uniform(0.12, 0.2)
    x0, y0 = rng.uniform(0.25 * w, 0.75 * w), rng.uniform(0.25 * h, 0.75 * h)
    wander = rng.normal(0, 0.25, size=2)  # slow drift of the object when its path is not the class
    heading = rng.uniform(0, 2 * math.pi)
    sense = rng.choice([-1.0, 1.0])
    orientation = rng.uniform(0, math.pi)
    phase = rng.uniform(0, 1)
    distractors = [(rng.uniform(0, w), rng.uniform(0, h), *rng.normal(0, 1.2, size=2), rng.uniform(0, 255, size=3),
                    max(2.0, min(h, w) * rng.uniform(0.06, 0.1))) for _ in range(2)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        seconds = t / spec.fps
        x, y, size, angle, shown = x0 + wander[0] * t, y0 + wander[1] * t, radius, orientation, True
        background = scene
        if factor == "direction":
            theta = math.radians(level)
            x, y = x0 + math.cos(theta) * 1.6 * per_second * t, y0 - math.sin(theta) * 1.6 * per_second * t
        elif factor == "speed":
            x = x0 + math.cos(heading) * level * per_second * t
            y = y0 + math.sin(heading) * level * per_second * t
        elif factor == "rotation":
            angle = orientation + math.radians(sense * level * per_second * t)
        elif factor == "pulsation":
            size = radius * (1.0 + 0.45 * math.sin(2 * math.pi * (level * seconds + phase)))
        elif factor == "blinking":
            shown = level == 0 or ((seconds / level + phase) % 2.0) < 1.0
        elif factor == "trajectory":
            x, y = _trajectory(level, seconds + phase * 2.0, x0, y0, w, h)
        elif factor == "texture_drift":
            shift = level * per_second * t
            background = np.roll(scene, (int(round(math.sin(heading) * shift)), int(round(math.cos(heading) * shift))),
                                 axis=(0, 1))
        frame = background + rng.normal(0, 6, size=(h, w, 3))
        if shown:
            dx, dy = ((xx - x + w / 2) % w) - w / 2, ((yy - y + h / 2) % h) - h / 2  # the scene wraps around
            frame[_bar_or_disc(dx, dy, size, angle, factor == "rotation")] = colour
        for dx0, dy0, vx, vy, blob_colour, blob_radius in distractors:
            px, py = (dx0 + vx * t) % w, (dy0 + vy * t) % h
            frame[(xx - px) ** 2 + (yy - py) ** 2 <= blob_radius**2] = blob_colour
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def _bar_or_disc(dx: np.ndarray, dy: np.ndarray, size: float, angle: float, bar: bool) -> np.ndarray:
    """A disc of radius ``size``, or (for rotation, whose class needs an orientation) a bar turned by
    ``angle``."""
    if not bar:
        return dx**2 + dy**2 <= size**2
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = -dx * math.sin(angle) + dy * math.cos(angle)
    return (np.abs(along) <= size * 1.3) & (np.abs(across) <= size * 0.35)


def _trajectory(shape: str, seconds: float, x0: float, y0: float, w: int, h: int) -> tuple[float, float]:
    """Where an object following ``shape`` is after ``seconds`` (one cycle every 2 s)."""
    s = 2 * math.pi * seconds / 2.0
    ax, ay = 0.3 * w, 0.3 * h
    if shape == "still":
        return x0, y0
    if shape == "horizontal":
        return x0 + ax * math.sin(s), y0
    if shape == "vertical":
        return x0, y0 + ay * math.sin(s)
    if shape == "circle":
        return x0 + ax * math.cos(s), y0 + ay * math.sin(s)
    if shape == "figure8":
        return x0 + ax * math.sin(s), y0 + ay * math.sin(2 * s) / 2
    if shape == "zigzag":
        return x0 + ax * (2 / math.pi) * math.asin(math.sin(3 * s)), y0 + ay * math.sin(s) / 3
    return x0 + ax * math.sin(s), y0 + ay * math.sin(s)  # diagonal


def render_audio(family: Family, label: int, spec: FamilySpec, rng: np.random.Generator) -> np.ndarray:
    """float32 ``[2, samples]``: a sound organised by the class factor's value for ``label``, at a base
    pitch, loudness and (unless timbre is the class) timbre drawn per video, over a noise floor."""
    sr = spec.sample_rate
    n = int(round(spec.seconds * sr))
    t = np.arange(n) / sr
    factor, level = family.audio_factor, family.audio_levels[label]
    base = float(np.exp(rng.uniform(np.log(200.0), np.log(1200.0))))
    timbre = level if factor == "timbre" else str(rng.choice(list(TIMBRES)))
    envelope = np.ones(n)
    frequency = np.full(n, base)
    if factor == "interval":
        # Alternating notes of 1/8 s, half the interval either side of the base: their mean pitch is the
        # base's whatever the interval, so the pitch alone still says nothing.
        high = (np.floor(t / 0.125 + rng.uniform(0, 1)) % 2).astype(bool)
        frequency = base * 2.0 ** (np.where(high, level, -level) / 24.0)
    elif factor == "pulse_rate":
        envelope = (((t * level + rng.uniform(0, 1)) % 1.0) < 0.35).astype(float)
    elif factor == "chirp":
        frequency = base * _chirp(level, t + rng.uniform(0, 0.5)) / np.sqrt(2.0)  # centred on the base
    elif factor == "rhythm":
        bar = BAR_SECONDS * rng.uniform(0.93, 1.07)  # the tempo varies a little; the pattern does not
        position = ((t / bar) + rng.uniform(0, 1)) % 1.0
        envelope = np.zeros(n)
        for onset in level:
            envelope[(position >= onset) & (position < onset + 0.06)] = 1.0
    if factor == "noise_band":
        sound = _band_noise(n, sr, float(np.exp(rng.uniform(np.log(400.0), np.log(3000.0)))), level, rng)
    else:
        sound = _tone(frequency, timbre, sr, rng)
    loudness = rng.uniform(0.15, 0.6)
    noise = rng.normal(0, rng.uniform(0.005, 0.03), size=(2, n))
    balance = rng.uniform(0.7, 1.0, size=(2, 1))
    return (loudness * balance * (sound * envelope)[None, :] + noise).astype(np.float32)


def _chirp(shape: str, t: np.ndarray) -> np.ndarray:
    """Pitch as a multiple of the base over time (each shape repeats every 0.5 s); every shape spends as
    long above half an octave as below it, so its mean pitch says nothing of the shape."""
    s = (t % 0.5) / 0.5
    octave = {"flat": np.full_like(s, 0.5), "up": s, "down": 1 - s, "up-down": 1 - np.abs(2 * s - 1),
              "down-up": np.abs(2 * s - 1), "vibrato": 0.5 + 0.1 * np.sin(2 * math.pi * 6 * t),
              "staircase": np.floor(s * 4) / 3}[shape]
    return 2.0 ** octave


def _tone(frequency: np.ndarray, timbre: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    phase = 2 * math.pi * np.cumsum(frequency) / sr
    partials = BELL_PARTIALS if timbre == "bell" else tuple(range(1, len(TIMBRES[timbre]) + 1))
    sound = np.zeros_like(phase)
    for ratio, amplitude in zip(partials, TIMBRES[timbre]):
        if amplitude and frequency.max() * ratio < sr / 2:
            sound += amplitude * np.sin(ratio * phase + rng.uniform(0, 2 * math.pi))
    return sound / max(np.abs(sound).max(), 1e-9)


def _band_noise(n: int, sr: int, centre: float, octaves: float, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.normal(size=n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    low, high = centre * 2.0 ** (-octaves / 2), min(centre * 2.0 ** (octaves / 2), sr / 2 * 0.95)
    spectrum[(freqs < low) | (freqs > high)] = 0
    sound = np.fft.irfft(spectrum, n)
    return sound / max(np.abs(sound).max(), 1e-9)


def make_family_dataset(root: str | Path, spec: FamilySpec) -> list[Path]:
    """Write ``spec.classes * spec.videos_per_class`` videos of the family as ``root/<class>/<class>_<i>.mp4``
    (deterministic by the two seeds); returns the paths."""
    from .synthetic import write_media

    family = draw_family(spec.family_seed, spec.classes)
    root = Path(root)
    paths = []
    for label, name in enumerate(family.class_names()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(spec.videos_per_class):
            rng = np.random.default_rng([spec.family_seed, spec.seed, label, i])
            path = root / name / f"{name}_{i:03d}.mp4"
            write_media(path, render_video(family, label, spec, rng), spec.fps, render_audio(family, label, spec, rng),
                        spec.sample_rate)
            paths.append(path)
    return paths


def prepare_family(media: str | Path, dataset: str | Path, spec: FamilySpec, workers: int = 2) -> Path:
    """The family's media written under ``media`` and prepared into ``dataset`` (returned)."""
    from .prepare import prepare

    make_family_dataset(media, spec)
    prepare(media, dataset, workers=workers, progress=False)
    return Path(dataset)
