"""Errors that are the user's to fix: the CLIs print their message, without a traceback."""


class UserError(Exception):
    """Bad input from the user (a flag, a config file, a path, a checkpoint)."""


class DataError(UserError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message names it."""


class ConfigError(UserError):
    """A flag or config value is malformed or out of range."""
