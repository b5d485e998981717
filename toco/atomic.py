"""Atomic file writes that survive a kill at any moment and keep the user's file mode.

The new content goes to a temporary sibling, is flushed to disk, given the mode a plain
`open(path, "w")` would give (0666 minus the umask; mkstemp's 0600 would hide checkpoints
from colleagues on a shared cluster) and renamed over the target: readers see the old file
or the new one, never a mix. A kill leaves at most a `.<name>.*.tmp` sibling, which
`remove_stale_temps` clears before the next write by the same (only) writer.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    return 0o666 & ~current_umask()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete temporary siblings of `path` left by a killed writer. Only call it from the one
    process that writes `path` (or under its lock): it would delete a live writer's file."""
    path = Path(path)
    if path.parent.is_dir():
        for tmp in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (mode as for a new file).

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, default_file_mode())
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:  # e.g. ENOSPC raised by a write: name the file meant
            err.filename = str(path)
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, payload: bytes, fsync: bool = False) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(payload)
