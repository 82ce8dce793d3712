"""Small file helpers: atomic writes (nothing half-written) and JSON/JSONL records."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from prefgym.errors import DataError, OutputError


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; move it onto `path` only if the block succeeds.

    An OSError while writing (disk full, no permission) becomes an OutputError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(path, e) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are ordinary files
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise OutputError(path, e) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (indent 2, UTF-8, non-ASCII kept)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write JSON Lines atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line (metrics logs); flushed so a crash loses at most this line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    except OSError as e:
        raise OutputError(path, e) from None


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read a list of records from .json (a list of objects) or .jsonl (one object per line).

    Raises DataError naming the file (and the row) on non-UTF-8 bytes, truncated or invalid
    JSON, or rows that are not objects.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {e.start}); save the file as UTF-8", path=path) from None
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON on line {i + 1}: {e.msg}", path=path, row=len(rows)) from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (the file looks truncated)" if e.pos >= len(text.rstrip()) - 1 else ""
            raise DataError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}", path=path) from None
        if not isinstance(rows, list):
            raise DataError(f"expected a list of records (a JSON array of objects), got a JSON "
                            f"{_json_type(rows)}", path=path)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"expected an object, got {type(r).__name__}", path=path, row=i)
    return rows


def _json_type(value) -> str:
    names = {dict: "object", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
