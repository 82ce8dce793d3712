"""The durable cache of judge answers, and the claims that keep concurrent runs from paying twice.

One SQLite file in WAL mode, `<cache_dir>/annotations.sqlite`, with two tables:

- `annotations`: one row per (judge config, example) answer, committed by the thread that made
  the call as soon as it returns, so a run killed at any moment (even SIGKILL) and started again
  repeats no call whose answer was stored;
- `claims`: the examples a run is asking about right now (owner, host, pid, heartbeat). Another
  run over the same examples waits for those answers instead of paying for them, and takes a
  claim over when its owner is gone (a dead pid on this host) or silent (no heartbeat for
  `STALE_SECONDS`, the only test possible for a run on another machine).

Files written before claims existed are read as they are; the `claims` table is added on open.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from prefgym.errors import ConfigError, DataError

HEARTBEAT_SECONDS = 2.0
"""How often a run refreshes the heartbeat of its claims."""
STALE_SECONDS = 60.0
"""A claim whose heartbeat is older than this is taken over (its run is hung or gone)."""

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
);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    heartbeat REAL NOT NULL
);
"""


def _retry_while_locked(action, patience: float = 60.0):
    """Run `action`, again while SQLite answers "database is locked/busy" at once (it does not wait
    where waiting could deadlock, e.g. two connections upgrading to a write lock), for up to
    `patience` seconds with backoff."""
    deadline, pause = time.monotonic() + patience, 0.01
    while True:
        try:
            return action()
        except sqlite3.OperationalError as e:
            if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def default_cache_dir() -> Path:
    """`$PREFGYM_HOME/cache`, or `~/.cache/prefgym` (never inside the installed package)."""
    home = os.environ.get("PREFGYM_HOME")
    return Path(home) / "cache" if home else Path.home() / ".cache" / "prefgym"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class AnnotationCache:
    """Judge answers keyed by a hash of the judge config and the example (as shown).

    One object per run: it owns the claims it makes (`owner`), and may be used from several
    threads (every statement holds a lock).
    """

    FIELDS = ("preference", "error", "prompt_tokens", "completion_tokens", "price", "seconds", "raw")

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.path = Path(cache_dir or default_cache_dir()) / "annotations.sqlite"
        self.owner, self.host, self.pid = uuid.uuid4().hex, socket.gethostname(), os.getpid()
        self._lock = threading.RLock()
        self._last_heartbeat = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are opened explicitly (BEGIN IMMEDIATE) below
            self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"{self.path}: cannot open the annotation cache ({e}); "
                              "pass another --cache-dir or set PREFGYM_HOME") from None
        try:
            self._initialise()
        except sqlite3.Error as e:
            self.conn.close()
            raise self._error(e) from None

    def _initialise(self, patience: float = 60.0) -> None:
        """WAL mode and the tables. Several processes may open a new cache at once: switching to
        WAL and creating tables can fail at once with "database is locked" (SQLite does not wait
        where waiting could deadlock), so retry those for up to `patience` seconds; the schema
        is created under BEGIN IMMEDIATE, which waits for the write lock instead."""
        def setup():
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # durable against process death in WAL mode
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self.conn.execute(statement)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

        _retry_while_locked(setup, patience)
        self.conn.execute(f"SELECT key, judge, {', '.join(self.FIELDS)} FROM annotations LIMIT 1").fetchall()

    def _error(self, e: Exception) -> DataError:
        return DataError(f"the annotation cache cannot be used ({e}); move the file away or pass another "
                         "--cache-dir", path=self.path)

    @contextmanager
    def _transaction(self):
        """A write transaction that holds the database lock from its start (BEGIN IMMEDIATE)."""
        with self._lock:
            try:
                _retry_while_locked(lambda: self.conn.execute("BEGIN IMMEDIATE"))
            except sqlite3.Error as e:
                raise self._error(e) from None
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as e:
                self.conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise self._error(e) from None
                raise

    def _select(self, table: str, fields: tuple[str, ...], keys: list[str]) -> dict[str, tuple]:
        out = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            rows = self.conn.execute(f"SELECT key, {', '.join(fields)} FROM {table} "
                                     f"WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
            out.update((row[0], row[1:]) for row in rows)
        return out

    def _answers(self, keys: list[str], with_raw: bool) -> dict[str, dict]:
        fields = self.FIELDS if with_raw else self.FIELDS[:-1]
        out = {}
        for key, row in self._select("annotations", fields, keys).items():
            d = dict(zip(fields, row))
            if with_raw:
                d["raw"] = json.loads(d["raw"]) if d["raw"] else None
            out[key] = d
        return out

    def get_many(self, keys: list[str], with_raw: bool = False) -> dict[str, dict]:
        """The stored answers among `keys` (with the raw completion details if `with_raw`)."""
        with self._lock:
            try:
                return self._answers(keys, with_raw)
            except (sqlite3.Error, ValueError) as e:
                raise self._error(e) from None

    def put_many(self, entries: list[tuple[str, str, dict]]) -> None:
        """Store (key, judge name, answer) entries and drop this run's claims on them, in one transaction."""
        if not entries:
            return
        with self._transaction() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO annotations (key, judge, {', '.join(self.FIELDS)}) "
                f"VALUES (?, ?, {', '.join('?' * len(self.FIELDS))})",
                [(k, judge, *(json.dumps(v[f]) if f == "raw" and v[f] is not None else v[f] for f in self.FIELDS))
                 for k, judge, v in entries])
            conn.executemany("DELETE FROM claims WHERE key = ? AND owner = ?", [(k, self.owner) for k, _, _ in entries])

    def claim(self, keys: list[str]) -> tuple[list[str], dict[str, dict], list[str]]:
        """Claim the unanswered `keys` for this run, in one transaction.

        Returns (claimed by this run now, in the order of `keys`; answers already stored; claimed
        by another run that is still alive). A claim of a dead or silent run is taken over.
        """
        now = time.time()
        with self._transaction():
            stored = self._answers(keys, with_raw=False)
            rest = [k for k in keys if k not in stored]
            holders = self._select("claims", ("owner", "host", "pid", "heartbeat"), rest)
            busy = {k for k in rest
                    if k in holders and holders[k][0] != self.owner and self._alive(*holders[k][1:], now)}
            taken = [k for k in rest if k in busy]
            mine = [k for k in rest if k not in busy]
            self.conn.executemany("INSERT OR REPLACE INTO claims (key, owner, host, pid, heartbeat) "
                                  "VALUES (?, ?, ?, ?, ?)", [(k, self.owner, self.host, self.pid, now) for k in mine])
        return mine, stored, taken

    def _alive(self, host: str, pid: int, heartbeat: float, now: float) -> bool:
        if now - heartbeat > STALE_SECONDS:
            return False
        return pid_alive(pid) if host == self.host else True

    def heartbeat(self) -> None:
        """Tell other runs that this run's claims are still being worked on (at most every
        HEARTBEAT_SECONDS / 2; call it as often as convenient)."""
        now = time.time()
        if now - self._last_heartbeat < HEARTBEAT_SECONDS / 2:
            return
        self._last_heartbeat = now
        with self._transaction() as conn:
            conn.execute("UPDATE claims SET heartbeat = ? WHERE owner = ?", (now, self.owner))

    def release(self, keys: list[str] | None = None) -> None:
        """Give up this run's claims on `keys` (all of them if None), e.g. after a failed call."""
        with self._transaction() as conn:
            if keys is None:
                conn.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))
            else:
                conn.executemany("DELETE FROM claims WHERE key = ? AND owner = ?", [(k, self.owner) for k in keys])

    def __len__(self) -> int:
        with self._lock:
            return self.conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self.conn.close()
