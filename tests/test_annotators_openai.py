"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 (faults included), the
durable cache under SIGKILL and two processes, and the local Hugging Face logprob judge."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from prefgym.annotators import annotate_pairs
from prefgym.annotators.annotate import example_key
from prefgym.errors import ConfigError, PrefgymError

sys.path.insert(0, str(Path(__file__).parent))
from test_annotators_fakeapi import (FakeOpenAI, expected_preference, ids_count, judge_config,  # noqa: E402
                                     make_fake_pairs, pool_file)

SECRET = "sk-test-SECRET-1234567890"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("FAKE_API_KEY", SECRET)


@pytest.fixture
def api():
    with FakeOpenAI() as server:
        yield server


def test_batch_of_5_with_faults_only_failing_items_retried_alone(api, tmp_path):
    faults = {2: "429x2", 7: "500x1", 11: "garbagex1", 16: "wrongcount", 21: "garbage-always", 23: "truncx1"}
    pairs = make_fake_pairs(25, faults=faults)
    cfg = pool_file(tmp_path, judge_config(api.base_url, batch_size=5))
    stats = {}
    rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "cache", progress=False, stats=stats)
    assert len(rows) == 25
    for i, r in enumerate(rows):
        if i == 21:
            assert r["preference"] is None and "expected 1 answers, parsed 0" in r["error"]
        else:
            assert r["preference"] == expected_preference(i), (i, r)
    n = ids_count(api.requests)
    ids = [p["instruction"] for p in pairs]
    # 429x2 / 500x1: retried by the client, answered once.
    assert ids_count(api.attempts)[ids[2]] == 3 and n[ids[2]] == 1
    assert ids_count(api.attempts)[ids[7]] == 2 and n[ids[7]] == 1
    # A garbage / truncated / short batch: each of its examples asked again alone, once.
    singles = Counter(req[0] for req in api.requests if len(req) == 1)
    for bad in (11, 16, 23):
        batch = next(req for req in api.requests if ids[bad] in req and len(req) > 1)
        assert all(singles[i] == 1 for i in batch)
    assert n[ids[21]] == 2  # in its batch, then once alone (max_parse_retries=1), then reported
    untouched = [i for i in ids if not any(i in req for req in api.requests if len(req) == 1)]
    assert all(n[i] == 1 for i in untouched) and untouched
    # prompt tokens: counted by the server (words); each example pays its share of its calls
    r0 = rows[0]
    assert r0["price_per_example"] == pytest.approx(r0["prompt_tokens_per_example"] * 1e-5
                                                    + r0["completion_tokens_per_example"] * 3e-5)
    # rerun: everything (including the unparsable row) comes from the cache
    before = len(api.attempts)
    again = annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "cache", progress=False, stats=stats)
    assert len(api.attempts) == before and stats["n_calls"] == 0
    assert [r["preference"] for r in again] == [r["preference"] for r in rows]


def test_timeout_retried_and_api_errors_kept_not_cached(api, tmp_path):
    pairs = make_fake_pairs(6, faults={1: "timeoutx1", 4: "500x99"})
    cfg = pool_file(tmp_path, judge_config(api.base_url, batch_size=1, timeout=0.5, max_retries=2))
    t0 = time.time()
    rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "c", progress=False)
    assert time.time() - t0 < 10
    assert rows[1]["preference"] == expected_preference(1)
    assert rows[4]["preference"] is None and rows[4]["error"].startswith("api error: InternalServerError")
    assert ids_count(api.attempts)[pairs[4]["instruction"]] == 3  # 1 + max_retries
    stats = {}
    annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path / "c", progress=False, stats=stats)
    assert stats["n_called"] == 1  # only the failed call is made again


@pytest.mark.parametrize("chat", [True, False])
def test_logprob_judge_chat_and_completions(api, tmp_path, chat):
    pairs = make_fake_pairs(10)
    cfg = pool_file(tmp_path, judge_config(api.base_url, parser="logprob_parser", chat=chat))
    rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=tmp_path, progress=False)
    # The server puts P = 0.8 on the better output's letter; the parser normalises over a and b.
    for i, r in enumerate(rows):
        assert r["preference"] == pytest.approx(1.2 if expected_preference(i) == 1 else 1.8, abs=1e-9)


def test_json_and_swap_back_through_the_server(api, tmp_path):
    pairs = make_fake_pairs(20)
    cfg = judge_config(api.base_url, parser="regex_parser")
    rows = annotate_pairs(pairs, pool_file(tmp_path, cfg), seed=5, cache_dir=tmp_path, progress=False)
    assert [r["preference"] for r in rows] == [expected_preference(i) for i in range(20)]
    # some prompts showed the outputs swapped: the server saw GOOD second for an even example
    swapped = [req for req in api.requests if int(req[0][2:]) % 2 == 0]
    assert swapped


def test_missing_key_and_refused_requests(api, tmp_path, monkeypatch):
    cfg = pool_file(tmp_path, judge_config(api.base_url))
    monkeypatch.delenv("FAKE_API_KEY")
    with pytest.raises(ConfigError, match="FAKE_API_KEY"):
        annotate_pairs(make_fake_pairs(2), cfg, cache_dir=tmp_path, progress=False)
    monkeypatch.setenv("FAKE_API_KEY", SECRET)
    bad = pool_file(tmp_path, judge_config(api.base_url.replace("/v1", "/nope")), name="bad")
    with pytest.raises(PrefgymError, match="refused"):
        annotate_pairs(make_fake_pairs(2), bad, cache_dir=tmp_path, progress=False)


def test_secret_never_written(api, tmp_path):
    cfg = pool_file(tmp_path, judge_config(api.base_url, batch_size=5))
    rows = annotate_pairs(make_fake_pairs(10), cfg, cache_dir=tmp_path / "cache", progress=False)
    assert SECRET not in json.dumps(rows)
    for f in (tmp_path / "cache").iterdir():
        assert SECRET.encode() not in f.read_bytes()


_CHILD = """
import sys, json
sys.path.insert(0, {tests!r})
from prefgym.annotators import annotate_pairs
from test_annotators_fakeapi import make_fake_pairs
rows = annotate_pairs(make_fake_pairs({n}), {cfg!r}, seed=0, cache_dir={cache!r}, progress=False)
print(json.dumps([r["preference"] for r in rows]))
"""


def _child(tmp_path, cfg, n, cache):
    script = _CHILD.format(tests=str(Path(__file__).parent), n=n, cfg=str(cfg), cache=str(cache))
    env = dict(os.environ, FAKE_API_KEY=SECRET)
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_mid_run_then_rerun_repeats_no_stored_call_and_loses_no_label(tmp_path):
    n = 60
    with FakeOpenAI(latency=0.05) as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, batch_size=1, concurrency=2))
        cache = tmp_path / "cache"
        proc = _child(tmp_path, cfg, n, cache)
        deadline = time.time() + 60
        while len(api.requests) < 20 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        con = sqlite3.connect(cache / "annotations.sqlite")
        stored = {k.split(":")[1]: p for k, p in con.execute("SELECT key, preference FROM annotations")}
        con.close()
        pairs = make_fake_pairs(n)
        key_to_id = {example_key(p["instruction"], "", p["output_1"], p["output_2"]): p["instruction"] for p in pairs}
        stored_ids = {key_to_id[k] for k in stored}
        assert 10 <= len(stored_ids) < n
        before = len(api.requests)
        rows = annotate_pairs(pairs, cfg, seed=0, cache_dir=cache, progress=False)
        rerun_ids = [i for req in api.requests[before:] for i in req]
        assert not set(rerun_ids) & stored_ids  # zero repeated calls for stored rows
        assert len(rerun_ids) == n - len(stored_ids)
        assert [r["preference"] for r in rows] == [expected_preference(i) for i in range(n)]  # zero lost labels


def test_two_processes_share_one_cache(tmp_path):
    with FakeOpenAI(latency=0.01) as api:
        cfg = pool_file(tmp_path, judge_config(api.base_url, batch_size=5, concurrency=2))
        cache = tmp_path / "cache"
        procs = [_child(tmp_path, cfg, 80, cache) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        results = [json.loads(o[0]) for o in outs]
        assert results[0] == results[1] == [expected_preference(i) for i in range(80)]
        con = sqlite3.connect(cache / "annotations.sqlite")
        assert con.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == 80
        con.close()


def test_huggingface_logprob_judge(tmp_path):
    import torch

    from prefgym.annotators.prompts import Item, render_prompt
    from prefgym.annotators.config import load_pool
    from prefgym.models.tiny import make_tiny_checkpoint

    model_dir = make_tiny_checkpoint(tmp_path / "tiny", arch="gpt2")
    cfg = {"fn_completions": "huggingface_logprobs", "fn_completion_parser": "logprob_parser",
           "prompt_template": "Q: {instruction}\nA) {output_1}\nB) {output_2}\nBetter:",
           "completions_kwargs": {"model_name": str(model_dir)},
           "completion_parser_kwargs": {"first_token": "a", "second_token": "b"}}
    path = pool_file(tmp_path, cfg, name="hf")
    pairs = make_fake_pairs(4)
    rows = annotate_pairs(pairs, path, seed=0, cache_dir=tmp_path / "c", progress=False)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from prefgym.seeding import stable_hash

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    judge = load_pool(path).judges[0]
    a_id, b_id = tok("a", add_special_tokens=False)["input_ids"][0], tok("b", add_special_tokens=False)["input_ids"][0]
    for p, r in zip(pairs, rows):
        key = example_key(p["instruction"], "", p["output_1"], p["output_2"])
        swapped = stable_hash("swap", 0, key) / 2.0**64 < 0.5
        prompt = render_prompt(judge, [Item(key, p["instruction"], "", p["output_1"], p["output_2"], swapped)])
        with torch.no_grad():
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
        pa, pb = torch.softmax(logits[[a_id, b_id]].double(), dim=0).tolist()
        shown = 1 + pb
        assert r["preference"] == pytest.approx(3 - shown if swapped else shown, abs=1e-5)


def test_huggingface_judge_refuses_a_prompt_longer_than_max_length_instead_of_cutting_its_end(tmp_path):
    """A prompt past max_length would lose its end (the second output and the answer cue) and the
    answer log-probs would be read at the wrong place: those rows get an error; short ones a label."""
    from prefgym.models.tiny import make_tiny_checkpoint

    model_dir = make_tiny_checkpoint(tmp_path / "tiny", arch="gpt2")
    cfg = {"fn_completions": "huggingface_logprobs", "fn_completion_parser": "logprob_parser",
           "prompt_template": "Q: {instruction}\nA) {output_1}\nB) {output_2}\nBetter:",
           "completions_kwargs": {"model_name": str(model_dir), "max_length": 60, "dtype": "auto"},
           "completion_parser_kwargs": {"first_token": "a", "second_token": "b"}}
    pairs = [{"instruction": "Add.", "input": "", "output_1": "two", "output_2": "three"},
             {"instruction": "Add.", "input": "", "output_1": "one two " * 40, "output_2": "four"}]
    rows = annotate_pairs(pairs, pool_file(tmp_path, cfg, name="hf"), seed=0, cache_dir=tmp_path / "c",
                          progress=False)
    assert 1 <= rows[0]["preference"] <= 2 and rows[0].get("error") is None
    assert rows[1]["preference"] is None and "max_length (60)" in rows[1]["error"], rows[1]


@pytest.mark.parametrize("dtype", ["bf17", "int8"])
def test_huggingface_judge_names_an_unknown_dtype(dtype):
    from prefgym.annotators.config import JudgeConfig
    from prefgym.annotators.hf_backend import HFLogprobBackend
    from prefgym.errors import ConfigError

    cfg = JudgeConfig(name="j", fn_completions="huggingface_logprobs", fn_completion_parser="logprob_parser",
                      completions_kwargs={"model_name": "unused", "dtype": dtype})
    with pytest.raises(ConfigError, match=rf"judge 'j': key 'completions_kwargs.dtype' is '{dtype}'; use float32"):
        HFLogprobBackend(cfg)
