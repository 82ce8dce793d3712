"""The durable cache of judge answers: SQLite in WAL mode, one row per (judge config, example).

Every finished call is committed before the next result is used, so a run killed at any moment
(even SIGKILL) and started again repeats no call whose result was stored. Several processes may
read and write the same file at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from prefgym.errors import ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    preference REAL,
    error TEXT,
    prompt_tokens REAL NOT NULL,
    completion_tokens REAL NOT NULL,
    price REAL NOT NULL,
    seconds REAL NOT NULL,
    raw TEXT
)
"""


def default_cache_dir() -> Path:
    """`$PREFGYM_HOME/cache`, or `~/.cache/prefgym` (never inside the installed package)."""
    home = os.environ.get("PREFGYM_HOME")
    return Path(home) / "cache" if home else Path.home() / ".cache" / "prefgym"


class AnnotationCache:
    """Judge answers keyed by a hash of the judge config and the example (as shown)."""

    FIELDS = ("preference", "error", "prompt_tokens", "completion_tokens", "price", "seconds", "raw")

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.path = Path(cache_dir or default_cache_dir()) / "annotations.sqlite"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=60.0)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # durable against process death in WAL mode
            self.conn.execute(_SCHEMA)
            self.conn.commit()
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"{self.path}: cannot open the annotation cache ({e}); "
                              "pass another --cache-dir or set PREFGYM_HOME") from None

    def get_many(self, keys: list[str], with_raw: bool = False) -> dict[str, dict]:
        """The stored answers among `keys` (with the raw completion details if `with_raw`)."""
        fields = self.FIELDS if with_raw else self.FIELDS[:-1]
        out = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            rows = self.conn.execute(
                f"SELECT key, {', '.join(fields)} FROM annotations WHERE key IN ({','.join('?' * len(chunk))})",
                chunk).fetchall()
            for row in rows:
                d = dict(zip(fields, row[1:]))
                if with_raw:
                    d["raw"] = json.loads(d["raw"]) if d["raw"] else None
                out[row[0]] = d
        return out

    def put_many(self, entries: list[tuple[str, str, dict]]) -> None:
        """Store (key, judge name, answer) entries in one transaction."""
        with self.conn:
            self.conn.executemany(
                f"INSERT OR REPLACE INTO annotations (key, judge, {', '.join(self.FIELDS)}) "
                f"VALUES (?, ?, {', '.join('?' * len(self.FIELDS))})",
                [(k, judge, *(json.dumps(v[f]) if f == "raw" and v[f] is not None else v[f] for f in self.FIELDS))
                 for k, judge, v in entries])

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]

    def close(self) -> None:
        self.conn.close()
