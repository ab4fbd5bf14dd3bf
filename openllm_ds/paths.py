"""Paths the user names: one normal form to compare them in, and one way to say what is wrong with one.

Two settings that name files are compared through ``normal_path`` / ``same_path`` (``~`` expanded, relative
paths made absolute, ``..`` folded, symlinks followed, trailing slashes gone), never as the strings typed. A path
that cannot be used is named by ``check_path`` for what it is: missing, a file where a directory is expected or
the reverse, a broken symbolic link, under a file, or unreadable; never "does not exist" for a path that does.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from openllm_ds.errors import UserError

KIND_WORDS = {"dir": "a directory", "file": "a file"}


def expand_path(path: str | Path) -> Path:
    """``~`` expanded, nothing else: the path a setting holds, as the user meant it (still relative if it was)."""
    return Path(os.path.expanduser(os.fspath(path)))


def normal_path(path: str | Path) -> Path:
    """The form two path settings are compared in: ``~`` expanded, absolute, symlinks resolved, ``..`` folded."""
    return expand_path(path).resolve()


def same_path(a: str | Path, b: str | Path) -> bool:
    """``a`` and ``b`` name one file or directory: the same normal path, or (both existing) the same inode (a hard
    link, a bind mount)."""
    if normal_path(a) == normal_path(b):
        return True
    try:
        return os.path.samefile(expand_path(a), expand_path(b))
    except OSError:
        return False


def is_within(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or lies under it, compared as normal paths."""
    p, f = normal_path(path), normal_path(folder)
    return p == f or f in p.parents


def kind_of(path: str | Path) -> str | None:
    """"dir", "file", "other" (a device, a socket, a fifo), or None when nothing is there (a broken link too)."""
    try:
        mode = os.stat(expand_path(path)).st_mode
    except (OSError, ValueError):
        return None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def missing_reason(path: str | Path) -> str:
    """Why nothing usable is at ``path``, in words that follow its name: "does not exist", "does not exist (x is a
    file, not a directory)", "is a broken symbolic link (to t)", "cannot be reached (permission denied on d)"."""
    p = expand_path(path)
    if p.is_symlink() and not p.exists():
        return f"is a broken symbolic link (to {os.readlink(p)})"
    for parent in reversed(p.parents):
        if parent == Path(".") or str(parent) in ("", "/"):
            continue
        try:
            mode = os.stat(parent).st_mode
        except FileNotFoundError:
            break
        except PermissionError:
            return f"cannot be reached (permission denied on {parent})"
        except OSError:
            break
        if not stat.S_ISDIR(mode):
            return f"does not exist ({parent} is a file, not a directory)"
    return "does not exist"


def check_path(path: str | Path, name: str, kind: str | None = None, fix: str = "",
               error: type[UserError] = UserError) -> Path:
    """``path`` (``~`` expanded) when something of ``kind`` ("dir", "file", None: either) is there; else an ``error``
    "``name`` ``path`` <what is wrong>; ``fix``". ``name`` is the flag or key that holds it (``--model_dir``)."""
    if not isinstance(path, (str, os.PathLike)) or "\x00" in os.fspath(path):
        from openllm_ds.text import type_name

        got = "a NUL character" if isinstance(path, (str, os.PathLike)) else type_name(path)
        raise error(f"{name} must be a path, got {got}{'; ' + fix if fix else ''}")
    p = expand_path(path)
    found = kind_of(p)
    tail = f"; {fix}" if fix else ""
    if found is None:
        try:
            os.stat(p)
        except PermissionError:
            raise error(f"{name} {path} cannot be read (permission denied){tail}") from None
        except OSError:
            pass
        raise error(f"{name} {path} {missing_reason(p)}{tail}")
    if kind is not None and found != kind:
        what = KIND_WORDS.get(found, "neither a file nor a directory")
        raise error(f"{name} {path} is {what}, not {KIND_WORDS[kind]}{tail}")
    return p
