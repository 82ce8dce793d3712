"""The human side's database: SQLite (stdlib `sqlite3`) in WAL mode with synchronous=FULL.

Every acknowledged write is committed before the reply leaves the server, and a transaction is
atomic, so a crash (kill -9, power loss) can never leave a torn record: a restart sees exactly the
labels and votes that were acknowledged. One file holds everything either app needs:

- `tokens`: access tokens, stored as SHA-256 hashes (a token is 32 random bytes, so a plain hash is
  enough), with a name and a role (`labeler` or `voter`);
- `pairs` and `labels`: the pairs to label and one row per (pair, labeler);
- `outputs`, `dealt` and `battles`: model outputs, the battle dealt to each voter, and the votes;
- `meta`: the server secret that signs CSRF tokens and page tickets (so they survive restarts).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import sys
import threading
import time
from pathlib import Path

from prefgym.errors import DataError

ROLES = ("labeler", "voter")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, created REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, UNIQUE (name, role));
CREATE TABLE IF NOT EXISTS pairs (
    idx INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, pair_idx INTEGER NOT NULL REFERENCES pairs(idx), labeler TEXT NOT NULL,
    preference REAL NOT NULL, time_per_example REAL, page_version TEXT NOT NULL, tstamp REAL NOT NULL,
    idempotency_key TEXT UNIQUE, UNIQUE (pair_idx, labeler));
CREATE TABLE IF NOT EXISTS outputs (
    id INTEGER PRIMARY KEY, instruction TEXT NOT NULL, input TEXT NOT NULL, generator TEXT NOT NULL,
    output TEXT NOT NULL, UNIQUE (instruction, input, generator));
CREATE TABLE IF NOT EXISTS dealt (
    judge TEXT NOT NULL, number INTEGER NOT NULL, instruction TEXT NOT NULL, input TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, PRIMARY KEY (judge, number));
CREATE TABLE IF NOT EXISTS battles (
    id INTEGER PRIMARY KEY, judge TEXT NOT NULL, number INTEGER NOT NULL, model_a TEXT NOT NULL,
    model_b TEXT NOT NULL, winner TEXT NOT NULL, instruction TEXT NOT NULL, input TEXT NOT NULL,
    tstamp REAL NOT NULL, idempotency_key TEXT UNIQUE, UNIQUE (judge, number));
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Store:
    """One SQLite connection shared by the server's threads behind a lock (SQLite serialises
    writers anyway); each method is one transaction, committed before it returns."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DataError(f"not a prefgym database ({e})", path=self.path) from None
        self.db.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        self.secret = self._secret()

    def close(self) -> None:
        self.db.close()

    def tx(self):
        """`with store.tx():` one transaction under the lock (BEGIN IMMEDIATE ... COMMIT)."""
        return _Transaction(self)

    def query(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def _secret(self) -> bytes:
        with self.tx():
            row = self.db.execute("SELECT value FROM meta WHERE key='secret'").fetchone()
            if row is None:
                value = secrets.token_hex(32)
                self.db.execute("INSERT INTO meta VALUES ('secret', ?)", (value,))
                return bytes.fromhex(value)
        return bytes.fromhex(row["value"])

    # --- tokens ---------------------------------------------------------------------------------

    def create_token(self, name: str, role: str) -> str:
        """A new access token for `name` (raises ValueError if `name` already has a live one)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        token = new_token()
        with self.tx():
            live = self.db.execute("SELECT revoked FROM tokens WHERE name=? AND role=?", (name, role)).fetchone()
            if live is not None and not live["revoked"]:
                raise ValueError(f"{role} {name!r} already has a token; revoke it first")
            self.db.execute("DELETE FROM tokens WHERE name=? AND role=?", (name, role))
            self.db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, 0)", (hash_token(token), name, role, time.time()))
        return token

    def revoke_token(self, name: str, role: str) -> bool:
        with self.tx():
            return self.db.execute("UPDATE tokens SET revoked=1 WHERE name=? AND role=? AND revoked=0",
                                   (name, role)).rowcount > 0

    def who(self, token_hash: str, role: str) -> str | None:
        """The name behind a live token of `role`, or None."""
        rows = self.query("SELECT name FROM tokens WHERE hash=? AND role=? AND revoked=0", (token_hash, role))
        return rows[0]["name"] if rows else None

    def names(self, role: str) -> list[str]:
        return [r["name"] for r in self.query("SELECT name FROM tokens WHERE role=? AND revoked=0 ORDER BY name",
                                              (role,))]

    # --- pairs and labels -----------------------------------------------------------------------

    def add_pairs(self, pairs: list[dict]) -> int:
        """Add pairs not already present (keyed on instruction, input and both outputs), numbered on from
        0 in the given order; returns how many."""
        from prefgym.annotators.annotate import example_key

        added = 0
        with self.tx():
            idx = self.db.execute("SELECT coalesce(max(idx) + 1, 0) FROM pairs").fetchone()[0]
            for p in pairs:
                key = example_key(p["instruction"], p.get("input") or "", p["output_1"], p["output_2"])
                if self.db.execute("SELECT 1 FROM pairs WHERE key=?", (key,)).fetchone() is None:
                    self.db.execute("INSERT INTO pairs VALUES (?, ?, ?)",
                                    (idx + added, key, json.dumps(p, ensure_ascii=False)))
                    added += 1
        return added

    def n_pairs(self) -> int:
        return self.query("SELECT count(*) AS n FROM pairs")[0]["n"]

    def pair(self, idx: int) -> dict | None:
        rows = self.query("SELECT record FROM pairs WHERE idx=?", (idx,))
        return json.loads(rows[0]["record"]) if rows else None

    def open_pair(self, labeler: str, labels_per_pair: int) -> int | None:
        """The pair with the fewest labels (then the lowest index) that `labeler` has not labelled
        and that still needs labels."""
        rows = self.query(
            "SELECT p.idx FROM pairs p LEFT JOIN labels l ON l.pair_idx = p.idx GROUP BY p.idx "
            "HAVING count(l.id) < ? AND coalesce(sum(l.labeler = ?), 0) = 0 ORDER BY count(l.id), p.idx LIMIT 1",
            (labels_per_pair, labeler))
        return rows[0]["idx"] if rows else None

    def label_counts(self, labeler: str) -> tuple[int, int]:
        row = self.query("SELECT count(*) AS n, coalesce(sum(labeler = ?), 0) AS mine FROM labels", (labeler,))[0]
        return row["n"], row["mine"]

    def label_row(self, where: str, args) -> sqlite3.Row | None:
        rows = self.query(f"SELECT * FROM labels WHERE {where}", args)
        return rows[0] if rows else None

    def labels(self) -> list[sqlite3.Row]:
        return self.query("SELECT l.*, p.record FROM labels l JOIN pairs p ON p.idx = l.pair_idx ORDER BY l.id")

    # --- outputs, dealt battles and votes -------------------------------------------------------

    def add_outputs(self, records: list[dict]) -> int:
        with self.tx():
            before = self.db.total_changes
            self.db.executemany(
                "INSERT OR REPLACE INTO outputs (instruction, input, generator, output) VALUES (?, ?, ?, ?)",
                [(r["instruction"], r.get("input") or "", r["generator"], r["output"]) for r in records])
            return self.db.total_changes - before

    def outputs(self) -> list[sqlite3.Row]:
        return self.query("SELECT instruction, input, generator, output FROM outputs ORDER BY id")

    def battles(self) -> list[dict]:
        return [dict(r) for r in self.query(
            "SELECT model_a, model_b, winner, instruction, input, judge, tstamp FROM battles ORDER BY id")]

    def battles_version(self) -> tuple[int, int]:
        """Changes whenever a vote is stored: (number of battles, last battle id)."""
        row = self.query("SELECT count(*) AS n, coalesce(max(id), 0) AS last FROM battles")[0]
        return row["n"], row["last"]


class _Transaction:
    def __init__(self, store: Store):
        self.store = store

    def __enter__(self):
        self.store.lock.acquire()
        try:
            self.store.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store.lock.release()
            raise
        return self.store.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.store.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.store.lock.release()
        return False


def read_jsonl_tolerant(path) -> list[dict]:
    """Rows of an old JSON Lines file. A torn (unparseable) last line, as a crash mid-append
    leaves, is skipped with a warning on stderr; a bad line elsewhere is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {e.start})", path=path) from None
    numbered = [(i, line) for i, line in enumerate(lines) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(numbered) - 1:
                print(f"warning: {path}: line {i + 1} is torn (an interrupted write); skipped", file=sys.stderr)
                break
            raise DataError(f"invalid JSON on line {i + 1}: {e.msg}", path=path, row=len(rows)) from None
        if not isinstance(row, dict):
            raise DataError(f"line {i + 1} is not a JSON object", path=path, row=len(rows))
        rows.append(row)
    return rows
