"""Writing results so that nothing is half-written or written twice.

Every result file goes through :func:`atomic_path`: the content is written under a temporary name unique
to this process, flushed to disk, then renamed over the target (and the folder's entry flushed), so a
kill, a full disk or a second process never leaves a torn file under the real name. :class:`RunLock`
keeps two commands from writing into the same output at once.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import XdcError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a folder: the rename is what matters
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps two processes' temporaries apart; the leading dot keeps them out of listings.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_path`: a killed process never leaves half a checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def output_lock(target: str | Path):
    """The lock of ``target`` for the process that writes it: rank 0 under torchrun (whose ranks all run
    the same command on the same output), the only process otherwise."""
    return RunLock(target) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


class RunLock:
    """An exclusive lock on an output (a run folder, a results folder or a file), held for the life of
    the command: a second command writing there is refused with the holder's pid instead of interleaving
    its files with the first one's. The lock is the kernel's (``flock``), so it disappears with its
    process, however that process ends; the file it lives in may stay behind, unlocked."""

    def __init__(self, target: str | Path):
        target = Path(target)
        self.path = target / ".xdc-fast.lock" if target.suffix == "" else target.with_name(f".{target.name}.lock")
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            raise XdcError(f"{self.path.parent} is in use by another xdc-fast process (pid {holder}); wait for it "
                           "to finish, stop it, or choose another output") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
