"""Writing results so that nothing is half-written or written twice.

Every result file goes through :func:`atomic_path`: the content is written under a temporary name unique
to this process, flushed to disk, then renamed over the target (and the folder's entry flushed), so a
kill, a full disk or a second process never leaves a torn file under the real name. :class:`RunLock`
keeps two commands from writing into the same output at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from typing import Callable

from .errors import OutputError, XdcError

# What an output that cannot be written means, and the way out: these are the user's to fix (space,
# permissions, a path that names a file where a folder is needed), never a reason for a traceback.
WRITE_ADVICE = {
    errno.ENOSPC: "the disk holding it is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space or ask for a larger quota",
    errno.EFBIG: "a file-size limit was hit (`ulimit -f`, or the filesystem's largest file): raise the limit",
    errno.EROFS: "it is on a read-only filesystem: choose a writable output",
    errno.EACCES: "permission denied: choose an output you may write to",
    errno.EPERM: "choose an output you may write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another output",
    errno.EISDIR: "a folder stands where a file should go: choose another output",
    errno.EEXIST: "a file stands where a folder should go: choose another output",
}
# The disk filled: what was written before stays, so the same command (pretrain: with --resume) goes on.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
AGAIN = "then run the command again"


def shown_path(path) -> str:
    """A path as it can be printed and written to any text file: bytes that are not UTF-8 (a file name
    from another system) are shown escaped instead of failing the message."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def output_error(error: OSError, path=None) -> OutputError | None:
    """The user's message for ``error`` raised while writing ``path``, or None when it is not an output
    problem (then it is a bug, and its traceback is wanted)."""
    if error.errno not in WRITE_ADVICE:
        return None
    # The output the command was writing, rather than its temporary name or a parent the system tried.
    where = shown_path(path if path is not None else error.filename)
    return OutputError(f"cannot write {where}: {error.strerror or error}; {WRITE_ADVICE[error.errno]}, {AGAIN}")


@contextlib.contextmanager
def writing(path):
    """Translates an output error raised inside into an :class:`OutputError` naming ``path`` (or the file
    the system named)."""
    try:
        yield
    except OSError as error:
        translated = output_error(error, path)
        if translated is None:
            raise
        raise translated from None


def make_folder(path: str | Path) -> Path:
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def append_text(path: str | Path, text: str) -> None:
    """``text`` at the end of ``path`` (a log of lines), an OutputError when it cannot be written."""
    with writing(path), open(path, "a", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)


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


def temporary_name(path: str | Path) -> Path:
    """Where ``path`` is written before it is renamed into place. The pid keeps two processes'
    temporaries apart, the leading dot keeps them out of listings, and the suffix stays last for
    writers that read the format from it (matplotlib)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def temporaries_of(path: str | Path) -> list[Path]:
    """Every process's leftover temporaries of ``path`` (a killed writer's)."""
    path = Path(path)
    return list(path.parent.glob(f".{path.name}.*.tmp{path.suffix}"))


@contextlib.contextmanager
def atomic_path(path: str | Path, translate: bool = True):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (file and folder synced: a
    kill or a power loss leaves the old content or the new, never half), on failure it is removed.
    ``translate``: an OSError becomes an :class:`OutputError`; False leaves it to a caller with advice
    of its own."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with writing(path) if translate else contextlib.nullcontext():
            make_folder(path.parent)
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` as UTF-8; a name that was not UTF-8 on disk (carried as surrogate escapes from the file
    system) is written back as its own bytes, so an id in a result file matches the file it names."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8", "surrogateescape"))


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_path`: a killed process never leaves half a checkpoint."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as error:
            # torch reports a failed write of its archive as a RuntimeError ("unexpected pos"); the
            # OSError of the file underneath says why (a full disk, a size limit).
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None
            raise


def output_lock(target: str | Path):
    """The lock of ``target`` for the process that writes it: rank 0 under torchrun (whose ranks all run
    the same command on the same output), the only process otherwise."""
    return RunLock(target) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


class RunLock:
    """An exclusive lock on an output (a run folder, a results folder or a file), held for the life of
    the command: a second command writing there is refused with the holder's pid instead of interleaving
    its files with the first one's. The lock is the kernel's (``flock``), so it disappears with its
    process, however that process ends; the file it lives in may stay behind, unlocked."""

    def __init__(self, target: str | Path, *, name: str | None = None, wait_s: float = 0.0,
                 busy: Callable[[str], XdcError] | None = None):
        """``name``: the lock file inside a folder ``target`` (default ``.xdc-fast.lock``); ``wait_s``: how
        long to wait for a holder that is going away (a killed run's workers still exiting); ``busy``: the
        error for a holder of pid ``holder``."""
        target = Path(target)
        if target.suffix == "" or name is not None:
            self.path = target / (name or ".xdc-fast.lock")
        else:
            self.path = target.with_name(f".{target.name}.lock")
        self.wait_s, self.busy = wait_s, busy
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        make_folder(self.path.parent)
        with writing(self.path.parent):
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(self.fd)
                self.fd = None
                if self.busy is not None:
                    raise self.busy(holder) from None
                raise XdcError(f"{self.path.parent} is in use by another xdc-fast process (pid {holder}); wait for "
                               "it to finish, stop it, or choose another output") from None
        with contextlib.suppress(OSError):  # the pid only informs a second command; a full disk says so later
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
