"""Writing files and directories so that no reader ever sees them half-written.

A file is written to a temporary name beside its target, flushed to disk and
renamed over the target (`os.replace` is atomic on POSIX); a directory is
built under a temporary name beside its target and swapped in by renames: an
existing target is first renamed aside, the new one renamed into place, and
the old copy removed last. On an exception the temporary is removed and the
old target, if any, is untouched.

Temporary names say who owns them: `.NAME.HOST~PID~START.RANDOM.tmp` (and
`.old` for a replaced directory on its way out), START being the owner's
start time in centiseconds, so a reused pid is not taken for the owner. A
process killed mid-write leaves such names behind; the next write of the same
target removes those whose owner is gone (`remove_temporaries`).

Running out of space (ENOSPC, or a full quota) while writing raises
`DiskFull`, a one-line `UserError` naming the path that could not be written.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from runtime.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
FREE_SPACE = "free some space on that disk and run again"


class DiskFull(UserError):
    """The disk (or quota) ran out of space while writing `path`."""

    def __init__(self, path: str | os.PathLike, hint: str = FREE_SPACE):
        self.path, self.hint = Path(path), hint
        super().__init__(f"no space left on the device to write {path}: {hint}")


@contextlib.contextmanager
def full_disk_reported(path: str | os.PathLike, hint: str | None = None):
    """Turn running out of space inside the block into one `DiskFull` naming `path` (or the more precise
    path of a `DiskFull` raised inside) with `hint` (None: an inner `DiskFull`'s hint, or FREE_SPACE)."""
    try:
        yield
    except DiskFull as err:
        raise DiskFull(err.path, hint or err.hint) from None
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        raise DiskFull(path, hint or FREE_SPACE) from None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _start_centiseconds(pid: int | None = None) -> int:
    """The start time of process `pid` (this process when None) in centiseconds; psutil's errors pass through."""
    import psutil  # only when a temporary is named or checked, not for every load

    return round(psutil.Process(pid).create_time() * 100)


def temporary_name(path: Path, kind: str) -> Path:
    """A fresh name beside `path` for a temporary of this process: `.NAME.HOST~PID~START.RANDOM.KIND`."""
    owner = f"{_host()}~{os.getpid()}~{_start_centiseconds()}"
    return path.with_name(f".{path.name}.{owner}.{uuid.uuid4().hex[:12]}.{kind}")


def _temporary_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{name}\.(?P<host>[A-Za-z0-9-]+)~(?P<pid>\d+)~(?P<start>\d+)\.[0-9a-f]+\.(?:tmp|old)")


def _owner_alive(host: str, pid: int, start: int) -> bool:
    """True unless the owner is known to be gone (another host's processes cannot be checked: alive)."""
    if host != _host():
        return True
    import psutil

    try:
        return abs(_start_centiseconds(pid) - start) <= 1
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def remove_temporaries(directory: str | os.PathLike, name: str | None = None, any_owner: bool = False) -> None:
    """Remove the temporaries in `directory` (those of target `name` only, when given) whose owner is gone;
    `any_owner`: every one, for a caller holding a lock that proves no owner is left."""
    directory = Path(directory)
    pattern = _temporary_pattern(re.escape(name) if name is not None else ".+")
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not any_owner and _owner_alive(match["host"], int(match["pid"]), int(match["start"])):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path` for writing; rename it onto `path` on success."""
    path = Path(path)
    remove_temporaries(path.parent, path.name)
    tmp = temporary_name(path, "tmp")
    try:
        with full_disk_reported(path):
            with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    with atomic_file(path, "w") as f:
        f.write(text)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def swap_in(new: Path, path: Path) -> None:
    """Put directory `new` at `path` by renames; an old `path` is renamed aside first and removed last."""
    if not path.exists() and not path.is_symlink():
        os.replace(new, path)
        return
    old = temporary_name(path, "old")
    os.replace(path, old)
    os.replace(new, path)
    _remove(old)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a fresh temporary directory beside `path`; on success it replaces `path` (see `swap_in`).

    Running out of space inside the block raises `DiskFull` naming the file under `path`
    that could not be written.
    """
    path = Path(path)
    with full_disk_reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_temporaries(path.parent, path.name)
        tmp = temporary_name(path, "tmp")
        tmp.mkdir()
    try:
        try:
            with full_disk_reported(path):
                yield tmp
        except DiskFull as err:
            if not err.path.is_relative_to(tmp):
                raise
            raise DiskFull(path / err.path.relative_to(tmp), err.hint) from None
        with full_disk_reported(path):
            swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
