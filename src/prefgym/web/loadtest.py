"""A load test of the arena on loopback: clients vote against a real uvicorn server in a
subprocess, the server is killed with SIGKILL mid-way and restarted on the same database, and the
clients retry until each vote is acknowledged (with an idempotency key per vote, so a retry of a
vote that was stored but whose reply was lost is not counted twice).

Used by `bench/bench_web_load.py` and the tests; stdlib only on the client side (http.client).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

VOTES = ("a", "b", "tie", "bothbad")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_outputs(folder: Path, n_generators: int = 4, n_instructions: int = 20) -> list[Path]:
    paths = []
    for g in range(n_generators):
        path = folder / f"gen{g}.json"
        path.write_text(json.dumps([{"instruction": f"Task {i}", "input": "", "output": f"gen{g} answer {i}",
                                     "generator": f"gen{g}"} for i in range(n_instructions)]), encoding="utf-8")
        paths.append(path)
    return paths


class Server:
    """`python -c ...` running the arena on `db`; start() waits until it answers."""

    def __init__(self, db: Path, outputs: list[Path], admin_token: str, port: int):
        self.db, self.outputs, self.admin_token, self.port = db, outputs, admin_token, port
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        code = ("import os, sys, uvicorn; from prefgym.web.app import arena_app; "
                "uvicorn.run(arena_app(sys.argv[1], sys.argv[3:], admin_token=sys.argv[2]), host='127.0.0.1', "
                "port=int(os.environ['PREFGYM_LOAD_PORT']), log_level='warning')")
        env = dict(os.environ, PREFGYM_LOAD_PORT=str(self.port), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.db), self.admin_token,
                                      *map(str, self.outputs)], env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError("the server did not answer in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class Voter(threading.Thread):
    """Votes `n_votes` times: GET /api/battle, then POST /api/vote with an idempotency key, each
    retried (same key) on connection errors and 5xx until acknowledged."""

    def __init__(self, port: int, name: str, token: str, n_votes: int, on_ack, deadline: float):
        super().__init__(daemon=True)
        self.port, self.name, self.token, self.n_votes = port, name, token, n_votes
        self.on_ack, self.deadline = on_ack, deadline
        self.acked: dict[str, str] = {}  # idempotency key -> vote
        self.latencies: list[float] = []
        self.retries = 0
        self.error: str | None = None
        self.conn: http.client.HTTPConnection | None = None

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, float]:
        while True:
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"{self.name}: out of time")
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                data = json.dumps(body).encode() if body is not None else None
                headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
                start = time.perf_counter()
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                payload = json.loads(response.read() or b"null")
                if response.status < 500:
                    return response.status, payload, time.perf_counter() - start
            except (OSError, http.client.HTTPException, json.JSONDecodeError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
            self.retries += 1
            time.sleep(0.05)

    def run(self) -> None:
        try:
            for n in range(self.n_votes):
                status, battle, _ = self._call("GET", "/api/battle")
                if status != 200 or battle["battle"] != n:
                    raise AssertionError(f"{self.name}: battle {battle} at vote {n} (status {status})")
                key, vote = f"{self.name}-{n}", VOTES[(n * 7 + len(self.name)) % len(VOTES)]
                status, row, seconds = self._call("POST", "/api/vote", {"battle": n, "vote": vote,
                                                                        "idempotency_key": key})
                if status != 200:
                    raise AssertionError(f"{self.name}: vote {n} refused with {status}: {row}")
                self.acked[key] = vote
                self.latencies.append(seconds)
                self.on_ack()
        except Exception as e:  # reported by the driver
            self.error = f"{type(e).__name__}: {e}"


def run_load(folder: Path, n_clients: int = 20, n_votes: int = 500, kill_at: float = 0.5,
             timeout: float = 600.0) -> dict:
    """Run the load test in `folder`; returns the figures and the checks' results."""
    from prefgym.web.store import Store

    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "arena.sqlite"
    outputs = make_outputs(folder)
    store = Store(db)
    tokens = {f"voter{i:02d}": store.create_token(f"voter{i:02d}", "voter") for i in range(n_clients)}
    store.close()
    server = Server(db, outputs, "load-test-admin-token-000000", free_port())
    server.start()
    total, kill_after = n_clients * n_votes, int(n_clients * n_votes * kill_at)
    acked = [0]
    lock, kill_now = threading.Lock(), threading.Event()

    def on_ack():
        with lock:
            acked[0] += 1
            if acked[0] == kill_after:
                kill_now.set()

    deadline = time.monotonic() + timeout
    voters = [Voter(server.port, name, token, n_votes, on_ack, deadline) for name, token in tokens.items()]
    start = time.perf_counter()
    for v in voters:
        v.start()
    killed_at, downtime = None, 0.0
    try:
        if kill_at and kill_now.wait(timeout=timeout):
            killed_at, down = acked[0], time.perf_counter()
            server.kill()
            server.start()
            downtime = time.perf_counter() - down
        for v in voters:
            v.join(timeout=max(1.0, deadline - time.monotonic()))
        wall = time.perf_counter() - start
    finally:
        server.kill()
    errors = [v.error for v in voters if v.error] + [f"{v.name}: still running" for v in voters if v.is_alive()]
    acknowledged = {k: vote for v in voters for k, vote in v.acked.items()}
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT idempotency_key, winner FROM battles").fetchall()
    keys = [k for k, _ in stored]
    winners = dict(stored)
    from prefgym.web.app import ARENA_VOTES

    lost = [k for k in acknowledged if k not in winners]
    wrong = [k for k, vote in acknowledged.items() if k in winners and winners[k] != ARENA_VOTES[vote]]
    latencies = sorted(x for v in voters for x in v.latencies)
    p = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None
    return {"clients": n_clients, "votes_per_client": n_votes, "wanted": total, "acknowledged": len(acknowledged),
            "stored": len(stored), "stored_distinct_keys": len(set(keys)), "lost": len(lost), "wrong": len(wrong),
            "killed_after_acks": killed_at, "retries": sum(v.retries for v in voters), "errors": errors,
            "wall_s": round(wall, 2), "restart_s": round(downtime, 2),
            "votes_per_s": round(len(acknowledged) / (wall - downtime), 1),
            "p50_ms": p(0.50), "p95_ms": p(0.95), "p99_ms": p(0.99)}
