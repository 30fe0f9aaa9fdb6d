"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

Every file symfast writes goes through here: write to a temporary name in the same directory,
flush and fsync it, rename it over the target (atomic on POSIX), then fsync the directory so the
rename itself survives a crash.
"""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    # Linux shows it in /proc without changing it; elsewhere set and restore (a brief window in
    # which another thread's new files would get mode 0666)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# atomic_path's temporaries: ".<name>.<mkstemp's 8 characters>.tmp" (and torch's own ".tmp" on
# top when it writes a trace to that name)
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.tmp)?$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of :func:`atomic_path` that a killed writer left in ``folder`` (not
    below it); returns them. Only a job that owns the folder calls this, before it writes."""
    removed = []
    for entry in Path(folder).iterdir():
        if entry.is_file() and _TEMPORARY.match(entry.name):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def remove_outputs(folder: str | os.PathLike, names: list[str]) -> None:
    """Delete an earlier run's ``names`` in ``folder`` before a job writes its own, so a job
    killed between its writes leaves some of its files, never a mix of two runs' (each file is
    atomic, the set is not). ``names`` may hold glob patterns."""
    folder = Path(folder)
    for name in names:
        for path in folder.glob(name):
            if path.is_file():
                path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; whatever the block writes there is fsynced and
    renamed onto ``path`` when the block exits without error, and removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
