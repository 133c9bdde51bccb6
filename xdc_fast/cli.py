"""The ``xdc-fast`` command line. Each verb imports its module only when it runs, so --help is instant."""

from __future__ import annotations

import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="xdc-fast")
def main():
    """xdc-fast: self-supervised video and audio encoders by cross-modal deep clustering (XDC).

    Start with `xdc-fast bench kmeans` to see the clustering kernels against faiss and scikit-learn
    on this machine.
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
    import yaml

    from .data.prepare import PrepareError
    from .pretrain import ConfigError, PretrainConfig, pretrain as run

    values = {}
    if config_path:
        from pathlib import Path

        preset = Path(__file__).parent / "configs" / f"{config_path}.yaml"
        path = preset if preset.exists() else Path(config_path)
        if not path.exists():
            _fail(f"--config {config_path}: neither a preset (tiny, paper) nor an existing file")
        values = yaml.safe_load(path.read_text()) or {}
    flags = {"variant": variant, "arch": arch, "epochs": epochs, "clusters": clusters, "batch_size": batch_size,
             "lr": lr, "device": device, "seed": seed, "init_checkpoint": init_checkpoint, "labels_from": labels_from}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        config = PretrainConfig.from_dict(values)
        run(dataset, out, config, resume=resume, log=click.echo)
    except (ConfigError, PrepareError) as error:
        _fail(str(error))
    except FloatingPointError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
    click.echo(f"done: {out}/metrics.jsonl, {out}/checkpoints/last.pt")


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
