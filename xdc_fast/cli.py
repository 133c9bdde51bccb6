"""The ``xdc-fast`` command line.

The options of ``pretrain``, ``finetune`` and ``extract`` are generated from their configuration
dataclasses (:mod:`xdc_fast.config`): the default, the help and the allowed values of a flag are those of
its field. ``--config FILE`` (or a preset name) fills click's ``default_map``, so a flag beats the file
and the file beats the default; keys of the file that have no flag still reach the configuration. Any
:class:`~xdc_fast.errors.XdcError` becomes one ``Error:`` line and exit status 2.
"""

from __future__ import annotations

import logging
import math
import sys
import typing
from dataclasses import MISSING, fields

import click

from .choices import CONCRETE_DEVICES, CONCRETE_LOADERS, CPU_ISAS, DEVICE_HELP, DEVICES, LOADER_HELP, LOADERS
from .config import EvaluateConfig, ExtractConfig, FinetuneConfig, PretrainConfig, from_dict, read_yaml
from .data.formats import FORMAT_HELP, READERS
from .data.shards import SHARD_CODEC_HELP
from .data.synthetic import CODECS
from .errors import StalledError, XdcError
from .models.archs import ARCHS, default_arch
from .protocols import PROTOCOLS, default_protocols, protocols_help, multilabel_names
from .variants import CLUSTERINGS, VARIANTS
from .files import AGAIN, DISK_FULL, output_error
from .launch import RESUME_CHOICES, RESUME_HELP, TRANSFER_RESUME_HELP

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}

# What a Ctrl-C leaves behind, per command (the default: nothing half-written).
INTERRUPTED = {
    "prepare": "everything finished so far is kept; run the same command again to resume",
    "pretrain": "the last checkpoint is kept; continue with the same command and --resume",
    "finetune": "metrics.json was not written; the last finished epoch is kept: run the same command with --resume to go on",
    "demo": "run the same command again to start it over",
}


class XdcGroup(click.Group):
    """The one place user errors become ``Error: ...`` (exit 2) instead of a traceback."""

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            if "xdc_fast.distributed" in sys.modules:  # imported by every command that may join a group
                sys.modules["xdc_fast.distributed"].leave_together()
            return result
        except StalledError as error:
            click.echo(f"Error: {error}", err=True)
            from . import distributed as xdist  # already imported: it raised the error

            xdist.abandon(2)
        except XdcError as error:
            click.echo(f"Error: {_after(error, ctx)}", err=True)
            ctx.exit(2)
        except OSError as error:  # an output no writer translated: the same message as theirs
            translated = output_error(error)
            if translated is None:
                raise
            click.echo(f"Error: {_after(translated, ctx)}", err=True)
            ctx.exit(2)
        except FloatingPointError as error:  # a diverged run: the user's settings, but not a usage error
            click.echo(f"Error: {error}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            command = ctx.invoked_subcommand
            click.echo(f"interrupted: {INTERRUPTED.get(command, 'nothing was written half-way')}", err=True)
            ctx.exit(130)


# What a full disk leaves behind where running the same command again is not the whole way out.
AFTER_FULL_DISK = {"pretrain": "then continue with the same command and --resume (the last checkpoint is kept)"}


def _after(error: XdcError, ctx) -> str:
    cause = error.__cause__ or error.__context__
    command = ctx.invoked_subcommand
    if command in AFTER_FULL_DISK and isinstance(cause, OSError) and cause.errno in DISK_FULL:
        return str(error).replace(AGAIN, AFTER_FULL_DISK[command])
    return str(error)


class FiniteFloat(click.ParamType):
    """A number flag that refuses nan and infinities (and numbers too large to hold, like 1e400), which
    pass every comparison of a range check and then make the results silently wrong."""

    name = "float"

    def __init__(self, min: float | None = None):
        self.min = min

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and number < self.min:
            self.fail(f"{value!r} is out of range; it must be at least {self.min}", param, ctx)
        return number


# ---- options generated from the configuration dataclasses -----------------------------------------------

class AutoOr(click.ParamType):
    """A number flag that also takes the word ``auto`` (resolved from the data by the command)."""

    def __init__(self, number: click.ParamType):
        self.number, self.name = number, f"{number.name}|auto"

    def convert(self, value, param, ctx):
        return value if value == "auto" else self.number.convert(value, param, ctx)


def _click_type(config_cls, name: str, meta: dict):
    if meta.get("choices"):
        return click.Choice(list(meta["choices"]))
    kinds = [k for k in typing.get_args(typing.get_type_hints(config_cls)[name]) if k is not type(None)] or \
        [typing.get_type_hints(config_cls)[name]]
    if meta.get("auto"):
        return AutoOr(_number_type(next(k for k in kinds if k is not str), meta))
    return _number_type(kinds[0], meta)


def _number_type(kind, meta: dict):
    low, high = meta.get("min"), meta.get("max")
    opens = {"min_open": meta.get("min_open", False), "max_open": meta.get("max_open", False)}
    if kind is int:
        return click.IntRange(min=low, max=high, **opens) if low is not None or high is not None else click.INT
    if kind is float:
        return click.FloatRange(min=low, max=high, **opens) if low is not None or high is not None \
            else click.FLOAT
    return click.STRING


def config_options(config_cls, names: tuple[str, ...], types: dict | None = None):
    """Click options for the fields ``names`` of ``config_cls`` (``--batch-size`` for ``batch_size``)."""
    by_name = {f.name: f for f in fields(config_cls)}

    def decorate(command):
        for name in reversed(names):
            spec = by_name[name]
            default = spec.default if spec.default is not MISSING else None
            click_type = (types or {}).get(name) or _click_type(config_cls, name, spec.metadata)
            command = click.option(f"--{name.replace('_', '-')}", name, type=click_type, default=default,
                                   show_default=default is not None, help=spec.metadata.get("help"))(command)
        return command

    return decorate


def config_file_option(config_cls, preset_prefix: str, presets_help: str = ""):
    """``--config``: a YAML file (or preset) of ``config_cls`` fields, checked, then used as the defaults."""

    def load(ctx, _param, value):
        if value is None:
            return {}
        values = read_yaml(value, preset_prefix)
        from_dict(config_cls, values)  # every key and value checked now, before any work
        ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in values.items()}}
        return values

    return click.option("--config", "config_values", is_eager=True, callback=load, default=None,
                        metavar="FILE", expose_value=True,
                        help=f"A YAML file of {config_cls.__name__} fields{presets_help}; flags given here override "
                             "it, it overrides the defaults shown.")


def build_config(config_cls, file_values: dict, flag_values: dict):
    """The configuration: the file's fields, then every flag's value (given, from the file, or default)."""
    return from_dict(config_cls, {**file_values, **flag_values})


@click.group(cls=XdcGroup, context_settings=CONTEXT)
@click.version_option(package_name="xdc-fast")
def main():
    """xdc-fast: self-supervised video and audio encoders by cross-modal deep clustering (XDC).

    Start with `xdc-fast demo`: the whole method on built-in data in a few minutes on a CPU.
    Then: prepare a dataset, pretrain, finetune (or probe), extract, report; `bench` measures speed.
    """


# ---- prepare ------------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT)
@click.argument("root", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The dataset folder to write (manifest.jsonl, rejects.jsonl, audio/). Re-running resumes.")
@click.option("--format", "fmt", type=click.Choice(list(READERS)), default="folder", help=FORMAT_HELP)
@click.option("--sample-rate", type=click.IntRange(min=1000), default=16000,
              help="Rate of the extracted mono audio (Hz).")
@click.option("--workers", type=click.IntRange(min=0), default=None, show_default="the number of CPUs",
              help="Processes probing files; 0 or 1 works in this process.")
@click.option("--min-seconds", type=FiniteFloat(min=0), default=1.0,
              help="Files shorter than this are rejected: they cannot hold one clip.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="kinetics-csv: the annotation CSV (label,youtube_id,time_start,time_end,split); vggsound: its CSV "
                   "(default: vggsound.csv under ROOT); audioset: one segments CSV (default: all under ROOT).")
@click.option("--shards", "make_shards", is_flag=True,
              help="Then transcode every video once to the clip geometry and pack it with its audio into "
                   "WebDataset tar shards under OUT/shards/, which every command reads instead of the originals: "
                   "random clips decode several times faster (docs/data.md).")
@click.option("--short-side", type=click.IntRange(min=16), default=128,
              help="--shards: short side of the transcoded video (never scaled up); at least the clip's resize.")
@click.option("--gop", type=click.IntRange(min=1), default=16,
              help="--shards: frames between keyframes; the clip span (frames x stride) bounds a seek to one clip.")
@click.option("--crf", type=click.IntRange(min=0, max=63), default=23,
              help="--shards: the encoder's constant rate factor (lower: more bytes, closer to the source).")
@click.option("--shard-codec", type=click.Choice(list(SHARD_CODEC_HELP)), default="libx264",
              help="--shards: the video encoder. " + "; ".join(f"{k}: {v}" for k, v in SHARD_CODEC_HELP.items()) + ".")
@click.option("--shard-mb", type=FiniteFloat(min=1), default=512.0, help="--shards: about this many MB per shard.")
@click.option("--rank", type=click.IntRange(min=0), default=0,
              help="--shards: this process transcodes the shards s with s % WORLD == RANK (several machines or "
                   "processes into one dataset, once it is indexed).")
@click.option("--world", type=click.IntRange(min=1), default=1, help="--shards: how many processes share the work.")
def prepare(root, out, fmt, sample_rate, workers, min_seconds, csv_path, make_shards, short_side, gop, crf,
            shard_codec, shard_mb, rank, world):
    """Index the media under ROOT, extract each audio track once, and record every unusable file.

    Audio is averaged to mono and resampled once here, because DALI cannot read audio inside video
    containers and every clip would otherwise decode it again. With --shards, the videos are then
    transcoded into clip shards; re-running resumes either step.
    """
    import os

    from .data.prepare import prepare as run_prepare

    if rank >= world:
        raise XdcError(f"--rank {rank} should be below --world {world}")
    workers = os.cpu_count() if workers is None else workers
    if world == 1:
        summary = run_prepare(root, out, fmt=fmt, sample_rate=sample_rate, workers=workers, min_seconds=min_seconds,
                              csv_path=csv_path, progress=True)
        click.echo(str(summary))
    else:  # the ranks share one finished index; indexing takes the folder's lock, which one rank would hold
        click.echo(f"--world {world}: indexing is skipped; the dataset must be prepared (without --world) first")
    if make_shards:
        from .data.shards import write_shards

        done = write_shards(out, short_side=short_side, gop=gop, crf=crf, codec=shard_codec, shard_mb=shard_mb, rank=rank, world=world,
                            workers=workers, progress=True)
        click.echo(f"shards: {done['videos']} video(s) in {done['shards']} new shard(s) under {done['folder']} "
                   f"({done['shards_done_before']} were already done, {done['failed']} failed: see "
                   f"{done['folder']}/rejects.jsonl)")


# ---- resuming (the rules live in xdc_fast.launch) --------------------------------------------------

def _resume_option(text: str):
    return click.option("--resume", type=click.Choice(RESUME_CHOICES), default="auto", is_flag=False,
                        flag_value="yes", show_default=True, help=text)


def _resume_asked(choice: str) -> bool:
    from .launch import resolve_resume

    resume, by = resolve_resume(choice)
    if by is not None:
        click.echo(f"--resume auto: launched by {by}, so a run in --out is continued", err=True)
    return resume


# ---- pretrain -----------------------------------------------------------------------------------------

PRETRAIN_FLAGS = ("variant", "arch", "video_input", "audio_input", "epochs", "clusters", "batch_size", "lr", "device",
                  "loader", "workers", "seed", "init_checkpoint", "labels_from", "round_features")
EXISTING_FILE = click.Path(dir_okay=False, exists=True)


@main.command(context_settings=CONTEXT)
@click.option("--data", "dataset", required=True, type=click.Path(file_okay=False),
              help="A dataset written by `xdc-fast prepare`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The run directory.")
@config_options(PretrainConfig, PRETRAIN_FLAGS, {"init_checkpoint": EXISTING_FILE, "labels_from": EXISTING_FILE})
@config_file_option(PretrainConfig, "", " or a preset (tiny, paper)")
@_resume_option(RESUME_HELP)
def pretrain(dataset, out, config_values, resume, **flags):
    """Self-supervised pretraining by deep clustering (XDC and the paper's other variants).

    Writes OUT/config.yaml, OUT/metrics.jsonl (a line per epoch), OUT/checkpoints/last.pt,
    OUT/clusters/round_NNN.pt and the figures in OUT/report/. Under torchrun the same command trains
    on every GPU (or CPU process) of the job.
    """
    from . import distributed as xdist
    from .pretrain import pretrain as run

    _show_loader_choice()
    run(dataset, out, build_config(PretrainConfig, config_values, flags), resume=_resume_asked(resume),
        log=click.echo)
    if xdist.is_main_process():
        _report_quietly(out)
    click.echo(f"done: {out}/metrics.jsonl, {out}/checkpoints/last.pt, {out}/report/")


class _EchoHandler(logging.Handler):
    """Log lines on click's stderr of the moment (CliRunner swaps it between invocations)."""

    def emit(self, record):
        click.echo(self.format(record), err=True)


def _show_loader_choice() -> None:
    """make_loader's one line saying which loader ``auto`` took and why, on stderr (once per process)."""
    logger = logging.getLogger("xdc_fast.engine")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
        logger.setLevel(logging.INFO)


def _report_quietly(run: str) -> None:
    """The run's figures; a failure to draw them costs a line, never the finished run."""
    from .report import write_report

    try:
        write_report(run)
    except Exception as error:  # noqa: BLE001 - drawing is a courtesy after the real work
        click.echo(f"(figures skipped: {error}; try `xdc-fast report {run}`)", err=True)


# ---- finetune -----------------------------------------------------------------------------------------

FINETUNE_FLAGS = ("checkpoint", "modality", "mode", "arch", "video_input", "audio_input", "split", "epochs", "batch_size",
                  "lr", "test_clips", "eval_every", "device", "loader", "workers", "seed")


@main.command(context_settings=CONTEXT)
@click.option("--data", "dataset", required=True, type=click.Path(file_okay=False),
              help="A labelled dataset written by `xdc-fast prepare`.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Where metrics.json, confusion.png and checkpoints/last.pt go.")
@config_options(FinetuneConfig, FINETUNE_FLAGS)
@config_file_option(FinetuneConfig, "finetune_", " (clip geometry, train_clips, linear_c, bn_eps, ...)")
@_resume_option(TRANSFER_RESUME_HELP)
def finetune(dataset, out, config_values, resume, **flags):
    """Transfer an encoder to a labelled dataset and report clip and video accuracy on its test split.

    Video accuracy averages the softmax over --test-clips uniformly spaced clips per video, at the final
    epoch. --mode linear freezes the encoder and fits a logistic regression on cached features (the
    linear probe). The same command runs under torchrun for several GPUs.
    """
    from dataclasses import asdict

    from .launch import finished_results

    config = build_config(FinetuneConfig, config_values, flags)
    done = finished_results(out, asdict(config), _resume_asked(resume))
    if done is not None:
        click.echo(f"{out} already holds these results (video accuracy {done['video_acc']:.1%}); nothing to run")
        return
    _show_loader_choice()
    if config.mode == "linear":
        from .probe import probe

        probe(dataset, out, config, log=click.echo)
    else:
        from .finetune import finetune as run

        run(dataset, out, config, log=click.echo, resume=_resume_asked(resume))
    click.echo(f"done: {out}/metrics.json, {out}/confusion.png, {out}/checkpoints/last.pt")


# ---- submit -------------------------------------------------------------------------------------------

@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--nodes", type=click.IntRange(min=1), default=1, help="Nodes of the job.")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=1,
              help="GPUs asked for on each node; one task (one rank) runs per GPU.")
@click.option("--tasks-per-node", type=click.IntRange(min=1), default=None,
              show_default="--gpus-per-node, or 1 without GPUs", help="Ranks per node, when not one per GPU (CPU jobs).")
@click.option("--partition", default=None, show_default="the cluster's default", help="SLURM partition.")
@click.option("--time", "time_limit", default="01:00:00",
              help="Time limit of each run of the job, HH:MM:SS or D-HH:MM:SS; at the limit the job is requeued "
                   "and resumes, so a short limit that the scheduler fits in sooner costs only the checkpoint interval.")
@click.option("--account", default=None, show_default="your default account", help="SLURM account to charge.")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=8,
              help="CPU cores per rank (decoding workers live here: --workers should fit).")
@click.option("--folder", type=click.Path(file_okay=False), default="xdc-fast-jobs",
              help="Where submitit keeps each job's scripts and logs (JOBID_RANK_log.out/.err).")
@click.option("--local", is_flag=True,
              help="Run the job on this machine with submitit's local executor (no SLURM), requeues included; "
                   "waits for it to end.")
@click.option("--max-requeues", type=click.IntRange(min=0), default=10,
              help="Requeues after a time limit before the job gives up (preemptions do not count).")
@click.option("--signal-delay-s", type=click.IntRange(min=1), default=120,
              help="Seconds before the time limit at which the job is signalled and requeued; leave room to "
                   "start the requeue.")
@click.option("--wait", is_flag=True, help="Wait for the job to end and fail if it fails (always with --local).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]...")
def submit(command, nodes, gpus_per_node, tasks_per_node, partition, time_limit, account, cpus_per_task, folder,
           local, max_requeues, signal_delay_s, wait):
    """Run an xdc-fast command as a SLURM job through submitit, requeued at time limits and preemptions.

    One task per GPU, with the rendezvous taken from SLURM's environment; the command resumes from its
    last checkpoint after each requeue (--resume auto). Example: xdc-fast submit --nodes 2
    --gpus-per-node 8 --partition gpu --time 24:00:00 -- pretrain --data D --out RUN. Needs the slurm
    extra: pip install 'xdc-fast[slurm]'.
    """
    from .submit import submit as run

    run(list(command), nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node, time=time_limit,
        partition=partition, account=account, cpus_per_task=cpus_per_task, folder=folder, local=local,
        max_requeues=max_requeues, signal_delay_s=signal_delay_s, wait=wait or local, log=click.echo)


# ---- evaluate -----------------------------------------------------------------------------------------

EVALUATE_FLAGS = ("modality", "arch", "video_input", "audio_input", "split", "clips_per_video", "knn_k",
                  "knn_temperature", "epochs", "lr", "batch_size", "device", "loader", "workers", "seed")


@main.command(context_settings=CONTEXT)
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="FILE|random",
              help="An encoder to score (repeat for several): a checkpoint file, 'random' (seeded by --seed) or "
                   "'random:N'.  [default: random]")
@click.option("--data", "dataset", type=click.Path(file_okay=False),
              help="A labelled dataset written by `xdc-fast prepare` (required unless --compare).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Where results.json, results.md and results.png go (required unless --compare).")
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(list(PROTOCOLS)),
              help=f"{protocols_help()} Repeat for several; on a multi-label dataset: {', '.join(multilabel_names())}.  "
                   f"[default: {', '.join(default_protocols())}]")
@click.option("--compare", nargs=2, metavar="A.json B.json", type=click.Path(), default=None,
              help="Run nothing: say which protocol fingerprint fields differ between two results.json files "
                   "(exit status 0 when comparable, 1 when not).")
@config_options(EvaluateConfig, EVALUATE_FLAGS)
@config_file_option(EvaluateConfig, "evaluate_", " (checkpoints, protocols, clip geometry, linear_c, ...)")
@click.pass_context
def evaluate(ctx, dataset, out, checkpoints, protocols, compare, config_values, **flags):
    """Score encoders with the field's protocols over every split of a labelled dataset, in one table.

    Each checkpoint's encoder encodes every video once; linear probe, weighted k-NN, retrieval Recall@k,
    linear SVM and k-means clustering all run on those features, for every split (or --split N). Writes
    results.json (every per-split result with its protocol fingerprint, mean ± std across splits),
    results.md and results.png. With --compare A B, tells whether two such results may be set side by side.
    """
    if compare:
        from .evaluate import compare as compare_results, comparison_text

        comparison = compare_results(*compare)
        click.echo(comparison_text(comparison))
        ctx.exit(0 if comparison["comparable"] else 1)
    if not dataset or not out:
        raise click.UsageError("--data and --out are required (or --compare A.json B.json)")
    from .evaluate import evaluate as run

    lists = {k: list(v) for k, v in (("checkpoints", checkpoints), ("protocols", protocols)) if v}
    _show_loader_choice()
    run(dataset, out, build_config(EvaluateConfig, config_values, {**flags, **lists}), log=click.echo)
    click.echo(f"done: {out}/results.json, {out}/results.md, {out}/results.png")


# ---- extract ------------------------------------------------------------------------------------------

EXTRACT_FLAGS = ("checkpoint", "modality", "clips_per_video", "aggregate", "arch", "video_input", "audio_input",
                 "batch_size", "device", "loader", "workers", "seed")


@main.command(context_settings=CONTEXT)
@click.option("--data", "dataset", required=True, type=click.Path(file_okay=False),
              help="A dataset written by `xdc-fast prepare`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The file to write: .pt (torch) or .npz (numpy).")
@config_options(ExtractConfig, EXTRACT_FLAGS)
@config_file_option(ExtractConfig, "extract_", " (clip geometry, bn_eps, ...)")
def extract(dataset, out, config_values, **flags):
    """Features of a checkpoint's encoder for every item of a dataset, saved with the manifest ids.

    Clip geometry follows the checkpoint's pretraining configuration. The output holds ids, labels,
    features and the ids of items that could not be decoded (NaN rows).
    """
    from .extract import extract as run

    _show_loader_choice()
    run(dataset, out, build_config(ExtractConfig, config_values, flags), log=click.echo)


# ---- clusters: assign, browse, export ------------------------------------------------------------------

ROUND_OPTION = click.option("--round", "round_index", type=click.IntRange(min=0), default=None,
                            show_default="the run's last round",
                            help="Which round's clustering (clusters/round_NNN.pt).")
LOADER_CHOICE = click.option("--loader", type=click.Choice(list(LOADERS)), default="auto", help=LOADER_HELP)
DEVICE_CHOICE = click.option("--device", type=click.Choice(list(DEVICES)), default="auto",
                             help=f"Where the encoders run. {DEVICE_HELP}")
WORKERS_OPTION = click.option("--workers", type=click.IntRange(min=0), default=0, help="DataLoader worker processes.")
BATCH_OPTION = click.option("--batch-size", type=click.IntRange(min=1), default=None, show_default="the run's",
                            help="Clips per forward pass.")


@main.command(context_settings=CONTEXT)
@click.argument("run_argument", metavar="[RUN]", required=False, type=click.Path(file_okay=False, exists=True))
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True),
              help="A pretraining run (its clusters/round_NNN.pt and checkpoints/); may also come as RUN. Under "
                   "torchrun give it as RUN: torchrun's own parser mistakes --run for its --run-path.")
@ROUND_OPTION
@click.option("--data", "dataset", required=True, type=click.Path(file_okay=False),
              help="A dataset written by `xdc-fast prepare`: new footage, or the run's own.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The file to write: .json (every video and clip) or .csv (one row per video).")
@BATCH_OPTION
@DEVICE_CHOICE
@LOADER_CHOICE
@WORKERS_OPTION
def assign(run_argument, run_dir, round_index, dataset, out, batch_size, device, loader, workers):
    """Map every video of a dataset to a pretraining round's clusters (each clustering of the round).

    Videos are encoded by the encoders whose features the round clustered, with the run's clips, then
    PCA-whitened and assigned to the nearest centroid as the round was. Each video gets a cluster per
    clustering, its distance and the margin to the second-nearest centroid (a confidence). Works under
    torchrun (the encoding is shared out).
    """
    from .assign import assign as run

    if run_argument is None and run_dir is None:
        raise click.UsageError("which run? give --run RUN (or RUN)")
    if run_argument is not None and run_dir is not None and run_argument != run_dir:
        raise click.UsageError(f"two runs given ({run_argument} and --run {run_dir}); give one")
    _show_loader_choice()
    run(run_dir or run_argument, dataset, out, round_index, device=device, loader=loader, workers=workers, batch_size=batch_size,
        log=click.echo)


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False, exists=True))
@ROUND_OPTION
@click.option("--modality", required=True, type=click.Choice(list(CLUSTERINGS)),
              help="Whose clusters become the labels: video, audio, or concat (cdc runs).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The dataset folder to write (manifest.jsonl, classes.json, rejects.jsonl, export.json).")
@click.option("--min-margin", type=FiniteFloat(), default=None, show_default="keep every assigned item",
              help="Keep only videos whose margin to the second-nearest centroid is at least this (confident "
                   "members); see the margins with `xdc-fast assign`.")
@click.option("--data", "dataset", type=click.Path(file_okay=False), default=None,
              show_default="the one in RUN/config.yaml", help="The dataset the run trained on, if it moved.")
def export(run_dir, round_index, modality, out, min_margin, dataset):
    """Turn a round's clusters into a labelled dataset for finetune and evaluate.

    The new folder points at the run's media; labels are cluster ids and classes.json holds a name per
    cluster, which you may edit (exporting again into the folder keeps your names).
    """
    from .export import export as run

    run(run_dir, out, modality, round_index, min_margin=min_margin, dataset=dataset, log=click.echo)


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False, exists=True))
@ROUND_OPTION
@click.option("--data", "dataset", type=click.Path(file_okay=False), default=None,
              show_default="the run's own videos, with the round's saved assignments",
              help="Show this dataset's videos instead, assigned to the round's clusters first (as assign does).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The folder of the site; open OUT/index.html in a browser (no server needed).")
@click.option("--members", type=click.IntRange(min=1), default=12,
              help="Members shown per list (most central, most uncertain) on each cluster's page; the page says "
                   "how many were left out.")
@DEVICE_CHOICE
@LOADER_CHOICE
@WORKERS_OPTION
def browse(run_dir, round_index, dataset, out, members, device, loader, workers):
    """A static web site of a round's clusters, to watch and listen to what each one holds.

    index.html lists every cluster (size, purity and majority class when the data has labels, agreement
    between the video and audio clusterings), sortable and filterable; each cluster's page shows its most
    central and most uncertain members as a still, a short animated clip and an audio snippet.
    """
    from .browse import browse as run

    _show_loader_choice()
    run(run_dir, out, round_index, dataset, members=members, device=device, loader=loader, workers=workers,
        log=click.echo)


# ---- report and demo ----------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--data", "dataset", type=click.Path(file_okay=False), default=None,
              show_default="the one in RUN/config.yaml",
              help="The dataset the run trained on, for the montages.")
@click.option("--out", type=click.Path(file_okay=False), default=None, show_default="RUN/report")
@click.option("--clusters", "montage_clusters", type=click.IntRange(min=1), default=4,
              help="Largest clusters shown in each montage.")
@click.option("--videos", "montage_videos", type=click.IntRange(min=1), default=6, help="Videos per cluster shown.")
def report(run, dataset, out, montage_clusters, montage_videos):
    """PNG figures of a pretraining run: loss and cluster-quality curves per round, cluster sizes, and
    montages of the largest clusters' videos (what a cluster means)."""
    import logging

    from .report import write_report

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_report(run, dataset, out, montage_clusters=montage_clusters, montage_videos=montage_videos)


@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(file_okay=False), default=None, show_default="xdc-fast-demo/<date-time>",
              help="Where the data, the run, the probes and the figures go (a new folder each run by default, so "
                   "an earlier demo is never overwritten).")
@click.option("--videos-per-class", type=click.IntRange(min=4), default=None, show_default="configs/demo.yaml: 24",
              help="Synthetic videos per class (4 classes).")
@click.option("--epochs", type=click.IntRange(min=3), default=None, show_default="configs/demo.yaml: 48",
              help="XDC pretraining epochs, in 3 rounds (a re-clustering every epochs/3).")
@click.option("--seed", type=int, default=0, help="Seed of the data, the split and the training.")
def demo(out, videos_per_class, epochs, seed):
    """The whole method on built-in synthetic data, on the CPU: generate, prepare, pretrain XDC, and
    compare linear probes and clusters of the XDC encoders against random ones (about 5 minutes on 2 cores).

    Labels are used only to score; the table compares each XDC encoder with a random one of the
    same architecture on the same split. The settings are xdc_fast/configs/demo.yaml."""
    import time

    from .demo import demo_config, run_demo

    out = out or f"xdc-fast-demo/{time.strftime('%Y%m%d-%H%M%S')}"
    run_demo(out, demo_config(videos_per_class=videos_per_class, epochs=epochs, seed=seed), log=click.echo)


# ---- bench --------------------------------------------------------------------------------------------

@main.group(cls=XdcGroup, context_settings=CONTEXT)
def bench():
    """Measure speed against the usual alternatives, side by side in one run."""


@bench.command("kmeans", context_settings=CONTEXT)
@click.option("--device", type=click.Choice(list(CONCRETE_DEVICES)), default="cpu", help="Where the data and kernels run.")
@click.option("--b", "b", type=click.IntRange(min=1), default=1, help="Independent problems per call (XDC uses 2).")
@click.option("--n", "n", type=click.IntRange(min=1), default=400_000, help="Points per problem.")
@click.option("--d", "d", type=click.IntRange(min=1), default=256, help="Dimension (DeepCluster's PCA gives 256).")
@click.option("--k", "k", type=click.IntRange(min=1), default=1024, help="Centroids.")
@click.option("--repeats", type=click.IntRange(min=1), default=3,
              help="Timed runs per contender after one warm-up; the best is kept (the machine may be shared).")
@click.option("--threads", type=click.IntRange(min=1), default=None, show_default="torch's default",
              help="CPU threads for every contender.")
@click.option("--seed", type=int, default=0, help="Seed of the random data.")
@click.option("--engine", "engines", type=click.Choice(list(CPU_ISAS)), multiple=True,
              help="Also time our CPU assignment forced to this engine (repeatable); the default call takes "
                   "the best the CPU has.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the figures as JSON here.")
def bench_kmeans_command(device, b, n, d, k, repeats, threads, seed, engines, json_path):
    """One assignment and one full Lloyd iteration: xdc-fast, plain torch, faiss and scikit-learn.

    The default size (N=400,000, D=256, K=1,024) is a DeepCluster-scale round on one machine and
    takes about a minute on two cores. Effective GFLOP/s count 2*N*D*K per assignment.
    """
    from .bench import kmeans as bench_module
    from .bench.timing import check_device, memory_budget, write_json

    check_device(device)
    if k > n:
        raise XdcError(f"--k {k} is larger than --n {n}: k-means needs at least as many points as centroids")
    if b * n * d * 4 > memory_budget(device):
        raise XdcError(f"B*N*D = {b * n * d:,} floats ({b * n * d * 4 / 2**30:.1f} GiB) does not fit comfortably in memory here")
    result = bench_module.bench_kmeans(device=device, b=b, n=n, d=d, k=k, repeats=repeats, seed=seed,
                                       threads=threads, progress=lambda msg: click.echo(f"... {msg}", err=True),
                                       engines=engines)
    click.echo(bench_module.format_kmeans_table(result))
    if json_path:
        write_json(result.to_json(), json_path)
        click.echo(f"wrote {json_path}", err=True)


def _pipelines(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r} is neither auto nor a count of at least 1")
    return int(value)


@bench.command("loader", context_settings=CONTEXT)
@click.option("--data", "dataset", type=click.Path(file_okay=False, exists=True), default=None,
              show_default="a synthetic one, 320x240, written to a temporary folder", help="A prepared dataset.")
@click.option("--workers", multiple=True, type=click.IntRange(min=0), default=(0, 2),
              help="DataLoader worker counts to try (repeat the option).")
@click.option("--clips", type=click.IntRange(min=1), default=48, help="Clips decoded per configuration.")
@click.option("--seed", type=int, default=0, help="Seed of the clip positions (and of the synthetic data).")
@click.option("--codec", type=click.Choice(list(CODECS)), default="h264",
              help="Codec of the synthetic data (vp9 lets DALI's CPU decoder take part).")
@click.option("--dali-pipelines", "dali_pipelines", multiple=True, default=("auto",), show_default=True,
              callback=lambda _ctx, _param, values: tuple(_pipelines(v) for v in values),
              help="DALI pipeline counts to try (repeat the option); auto: one per NVDEC engine of the card.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the figures as JSON here.")
def bench_loader_command(dataset, workers, clips, seed, codec, dali_pipelines, json_path):
    """Clips/s of each decoding backend and worker count, against decoding each file from its start."""
    from .bench import loader as bench_module
    from .bench.timing import write_json

    rows = bench_module.bench_loader(dataset, tuple(workers), clips, seed, codec,
                                     progress=lambda msg: click.echo(f"... {msg}", err=True),
                                     dali_pipelines=dali_pipelines)
    click.echo(bench_module.format_loader_table(rows))
    if json_path:
        write_json(bench_module.loader_json(rows), json_path)


@main.command("plan", context_settings=CONTEXT)
@click.option("--videos", required=True, type=click.IntRange(min=1), help="Videos clustered each round.")
@click.option("--clips-per-video", type=click.IntRange(min=1), default=2, help="Fixed clips per video clustered.")
@click.option("--world", type=click.IntRange(min=1), default=1, help="Ranks (GPUs or processes) in all.")
@click.option("--ranks-per-node", type=click.IntRange(min=1), default=8, help="Ranks sharing one machine's memory.")
@click.option("--arch", type=click.Choice(list(ARCHS)), default="r2plus1d_18",
              help="Encoders, for the feature width: "
                   + ", ".join(f"{a.feature_dim} for {a.name}" for a in ARCHS.values()) + ".")
@click.option("--variant", type=click.Choice(list(VARIANTS)), default="xdc",
              help="Which clusterings a round computes (cdc adds the concatenation).")
@click.option("--pca-dim", type=click.IntRange(min=0), default=256, help="PCA-whitening width (0: the raw width).")
@click.option("--clusters", type=click.IntRange(min=2), default=1024, help="k of the k-means.")
@click.option("--niter", type=click.IntRange(min=1), default=20, help="Lloyd iterations.")
@click.option("--max-points-per-centroid", type=click.IntRange(min=1), default=256,
              help="k-means trains on about k x this many points (faiss's rule); the rest are assigned in a stream.")
@click.option("--device", type=click.Choice(CONCRETE_DEVICES), default="cuda",
              help="Whose measured assignment rate prices the time: cuda an H200's, cpu a 2-core CPU's.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the figures as JSON here.")
def plan(videos, clips_per_video, world, ranks_per_node, arch, variant, pca_dim, clusters, niter,
         max_points_per_centroid, device, json_path):
    """Memory, disk, collectives and k-means work of one clustering round, per rank and per node, before a
    run starts. The process's own resident memory stands for a rank's before the round (pretraining
    measures its own, prints the same plan and refuses a round that would not fit)."""
    from .planner import plan_round

    chosen = VARIANTS[variant]
    figures = plan_round(videos, clips_per_video, world, arch=arch, pca_dim=pca_dim, clusters=clusters, niter=niter,
                         modalities=len(chosen.modalities), concat="concat" in chosen.clusterings,
                         max_points_per_centroid=max_points_per_centroid, ranks_per_node=ranks_per_node,
                         device=device)
    click.echo("\n".join(figures.lines()))
    if json_path:
        from .bench.timing import write_json

        write_json(figures.to_json(), json_path)


@bench.command("train", context_settings=CONTEXT)
@click.option("--device", type=click.Choice(list(CONCRETE_DEVICES)), default="cpu", help="Where the step runs.")
@click.option("--arch", "archs", multiple=True, type=click.Choice(list(ARCHS)), default=None,
              show_default="tiny on the CPU, both on CUDA",
              help="Encoders to time (repeat); r2plus1d_18 takes ~25 s a step on two CPU cores.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, help="Clips per step.")
@click.option("--steps", type=click.IntRange(min=1), default=3, help="Timed steps after a warm-up; the best counts.")
@click.option("--loader", "loaders", multiple=True, type=click.Choice(list(CONCRETE_LOADERS)), default=(),
              help="Also time the step fed by this loader with real clips (repeat): H.264 synthetic data, "
                   "VP9 when dali is asked for on the CPU.")
@click.option("--workers", type=click.IntRange(min=0), default=2,
              help="Loader workers (PyAV DataLoader processes, DALI threads).")
@click.option("--shards", is_flag=True,
              help="Also shard that data (prepare --shards) and time each loader from the shards as well.")
@click.option("--dali-pipelines", "dali_pipelines", multiple=True, default=("auto",), show_default=True,
              callback=lambda _ctx, _param, values: tuple(_pipelines(v) for v in values),
              help="DALI pipeline counts to time (repeat); auto: one per NVDEC engine of the card.")
@click.option("--joint/--no-joint", default=True,
              help="Also time the step XDC pretraining runs: both encoders and their heads together.")
@click.option("--no-round", is_flag=True, help="Skip the tiny pretraining round that measures phase shares.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the figures as JSON here.")
def bench_train_command(device, archs, batch_size, steps, loaders, workers, shards, dali_pipelines, joint, no_round,
                        json_path):
    """Clips/s, model FLOPs per clip (torch.utils.flop_counter) and MFU of a training step per encoder and
    arch, the same step fed by each --loader (and which bound holds), and the share of a round spent
    extracting, clustering and training.

    MFU is against a bf16 GEMM measured in the same run (CUDA); on the CPU the fp32 GEMM rate is shown
    instead, labelled so."""
    from .bench import train as bench_module
    from .bench.timing import check_device, gemm_rate, machine, write_json

    check_device(device)
    archs = tuple(archs) or ((default_arch("cpu"), default_arch("cuda")) if device == "cuda" else (default_arch("cpu"),))

    def one_round(dataset_dir: str, run_dir: str) -> dict:
        from .pretrain import pretrain as run

        (record,) = run(dataset_dir, run_dir, PretrainConfig(arch=default_arch("cpu"), clusters=4, epochs=1, device=device), log=lambda *_: None)
        return record

    say = lambda msg: click.echo(f"... {msg}", err=True)  # noqa: E731
    say("GEMM ceiling (bf16 on CUDA, fp32 on the CPU)")
    ceiling = gemm_rate(device)
    rows, shares = bench_module.bench_train(device, archs, batch_size, steps, None if no_round else one_round,
                                            progress=say, loaders=tuple(loaders), workers=workers,
                                            shards=shards, dali_pipelines=dali_pipelines, joint=joint)
    click.echo(bench_module.format_train_table(rows, shares, device, ceiling))
    if json_path:
        write_json(bench_module.train_json(rows, shares, device, ceiling, machine(device)), json_path)
        click.echo(f"wrote {json_path}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
