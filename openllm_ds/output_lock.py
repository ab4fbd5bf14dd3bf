"""One writer per output directory, whatever the command: ``OutputLock(path, command)``.

Every stage takes it on the directory it writes before it reads or writes anything there: ``prepare``
(``data.output_dir``), ``train-tokenizer`` and ``tokenize`` (their ``--output_dir``, or each input's default shards
dir), ``train`` (the run dir; rank 0 under the deepspeed launcher, the driver under Ray Train, never its
workers), ``evaluate --tasks`` (the run's ``eval/``), ``export`` and ``pipeline`` (its ``--work_dir``). A second
command on the same directory stops at once with one line naming the holder (command, pid, host, start time).

The lock is an ``flock`` on a hidden file beside the directory, ``.<name>.lock`` in its parent (inside the
directory when only it is writable): beside it, because stages that replace their directory whole (tokenizer,
shards, exports) swap the directory itself. The path is compared in its normal form (``paths.normal_path``:
``~``, relative paths, symlinks), so two spellings of one directory share a lock. The kernel releases an flock
when its process ends, however it ends, so a killed run never leaves a stale lock; the file is removed on release.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from openllm_ds.errors import UserError
from openllm_ds.paths import kind_of, missing_reason, normal_path


def lock_file(path: str | Path) -> Path:
    """Where the lock of output directory ``path`` lives."""
    p = normal_path(path)
    parent = next((a for a in p.parents if a.exists()), Path("/"))
    if parent == p.parent and not os.access(parent, os.W_OK) and p.is_dir() and os.access(p, os.W_OK):
        return p / ".openllm-ds.lock"
    return p.parent / f".{p.name}.lock"


class OutputLock:
    """Hold the lock of output directory ``path`` for ``command`` (``with OutputLock(...)``, or ``release()``).
    ``flag`` names the setting that chose the directory in the message a second command gets."""

    def __init__(self, path: str | Path, command: str, flag: str = "--output_dir"):
        self.path, self.command, self.flag, self.fd = Path(path), command, flag, None
        self.file = lock_file(path)
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = (("is a file, not a directory" if kind_of(self.file.parent) == "file" else
                    missing_reason(self.file.parent)) if isinstance(e, (FileExistsError, NotADirectoryError)) else
                   f"cannot be created ({e.strerror})")
            raise UserError(f"{flag} {path}: {self.file.parent} {why}; choose another {flag}") from None
        while self.fd is None:
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"{flag} {path}: cannot create its lock file {self.file} ({e.strerror}); make "
                                f"{self.file.parent} writable or choose another {flag}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(in_use(path, holder, flag)) from None
            if _same_file(self.file, fd):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"openllm-ds {command} (pid {os.getpid()} on {socket.gethostname()}, since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
                self.fd = fd
            else:  # the holder removed the file between our open and our lock: lock the new one
                os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file)  # before the lock goes: a waiter then finds the file gone and starts over
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(path: str | Path, holder: str, flag: str = "--output_dir") -> str:
    """The message a second command gets."""
    return f"{flag} {path} is in use by {holder}; wait for it to finish, or choose another {flag}"


def _holder(fd: int) -> str:
    return os.pread(fd, 300, 0).decode(errors="replace").strip() or "another openllm-ds command"


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def output_in_use(path: str | Path) -> str | None:
    """Who holds the lock of output directory ``path`` (its line), or None when it is free; creates nothing (for
    ``train --dry_run``)."""
    file = lock_file(path)
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: conflicts with the holder's, not another probe's
    except OSError:
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
