"""Errors that are the user's to fix: the CLIs print their message, without a traceback."""

from __future__ import annotations

import errno
from typing import Optional


class UserError(Exception):
    """Bad input from the user (a flag, a config file, a path, a checkpoint)."""


class DataError(UserError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message names it."""


class ConfigError(UserError):
    """A flag or config value is malformed or out of range."""


# A write that fails with one of these is the storage's fault, not a bug: say so in one line.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.EIO}
)


def storage_error(err: OSError, resume_hint: str) -> Optional[UserError]:
    """A UserError for a failed write to the run folder, or None if `err` is something else."""
    if err.errno not in STORAGE_ERRNOS:
        return None
    where = f" {err.filename}" if err.filename else ""
    return UserError(
        f"cannot write{where}: {err.strerror or errno.errorcode.get(err.errno)} "
        f"(disk full or read-only?); {resume_hint}"
    )
