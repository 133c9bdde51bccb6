"""Configurations: dataclasses whose fields carry their own help, choices and ranges.

Every command's settings are one dataclass here. A field is declared with :func:`option`, which keeps the
default, a one-line help (advice, not only a description), and what values are allowed next to each
other; the CLI builds its flags from these, so a default is written in exactly one place. Values from
YAML files or flags go through :func:`from_dict`, which checks each against the field's annotation and
range and reports the first problem as one line naming the field, the value and what is allowed.

Clip geometry is declared once, in :class:`~xdc_fast.data.clips.ClipConfig`; a command's ``clip`` field
holds only the fields a user overrides (on top of the arch's geometry, or the checkpoint's).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from .choices import DEVICE_HELP, DEVICES, LOADER_HELP, LOADERS, MODALITIES
from .data.clips import CLIP_FIELDS, ClipConfig
from .errors import ConfigError, XdcError
from .files import shown_path
from .models.archs import (ARCH_HELP, ARCHS, AUDIO_INPUT_HELP, AUDIO_INPUTS, HEAD_HELP, HEADS, VIDEO_INPUT_HELP,
                           VIDEO_INPUTS, arch_named, default_arch)
from .protocols import PROTOCOLS, default_protocols, protocols_help
from .variants import VARIANTS

SCHEDULES = ("cosine", "constant")
PRESETS = Path(__file__).parent / "configs"

# Geometry keys that older YAML files (and older checkpoints) keep at the top level instead of under clip:.
FLAT_CLIP_KEYS = ("frames", "stride", "resize_short", "crop", "audio_seconds", "n_mels")


AUTO = "auto"


def option(default, help: str = "", *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, min_open: bool = False, max_open: bool = False, default_factory=None,
           auto: bool = False):
    """A dataclass field with its help text and allowed values (checked by :func:`check_value`).

    ``auto``: the field also takes the word ``auto``, a value the command resolves from the data at
    start-up (and records as resolved)."""
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "min_open": min_open, "max_open": max_open,
                "auto": auto}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _allowed(annotation) -> tuple[tuple[type, ...], bool]:
    """The plain types an annotation admits, and whether None is one of them."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (typing.get_origin(annotation) or annotation,), False


def _type_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_value(cls, name: str, value):
    """``value`` for the field ``name`` of ``cls``, converted (an int for a float field) and checked.

    Raises ConfigError naming the field, the value and what is allowed."""
    spec = {f.name: f for f in fields(cls)}.get(name)
    if spec is None:
        raise ConfigError(f"unknown configuration key {name!r} for {cls.__name__}; known keys: "
                          f"{', '.join(f.name for f in fields(cls))}")
    kinds, optional = _allowed(typing.get_type_hints(cls)[name])
    if spec.metadata.get("auto"):
        if value == AUTO:
            return value
        kinds = tuple(k for k in kinds if k is not str)
        if isinstance(value, str):
            raise ConfigError(f"{name}: expected {_type_name(kinds)} or 'auto', got {value!r}")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is needed ({_type_name(kinds)}), got nothing")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is an int in Python, but `batch_size: true` in a YAML file is a mistake, not 1.
    if not any(isinstance(value, k) and not (k is not bool and isinstance(value, bool)) for k in kinds):
        raise ConfigError(f"{name}: expected {_type_name(kinds)}, got {value!r} ({type(value).__name__})")
    # nan fails every comparison, so it would pass any range below; inf (or 1e400, read as inf) passes a
    # range without a maximum. Either would run and give a wrong result, so no field takes them.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: {value!r} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise ConfigError(f"{name}: {value!r} is out of range; it must fit in 64 bits")
    meta = spec.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value < low or (meta.get("min_open") and value == low)):
        relation = "greater than" if meta.get("min_open") else "at least"
        raise ConfigError(f"{name}: {value!r} is out of range; it must be {relation} {low}")
    if high is not None and (value > high or (meta.get("max_open") and value == high)):
        relation = "less than" if meta.get("max_open") else "at most"
        raise ConfigError(f"{name}: {value!r} is out of range; it must be {relation} {high}")
    if name == "clip":
        value = check_clip_overrides(value)
    return value


def check_clip_overrides(values: dict) -> dict:
    """Clip-geometry overrides (fields of ClipConfig), each type- and range-checked."""
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = check_value(ClipConfig, key, value)
        except ConfigError as error:
            raise ConfigError(f"clip.{error}") from None
    return checked


def from_dict(cls, values: dict):
    """``cls`` from a mapping (a YAML file, flags): unknown keys and wrong values are one-line errors.

    Geometry keys at the top level (older files) are moved under ``clip``."""
    if not isinstance(values, dict):
        raise ConfigError(f"a configuration should be a mapping of field: value, got {type(values).__name__}")
    values = dict(values)
    names = {f.name for f in fields(cls)}
    if "clip" in names:
        flat = {k: values.pop(k) for k in FLAT_CLIP_KEYS if k in values}
        nested = values.get("clip") or {}
        twice = [k for k in flat if isinstance(nested, dict) and k in nested]
        if twice:
            raise ConfigError(f"{', '.join(twice)} given both at the top level and under clip: (e.g. {twice[0]}: "
                              f"{flat[twice[0]]!r} and clip.{twice[0]}: {nested[twice[0]]!r}); keep one")
        if flat:
            values["clip"] = {**flat, **nested}
    return cls(**{key: check_value(cls, key, value) for key, value in values.items()})


def read_yaml(path_or_preset: str, preset_prefix: str = "") -> dict:
    """The mapping in a preset (``xdc_fast/configs/<prefix><name>.yaml``) or in a YAML file."""
    import yaml

    preset = PRESETS / f"{preset_prefix}{path_or_preset}.yaml"
    path = preset if preset.exists() else Path(path_or_preset)
    if not path.is_file():
        presets = sorted(p.stem[len(preset_prefix):] for p in PRESETS.glob(f"{preset_prefix}*.yaml"))
        raise ConfigError(f"--config {path_or_preset}: neither a preset ({', '.join(presets) or 'none'}) "
                          "nor an existing file")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"--config {shown_path(path_or_preset)} is not UTF-8 text (byte {error.start}); save it as "
                          "UTF-8") from None
    except OSError as error:
        raise ConfigError(f"--config {shown_path(path_or_preset)} cannot be read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        where = " ".join(str(error).split())  # yaml's message spans lines; the Error: is one
        raise ConfigError(f"--config {shown_path(path_or_preset)} is not valid YAML: {where}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path_or_preset} should hold a mapping of field: value")
    return values


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """YAML's safe loader, except that a key given twice in one mapping is an error: the plain loader
        keeps the last one, so the first would be silently ignored."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


class Checked:
    """Mixin: every field is checked when the dataclass is built, from YAML, flags or Python alike."""

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, check_value(type(self), f.name, getattr(self, f.name)))

    @classmethod
    def from_dict(cls, values: dict):
        return from_dict(cls, values)


def clip_config(arch: str, *layers: dict | None, **fixed) -> ClipConfig:
    """The clip geometry of ``arch``, overridden by each mapping of ``layers`` in turn (later wins;
    None values are skipped), then by ``fixed``."""
    from .data.clips import clip_for_arch

    merged: dict = {}
    for layer in layers:
        merged.update({k: v for k, v in (layer or {}).items() if k in CLIP_FIELDS and v is not None})
    clip = dataclasses.replace(clip_for_arch(arch), **merged, **fixed)
    if clip.crop > clip.resize_short:
        raise ConfigError(f"clip.crop {clip.crop} is larger than clip.resize_short {clip.resize_short}: the crop is "
                          "taken inside the resized frame; lower crop or raise resize_short")
    return clip


# More epochs than any run could finish: a larger number (a typo, an extra zero) would only surface as
# an allocation failure in the learning-rate schedule, after the run's files are written.
MAX_EPOCHS = 100_000
# Beyond this a timedelta overflows; no collective should wait longer anyway.
MAX_TIMEOUT_S = 30 * 24 * 3600.0


# Fields several commands share, declared once (a fresh Field per dataclass).

def clip_overrides_option():
    return option(None, "Clip geometry overrides on top of the checkpoint's (else the arch's).", default_factory=dict)


def video_input_option():
    return option(None, "What a video encoder is fed: rgb or residual (differences of consecutive frames). Default: "
                  "the checkpoint's (rgb for torchvision files; for a random encoder, the arch's: residual for "
                  "tiny, rgb for r2plus1d_18, as a pretraining of that arch feeds it).", choices=VIDEO_INPUTS)


def audio_input_option():
    return option(None, "What an audio encoder is fed: logmel or centred (the log-mel less its mean over the clip). "
                  "Default: the checkpoint's (logmel for one written before the choice existed; for a random "
                  "encoder, the arch's, logmel for both, as a pretraining of that arch feeds it).",
                  choices=AUDIO_INPUTS)


def bn_eps_option():
    return option(1e-5, "Batch-norm epsilon of the video encoder: 1e-3 for the official XDC weights.", min=0,
                  min_open=True)


def workers_option():
    return option(0, "DataLoader worker processes decoding clips beside the training process (0: it decodes "
                  "them itself). With spare cores, 2-8 keep the step fed; each holds its own decoder.", min=0)


def loader_option():
    return option("auto", LOADER_HELP, choices=tuple(LOADERS))


def clip_order_option():
    return option("global", "Order of an epoch's training clips. global: one sequence of the seed and epoch that "
                  "ranks take in turn, the same whatever their number; shards (a dataset read from its clip "
                  "shards, prepare --shards): the same clips regrouped so that each rank reads whole shards one "
                  "after another, for storage that reads large runs faster than scattered records (network file "
                  "systems, object stores); what a rank reads then depends on the number of ranks.",
                  choices=("global", "shards"))


def compile_option():
    return option(False, "Compile the encoders with torch.compile before training: on an H200, 1.4x the "
                  "training clips/s of R(2+1)D-18 after about a minute of compiling "
                  "(benchmarks/results/train_h200.md); worth it for runs of hours, not for a smoke test.")


def device_option():
    return option("auto", DEVICE_HELP, choices=DEVICES)


def dist_timeout_option():
    return option(600.0, "Under torchrun: seconds a rank waits for the others.", min=0, min_open=True,
                  max=MAX_TIMEOUT_S)


# An auto-length pretraining is at least this many optimisation steps, split into the arch's number of rounds
# (Arch.rounds): three rounds of 200, the first length at which the tiny encoders left chance on the demo's
# data (the video encoder's pseudo-label loss stays at ln k for its first ~150 steps); the same length in
# seven rounds gained more over random encoders on the tuning families (docs/pretraining.md#auto-settings).
AUTO_STEPS = 600


def auto_round_steps(arch) -> int:
    """The fewest optimisation steps of each of ``arch``'s rounds when ``epochs_per_round`` is auto."""
    return math.ceil(AUTO_STEPS / arch.rounds)


AUTO_ROUNDS_HELP = ", ".join(f"{a.name}: {a.rounds} rounds of {auto_round_steps(a)} steps" for a in ARCHS.values())
# Settings whose auto value is the arch's (models.archs.Arch), with why each value was given to an arch.
ARCH_CHOSEN = {
    "video_input": {"residual": "frame differences gained more over random encoders than frames did on the tuning "
                                "families, in both modalities",
                    "rgb": "the paper's input, and every released weight file's"},
    "audio_input": {"logmel": "centred gained XDC less over random encoders in audio on the tuning families"},
    "head": {"mlp": "a hidden layer gained more over random encoders than a linear head on the tuning families, in "
                    "both modalities",
             "linear": "XDC's linear classifier"},
}


# ---- the optimiser every trained model uses -----------------------------------------------------------

@dataclass
class SgdSettings(Checked):
    """The SGD settings of whatever a command trains: pretrain's encoders and heads, finetune's encoder and
    classifier in full mode, evaluate's finetune protocol. Declared once; each command's configuration
    holds them at its top level (``--lr``, ``lr:`` in its YAML file)."""

    lr: float = option(0.01, "SGD learning rate, after the warm-up and decayed by the schedule; 0.01 suits the "
                       "tiny encoders' finetuning, lower it if the loss does not decrease. (finetune: full mode; "
                       "evaluate: the finetune protocol; pretrain has its own default.)", min=0, min_open=True)
    momentum: float = option(0.9, "SGD momentum.", min=0, max=1)
    weight_decay: float = option(1e-4, "SGD weight decay of the trained weights.", min=0)
    warmup_epochs: float = option(0.0, "Linear warm-up of the learning rate from 0, then the schedule.", min=0,
                                  max=MAX_EPOCHS)
    schedule: str = option("cosine", "cosine: decay to 0 at the last step; constant: no decay.", choices=SCHEDULES)

    def sgd_settings(self) -> dict:
        """These settings alone, for another command's configuration."""
        return {f.name: getattr(self, f.name) for f in fields(SgdSettings)}


# ---- the commands' configurations --------------------------------------------------------------------

@dataclass
class PretrainConfig(SgdSettings):
    variant: str = option("xdc", "xdc: each encoder learns the other modality's clusters (the paper's best); "
                          "mdc, cdc, sdc-video, sdc-audio are its baselines.", choices=tuple(VARIANTS))
    arch: str = option("auto", ARCH_HELP, choices=(AUTO, *ARCHS))
    video_input: str = option("auto", VIDEO_INPUT_HELP, choices=(AUTO, *VIDEO_INPUTS))
    audio_input: str = option("auto", AUDIO_INPUT_HELP, choices=(AUTO, *AUDIO_INPUTS))
    # Rounds of a few hundred steps at 0.01 left the tiny heads near chance on their targets; at 0.05 the
    # encoders gained more over random ones on the tuning families (docs/pretraining.md#learning-rate).
    lr: float = option(0.05, "SGD learning rate, after the warm-up and decayed by the schedule (0.05, as the "
                       "paper preset); lower it if the loss does not decrease.", min=0, min_open=True)
    audio_lr: float | None = option(None, "SGD learning rate of the audio encoder and its heads, on the same "
                                    "warm-up and schedule; unset: lr.", min=0, min_open=True)
    clusters: int | str = option("auto", "k of the k-means, at most the number of clips clustered. auto: the "
                                 "square root of the number of videos, between 8 and 1024 (the XDC lineage uses "
                                 "64-1024 on Kinetics-size data).", min=2, auto=True)
    epochs: int | str = option("auto", "Training epochs in all. auto: the arch's number of rounds of "
                               "epochs_per_round, at least 4 epochs.", min=1, max=MAX_EPOCHS, auto=True)
    epochs_per_round: int | str = option("auto", "Re-cluster after this many epochs (DeepCluster: 1). auto: the "
                                         f"fewest epochs that give a round its share of {AUTO_STEPS} optimisation "
                                         f"steps over the arch's rounds ({AUTO_ROUNDS_HELP}; 1 epoch on large "
                                         "data).", min=1, max=MAX_EPOCHS, auto=True)
    clips_per_video: int = option(2, "Fixed clips per video whose features are clustered.", min=1)
    pca_dim: int | str = option("auto", "PCA-whitening dimension before k-means (0 = off, L2 only; DeepCluster: "
                                "256). auto: the largest of 256, 128, 64, 32 (at most the feature size) with 100 "
                                "clips clustered per dimension, else 0.", min=0, auto=True)
    kmeans_niter: int = option(20, "Lloyd iterations per clustering.", min=1)
    kmeans_max_points_per_centroid: int = option(256, "k-means trains on a seeded sample of about clusters x this "
                                                 "many clips (faiss's rule and default) and then assigns every clip "
                                                 "in a stream; on fewer clips it trains on all of them. 0: always "
                                                 "train on every clip.", min=0)
    round_features: str = option("auto", "Where a round keeps the clips' features: memory (each rank holds its "
                                 "own), disk (each rank writes them to the run folder chunk by chunk and k-means "
                                 "reads them back, for rounds larger than memory; stored in float16 after the "
                                 "whitening), or auto: memory where the plan printed at start fits this machine, "
                                 "else disk.", choices=("auto", "memory", "disk"))
    head: str = option("auto", HEAD_HELP, choices=(AUTO, *HEADS))
    assignment: str = option("nearest", "How a round labels its clips once k-means has its centroids: nearest (each "
                             "clip its nearest centroid, DeepCluster's and XDC's rule) or balanced (the clusters "
                             "made about equal in size at the least cost in distance: Sinkhorn-Knopp's optimal "
                             "transport, as SeLa, SwAV and SeLaVi label).", choices=("nearest", "balanced"))
    kmeans_nredo: int | str = option("auto", "k-means restarts; each modality keeps its lowest objective. auto: 3 "
                                     "while clips x clusters stays under 5e7 (restarts are cheap there), else 1.",
                                     min=1, auto=True)
    batch_size: int = option(8, "Clips per step (per rank under torchrun).", min=1)
    init_checkpoint: str | None = option(None, "Start the encoders from this checkpoint (another run's, or "
                                         "torchvision / official XDC video weights).")
    labels_from: str | None = option(None, "Cluster transfer: train on these saved assignments "
                                     "(RUN/clusters/round_NNN.pt) instead of clustering.")
    checkpoint_every: int = option(50, "Steps between mid-epoch checkpoints (0: only at the end of a round).",
                                   min=0)
    recluster: str = option("epochs", "epochs: every epochs_per_round epochs; plateau: when the held-out "
                            "pseudo-label loss stops improving for `patience` epochs.", choices=("epochs", "plateau"))
    heldout_fraction: float = option(0.1, "Share of videos (rounded down) clustered but kept out of training: "
                                     "each round says whether the encoders fit their targets on them (not just "
                                     "memorised them); plateau mode watches their loss. 0: none.",
                                     min=0, max=1, max_open=True)
    patience: int = option(1, "plateau mode: epochs without improvement before re-clustering.", min=1)
    audio_shift: int = option(2, "Training augmentation: each training clip's log-mel moves up or down by up "
                              "to this many mel bins (of 40 by default; 2 is about 3.5 semitones near 1 kHz), "
                              "so a pitch of its own no longer identifies a video and the audio encoder must "
                              "learn what clips share rather than memorise its videos' targets. 0: off.",
                              min=0)
    colour_jitter: float = option(0.0, "Training augmentation: each training clip's brightness, contrast and "
                                  "saturation scaled by a factor drawn in [1 - x, 1 + x] and its hue turned by up "
                                  "to x / 2 of a turn, the same over its frames, so a video's colours no longer "
                                  "identify it and the video encoder must learn what its cluster shares rather "
                                  "than memorise its videos' targets. 0: off.", min=0, max=1)
    max_unreadable: float = option(0.05, "Share of videos whose fixed clips may all fail to decode in a round "
                                   "(they sit it out, listed in metrics.jsonl); more stops the run.", min=0, max=1)
    clip: dict = option(None, "Clip geometry overrides (frames, stride, resize_short, crop, audio_seconds, "
                        "n_mels, ...) on top of the arch's.", default_factory=dict)
    workers: int = workers_option()
    loader: str = loader_option()
    clip_order: str = clip_order_option()
    compile: bool = compile_option()
    device: str = device_option()
    dist_timeout_s: float = option(600.0, "Under torchrun: seconds a rank waits for the others before every rank "
                                   "stops with a message naming the phase that stalled.", min=0, min_open=True,
                                   max=MAX_TIMEOUT_S)
    seed: int = option(0, "Seed of every random choice of the run (see xdc_fast.seeds).")

    def __post_init__(self):
        super().__post_init__()
        if self.arch != AUTO:  # an auto arch is checked once the device names it
            self.clip_config()  # the arch's geometry with the overrides: refused now if they do not fit together

    def resolved_arch(self, device_type: str | None = None) -> str:
        """The arch, ``auto`` resolved for ``device_type`` (default: the device this config would take)."""
        if self.arch != AUTO:
            return self.arch
        if device_type is None:
            import torch

            device_type = "cuda" if self.device == "cuda" or (self.device == AUTO and torch.cuda.is_available()) \
                else "cpu"
        return default_arch(device_type)

    def clip_config(self) -> ClipConfig:
        return clip_config(self.resolved_arch(), self.clip)


# ---- auto: pretraining settings resolved from the data's size ------------------------------------------

def resolve_auto(config: PretrainConfig, videos: int, steps_per_epoch: int,
                 device_type: str = "cpu") -> tuple[PretrainConfig, dict[str, str]]:
    """``config`` with every ``auto`` field replaced by its value for ``videos`` videos (all ranks),
    ``steps_per_epoch`` optimisation steps per epoch and the run's device, and for each one why (a line
    for the log).

    The rules, and the measurements behind them, are in docs/pretraining.md#auto-settings."""
    values, why = {}, {}
    clips = videos * config.clips_per_video
    arch = arch_named(config.resolved_arch(device_type))
    if config.clusters == AUTO:
        k = min(max(8, round(math.sqrt(videos))), 1024, clips)
        values["clusters"], why["clusters"] = k, f"the square root of {videos} videos, kept between 8 and 1024"
    k = values.get("clusters", config.clusters)
    if config.pca_dim == AUTO:
        fits = [d for d in (256, 128, 64, 32) if d <= arch.feature_dim and clips >= 100 * d]
        values["pca_dim"] = fits[0] if fits else 0
        why["pca_dim"] = (f"{clips} clips clustered, at least 100 per dimension" if fits else
                          f"{clips} clips clustered: fewer than 100 per dimension even at 32, so L2 only")
    if config.kmeans_nredo == AUTO:
        values["kmeans_nredo"] = 3 if clips * k <= 5e7 else 1
        why["kmeans_nredo"] = f"{clips} clips x {k} clusters " + ("is cheap to cluster again" if clips * k <= 5e7
                                                                    else "is costly to cluster again")
    if config.epochs_per_round == AUTO:
        round_steps = auto_round_steps(arch)
        needed = max(1, math.ceil(round_steps / steps_per_epoch))
        values["epochs_per_round"] = needed
        why["epochs_per_round"] = (f"{steps_per_epoch} steps per epoch; the {arch.name} arch's {arch.rounds} rounds "
                                   f"share at least {AUTO_STEPS} steps, {round_steps} each")
        if config.epochs != AUTO and config.epochs < needed:
            why["epochs_per_round"] += (f"; epochs {config.epochs} is fewer, so this run is one partial round of "
                                        f"{config.epochs * steps_per_epoch} steps: raise epochs for rounds the "
                                        "encoders can fit")
    for name in ARCH_CHOSEN:
        if getattr(config, name) == AUTO:
            values[name] = getattr(arch, name)
            why[name] = f"the {arch.name} arch's ({values[name]}): {ARCH_CHOSEN[name][values[name]]}"
    per_round = values.get("epochs_per_round", config.epochs_per_round)
    if config.epochs == AUTO:
        values["epochs"] = max(4, arch.rounds * per_round)
        why["epochs"] = f"the {arch.name} arch's {arch.rounds} rounds of {per_round} epoch(s), at least 4"
    return dataclasses.replace(config, **values), why


@dataclass
class FinetuneConfig(SgdSettings):
    checkpoint: str = option("random", "RUN/checkpoints/last.pt of a pretraining (or finetuning) run, a "
                             "torchvision / official XDC video weight file, or 'random' (the untrained baseline "
                             "every table needs).")
    modality: str = option("video", "Which encoder to transfer.", choices=MODALITIES)
    mode: str = option("full", "full: train encoder and classifier; linear: frozen encoder, cached features, "
                       "logistic regression.", choices=("full", "linear"))
    arch: str | None = option(None, "Default: the checkpoint's (tiny for random).", choices=ARCHS)
    video_input: str | None = video_input_option()
    audio_input: str | None = audio_input_option()
    split: int = option(1, "UCF101/HMDB51 split 1-3, ESC-50 test fold 1-5. Datasets without splits get a seeded "
                        "stratified one (test_fraction), recorded in metrics.json.", min=1)
    epochs: int = option(8, "Full mode: training epochs.", min=1, max=MAX_EPOCHS)
    batch_size: int = option(8, "Clips per step (per rank under torchrun).", min=1)
    clips_per_video: int = option(1, "Full mode: random clips per training video per epoch.", min=1)
    train_clips: int = option(10, "Linear mode: uniformly spaced clips per training video (features cached).",
                              min=1)
    test_clips: int = option(10, "Uniformly spaced clips per test video; video accuracy averages their softmax.",
                             min=1)
    linear_c: float = option(1.0, "Linear mode: inverse L2 strength of the logistic regression (standardised "
                             "features).", min=0, min_open=True)
    eval_every: int = option(0, "Full mode: also score the test split every N epochs; the final epoch is the "
                             "result, the best one is reported beside it, labelled as selected on the test set "
                             "(0 = final only).", min=0)
    test_fraction: float = option(0.3, "Datasets without splits: share of each class held out for testing.",
                                  min=0, max=1, min_open=True)
    clip: dict = clip_overrides_option()
    bn_eps: float = bn_eps_option()
    workers: int = workers_option()
    loader: str = loader_option()
    clip_order: str = clip_order_option()
    compile: bool = compile_option()
    device: str = device_option()
    dist_timeout_s: float = dist_timeout_option()
    seed: int = option(0, "Seed of the split, the head, the clip order (and of a random encoder).")


@dataclass
class ExtractConfig(Checked):
    checkpoint: str = option("random", "A pretraining or finetuning checkpoint, torchvision / official XDC video "
                             "weights, or 'random'.")
    modality: str = option("video", "Which encoder's features.", choices=MODALITIES)
    clips_per_video: int = option(10, "Uniformly spaced clips per item.", min=1)
    aggregate: str = option("mean", "mean: one row per item; all: every clip ([items, clips, dim]).",
                            choices=("mean", "all"))
    arch: str | None = option(None, "Default: the checkpoint's (tiny for random).", choices=ARCHS)
    video_input: str | None = video_input_option()
    audio_input: str | None = audio_input_option()
    bn_eps: float = bn_eps_option()
    batch_size: int = option(8, "Clips per forward pass.", min=1)
    clip: dict = clip_overrides_option()
    workers: int = workers_option()
    loader: str = loader_option()
    device: str = device_option()
    dist_timeout_s: float = dist_timeout_option()
    seed: int = option(0, "Seed of a random encoder.")





@dataclass
class EvaluateConfig(SgdSettings):
    checkpoints: list = option(None, "Encoders to score, each a checkpoint file or 'random' (the untrained "
                               "baseline, drawn from seed; 'random:N' draws it from seed N).",
                               default_factory=lambda: ["random"])
    protocols: list = option(None, protocols_help(), default_factory=lambda: list(default_protocols()))
    modality: str = option("video", "Which encoder to score.", choices=MODALITIES)
    arch: str | None = option(None, "Default: the checkpoint's (tiny for random).", choices=ARCHS)
    video_input: str | None = video_input_option()
    audio_input: str | None = audio_input_option()
    split: int | None = option(None, "One split/fold (UCF101/HMDB51 1-3, ESC-50 1-5); default: every split the "
                               "manifest has, or one seeded stratified split when it has none.", min=1)
    clips_per_video: int = option(10, "Uniformly spaced clips per training and per test video.", min=1)
    test_fraction: float = option(0.3, "Datasets without splits: share of each class held out for testing.",
                                  min=0, max=1, min_open=True)
    knn_k: int = option(20, "k-NN: neighbours that vote.", min=1)
    knn_temperature: float = option(0.07, "k-NN: temperature T of the exp(cos/T) vote weights.", min=0,
                                    min_open=True)
    linear_c: float = option(1.0, "linear: inverse L2 strength of the logistic regression.", min=0, min_open=True)
    svm_folds: int = option(3, "svm: group folds over the training videos for choosing C.", min=2)
    epochs: int = option(8, "finetune: training epochs; the last one is scored.", min=1, max=MAX_EPOCHS)
    finetune_clips: int = option(1, "finetune: random augmented clips per training video per epoch (its test "
                                 "clips are clips_per_video, as for every protocol).", min=1)
    batch_size: int = option(8, "Clips per forward pass, and per training step of finetune (per rank).", min=1)
    clip: dict = clip_overrides_option()
    bn_eps: float = bn_eps_option()
    workers: int = workers_option()
    loader: str = loader_option()
    device: str = device_option()
    seed: int = option(0, "Seed of a stratified split, the classifiers, k-means, finetune's head and clips (and "
                       "of a random encoder).")

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("checkpoints", None), ("protocols", tuple(PROTOCOLS))):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{name}: at least one is needed")
            for value in values:
                if not isinstance(value, str):
                    raise ConfigError(f"{name}: expected strings, got {value!r} ({type(value).__name__})")
                if allowed and value not in allowed:
                    raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}: {values} names one twice")


__all__ = ["XdcError", "ConfigError", "AUTO", "resolve_auto", "PretrainConfig", "FinetuneConfig", "ExtractConfig", "option", "from_dict",
           "check_value", "read_yaml", "clip_config"]
