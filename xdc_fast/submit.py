"""``xdc-fast submit``: run any xdc-fast command as a SLURM job (or locally) through submitit.

One task per GPU (``--tasks-per-node``, by default ``--gpus-per-node``); each task exports the variables
torch.distributed reads (``MASTER_ADDR`` = the job's first node, ``MASTER_PORT`` from the job id, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), so the command forms its process group as it does under torchrun. When
SLURM signals a time limit or a preemption (``--signal-delay-s`` before the end), submitit requeues the
job with the same command; the command starts with ``--resume auto``, which resumes under a launcher,
and goes on from its last checkpoint. What a requeue costs is the work since that checkpoint
(``checkpoint_every`` steps for pretraining).

submitit is an optional extra (``pip install xdc-fast[slurm]``): it is imported only here, when a job
is submitted or runs.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from .errors import SubmitError


def minutes_of(limit: str) -> float:
    """``HH:MM:SS``, ``MM:SS`` or ``D-HH:MM:SS`` (SLURM's forms) in minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", limit.strip())
    if not match:
        raise SubmitError(f"--time {limit!r} should read HH:MM:SS (or D-HH:MM:SS)")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise SubmitError(f"--time {limit!r} gives the job no time")
    return total / 60


class Task:
    """What every task of the job runs: one xdc-fast command, as a rank of the job's process group.

    ``checkpoint`` is submitit's requeue hook: called on rank 0 when the job is signalled, it asks for the
    same task again, which the command's auto-resume turns into a continuation."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        import submitit

        _exit_at_once_on_requeue(submitit.JobEnvironment._usr_sig())
        environment = submitit.helpers.TorchDistributedEnvironment()
        # Each rank picks its own GPU by LOCAL_RANK, as under torchrun.
        environment.export(set_cuda_visible_devices=False)
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(environment.local_world_size))
        from .cli import main

        code = main(self.argv, prog_name="xdc-fast", standalone_mode=False)
        if code:
            raise RuntimeError(f"xdc-fast {' '.join(self.argv)} ended with exit status {code} (see the log above)")
        return 0

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(Task(self.argv))


def _exit_at_once_on_requeue(signum) -> None:
    """Wrap submitit's handler of the time-limit/preemption signal so that, once it has requeued the job,
    the process ends with its exit status at once. Its own way out is a SystemExit raised from the
    handler, which Python swallows when the signal lands in a weakref callback or a ``__del__``
    ("Exception ignored in ..."): the run would then go on, unrequeued, until the scheduler killed it."""
    import signal

    requeue = signal.getsignal(signum)
    if not callable(requeue):
        return

    def handler(number, frame):
        try:
            requeue(number, frame)
        except SystemExit as stop:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stop.code if isinstance(stop.code, int) else 1)

    signal.signal(signum, handler)


def submit(argv: list[str], *, nodes: int, gpus_per_node: int, tasks_per_node: int | None, time: str,
           partition: str | None, account: str | None, cpus_per_task: int, folder: str | Path, local: bool,
           max_requeues: int, signal_delay_s: int, wait: bool, log=print):
    """Submit ``xdc-fast ARGV`` as one job; returns the submitit job (its result when ``wait``)."""
    try:
        import submitit
    except ImportError:
        raise SubmitError("submit needs submitit: pip install 'xdc-fast[slurm]' (or pip install submitit)") from None
    if not argv:
        raise SubmitError("which command? give it after --, e.g. xdc-fast submit ... -- pretrain --data D --out RUN")
    if argv[0] == "submit":
        raise SubmitError("the command to run cannot be submit itself")
    minutes = minutes_of(time)
    if signal_delay_s >= minutes * 60:
        raise SubmitError(f"--signal-delay-s {signal_delay_s} is not shorter than --time {time}: the job would be "
                          "signalled before it starts")
    tasks = tasks_per_node or max(gpus_per_node, 1)
    if local:
        if nodes != 1:
            raise SubmitError(f"--local runs on this machine: --nodes {nodes} cannot be honoured (use 1)")
        executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=max_requeues)
        executor.update_parameters(timeout_min=minutes, tasks_per_node=tasks, gpus_per_node=gpus_per_node,
                                   signal_delay_s=signal_delay_s)
    else:
        if shutil.which("sbatch") is None:
            raise SubmitError("sbatch is not on PATH: this machine cannot submit to SLURM; run the same job here with "
                              "--local (submitit's local executor), or submit from a SLURM login node")
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=max_requeues)
        executor.update_parameters(time=max(1, round(minutes)), nodes=nodes, ntasks_per_node=tasks,
                                   gpus_per_node=gpus_per_node or None, cpus_per_task=cpus_per_task,
                                   partition=partition, account=account, signal_delay_s=signal_delay_s,
                                   job_name="xdc-fast-" + argv[0])
    job = executor.submit(Task(argv))
    log(f"submitted job {job.job_id}: {nodes} node(s) x {tasks} task(s), xdc-fast {' '.join(argv)}; "
        f"logs in {folder}/")
    if wait:
        try:
            job.results()
        except Exception as error:  # noqa: BLE001 - submitit wraps the task's failure; its log says more
            raise SubmitError(f"job {job.job_id} failed: {str(error).strip().splitlines()[-1][:300]} "
                              f"(logs: {folder}/{job.job_id}_*)") from None
        log(f"job {job.job_id} finished")
    return job
