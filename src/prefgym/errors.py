"""Errors that the `prefgym` command turns into a clear message and a non-zero exit."""

from __future__ import annotations


class PrefgymError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, failed API call)."""


class DataError(PrefgymError):
    """Malformed data. Names the file, the row (0-based index) and the field where known."""

    def __init__(self, message: str, *, path=None, row: int | None = None, field: str | None = None):
        self.path, self.row, self.field = path, row, field
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(PrefgymError):
    """A bad configuration: unknown key, wrong type, missing value. Names the file and key."""


class OutputError(PrefgymError):
    """An output could not be written (disk full, no permission, a file where a folder should be)."""

    def __init__(self, path, error: OSError):
        self.path = path
        reason = error.strerror or str(error)
        super().__init__(f"{path}: cannot write ({reason}); nothing was written there")
