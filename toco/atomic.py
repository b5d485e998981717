"""Atomic file writes that survive a kill at any moment and keep the user's file mode.

The new content goes to a temporary sibling, is flushed to disk, given the mode a plain
`open(path, "w")` would give (0666 minus the umask; mkstemp's 0600 would hide checkpoints
from colleagues on a shared cluster) and renamed over the target: readers see the old file
or the new one, never a mix. A kill leaves at most a `.<name>.*.tmp` sibling. The writer holds
a lock on its temporary file, which the OS releases when the writer dies, so
`remove_stale_temps` can tell a dead writer's leftovers from a live writer's file.
"""

from __future__ import annotations

import contextlib
import fcntl
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
    """Delete the temporary siblings of `path` whose writer is gone (killed mid-write); files
    of writers still at work (other processes writing `path`) are locked and left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:  # its writer just finished
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp.unlink(missing_ok=True)
        except BlockingIOError:  # a live writer holds it
            pass
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` (mode as for a new file).

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, tmp = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)  # "in use" for remove_stale_temps, until we close it
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, default_file_mode())
        if fsync:
            os.fsync(fd)
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:  # e.g. ENOSPC raised by a write: name the file meant
            err.filename = str(path)
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, payload: bytes, fsync: bool = False) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(payload)
