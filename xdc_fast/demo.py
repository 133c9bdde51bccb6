"""``xdc-fast demo``: the whole method on built-in data, in minutes on a laptop CPU.

Writes a synthetic audio-video dataset whose classes are seen (shape and motion) and heard (pitch and
beep rate), prepares it, pretrains XDC with the tiny encoders, then scores the XDC encoders against
random ones of the same architecture on the same split with ``xdc-fast evaluate``'s default protocols
(all but full finetuning); its table is evaluate's linear-probe clip and video accuracy and the NMI of
its clustering protocol to the true classes. The labels are used only for scoring.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


from .config import ConfigError, PRESETS, EvaluateConfig, PretrainConfig, from_dict, read_yaml
from .files import write_text_atomic


@dataclass
class DemoConfig:
    classes: int = 4
    videos_per_class: int = 24
    seconds: float = 4.0
    probe_clips: int = 4  # uniformly spaced clips per video that evaluate encodes
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
    """Every stage in ``out``: media/, data/, pretrain/ (with report/), evaluate/, browse/, demo.json."""
    from .data.synthetic import SyntheticSpec, prepare_synthetic
    from .pretrain import pretrain

    config = config or demo_config()
    out = Path(out)
    if (out / "demo.json").exists():
        raise ConfigError(f"{out} already holds a demo; choose another --out or delete it")
    start = time.perf_counter()
    timings = {}

    # ===== data =====
    log(f"[1/4] writing {config.classes * config.videos_per_class} synthetic videos and preparing them")
    t0 = time.perf_counter()
    spec = SyntheticSpec(classes=config.classes, videos_per_class=config.videos_per_class, seconds=config.seconds,
                         seed=config.seed)
    prepare_synthetic(out / "media", out / "data", spec)
    timings["data"] = time.perf_counter() - t0

    # ===== pretraining =====
    pretrain_config = from_dict(PretrainConfig, {**config.pretrain, "seed": config.seed})
    log(f"[2/4] pretraining XDC ({pretrain_config.epochs} epochs, a re-clustering every "
        f"{pretrain_config.epochs_per_round})")
    t0 = time.perf_counter()
    if (out / "pretrain" / "metrics.jsonl").exists():
        (out / "pretrain" / "metrics.jsonl").unlink()  # an interrupted demo starts its run again
    pretrain(out / "data", out / "pretrain", pretrain_config, log=lambda line: log("      " + line))
    timings["pretrain"] = time.perf_counter() - t0

    # ===== the protocols of the literature, whose linear probe and clustering make the demo's table =====
    log(f"[3/4] xdc-fast evaluate of XDC and random encoders: {', '.join(EvaluateConfig().protocols)}")
    t0 = time.perf_counter()
    evaluations = {modality: evaluate_encoders(out, modality, pretrain_config, config)
                   for modality in ("video", "audio")}
    rows = [row for modality, (_, summary) in evaluations.items() for row in demo_rows(modality, summary)]
    timings["evaluate"] = time.perf_counter() - t0

    # ===== figures =====
    log("[4/4] drawing the pretraining report")
    from .report import write_report

    figures = write_report(out / "pretrain", out / "data")
    timings["total"] = time.perf_counter() - start
    write_text_atomic(out / "demo.json", json.dumps({"rows": [asdict(r) for r in rows], "seconds": timings,
                                                     "config": asdict(config)}, indent=2) + "\n")
    log("")
    log(format_table(rows, config.classes))
    log("")
    for modality, (table, _) in evaluations.items():
        log(f"xdc-fast evaluate, {modality} (evaluate/{modality}/results.md):")
        log(table)
    log(f"done in {timings['total'] / 60:.1f} min. Files under {out}:")
    log(f"  data/             the prepared dataset ({out / 'data' / 'manifest.jsonl'})")
    log("  pretrain/         the XDC run: metrics.jsonl, checkpoints/last.pt, clusters/")
    log(f"  pretrain/report/  {', '.join(p.name for p in figures)}")
    log("  evaluate/         results.json, results.md and results.png of each modality")
    from .browse import browse  # a few seconds: media are written for the members shown only

    log(f"  browse/           {browse(out / 'pretrain', out / 'browse', members=4, log=lambda *_: None)}: "
        "watch and listen to the clusters")
    return rows


def evaluate_encoders(out: Path, modality: str, pretrain_config: PretrainConfig, config: DemoConfig
                      ) -> tuple[str, list[dict]]:
    """``xdc-fast evaluate`` of the XDC checkpoint and a random encoder with its default protocols (a
    seeded split, ``probe_clips`` clips per video, the run's geometry) into ``out/evaluate/<modality>/``;
    returns its table and its summary, the checkpoint named ``xdc``."""
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
    summary = [{**s, "checkpoint": "xdc" if s["checkpoint"] == xdc else s["checkpoint"]} for s in document["summary"]]
    return table(summary), summary


def demo_rows(modality: str, summary: list[dict]) -> list[DemoRow]:
    """The demo's table, read off evaluate's summary: the linear probe's clip and video accuracy and the
    clustering protocol's NMI (k = classes, on each video's mean feature), random first."""
    value = {(s["checkpoint"], s["protocol"], s["metric"]): s["mean"] for s in summary}
    return [DemoRow(modality, name, value[name, "linear", "clip_acc"], value[name, "linear", "video_acc"],
                    value[name, "clustering", "nmi"]) for name in ("random", "xdc")]


def format_table(rows: list[DemoRow], classes: int) -> str:
    lines = [f"{'modality':<9}{'encoder':<9}{'clip acc':>10}{'video acc':>11}{'NMI':>7}   (chance: {1 / classes:.0%})"]
    for r in rows:
        lines.append(f"{r.modality:<9}{r.encoder:<9}{r.clip_acc:>10.1%}{r.video_acc:>11.1%}{r.nmi:>7.2f}")
    return "\n".join(lines)
