"""The variant study: XDC, MDC, CDC, SDC (video, audio) and random encoders, on both synthetic families,
over several seeds; linear-probe video accuracy and k-means NMI of each encoder, as mean ± std.

    python benchmarks/variants.py --out benchmarks/results/variants.md
    python benchmarks/variants.py --families motion --variants xdc --seeds 0 1 2 --out /tmp/xdc.md
    python benchmarks/variants.py --set epochs=12 --set lr=0.02 --tag tuned ...

Not part of CI: each pretraining takes minutes on a CPU. A seed draws both the data (its own synthetic
videos) and the run (encoders, clusters, split, probe), so the spread covers both. Every finished run is
appended to ``WORK/results.jsonl`` and never recomputed, so an interrupted study resumes where it
stopped and later calls add seeds or variants to the same table. The ``shapes`` family tuned the demo;
``motion`` was never used to choose a setting.

Pretraining uses the command's defaults with only ``--arch tiny`` (and ``--set`` overrides, recorded in
the table); every probe uses the same split and clips for every encoder of a seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from pathlib import Path

import numpy as np

from xdc_fast.variants import VARIANTS

FAMILIES = ("motion", "shapes")
CLASSES, VIDEOS_PER_CLASS, SECONDS, PROBE_CLIPS = 6, 16, 3.0, 4
# The supervised ceiling: an encoder trained from random weights on the probe's own training split with the
# true labels (``finetune --mode full``), scored on its test split. What no label-free method is expected to
# beat at this data size; where it sits at chance, the data cannot show learning in that modality.
SUPERVISED_EPOCHS, SUPERVISED_CLIPS = 30, 4


def size_suffix(videos_per_class: int) -> str:
    """What tells apart the folders of a data size other than the study's own."""
    return "" if videos_per_class == VIDEOS_PER_CLASS else f"_v{videos_per_class}"


def dataset(work: Path, family: str, seed: int, videos_per_class: int = VIDEOS_PER_CLASS) -> Path:
    """The data of one seed of a family: ``shapes`` or ``motion`` (the built-in ones), or ``familyNNN``, the
    procedural family of seed NNN (xdc_fast.data.families), at ``videos_per_class`` per class."""
    from xdc_fast.data.families import FamilySpec, prepare_family
    from xdc_fast.data.synthetic import SyntheticSpec, prepare_synthetic

    data = work / "data" / f"{family}_{seed}{size_suffix(videos_per_class)}"
    if not (data / "manifest.jsonl").exists():
        media = work / "media" / f"{family}_{seed}{size_suffix(videos_per_class)}"
        if family.startswith("family"):
            prepare_family(media, data, FamilySpec(family_seed=int(family[len("family"):]), classes=CLASSES,
                                                   videos_per_class=videos_per_class, seconds=SECONDS,
                                                   seed=1000 + seed))
        else:
            prepare_synthetic(media, data, SyntheticSpec(classes=CLASSES, videos_per_class=videos_per_class,
                                                         seconds=SECONDS, seed=1000 + seed, family=family))
    return data


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        overrides[key] = yaml.safe_load(value)
    return overrides


def tiny_clip() -> dict:
    """The clip geometry every probe and ceiling of the study reads: the tiny arch's."""
    from xdc_fast.config import PretrainConfig
    from xdc_fast.data.clips import geometry

    return geometry(PretrainConfig(arch="tiny").clip_config())


def score(data: Path, where: Path, modality: str, checkpoint: str, seed: int, video_input: str | None = None,
          audio_input: str | None = None) -> dict:
    """Linear probe (``finetune --mode linear`` on its seeded split) and the NMI to the classes of k-means
    (k = classes, best of 5 k-means++ starts) on the probe's L2-normalised clip features, of one encoder
    (``video_input``, ``audio_input``: what a random encoder is fed; a checkpoint's says itself)."""
    import torch

    from xdc_fast import metrics
    from xdc_fast.cluster import KMeans
    from xdc_fast.config import FinetuneConfig
    from xdc_fast.probe import probe

    probe_dir = where / "probe" / modality
    if (probe_dir / "metrics.json").exists():
        (probe_dir / "metrics.json").unlink()
    clip = tiny_clip()
    result = probe(data, probe_dir, FinetuneConfig(checkpoint=checkpoint, modality=modality, mode="linear", arch="tiny",
                                                  train_clips=PROBE_CLIPS, test_clips=PROBE_CLIPS, seed=seed,
                                                  clip=clip, video_input=video_input if modality == "video" else None,
                                                  audio_input=audio_input if modality == "audio" else None),
                   log=lambda *_: None)
    features = torch.load(probe_dir / "features.pt", weights_only=True)
    points = torch.nn.functional.normalize(features["features"].float(), dim=1)
    fitted = KMeans(points.shape[1], CLASSES, niter=30, nredo=5, seed=seed, init="kmeans++").fit(points)
    return {"video_acc": result["video_acc"], "clip_acc": result["clip_acc"],
            "nmi": metrics.nmi(fitted.labels.numpy(), features["labels"].numpy())}


def supervised(data: Path, where: Path, modality: str, seed: int, video_input: str | None = None,
               audio_input: str | None = None) -> dict:
    """The supervised ceiling of one modality on the probe's split (see ``SUPERVISED_EPOCHS``), of encoders
    fed ``video_input`` and ``audio_input``."""
    from xdc_fast.config import FinetuneConfig
    from xdc_fast.finetune import finetune

    out = where / "supervised" / modality
    clip = tiny_clip()
    result = finetune(data, out, FinetuneConfig(checkpoint="random", modality=modality, mode="full", arch="tiny",
                                                epochs=SUPERVISED_EPOCHS, clips_per_video=SUPERVISED_CLIPS,
                                                test_clips=PROBE_CLIPS, seed=seed, clip=clip,
                                                video_input=video_input if modality == "video" else None,
                                                audio_input=audio_input if modality == "audio" else None),
                      log=lambda *_: None)
    return {"video_acc": result["video_acc"], "clip_acc": result["clip_acc"],
            "train_acc": result["history"][-1]["train_acc"] if result.get("history") else None}


def run_one(work: Path, family: str, seed: int, variant: str, overrides: dict, tag: str,
            videos_per_class: int = VIDEOS_PER_CLASS) -> dict:
    from xdc_fast.config import PretrainConfig, from_dict
    from xdc_fast.pretrain import pretrain

    data = dataset(work, family, seed, videos_per_class)
    where = work / "runs" / tag / f"{family}_{seed}{size_suffix(videos_per_class)}_{variant}"
    if where.exists():
        shutil.rmtree(where)  # an interrupted run starts again
    where.mkdir(parents=True)
    (where / "data").symlink_to(data.resolve())  # where the demo's scoring looks for the dataset
    t0 = time.perf_counter()
    scores, summary = {}, {}
    if variant == "random":
        for modality in ("video", "audio"):
            scores[modality] = score(data, where, modality, "random", seed, baseline_input(overrides),
                                     audio_baseline_input(overrides))
    elif variant == "supervised":
        for modality in overrides.get("modalities", ("video", "audio")):
            scores[modality] = supervised(data, where, modality, seed, baseline_input(overrides),
                                          audio_baseline_input(overrides))
    else:
        config = from_dict(PretrainConfig, {"arch": "tiny", **overrides, "variant": variant, "seed": seed})
        history = pretrain(data, where / "pretrain", config, log=lambda *_: None)
        signals = {**label_free_signals(history),
                   "nmi_to_first": agreement_with_first_round(where / "pretrain" / "clusters")}
        summary = {"final_loss": history[-1]["loss"], "final_pseudo_label_acc": history[-1]["pseudo_label_acc"],
                   "epochs": len(history), "signals": signals}
        for modality in VARIANTS[variant].modalities:
            scores[modality] = score(data, where, modality, str(where / "pretrain" / "checkpoints" / "last.pt"),
                                     seed)
    return {"family": family, "seed": seed, "variant": variant, "tag": tag, "overrides": overrides,
            "videos_per_class": videos_per_class, "video_input": baseline_input(overrides),
            "audio_input": audio_baseline_input(overrides),
            "scores": scores, "seconds": time.perf_counter() - t0, **summary}


def baseline_input(overrides: dict | None) -> str:
    """What the video encoders of a configuration are fed, so its gain is measured against a random encoder
    fed the same (a residual random encoder is a stronger baseline than an rgb one)."""
    from xdc_fast.models.archs import ARCHS

    return (overrides or {}).get("video_input") or ARCHS["tiny"].video_input


def audio_baseline_input(overrides: dict | None) -> str:
    """What the audio encoders of a configuration are fed (as ``baseline_input`` for video)."""
    from xdc_fast.models.archs import ARCHS

    return (overrides or {}).get("audio_input") or ARCHS["tiny"].audio_input


def inputs_named(video_input: str, audio_input: str) -> str:
    """Both encoders' inputs in one word for tables and keys; the audio's only where it is not the log-mel."""
    return video_input if audio_input == "logmel" else f"{video_input}, audio {audio_input}"


def fed(record: dict) -> str:
    """What a run's encoders were fed (``inputs_named``): its record says (records from before each choice
    existed: rgb frames, the plain log-mel)."""
    overrides = record.get("overrides") or {}
    return inputs_named(record.get("video_input") or overrides.get("video_input") or "rgb",
                        record.get("audio_input") or overrides.get("audio_input") or "logmel")


def fed_by(overrides: dict | None) -> str:
    """What a configuration's encoders are fed, as ``fed`` names it."""
    return inputs_named(baseline_input(overrides), audio_baseline_input(overrides))


def label_free_signals(history: list[dict]) -> dict:
    """What a run can say about itself without labels, per round's last epoch: the video-vs-audio cluster
    agreement (round 0 clusters the initial, random encoders' features, so it is the random baseline),
    each clustering's agreement with the round before, and each head's held-out lift over chance."""
    from xdc_fast.learning import round_signal

    last = {}
    for record in history:
        last[record["round"]] = record
    rounds = [last[r] for r in sorted(last)]
    signals = {"nmi_video_audio": [r.get("nmi_video_audio") for r in rounds],
               "nmi_to_previous": [r.get("nmi_to_previous") for r in rounds],
               "lift": [{head: s["lift"] for head, s in round_signal(r).items()} for r in rounds]}
    return signals


def agreement_with_first_round(clusters: Path) -> list[dict]:
    """Per clustering a run saved (``RUN/clusters/round_NNN.pt``), each modality's agreement (NMI over the
    videos labelled in both) with round 0's, which clustered the random encoders' features: how far training
    moved what the clusters follow from what a random encoder sees."""
    from xdc_fast.metrics import nmi
    from xdc_fast.rounds import read_round

    rounds = [read_round(path).video_labels() for path in sorted(clusters.glob("round_*.pt"))]
    return [{m: nmi(first[both], labels[m][both]) for m, first in rounds[0].items() if m in labels
             for both in [(first >= 0) & (labels[m] >= 0)]} for labels in rounds]


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def table(records: list[dict], tag: str) -> str:
    mine = [r for r in records if r["tag"] == tag]
    lines = ["| family | encoders | seeds | video: probe video acc | video: NMI | audio: probe video acc | audio: NMI |",
             "|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        for variant in ("random", *VARIANTS):
            runs = [r for r in mine if r["family"] == family and r["variant"] == variant]
            if not runs:
                continue
            cells = []
            for modality in ("video", "audio"):
                got = [r["scores"][modality] for r in runs if modality in r["scores"]]
                cells += [mean_std([g["video_acc"] for g in got]), mean_std([g["nmi"] for g in got])]
            seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
            lines.append(f"| {family} | {variant} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_gains(records: list[dict], tag: str) -> str:
    """Each variant's gain over the random encoder of the same seed (same videos, split and probe), in
    points of probe video accuracy: the comparison the seeds' spread of the data does not blur. A random
    encoder does not depend on the pretraining settings, so any tag's random run of that seed serves."""
    random = {(r["family"], r["seed"]): r for r in records if r["variant"] == "random"}
    lines = []
    for family in FAMILIES:
        for variant in VARIANTS:
            runs = sorted((r for r in records if r["tag"] == tag and r["family"] == family and r["variant"] == variant
                           and (family, r["seed"]) in random), key=lambda r: r["seed"])
            cells = []
            for modality in ("video", "audio"):
                gains = [100 * (r["scores"][modality]["video_acc"] - random[(family, r["seed"])]["scores"][modality]
                                ["video_acc"]) for r in runs if modality in r["scores"]]
                if gains:
                    cells.append(f"{modality} {np.mean(gains):+.1f} ± {np.std(gains):.1f} (per seed: "
                                 + ", ".join(f"{g:+.1f}" for g in gains) + ")")
            if cells:
                lines.append(f"- {family}, {variant} − random, seeds {','.join(str(r['seed']) for r in runs)}: "
                             + "; ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--variants", nargs="+", default=["random", *VARIANTS], choices=["random", *VARIANTS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="PretrainConfig override (default: none, the command's defaults)")
    parser.add_argument("--tag", default="defaults", help="name of this configuration in the results")
    parser.add_argument("--work", type=Path, default=Path("variants-work"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/variants.md"))
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["family"], r["seed"], r["variant"], r["tag"]) for r in records}
    for family in args.families:
        for seed in args.seeds:
            for variant in args.variants:
                if (family, seed, variant, args.tag) in done:
                    continue
                record = run_one(args.work, family, seed, variant, overrides, args.tag)
                records.append(record)
                with results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{family} seed {seed} {variant}: " + ", ".join(
                    f"{m} {s['video_acc']:.1%} NMI {s['nmi']:.2f}" for m, s in record["scores"].items())
                    + f" ({record['seconds']:.0f} s)", flush=True)
    tags = list(dict.fromkeys(r["tag"] for r in records))
    text = (f"# Variant study\n\n{datetime.date.today()}, `python benchmarks/variants.py`: {CLASSES} classes x "
            f"{VIDEOS_PER_CLASS} videos of {SECONDS:g} s per seed (the seed draws the data too); linear probe on a "
            f"seeded stratified 30% test split (video accuracy, chance {1 / CLASSES:.1%}); NMI of k-means "
            "(k = classes) on the probe's features. Mean ± std over seeds, in %.\n")
    for tag in tags:
        overrides = next(r["overrides"] for r in records if r["tag"] == tag)
        settings = ", ".join(f"`{k}: {v}`" for k, v in overrides.items()) or "the defaults"
        text += f"\n## {tag}: `--arch tiny` and {settings}\n\n" + table(records, tag) + "\n"
        gains = paired_gains(records, tag)
        if gains:
            text += "\nGain over the random encoder of the same seed, in points of probe video accuracy:\n\n" + gains + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
