"""The ``xdc-fast`` command line. Each verb imports its module only when it runs, so --help is instant."""

from __future__ import annotations

import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="xdc-fast")
def main():
    """xdc-fast: self-supervised video and audio encoders by cross-modal deep clustering (XDC).

    Start with `xdc-fast demo`: the whole method on built-in data in a few minutes on a CPU.
    Then: prepare a dataset, pretrain, finetune (or probe), extract, report; `bench` measures speed.
    """


@main.command(context_settings=CONTEXT)
@click.argument("root", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The dataset folder to write (manifest.jsonl, rejects.jsonl, audio/). Re-running resumes.")
@click.option("--format", "fmt", type=click.Choice(["folder", "ucf101", "hmdb51", "esc50", "kinetics-csv"]),
              default="folder",
              help="folder: ROOT/<class>/<file> gives labels (flat: none); ucf101/hmdb51: their official split "
                   "files, all 3 splits; esc50: audio only, meta/esc50.csv, 5 folds; kinetics-csv: --csv rows.")
@click.option("--sample-rate", type=click.IntRange(min=1000), default=16000,
              help="Rate of the extracted mono audio (Hz).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes probing files [default: the number of CPUs]; 0 or 1 works in this process.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0,
              help="Files shorter than this are rejected: they cannot hold one clip.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="kinetics-csv only: the annotation CSV (label,youtube_id,time_start,time_end,split).")
def prepare(root, out, fmt, sample_rate, workers, min_seconds, csv_path):
    """Index the media under ROOT, extract each audio track once, and record every unusable file.

    Audio is averaged to mono and resampled once here, because DALI cannot read audio inside video
    containers and every clip would otherwise decode it again.
    """
    import os

    from .data.formats import FormatError
    from .data.prepare import PrepareError, prepare as run_prepare

    try:
        summary = run_prepare(root, out, fmt=fmt, sample_rate=sample_rate,
                              workers=os.cpu_count() if workers is None else workers, min_seconds=min_seconds,
                              csv_path=csv_path, progress=True)
    except (PrepareError, FormatError) as error:
        _fail(str(error))
    except KeyboardInterrupt:
        click.echo("interrupted: everything finished so far is kept; run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(str(summary))


@main.command(context_settings=CONTEXT)
@click.option("--variant", type=click.Choice(["xdc", "mdc", "cdc", "sdc-video", "sdc-audio"]), default=None,
              help="xdc: each encoder learns the other modality's clusters [default: xdc].")
@click.option("--data", "dataset", required=True, type=click.Path(file_okay=False),
              help="A dataset written by `xdc-fast prepare`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The run directory.")
@click.option("--arch", type=click.Choice(["r2plus1d_18", "tiny"]), default=None,
              help="Encoders: the paper's (GPU) or tiny (CPU) [default: tiny].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs in all [default: 4].")
@click.option("--clusters", type=click.IntRange(min=2), default=None,
              help="k of the k-means [default: 8]; at most the number of clips clustered.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Clips per step [default: 8].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="SGD learning rate [default: 0.01].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[default: auto]")
@click.option("--seed", type=int, default=None, help="[default: 0]")
@click.option("--config", "config_path", type=str, default=None,
              help="A preset (tiny, paper) or a YAML file of PretrainConfig fields; flags given here override it.")
@click.option("--init-checkpoint", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Start the encoders from this checkpoint (another run's, or torchvision/XDC video weights).")
@click.option("--labels-from", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Cluster transfer: train on these saved assignments (RUN/clusters/round_NNN.pt).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def pretrain(variant, dataset, out, arch, epochs, clusters, batch_size, lr, device, seed, config_path,
             init_checkpoint, labels_from, resume):
    """Self-supervised pretraining by deep clustering (XDC and the paper's other variants)."""
    from .checkpoint import CheckpointError
    from .data.prepare import PrepareError
    from .pretrain import ConfigError, PretrainConfig, pretrain as run

    values = _config_values(config_path, "")
    flags = {"variant": variant, "arch": arch, "epochs": epochs, "clusters": clusters, "batch_size": batch_size,
             "lr": lr, "device": device, "seed": seed, "init_checkpoint": init_checkpoint, "labels_from": labels_from}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        config = PretrainConfig.from_dict(values)
        run(dataset, out, config, resume=resume, log=click.echo)
    except (ConfigError, PrepareError, CheckpointError) as error:
        _fail(str(error))
    except FloatingPointError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
    from . import distributed as xdist

    if xdist.is_main_process():
        _report_quietly(out)
    click.echo(f"done: {out}/metrics.jsonl, {out}/checkpoints/last.pt, {out}/report/")


def _report_quietly(run: str) -> None:
    """The run's figures; a failure to draw them costs a line, never the finished run."""
    from .report import write_report

    try:
        write_report(run)
    except Exception as error:  # noqa: BLE001 - drawing is a courtesy after the real work
        click.echo(f"(figures skipped: {error}; try `xdc-fast report {run}`)", err=True)


def _config_values(config_path: str | None, preset_prefix: str) -> dict:
    """Fields of a preset (``xdc_fast/configs/<prefix><name>.yaml``) or of a YAML file; {} without one."""
    if not config_path:
        return {}
    from pathlib import Path

    import yaml

    preset = Path(__file__).parent / "configs" / f"{preset_prefix}{config_path}.yaml"
    path = preset if preset.exists() else Path(config_path)
    if not path.is_file():
        _fail(f"--config {config_path}: neither a preset nor an existing file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        _fail(f"--config {config_path} is not valid YAML: {error}")
    if not isinstance(values, dict):
        _fail(f"--config {config_path} should hold a mapping of field: value")
    return values


@main.command(context_settings=CONTEXT)
@click.option("--checkpoint", default=None,
              help="RUN/checkpoints/last.pt of a pretraining (or finetuning) run, a torchvision / official XDC "
                   "video weight file, or 'random' (the untrained baseline every table needs) [default: random].")
@click.option("--data", "dataset", required=True, type=click.Path(file_okay=False),
              help="A labelled dataset written by `xdc-fast prepare`.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Where metrics.json, confusion.png and checkpoints/last.pt go.")
@click.option("--modality", type=click.Choice(["video", "audio"]), default=None, help="[default: video]")
@click.option("--mode", type=click.Choice(["full", "linear"]), default=None,
              help="full: train encoder and classifier; linear: frozen encoder, cached features, logistic "
                   "regression [default: full].")
@click.option("--arch", type=click.Choice(["r2plus1d_18", "tiny"]), default=None,
              help="[default: the checkpoint's; tiny for random]")
@click.option("--split", type=click.IntRange(min=1), default=None,
              help="UCF101/HMDB51 split 1-3, ESC-50 test fold 1-5 [default: 1]. Datasets without splits get "
                   "a seeded stratified one (test_fraction), recorded in metrics.json.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Full mode [default: 8].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 8]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Full mode: SGD learning rate, cosine-decayed [default: 0.01].")
@click.option("--test-clips", type=click.IntRange(min=1), default=None,
              help="Uniformly spaced clips per test video; video accuracy averages their softmax [default: 10].")
@click.option("--eval-every", type=click.IntRange(min=0), default=None,
              help="Full mode: also score the test split every N epochs; the final epoch is the result, the "
                   "best one is reported beside it, labelled as selected on the test set [default: 0 = final only].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[default: auto]")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader workers [default: 0].")
@click.option("--seed", type=int, default=None, help="[default: 0]")
@click.option("--config", "config_path", type=str, default=None,
              help="A YAML file of FinetuneConfig fields (clip geometry, train_clips, linear_c, bn_eps, ...); "
                   "flags given here override it.")
def finetune(checkpoint, dataset, out, modality, mode, arch, split, epochs, batch_size, lr, test_clips, eval_every,
             device, workers, seed, config_path):
    """Transfer an encoder to a labelled dataset and report clip and video accuracy on its test split.

    Video accuracy averages the softmax over --test-clips uniformly spaced clips per video, at the final
    epoch. The same command runs under torchrun for several GPUs.
    """
    from .checkpoint import CheckpointError
    from .data.prepare import PrepareError
    from .finetune import FinetuneConfig, FinetuneError, finetune as run

    values = _config_values(config_path, "finetune_")
    flags = {"checkpoint": checkpoint, "modality": modality, "mode": mode, "arch": arch, "split": split, "epochs": epochs,
             "batch_size": batch_size, "lr": lr, "test_clips": test_clips, "eval_every": eval_every,
             "device": device, "workers": workers, "seed": seed}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        config = FinetuneConfig.from_dict(values)
        run(dataset, out, config, log=click.echo)
    except (FinetuneError, PrepareError, CheckpointError) as error:
        _fail(str(error))
    except KeyboardInterrupt:
        click.echo(f"interrupted: {out}/metrics.json was not written; run the command again", err=True)
        sys.exit(130)
    except FloatingPointError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
    click.echo(f"done: {out}/metrics.json, {out}/confusion.png, {out}/checkpoints/last.pt")


@main.command(context_settings=CONTEXT)
@click.option("--checkpoint", default="random",
              help="A pretraining or finetuning checkpoint, torchvision / official XDC video weights, or 'random'.")
@click.option("--data", "dataset", required=True, type=click.Path(file_okay=False),
              help="A dataset written by `xdc-fast prepare`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The file to write: .pt (torch) or .npz (numpy).")
@click.option("--modality", type=click.Choice(["video", "audio"]), default="video")
@click.option("--clips-per-video", type=click.IntRange(min=1), default=10, help="Uniformly spaced clips per item.")
@click.option("--aggregate", type=click.Choice(["mean", "all"]), default="mean",
              help="mean: one row per item; all: every clip ([items, clips, dim]).")
@click.option("--arch", type=click.Choice(["r2plus1d_18", "tiny"]), default=None,
              help="[default: the checkpoint's; tiny for random]")
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="DataLoader workers.")
@click.option("--seed", type=int, default=0, help="Seed of a random encoder.")
def extract(checkpoint, dataset, out, modality, clips_per_video, aggregate, arch, batch_size, device, workers, seed):
    """Features of a checkpoint's encoder for every item of a dataset, saved with the manifest ids.

    Clip geometry follows the checkpoint's pretraining configuration. The output holds ids, labels,
    features and the ids of items that could not be decoded (NaN rows).
    """
    from .checkpoint import CheckpointError
    from .data.prepare import PrepareError
    from .extract import ExtractConfig, extract as run
    from .finetune import FinetuneError

    config = ExtractConfig(checkpoint=checkpoint, modality=modality, clips_per_video=clips_per_video,
                           aggregate=aggregate, arch=arch, batch_size=batch_size, device=device, workers=workers,
                           seed=seed)
    try:
        run(dataset, out, config, log=click.echo)
    except (FinetuneError, PrepareError, CheckpointError) as error:
        _fail(str(error))


@main.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--data", "dataset", type=click.Path(file_okay=False), default=None,
              help="The dataset the run trained on, for the montages [default: the one in RUN/config.yaml].")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="[default: RUN/report]")
@click.option("--clusters", "montage_clusters", type=click.IntRange(min=1), default=4,
              help="Largest clusters shown in each montage.")
@click.option("--videos", "montage_videos", type=click.IntRange(min=1), default=6, help="Videos per cluster shown.")
def report(run, dataset, out, montage_clusters, montage_videos):
    """PNG figures of a pretraining run: loss and cluster-quality curves per round, cluster sizes, and
    montages of the largest clusters' videos (what a cluster means)."""
    import logging

    from .report import ReportError, write_report

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = write_report(run, dataset, out, montage_clusters=montage_clusters, montage_videos=montage_videos)
    except ReportError as error:
        _fail(str(error))
    for path in paths:
        click.echo(str(path))


@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(file_okay=False), default="xdc-fast-demo",
              help="Where the data, the run, the probes and the figures go.")
@click.option("--videos-per-class", type=click.IntRange(min=4), default=24, help="Synthetic videos per class (4 classes).")
@click.option("--epochs", type=click.IntRange(min=3), default=48,
              help="XDC pretraining epochs, in 3 rounds (a re-clustering every epochs/3).")
@click.option("--seed", type=int, default=0, help="Seed of the data, the split and the training.")
def demo(out, videos_per_class, epochs, seed):
    """The whole method on built-in synthetic data, on the CPU: generate, prepare, pretrain XDC, and
    compare linear probes and clusters of the XDC encoders against random ones (about 5 minutes on 2 cores).

    Labels are used only to score; the table compares each XDC encoder with a random one of the
    same architecture on the same split."""
    from .demo import DEMO_PRETRAIN, DemoConfig, run_demo

    config = DemoConfig(videos_per_class=videos_per_class, seed=seed, pretrain={**DEMO_PRETRAIN, "epochs": epochs,
                                                                               "epochs_per_round": max(1, epochs // 3)})
    try:
        run_demo(out, config, log=click.echo)
    except FileExistsError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        click.echo(f"interrupted: run `xdc-fast demo --out {out}` again to start it over", err=True)
        sys.exit(130)


@main.group(context_settings=CONTEXT)
def bench():
    """Measure speed against the usual alternatives, side by side in one run."""


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(2)


@bench.command("kmeans", context_settings=CONTEXT)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Where the data and kernels run.")
@click.option("--b", "b", type=click.IntRange(min=1), default=1, help="Independent problems per call (XDC uses 2).")
@click.option("--n", "n", type=click.IntRange(min=1), default=400_000, help="Points per problem.")
@click.option("--d", "d", type=click.IntRange(min=1), default=256, help="Dimension (DeepCluster's PCA gives 256).")
@click.option("--k", "k", type=click.IntRange(min=1), default=1024, help="Centroids.")
@click.option("--repeats", type=click.IntRange(min=1), default=3,
              help="Timed runs per contender after one warm-up; the best is kept (the machine may be shared).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for every contender [default: torch's default].")
@click.option("--seed", type=int, default=0, help="Seed of the random data.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the figures as JSON here.")
def bench_kmeans_command(device, b, n, d, k, repeats, threads, seed, json_path):
    """One assignment and one full Lloyd iteration: xdc-fast, plain torch, faiss and scikit-learn.

    The default size (N=400,000, D=256, K=1,024) is a DeepCluster-scale round on one machine and
    takes about a minute on two cores. Effective GFLOP/s count 2*N*D*K per assignment.
    """
    import torch

    from . import bench as bench_module

    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
    if k > n:
        _fail(f"--k {k} is larger than --n {n}: k-means needs at least as many points as centroids")
    if b * n * d * 4 > _memory_budget(device):
        _fail(f"B*N*D = {b * n * d:,} floats ({b * n * d * 4 / 2**30:.1f} GiB) does not fit comfortably in memory here")
    result = bench_module.bench_kmeans(device=device, b=b, n=n, d=d, k=k, repeats=repeats, seed=seed,
                                       threads=threads, progress=lambda msg: click.echo(f"... {msg}", err=True))
    click.echo(bench_module.format_kmeans_table(result))
    if json_path:
        bench_module.write_json(result, json_path)
        click.echo(f"wrote {json_path}", err=True)


@bench.command("loader", context_settings=CONTEXT)
@click.option("--data", "dataset", type=click.Path(file_okay=False, exists=True), default=None,
              help="A prepared dataset [default: a synthetic one, 320x240, written to a temporary folder].")
@click.option("--workers", multiple=True, type=click.IntRange(min=0), default=(0, 2),
              help="DataLoader worker counts to try (repeat the option).")
@click.option("--clips", type=click.IntRange(min=1), default=48, help="Clips decoded per configuration.")
@click.option("--seed", type=int, default=0, help="Seed of the clip positions (and of the synthetic data).")
@click.option("--codec", type=click.Choice(["h264", "vp9"]), default="h264",
              help="Codec of the synthetic data (vp9 lets DALI's CPU decoder take part).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the figures as JSON here.")
def bench_loader_command(dataset, workers, clips, seed, codec, json_path):
    """Clips/s of each decoding backend and worker count, against decoding each file from its start."""
    import json
    from dataclasses import asdict

    from . import bench as bench_module
    from .data.prepare import PrepareError

    try:
        rows = bench_module.bench_loader(dataset, tuple(workers), clips, seed, codec,
                                         progress=lambda msg: click.echo(f"... {msg}", err=True))
    except PrepareError as error:
        _fail(str(error))
    click.echo(bench_module.format_loader_table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump([{**asdict(r), "clips_per_second": r.clips_per_second if r.clips else None} for r in rows], f,
                      indent=2)


@bench.command("train", context_settings=CONTEXT)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Where the step runs.")
@click.option("--arch", "archs", multiple=True, type=click.Choice(["tiny", "r2plus1d_18"]), default=None,
              help="Encoders to time (repeat) [default: tiny on the CPU, both on CUDA: r2plus1d_18 takes "
                   "~25 s a step on two CPU cores].")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, help="Clips per step.")
@click.option("--steps", type=click.IntRange(min=1), default=3, help="Timed steps after a warm-up; the best counts.")
@click.option("--no-round", is_flag=True, help="Skip the tiny pretraining round that measures phase shares.")
def bench_train_command(device, archs, batch_size, steps, no_round):
    """Clips/s of a training step per encoder and arch, and the share of a round spent extracting,
    clustering and training."""
    import torch

    from . import bench as bench_module

    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
    archs = tuple(archs) or (("tiny", "r2plus1d_18") if device == "cuda" else ("tiny",))
    rows, shares = bench_module.bench_train(device, archs, batch_size, steps, not no_round,
                                            progress=lambda msg: click.echo(f"... {msg}", err=True))
    click.echo(bench_module.format_train_table(rows, shares, device))


def _memory_budget(device: str) -> int:
    """Bytes one copy of the benchmark's data may take: a quarter of RAM (contenders make copies)."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory // 4
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):  # pragma: no cover - exotic platforms
        return 1 << 34


if __name__ == "__main__":  # pragma: no cover
    main()
