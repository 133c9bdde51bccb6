"""``xdc-fast demo``: the whole method on built-in data, in minutes on a laptop CPU.

Writes a synthetic audio-video dataset whose classes are seen (shape and motion) and heard (pitch and
beep rate), prepares it, pretrains XDC with the tiny encoders, then scores the XDC encoders against
random ones of the same architecture on the same split: linear-probe clip and video accuracy, and the
NMI of k-means clusters of their features to the true classes; then ``xdc-fast evaluate`` scores both
with its default protocols (all but full finetuning). The labels are used only for scoring.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, PRESETS, EvaluateConfig, PretrainConfig, from_dict, read_yaml
from .files import write_text_atomic


@dataclass
class DemoConfig:
    classes: int = 4
    videos_per_class: int = 24
    seconds: float = 4.0
    probe_clips: int = 4  # uniformly spaced clips per video for the probes and the clustering
    pretrain: dict = field(default_factory=dict)  # PretrainConfig fields
    seed: int = 0


def demo_config(path: str | Path = PRESETS / "demo.yaml", *, videos_per_class: int | None = None,
                epochs: int | None = None, seed: int = 0) -> DemoConfig:
    """The demo's settings from ``configs/demo.yaml``, with the CLI's overrides; a round is a third of the
    epochs unless the file says otherwise."""
    values = read_yaml(str(path))
    pretrain = dict(values.pop("pretrain", {}))
    unknown = set(values) - {"classes", "videos_per_class", "seconds", "probe_clips"}
    if unknown:
        raise ConfigError(f"{path}: unknown demo keys {', '.join(sorted(unknown))}")
    if epochs is not None:
        pretrain["epochs"] = epochs
    pretrain.setdefault("epochs_per_round", max(1, pretrain.get("epochs", 48) // 3))
    from_dict(PretrainConfig, pretrain)  # checked now, not after the data is written
    config = DemoConfig(**values, pretrain=pretrain, seed=seed)
    if videos_per_class is not None:
        config.videos_per_class = videos_per_class
    return config


@dataclass
class DemoRow:
    modality: str
    encoder: str  # "random" or "xdc"
    clip_acc: float
    video_acc: float
    nmi: float


def run_demo(out: str | Path, config: DemoConfig | None = None, log=print) -> list[DemoRow]:
    """Every stage in ``out``: media/, data/, pretrain/ (with report/), probe/, evaluate/, demo.json."""
    from .data.synthetic import SyntheticSpec, prepare_synthetic
    from .pretrain import pretrain

    config = config or demo_config()
    out = Path(out)
    if (out / "demo.json").exists():
        raise ConfigError(f"{out} already holds a demo; choose another --out or delete it")
    start = time.perf_counter()
    timings = {}

    # ===== data =====
    log(f"[1/5] writing {config.classes * config.videos_per_class} synthetic videos and preparing them")
    t0 = time.perf_counter()
    spec = SyntheticSpec(classes=config.classes, videos_per_class=config.videos_per_class, seconds=config.seconds,
                         seed=config.seed)
    prepare_synthetic(out / "media", out / "data", spec)
    timings["data"] = time.perf_counter() - t0

    # ===== pretraining =====
    pretrain_config = from_dict(PretrainConfig, {**config.pretrain, "seed": config.seed})
    log(f"[2/5] pretraining XDC ({pretrain_config.epochs} epochs, a re-clustering every "
        f"{pretrain_config.epochs_per_round})")
    t0 = time.perf_counter()
    if (out / "pretrain" / "metrics.jsonl").exists():
        (out / "pretrain" / "metrics.jsonl").unlink()  # an interrupted demo starts its run again
    pretrain(out / "data", out / "pretrain", pretrain_config, log=lambda line: log("      " + line))
    timings["pretrain"] = time.perf_counter() - t0

    # ===== scoring =====
    log("[3/5] linear probes and clustering of random and XDC encoders on the same split")
    t0 = time.perf_counter()
    rows = [score_encoder(out, modality, name, checkpoint, pretrain_config, config)
            for modality in ("video", "audio")
            for name, checkpoint in (("random", "random"), ("xdc", str(out / "pretrain" / "checkpoints" / "last.pt")))]
    timings["scoring"] = time.perf_counter() - t0

    # ===== the protocols of the literature =====
    log(f"[4/5] xdc-fast evaluate of XDC and random encoders: {', '.join(EvaluateConfig().protocols)}")
    t0 = time.perf_counter()
    evaluations = {modality: evaluate_encoders(out, modality, pretrain_config, config)
                   for modality in ("video", "audio")}
    timings["evaluate"] = time.perf_counter() - t0

    # ===== figures =====
    log("[5/5] drawing the pretraining report")
    from .report import write_report

    figures = write_report(out / "pretrain", out / "data")
    timings["total"] = time.perf_counter() - start
    write_text_atomic(out / "demo.json", json.dumps({"rows": [asdict(r) for r in rows], "seconds": timings,
                                                     "config": asdict(config)}, indent=2) + "\n")
    log("")
    log(format_table(rows, config.classes))
    log("")
    for modality, table in evaluations.items():
        log(f"xdc-fast evaluate, {modality} (evaluate/{modality}/results.md):")
        log(table)
    log(f"done in {timings['total'] / 60:.1f} min. Files under {out}:")
    log(f"  data/             the prepared dataset ({out / 'data' / 'manifest.jsonl'})")
    log("  pretrain/         the XDC run: metrics.jsonl, checkpoints/last.pt, clusters/")
    log(f"  pretrain/report/  {', '.join(p.name for p in figures)}")
    log("  probe/            metrics.json, confusion.png and features.pt of each probe")
    log("  evaluate/         results.json, results.md and results.png of each modality")
    from .browse import browse  # a few seconds: media are written for the members shown only

    log(f"  browse/           {browse(out / 'pretrain', out / 'browse', members=4, log=lambda *_: None)}: "
        "watch and listen to the clusters")
    return rows


def score_encoder(out: Path, modality: str, name: str, checkpoint: str, pretrain_config: PretrainConfig,
                  config: DemoConfig) -> DemoRow:
    """Linear probe (``xdc-fast finetune --mode linear``) and k-means NMI of one encoder's features, the ones
    the probe computed (saved with it in extract's format). A random encoder sees the XDC run's clips."""
    from .config import FinetuneConfig
    from .data.clips import geometry
    from .probe import probe

    probe_dir = out / "probe" / f"{modality}_{name}"
    if (probe_dir / "metrics.json").exists():
        (probe_dir / "metrics.json").unlink()
    metrics = probe(out / "data", probe_dir,
                    FinetuneConfig(checkpoint=checkpoint, modality=modality, mode="linear", arch="tiny",
                                   train_clips=config.probe_clips, test_clips=config.probe_clips,
                                   seed=config.seed, clip=geometry(pretrain_config.clip_config())),
                    log=lambda *_: None)
    features = torch.load(probe_dir / "features.pt", weights_only=True)
    return DemoRow(modality, name, metrics["clip_acc"], metrics["video_acc"],
                   cluster_nmi(features["features"].numpy(), features["labels"].numpy(), config.classes, config.seed))


def evaluate_encoders(out: Path, modality: str, pretrain_config: PretrainConfig, config: DemoConfig) -> str:
    """``xdc-fast evaluate`` of the XDC checkpoint and a random encoder with its default protocols (the
    probes' split, clips and geometry; on 2 cores about as long as the probes) into
    ``out/evaluate/<modality>/``; returns its table with the checkpoint named ``xdc``."""
    from .data.clips import geometry
    from .evaluate import evaluate, table

    target = out / "evaluate" / modality
    if (target / "results.json").exists():
        (target / "results.json").unlink()  # an interrupted demo scores again
    xdc = str(out / "pretrain" / "checkpoints" / "last.pt")
    document = evaluate(out / "data", target,
                        EvaluateConfig(checkpoints=[xdc, "random"], modality=modality, arch="tiny",
                                       clips_per_video=config.probe_clips, clip=geometry(pretrain_config.clip_config()),
                                       seed=config.seed),
                        log=lambda *_: None)
    return table([{**s, "checkpoint": "xdc" if s["checkpoint"] == xdc else s["checkpoint"]}
                  for s in document["summary"]])


def cluster_nmi(features: np.ndarray, labels: np.ndarray, k: int, seed: int) -> float:
    """NMI to the classes of k-means (k = classes, best of 5 starts) on L2-normalised features."""
    from . import metrics
    from .cluster import KMeans

    points = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(features)).float(), dim=1)
    fitted = KMeans(points.shape[1], k, niter=30, nredo=5, seed=seed, init="kmeans++").fit(points)
    return metrics.nmi(fitted.labels.numpy(), labels)


def format_table(rows: list[DemoRow], classes: int) -> str:
    lines = [f"{'modality':<9}{'encoder':<9}{'clip acc':>10}{'video acc':>11}{'NMI':>7}   (chance: {1 / classes:.0%})"]
    for r in rows:
        lines.append(f"{r.modality:<9}{r.encoder:<9}{r.clip_acc:>10.1%}{r.video_acc:>11.1%}{r.nmi:>7.2f}")
    return "\n".join(lines)
