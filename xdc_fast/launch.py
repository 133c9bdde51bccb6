"""Who launched this process, and whether a run restarted into its own folder continues it.

A job restarted by a scheduler comes back with the command it was first given: torchrun's elastic
agent restarts the workers after one of them died, SLURM requeues a job after a preemption or at its
time limit, and ``xdc-fast submit`` does the same through submitit. None of them can add ``--resume``,
so ``--resume auto`` (the default) resumes when one of them launched the process, and otherwise keeps
the safe rule of a hand-typed command: a folder that holds a run is refused rather than continued by
mistake. A resume is refused either way when the run was made with other settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .choices import RESUMES as RESUME_CHOICES
from .errors import ConfigError, XdcError

RESUME_HELP = ("Continue the run in --out from its last checkpoint: 'yes' (what --resume alone means), 'no' "
               "(refuse a folder that holds a run), or 'auto': yes when torchrun's elastic agent, SLURM or "
               "`xdc-fast submit` launched the process (a restarted or requeued job comes back with the same "
               "command), no otherwise. A run made with other settings is refused either way.")
TRANSFER_RESUME_HELP = ("A job restarted into its --out: 'yes' (what --resume alone means) keeps results already "
                        "there when they were made with these settings (nothing runs again), and otherwise goes on "
                        "after the last finished epoch of full finetuning (checkpoints/epoch.pt; the linear probe "
                        "starts over); 'no' refuses a folder that holds results and starts a finetuning from its "
                        "beginning; 'auto': yes when torchrun's elastic agent, SLURM or `xdc-fast submit` launched "
                        "the process, no otherwise.")
# Settings a transfer resumed from its epoch checkpoint may change: where and how fast it runs.
TRANSFER_RESUMABLE = ("device", "loader", "workers", "dist_timeout_s")

# The variables each launcher sets in every process it starts.
LAUNCHERS = (("torchrun", "TORCHELASTIC_RUN_ID"), ("SLURM", "SLURM_JOB_ID"), ("xdc-fast submit", "SUBMITIT_EXECUTOR"))


def launcher(environ=None) -> str | None:
    """The scheduler that started this process, if any: torchrun, SLURM or xdc-fast submit."""
    environ = os.environ if environ is None else environ
    return next((name for name, variable in LAUNCHERS if environ.get(variable)), None)


def resolve_resume(choice: str, environ=None) -> tuple[bool, str | None]:
    """``--resume`` as a yes or no, and the launcher that made ``auto`` say yes (None otherwise)."""
    if choice not in RESUME_CHOICES:
        raise XdcError(f"--resume should be one of {', '.join(RESUME_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice == "yes", None
    by = launcher(environ)
    return by is not None, by


def settings_differ(used: dict, settings: dict) -> list[str]:
    """What ``settings`` change in the settings a transfer was made with, beyond TRANSFER_RESUMABLE."""
    settings = json.loads(json.dumps(settings))  # tuples as the files hold them: lists
    return [f"{key}: {used.get(key)!r} in the run, {value!r} now" for key, value in settings.items()
            if key in used and used[key] != value and key not in TRANSFER_RESUMABLE]


def finished_results(out: str | Path, settings: dict, resume: bool) -> dict | None:
    """A transfer (finetune) resumed into a folder that holds its results: those results when they were
    made with ``settings`` (the job finished before its restart; nothing is run again), None when there
    are none yet (full finetuning then goes on from its epoch checkpoint, see :func:`settings_differ`).
    Other settings are refused; without ``resume`` the folder is left to the command's own check."""
    path = Path(out) / "metrics.json"
    if not resume or not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise XdcError(f"cannot resume: {path} is unreadable ({error}); choose another --out") from None
    differs = settings_differ(saved.get("config", {}) if isinstance(saved, dict) else {}, settings)
    if differs:
        raise ConfigError(f"--resume into {out}, which holds results made with other settings ({'; '.join(differs)}); "
                       "choose another --out")
    return saved
