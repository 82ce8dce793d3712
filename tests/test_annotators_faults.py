"""Judges behind a faulty OpenAI-compatible server: every malformed reply is a retried failure of
its example, every answer received is stored before anything else can fail, every row ends
labelled or with its error, concurrent runs pay once per prompt, errors name their file, and the
API key is written nowhere."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prefgym.annotators import annotate_pairs
from prefgym.annotators.cache import AnnotationCache
from prefgym.errors import DataError, PrefgymError

sys.path.insert(0, str(Path(__file__).parent))
from test_annotators_fakeapi import (MALFORMED, FakeOpenAI, expected_preference, ids_count,  # noqa: E402
                                     judge_config, make_fake_pairs, pool_file)

SECRET = "sk-test-FAULTS-0987654321"
FAST = {"retry_backoff": 0.001}  # seconds before the first retry (doubled each time)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("FAKE_API_KEY", SECRET)


def stored_ids(cache_dir: Path, pairs: list[dict]) -> dict[str, float | None]:
    """Example id -> stored preference (as shown), read straight from the SQLite file."""
    from prefgym.annotators.annotate import example_key

    by_key = {example_key(p["instruction"], "", p["output_1"], p["output_2"]): p["instruction"] for p in pairs}
    con = sqlite3.connect(cache_dir / "annotations.sqlite")
    rows = con.execute("SELECT key, preference FROM annotations").fetchall()
    con.close()
    return {by_key[k.split(":")[1]]: p for k, p in rows}


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize("fault", MALFORMED + ("500", "429", "timeout"))
def test_each_fault_is_retried_for_its_example_only(tmp_path, fault):
    pairs = make_fake_pairs(6, faults={3: f"{fault}x2"})
    with FakeOpenAI(slow_seconds=1.0) as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, timeout=0.3, max_retries=3, **FAST))
        stats = {}
        rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "c", progress=False, stats=stats)
    assert [r["preference"] for r in rows] == [expected_preference(i) for i in range(6)]
    assert all("error" not in r for r in rows)
    bad = pairs[3]["instruction"]
    assert ids_count(api.attempts)[bad] == 3  # two faults, then the answer
    assert ids_count(api.requests) == {p["instruction"]: 1 for p in pairs}  # each answered once
    assert api.faults[fault] == 2


def test_failure_after_retries_keeps_its_row_with_the_error_and_a_rerun_asks_only_it(tmp_path):
    pairs = make_fake_pairs(8, faults={2: "badjsonx99", 5: "wrongtypex99"})
    with FakeOpenAI() as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, max_retries=2, **FAST))
        rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "c", progress=False)
        for i, r in enumerate(rows):
            if i in (2, 5):
                assert r["preference"] is None and r["error"].startswith("api error: malformed reply"), r
                assert ids_count(api.attempts)[pairs[i]["instruction"]] == 3  # 1 + max_retries
            else:
                assert r["preference"] == expected_preference(i) and "error" not in r
        assert "not valid JSON" in rows[2]["error"] and "choices" in rows[5]["error"]
        # the six answers are stored, the two failures are not (a rerun asks again)
        answered = {p["instruction"] for i, p in enumerate(pairs) if i not in (2, 5)}
        assert set(stored_ids(tmp_path / "c", pairs)) == answered
        before = len(api.attempts)
        stats = {}
        annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "c", progress=False, stats=stats)
        assert stats["n_called"] == 2 and stats["n_cached"] == 6
        assert ids_count(api.attempts[before:]).keys() == {pairs[2]["instruction"], pairs[5]["instruction"]}


def test_answers_received_before_a_fatal_error_are_stored(tmp_path):
    # 4 calls in flight; the 403 of example 9 stops the run while other calls are still answering:
    # every answer the server gave must be in the cache (a rerun would pay for it otherwise).
    pairs = make_fake_pairs(24, faults={9: "deniedx1"})
    with FakeOpenAI(latency=0.15) as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, concurrency=4, **FAST))
        with pytest.raises(PrefgymError, match="refused"):
            annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "c", progress=False)
        answered = set(ids_count(api.requests))
    assert answered and answered <= set(stored_ids(tmp_path / "c", pairs))
    # nothing is left claimed: the next run starts at once
    con = sqlite3.connect(tmp_path / "c" / "annotations.sqlite")
    assert con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    con.close()


def test_30_percent_faults_every_row_labelled_each_prompt_answered_once(tmp_path):
    n = 60
    pairs = make_fake_pairs(n)
    with FakeOpenAI(fault_rate=0.3, slow_seconds=0.5) as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, concurrency=4, timeout=0.2, max_retries=8, **FAST))
        rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "c", progress=False)
    assert [r["preference"] for r in rows] == [expected_preference(i) for i in range(n)]
    assert sum(api.faults.values()) >= 0.2 * n and len(api.faults) >= 6  # the faults were there
    assert ids_count(api.requests) == {p["instruction"]: 1 for p in pairs}


def test_retry_after_is_honoured(tmp_path):
    pairs = make_fake_pairs(2, faults={0: "429x1"})
    with FakeOpenAI(retry_after=0.4) as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, **FAST))
        rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "c", progress=False)
        t = api.times[pairs[0]["instruction"]]
    assert rows[0]["preference"] == 1.0 and len(t) == 2
    assert t[1] - t[0] >= 0.4


def test_backoff_grows_between_retries(tmp_path):
    pairs = make_fake_pairs(1, faults={0: "emptyx3"})
    with FakeOpenAI() as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, retry_backoff=0.1))
        annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "c", progress=False)
        t = api.times[pairs[0]["instruction"]]
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert len(gaps) == 3
    # waits of about 0.1, 0.2, 0.4 s (with up to 25% jitter below)
    for gap, base in zip(gaps, (0.1, 0.2, 0.4)):
        assert 0.74 * base <= gap <= base + 0.25, gaps


# ---------------------------------------------------------------- several processes

_CHILD = """
import sys, json
sys.path.insert(0, {tests!r})
from prefgym.annotators import annotate_pairs
from test_annotators_fakeapi import make_fake_pairs
stats = {{}}
rows = annotate_pairs(make_fake_pairs({n})[{lo}:{hi}], {cfg!r}, seed=0, cache_dir={cache!r}, progress=False,
                      stats=stats)
print(json.dumps({{"prefs": [r["preference"] for r in rows], "stats": stats}}))
"""


def _child(cfg, n, lo, hi, cache):
    script = _CHILD.format(tests=str(Path(__file__).parent), n=n, lo=lo, hi=hi, cfg=str(cfg), cache=str(cache))
    env = dict(os.environ, FAKE_API_KEY=SECRET, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("n", [60, pytest.param(300, marks=pytest.mark.slow)])
def test_two_processes_on_overlapping_pairs_pay_once_per_prompt(tmp_path, n):
    ranges = [(0, 2 * n // 3), (n // 3, n)]  # a third of the pairs in common
    with FakeOpenAI(latency=0.02, fault_rate=0.3, slow_seconds=0.5) as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, batch_size=1, concurrency=3, timeout=0.2,
                                               max_retries=8, **FAST))
        procs = [_child(cfg, n, lo, hi, tmp_path / "cache") for lo, hi in ranges]
        outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    for (lo, hi), res in zip(ranges, results):
        assert res["prefs"] == [expected_preference(i) for i in range(lo, hi)]
    assert sum(api.faults.values()) > 0
    pairs = make_fake_pairs(n)
    assert ids_count(api.requests) == {p["instruction"]: 1 for p in pairs}  # exactly once each
    # the overlap was shared: what one process asked, the other received from the cache
    assert sum(r["stats"]["n_called"] for r in results) == n
    print(f"\n{n} prompts, 2 processes, faults {dict(api.faults)}: {len(api.attempts)} requests, "
          f"answers per prompt {set(ids_count(api.requests).values())}, "
          f"received from the other process {[r['stats']['n_waited'] for r in results]}")


def _learn_cache_keys(tmp_path, api, cfg, pairs) -> list[tuple]:
    """The cache rows (key, judge, preference, ...) a run stores for `pairs` (in a scratch cache)."""
    annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "scratch", progress=False)
    con = sqlite3.connect(tmp_path / "scratch" / "annotations.sqlite")
    rows = con.execute("SELECT * FROM annotations").fetchall()
    con.close()
    return rows


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claims_of_a_dead_or_silent_process_are_taken_over(tmp_path, monkeypatch):
    pairs = make_fake_pairs(4)
    with FakeOpenAI() as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, **FAST))
        keys = [r[0] for r in _learn_cache_keys(tmp_path, api, cfg, pairs)]
        cache = tmp_path / "c"
        dead = AnnotationCache(cache)
        dead.pid = _dead_pid()  # same host, the process is gone
        assert dead.claim(keys[:2])[0] == keys[:2]
        silent = AnnotationCache(cache)
        silent.host = "another-machine"  # its process cannot be checked: its heartbeat is old
        assert silent.claim(keys[2:])[0] == keys[2:]
        silent.conn.execute("UPDATE claims SET heartbeat = heartbeat - 1000 WHERE owner = ?", (silent.owner,))
        before = len(api.requests)
        t0 = time.monotonic()
        rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=cache, progress=False)
        assert time.monotonic() - t0 < 5
        assert [r["preference"] for r in rows] == [expected_preference(i) for i in range(4)]
        assert len(api.requests) - before == 4


def test_claims_of_a_run_killed_with_sigkill_are_taken_over_at_once(tmp_path):
    n = 40
    with FakeOpenAI(latency=0.1) as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, concurrency=2, **FAST))
        proc = _child(cfg, n, 0, n, tmp_path / "cache")
        deadline = time.time() + 60
        while len(api.requests) < 6 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.2)  # not reaped yet: a zombie, which must count as gone
        con = sqlite3.connect(tmp_path / "cache" / "annotations.sqlite")
        assert con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] > 0  # it left claims behind
        con.close()
        t0 = time.monotonic()
        rows = annotate_pairs(make_fake_pairs(n), cfg, seed=0, cache_dir=tmp_path / "cache", progress=False)
        assert time.monotonic() - t0 < 10  # not STALE_SECONDS
        proc.wait()
    assert [r["preference"] for r in rows] == [expected_preference(i) for i in range(n)]
    # paid twice: at most the 2 calls in flight when it was killed (answers it never received)
    twice = [i for i, c in ids_count(api.requests).items() if c > 1]
    assert len(twice) <= 2 and max(ids_count(api.requests).values()) <= 2


def test_a_live_claim_is_waited_for_not_paid_again(tmp_path):
    pairs = make_fake_pairs(4)
    with FakeOpenAI() as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, **FAST))
        learned = _learn_cache_keys(tmp_path, api, cfg, pairs)
        cache = tmp_path / "c"
        other = AnnotationCache(cache)  # another run, alive, answering keys 0 and 1
        other.pid = os.getppid()
        mine = {r[0] for r in learned[:2]}
        assert set(other.claim(sorted(mine))[0]) == mine

        def answer_later():
            time.sleep(0.6)
            fields = ", ".join("?" * len(learned[0]))
            with sqlite3.connect(cache / "annotations.sqlite") as con:
                con.executemany(f"INSERT INTO annotations VALUES ({fields})", learned[:2])
                con.execute("DELETE FROM claims")

        before = len(api.requests)
        thread = threading.Thread(target=answer_later)
        thread.start()
        stats = {}
        rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=cache, progress=False, stats=stats)
        thread.join()
        assert [r["preference"] for r in rows] == [expected_preference(i) for i in range(4)]
        assert len(api.requests) - before == 2  # only the two unclaimed examples were asked
        assert stats["n_waited"] == 2 and stats["n_called"] == 2


# ---------------------------------------------------------------- command line, files, secrets


def test_cli_exits_non_zero_with_a_count_and_writes_failed_rows(tmp_path, capsys):
    from prefgym.cli import main

    src = tmp_path / "pairs.json"
    src.write_text(json.dumps(make_fake_pairs(5, faults={1: "500x99", 3: "nochoicesx99"})))
    out = tmp_path / "out.json"
    with FakeOpenAI() as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, max_retries=1, **FAST))
        args = ["annotate", str(src), "--annotators", str(cfg), "--out", str(out),
                "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and "2 of 5 rows have no label" in err and str(out) in err
        rows = json.loads(out.read_text())
        assert [r["preference"] is None for r in rows] == [False, True, False, True, False]
        assert "InternalServerError" in rows[1]["error"] and "choices" in rows[3]["error"]
        assert main(args + ["--allow-missing"]) == 0  # a warning, not a failure, when asked


def test_errors_name_the_input_cache_and_config_files(tmp_path, capsys):
    from prefgym.cli import main

    src = tmp_path / "pairs.json"
    src.write_text(json.dumps([{"instruction": "a", "output_1": "x", "output_2": 3}]))
    rc = main(["annotate", str(src), "--annotators", "world_greedy", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and str(src) in err and "row 0" in err and "output_2" in err

    with pytest.raises(DataError, match=r"pairs\.json.*row 0.*output_2"):
        annotate_pairs(json.loads(src.read_text()), "world_greedy", cache_dir=tmp_path / "c", progress=False,
                       source=src)

    bad_cache = tmp_path / "broken"
    bad_cache.mkdir()
    (bad_cache / "annotations.sqlite").write_bytes(b"this is not a database" * 100)
    src.write_text(json.dumps(make_fake_pairs(2)))
    rc = main(["annotate", str(src), "--annotators", "world_greedy", "--cache-dir", str(bad_cache)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad_cache / "annotations.sqlite") in err and "Traceback" not in err

    cfg = tmp_path / "judge.yaml"
    cfg.write_text("judges: {j: {fn_completions: openai_chat, prompt_template: '{instruction}', "
                   "completions_kwargs: {model_name: m, api_key_env: FAKE_API_KEY, retry_backof: 1}}}")
    rc = main(["annotate", str(src), "--annotators", str(cfg), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and str(cfg) in err and "retry_backof" in err


def test_api_key_reaches_no_file_log_or_message(tmp_path, capsys, caplog):
    from prefgym.cli import main

    caplog.set_level(logging.DEBUG)
    src = tmp_path / "pairs.json"
    src.write_text(json.dumps(make_fake_pairs(6, faults={1: "echokeyx99", 2: "badjsonx1", 4: "500x1"})))
    out = tmp_path / "out.json"
    with FakeOpenAI() as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, max_retries=1, **FAST))
        rc = main(["annotate", str(src), "--annotators", str(cfg), "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--allow-missing"])
        assert rc == 0
        rows = json.loads(out.read_text())
        assert rows[1]["preference"] is None and "BadRequestError" in rows[1]["error"]
        assert "***" in rows[1]["error"]  # the server repeated the key; prefgym masked it
        # a refused request whose message repeats the key
        denied = pool_file(tmp_path, judge_config(api.base_url, **FAST), name="denied")
        with pytest.raises(PrefgymError) as info:
            annotate_pairs(make_fake_pairs(1, prefix="d", faults={0: "deniedx1"}), denied,
                           cache_dir=tmp_path / "cache", progress=False)
        assert SECRET not in str(info.value)
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert SECRET not in caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.startswith("annotations.sqlite") for p in written)
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from prefgym.annotators.cache import AnnotationCache
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
cache = AnnotationCache(sys.argv[1])
cache.put_many([(f"k{sys.argv[3]}", "judge", {"preference": 1.0, "error": None, "prompt_tokens": 1.0,
                 "completion_tokens": 1.0, "price": 0.0, "seconds": 0.0, "raw": None})])
cache.close()
"""


def test_many_processes_open_a_new_cache_at_once(tmp_path):
    """Processes that open the same fresh cache in the same instant all get it (switching to WAL
    and creating the tables can fail at once with 'database is locked' unless retried)."""
    import subprocess
    import sys

    for attempt in range(1):
        folder, go = tmp_path / f"cache{attempt}", tmp_path / f"go{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(folder), str(go), str(i)],
                                  stderr=subprocess.PIPE) for i in range(8)]
        time.sleep(1.0)  # all started and waiting
        go.touch()
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), [e.decode()[-300:] for e in errors if e]
        from prefgym.annotators.cache import AnnotationCache

        assert len(AnnotationCache(folder)) == 8


def test_locked_database_is_retried_and_other_errors_are_not(monkeypatch):
    from prefgym.annotators import cache as cache_module

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert cache_module._retry_while_locked(flaky, patience=5) == "ok" and len(calls) == 3

    def broken():
        calls.append(1)
        raise sqlite3.OperationalError("no such table: annotations")

    calls.clear()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        cache_module._retry_while_locked(broken, patience=5)
    assert len(calls) == 1  # not a lock: raised at once

    def always_locked():
        raise sqlite3.OperationalError("database is locked")

    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        cache_module._retry_while_locked(always_locked, patience=0.2)
    assert time.monotonic() - start < 2  # gives up after its patience
