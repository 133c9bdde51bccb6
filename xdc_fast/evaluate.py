"""``xdc-fast evaluate``: every chosen protocol, for several encoders, over every split of a dataset.

For each checkpoint the encoder is built once and the ``clips_per_video`` uniformly spaced clips of every
video that any split uses are encoded once; each split then takes its training and test videos' rows of
those features, and every protocol of :mod:`xdc_fast.protocols` runs on them. The outputs:

- ``results.json``: every per-split result (scores, and a fingerprint: manifest sha256, split, clip
  geometry, clips per video, protocol hyperparameters, checkpoint file sha256 or ``random:<seed>``, code
  version), and per checkpoint x protocol x metric the mean and standard deviation across splits
  (sample standard deviation, ddof=1; 0 for one split);
- ``results.md``: one table, rows checkpoint x protocol, the protocol's headline metric as mean ± std;
- ``results.png``: the same numbers as bars with error bars.

Features per protocol: ``linear`` and ``svm`` use clip features (train on every training clip, a video's
test prediction averaged over its clips); ``knn`` and ``retrieval`` use each video's mean clip feature
(test videos query training videos); ``clustering`` clusters the mean features of every video of the split.
``finetune`` (only when asked for) trains a fresh copy of the encoder on each split with the loop of
``finetune --mode full`` (:func:`xdc_fast.transfer.train_full`) and scores its ``clips_per_video`` test
clips at the final epoch, so its numbers are that command's for the same settings.

On a multi-label dataset (some item carries several ``labels``: VGGSound, AudioSet) ``linear`` is the
one-vs-rest probe scored by mAP and ``retrieval`` counts a shared class as a hit; the other protocols are
refused before any work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import __version__, distributed as xdist, engine, protocols
from .checkpoint import load_encoder
from .config import ConfigError, EvaluateConfig, FinetuneConfig, clip_config
from .data.clips import geometry
from .data.splits import DatasetError, Split, check_modality, choose_split, class_names, is_multilabel, label_matrix
from .errors import XdcError
from .files import atomic_path, make_folder, output_lock, write_text_atomic
from .protocols import headline
from .seeds import numpy_rng, seed_for
from .transfer import open_transfer, train_full


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_checkpoint(name: str, seed: int) -> tuple[str, int]:
    """(what load_encoder loads, the seed of a random encoder): ``random:N`` is the random encoder of seed N."""
    if name == "random":
        return "random", seed
    if name.startswith("random:"):
        try:
            return "random", int(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"checkpoint {name!r}: write random:N with an integer seed N") from None
    if not Path(name).is_file():
        raise ConfigError(f"checkpoint {name!r} is neither 'random' nor an existing file")
    return name, seed


def splits_of(items: list[dict], config: EvaluateConfig) -> list[Split]:
    """The split asked for, or every split the manifest has, or one seeded stratified split."""
    rng = lambda: numpy_rng(config.seed, "split")  # noqa: E731
    if config.split is not None:
        return [choose_split(items, config.split, config.test_fraction, rng(), config.seed)]
    keys = sorted({k for r in items for k in (r.get("split") or {})}, key=lambda k: (not k.isdigit(), int(k) if
                                                                                      k.isdigit() else 0, k))
    if not keys:
        return [choose_split(items, 1, config.test_fraction, rng(), config.seed)]
    return [choose_split(items, int(key) if key.isdigit() else key, config.test_fraction, rng(), config.seed)
            for key in keys]


def split_name(split: Split) -> str:
    d = split.description
    return str(d["split"]) if d["kind"] == "manifest" else f"stratified(seed={d['seed']})"


def split_fingerprint(split: Split) -> dict:
    d = {k: v for k, v in split.description.items() if k != "test_ids"}
    d["test_ids_sha256"] = hashlib.sha256("\n".join(r["id"] for r in split.test).encode()).hexdigest()
    return d


def _rows(features: np.ndarray, video_of_clip: np.ndarray, videos: np.ndarray, num_items: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Clip rows of ``videos`` (indices into the encoded items) and each row's position in ``videos``."""
    where = np.full(num_items, -1)
    where[videos] = np.arange(len(videos))
    chosen = where[video_of_clip] >= 0
    return features[chosen], where[video_of_clip[chosen]]


def run_protocols(chosen: list[str], train: tuple, test: tuple, num_classes: int, config: EvaluateConfig) -> dict:
    """Every protocol of ``chosen`` on one split's features: ``train``/``test`` are (clip features, video of
    each clip, label of each video)."""
    (train_x, train_v, train_labels), (test_x, test_v, test_labels) = train, test
    if len(train_x) == 0 or len(test_x) == 0:
        raise XdcError("no training or no test clip could be decoded (see the warnings above): nothing to score")
    # The solvers' stream, as in finetune --mode linear; k-means its own.
    features = protocols.Features(train_x, train_v, train_labels, test_x, test_v, test_labels, num_classes,
                                  seed_for(config.seed, "probe") % (2**32), seed_for(config.seed, "kmeans") % (2**32))
    return {name: protocols.run_protocol(name, features, config) for name in chosen}


def finetune_protocol(dataset: Path, out: Path, split: Split, classes: list[str], config: EvaluateConfig,
                      checkpoint: str, encoder, source: dict, device, log) -> dict:
    """Full finetuning of ``encoder`` (trained in place: pass a copy) on one split, as ``finetune --mode full``
    runs it with ``epochs``, ``lr``, ... of ``config``, ``finetune_clips`` random clips per training video per
    epoch and ``clips_per_video`` test clips; scored at the final epoch."""
    # Same name, same meaning in both configurations; the clips per video are named for their use in each.
    same = {name: getattr(config, name) for name in ("epochs", "batch_size", "test_fraction", "clip", "bn_eps",
                                                     "workers", "loader", "device", "seed")}
    settings = FinetuneConfig(checkpoint=checkpoint, modality=config.modality, mode="full", arch=source["arch"],
                              clips_per_video=config.finetune_clips, test_clips=config.clips_per_video,
                              **config.sgd_settings(), **same)
    transfer = open_transfer(dataset, out, settings, split, classes, device, encoder, source, log)
    _, final, history = train_full(transfer)
    return {"scores": {k: final[k] for k in ("clip_acc", "video_acc", "clip_top5", "video_top5", "num_test_videos",
                                             "num_test_clips")},
            "params": {"epochs": config.epochs, "lr": config.lr, "momentum": config.momentum,
                       "weight_decay": config.weight_decay, "warmup_epochs": config.warmup_epochs,
                       "schedule": config.schedule, "train_clips_per_video": config.finetune_clips,
                       "batch_size": config.batch_size, "world_size": xdist.world_size(), "seed": config.seed,
                       "model": "the encoder and a new linear layer trained end to end by SGD",
                       "aggregation": "mean softmax over a video's clips", "scored": "final epoch"},
            "history": history}


def evaluate(dataset: str | Path, out: str | Path, config: EvaluateConfig, log=print) -> dict:
    """Score every checkpoint of ``config`` with every protocol over the splits; writes ``out/results.*``."""
    with output_lock(out):
        return _evaluate(Path(dataset), Path(out), config, log)


def _evaluate(dataset: Path, out: Path, config: EvaluateConfig, log) -> dict:
    from .data.dataset import ClipDataset
    from .data.prepare import load_manifest

    # ===== everything checked before any work =====
    if (out / "results.json").exists():
        raise ConfigError(f"{out} already holds results (results.json); choose another --out")
    checkpoints = [(name, *parse_checkpoint(name, config.seed)) for name in config.checkpoints]
    items = load_manifest(dataset)
    if not items:
        raise XdcError(f"{dataset} holds no usable item (see its rejects.jsonl)")
    check_modality(items, config.modality)
    splits = splits_of(items, config)
    classes = class_names(dataset, items)
    multilabel = is_multilabel(items)
    refused = [p for p in config.protocols if multilabel and p not in protocols.multilabel_names()]
    if refused:
        raise DatasetError(f"this dataset is multi-label (some items carry several labels); {', '.join(refused)} "
                           f"score(s) one label per item: choose among --protocol "
                           f"{' / '.join(protocols.multilabel_names())} (linear is then scored by mAP)")
    manifest_sha = sha256_file(dataset / "manifest.jsonl")
    used = {r["id"]: r for s in splits for r in s.train + s.test}
    ordered = [used[i] for i in sorted(used)]
    index_of = {r["id"]: i for i, r in enumerate(ordered)}
    device = xdist.setup_device(config.device)
    log(f"{len(checkpoints)} checkpoint(s) x {len(splits)} split(s) x {len(config.protocols)} protocol(s) "
        f"({', '.join(config.protocols)}); {len(ordered)} videos, {len(classes)} classes"
        f"{' (multi-label)' if multilabel else ''}")

    started, results = time.perf_counter(), []
    on_features = [p for p in config.protocols if protocols.PROTOCOLS[p].on_features]
    for label, path, seed in checkpoints:
        # ===== one encoder, every used video encoded once =====
        encoder, source = load_encoder(path, config.modality, config.arch, config.bn_eps, seed,
                                       config.video_input, config.audio_input)
        encoder = encoder.to(device)
        clip = clip_config(source["arch"], source.get("clip"), config.clip, eval_clips=config.clips_per_video)
        checkpoint_id = f"random:{seed}" if path == "random" else f"sha256:{sha256_file(path)}"
        if on_features:
            view = ClipDataset(dataset, clip, train=False, modalities=(config.modality,))
            view.items = ordered
            features, position = engine.encode_clips({config.modality: encoder}, view, config.batch_size, device,
                                                     workers=config.workers, loader=config.loader,
                                                     description=f"{label} features")
            features, video_of_clip = features[config.modality], position // config.clips_per_video
            log(f"{label}: {source['source']} ({source['arch']}), {len(features)} clips encoded")
        else:
            log(f"{label}: {source['source']} ({source['arch']})")
        # ===== every split, every protocol, on those features (finetune: on a fresh copy of the encoder) =====
        for split in splits:
            scored = {}
            if on_features:
                parts = []
                for part in (split.train, split.test):
                    videos = np.array([index_of[r["id"]] for r in part])
                    x, v = _rows(features, video_of_clip, videos, len(ordered))
                    labels = label_matrix(part, len(classes)) if multilabel else np.array([r["label"] for r in part])
                    parts.append((x, v, labels))
                scored = run_protocols(on_features, parts[0], parts[1], len(classes), config)
            if "finetune" in config.protocols:
                where = f"  {label} split {split_name(split)} finetune "
                scored["finetune"] = finetune_protocol(dataset, out, split, classes, config, path,
                                                       copy.deepcopy(encoder), source, device,
                                                       lambda line, where=where: log(where + line))
            for protocol in config.protocols:
                result = scored[protocol]
                fingerprint = {"manifest_sha256": manifest_sha, "split": split_fingerprint(split),
                               "clip": geometry(clip), "clips_per_video": config.clips_per_video,
                               "modality": config.modality, "protocol": protocol, "params": result["params"],
                               "checkpoint": checkpoint_id, "arch": source["arch"],
                               "code_version": __version__}
                # outcomes beside the scores (the SVM's chosen C, finetune's epochs), not in the fingerprint
                outcomes = {k: v for k, v in result.items() if k not in ("scores", "params")}
                results.append({"checkpoint": label, "protocol": protocol, "split": split_name(split),
                                "scores": result["scores"], "fingerprint": fingerprint, **outcomes})
                metric = headline(protocol, result["scores"])
                log(f"  {label} split {split_name(split)} {protocol}: {metric} {result['scores'][metric]:.3f}")

    # ===== summary and files =====
    summary = summarise(results)
    document = {"dataset": str(dataset), "classes": classes, "config": asdict(config),
                "splits": [split_name(s) for s in splits], "seconds": time.perf_counter() - started,
                "summary": summary, "results": results}
    if xdist.is_main_process():
        make_folder(out)
        write_text_atomic(out / "results.md", table(summary))
        with atomic_path(out / "results.png") as tmp:
            chart(summary, tmp)
        write_text_atomic(out / "results.json", json.dumps(document, indent=2) + "\n")  # last: marks completion
    log(table(summary))
    return document


def summarise(results: list[dict]) -> list[dict]:
    """Mean and std across splits of every numeric score, per checkpoint x protocol x metric (run order)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["checkpoint"], r["protocol"]), []).append(r)
    summary = []
    for (checkpoint, protocol), rows in groups.items():
        main_metric = headline(protocol, rows[0]["scores"])
        for metric in rows[0]["scores"]:
            values = [float(r["scores"][metric]) for r in rows]
            summary.append({"checkpoint": checkpoint, "protocol": protocol, "metric": metric,
                            "headline": metric == main_metric,
                            "mean": float(np.mean(values)),
                            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                            "splits": [r["split"] for r in rows], "values": values})
    return summary


def table(summary: list[dict]) -> str:
    lines = ["| checkpoint | protocol | metric | mean ± std | splits |", "|---|---|---|---|---|"]
    for s in summary:
        if s["headline"]:
            lines.append(f"| {s['checkpoint']} | {s['protocol']} | {s['metric']} | {s['mean']:.4f} ± {s['std']:.4f} "
                         f"| {len(s['splits'])} |")
    return "\n".join(lines) + "\n"


def chart(summary: list[dict], path: Path) -> None:
    from .report import pyplot, save_figure

    plt = pyplot()
    heads = [s for s in summary if s["headline"]]
    checkpoints = list(dict.fromkeys(s["checkpoint"] for s in heads))
    names = list(dict.fromkeys(s["protocol"] for s in heads))
    metric_of = {s["protocol"]: s["metric"] for s in heads}
    width = 0.8 / len(checkpoints)
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    for i, checkpoint in enumerate(checkpoints):
        rows = {s["protocol"]: s for s in heads if s["checkpoint"] == checkpoint}
        axis.bar(np.arange(len(names)) + (i - (len(checkpoints) - 1) / 2) * width,
                 [rows[n]["mean"] if n in rows else 0.0 for n in names], width,
                 yerr=[rows[n]["std"] if n in rows else 0.0 for n in names], capsize=3, label=checkpoint)
    axis.set_xticks(np.arange(len(names)), [f"{n}\n{metric_of[n]}" for n in names])
    axis.set_ylim(0, 1)
    axis.set_ylabel("mean ± std across splits")
    axis.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, path)


# ===== --compare: may two results files' numbers be set side by side? =====

# What is being scored, not how: two encoders compared under one protocol differ here by design.
ENCODER_FIELDS = ("checkpoint", "arch")


def read_results(path: str | Path) -> dict:
    """A ``results.json`` written by ``evaluate`` (or the folder holding one), checked to be one."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise XdcError(f"{path} does not exist; --compare takes two results.json files written by xdc-fast evaluate")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise XdcError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise XdcError(f"{path} is not a results.json of xdc-fast evaluate: not JSON ({error})") from None
    results = document.get("results") if isinstance(document, dict) else None
    if not isinstance(results, list) or not results or not all(
            isinstance(r, dict) and isinstance(r.get("fingerprint"), dict) and "protocol" in r and "split" in r
            for r in results):
        raise XdcError(f"{path} is not a results.json of xdc-fast evaluate: it needs a non-empty 'results' list whose "
                       "entries carry protocol, split and fingerprint (finetune's metrics.json has none)")
    return {"path": str(path), **document}


def _flatten(value: dict, prefix: str = "") -> dict:
    """``{"clip": {"crop": 28}}`` -> ``{"clip.crop": 28}``, so a difference is named down to the leaf."""
    flat = {}
    for key, inner in value.items():
        if isinstance(inner, dict) and inner:
            flat.update(_flatten(inner, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = inner
    return flat


def _protocol_fields(result: dict) -> dict:
    return {k: v for k, v in _flatten(result["fingerprint"]).items() if k not in ENCODER_FIELDS}


def compare(a: str | Path, b: str | Path) -> dict:
    """Which fingerprint fields differ between two results files, for the protocols and splits both hold.

    Results are matched by protocol and split; every field but the encoder's (checkpoint, arch) must agree
    across all matched results of both files, and each protocol must cover the same splits (a mean over
    splits 1-3 is not comparable with split 1 alone). Returns ``comparable``, ``differences`` (field, the
    values in each file, where), the protocols found in one file only, and what each file scored."""
    documents = [read_results(a), read_results(b)]
    groups: list[dict[tuple[str, str], list[dict]]] = []
    for document in documents:
        grouped: dict[tuple[str, str], list[dict]] = {}
        for r in document["results"]:
            grouped.setdefault((r["protocol"], str(r["split"])), []).append(_protocol_fields(r))
        groups.append(grouped)
    protocols_of = [list(dict.fromkeys(p for p, _ in g)) for g in groups]
    common = [p for p in protocols_of[0] if p in protocols_of[1]]
    differences: dict[str, dict] = {}

    def note(field: str, values: tuple[set, set], where: str) -> None:
        entry = differences.setdefault(field, {"field": field, "a": set(), "b": set(), "where": []})
        entry["a"] |= values[0]
        entry["b"] |= values[1]
        entry["where"].append(where)

    for protocol in common:
        splits = [[s for p, s in g if p == protocol] for g in groups]
        if set(splits[0]) != set(splits[1]):
            note(f"splits of {protocol}", (set(splits[0]), set(splits[1])), protocol)
        for split in (s for s in splits[0] if s in splits[1]):
            rows = [g[(protocol, split)] for g in groups]
            for field in sorted({f for side in rows for row in side for f in row}):
                values = tuple({json.dumps(row.get(field, "(absent)"), sort_keys=True) for row in side}
                               for side in rows)
                if len(values[0] | values[1]) > 1:
                    note(field, values, f"{protocol} split {split}")
    listed = [{**d, "a": sorted(d["a"]), "b": sorted(d["b"])} for d in differences.values()]
    return {"a": documents[0]["path"], "b": documents[1]["path"], "common_protocols": common,
            "only_in_a": [p for p in protocols_of[0] if p not in common],
            "only_in_b": [p for p in protocols_of[1] if p not in common],
            "encoders": [sorted({r["fingerprint"].get("checkpoint", "?") for r in d["results"]}) for d in documents],
            "differences": listed, "comparable": bool(common) and not listed}


def _shown(values: list[str]) -> str:
    def short(text: str) -> str:
        return text if len(text) <= 40 else text[:24] + "..."
    return ", ".join(short(v) for v in values)


def comparison_text(comparison: dict) -> str:
    a, b = Path(comparison["a"]), Path(comparison["b"])
    lines = [f"a: {a} ({_shown(comparison['encoders'][0])})", f"b: {b} ({_shown(comparison['encoders'][1])})"]
    for side in ("a", "b"):
        if comparison[f"only_in_{side}"]:
            lines.append(f"only in {side}: {', '.join(comparison[f'only_in_{side}'])} (not compared)")
    if not comparison["common_protocols"]:
        lines.append("not comparable: the two files share no protocol")
        return "\n".join(lines)
    for d in comparison["differences"]:
        where = ", ".join(d["where"][:3]) + (f" and {len(d['where']) - 3} more" if len(d["where"]) > 3 else "")
        lines.append(f"differs: {d['field']}: a {_shown(d['a'])}; b {_shown(d['b'])} ({where})")
    if comparison["comparable"]:
        lines.append(f"comparable: every fingerprint field agrees ({', '.join(comparison['common_protocols'])})")
    else:
        lines.append(f"not comparable: {len(comparison['differences'])} fingerprint field(s) differ")
    return "\n".join(lines)


__all__ = ["evaluate", "summarise", "table", "run_protocols", "finetune_protocol", "headline", "compare",
           "comparison_text", "read_results"]
