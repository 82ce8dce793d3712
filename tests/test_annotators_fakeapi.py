"""A real HTTP server on 127.0.0.1 speaking the OpenAI response schema, for annotator tests and the
benchmark. It judges prompts written with `FAKE_TEMPLATE`-style examples:

    <ex id=ID>
    A: <first shown output>
    B: <second shown output>
    </ex>

The better output is the one containing "GOOD" (else the shorter one). Faults are asked for in
the instruction id, for the first n requests that include the example:

- HTTP: 429x<n> (with Retry-After), 500x<n>, timeoutx<n> (a reply slower than any test timeout);
- malformed replies with status 200: badjsonx<n> (the body is not JSON), truncbodyx<n> (the
  connection closes mid-body), nochoicesx<n> (`choices: []`), emptyx<n> (empty content),
  wrongtypex<n> (`choices` is a string), echokeyx<n> (a 400 whose message repeats the API key),
  deniedx<n> (a 403 that stops the run);
- unreadable completions: garbagex<n>, truncx<n> (the completion is garbage / cut),
  garbage-always, wrongcount (a batch holding this example gets one answer too few).

`FakeOpenAI(fault_rate=0.3)` also injects a fault, drawn from `RANDOM_FAULTS` by a hash of the
request's examples and attempt number (the same faults on every run), into that share of requests.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_EX = re.compile(r"<ex id=(\S+)>\nA: (.*?)\nB: (.*?)\n</ex>", re.S)

EXAMPLE_TEMPLATE = "<ex id={instruction}>\nA: {output_1}\nB: {output_2}\n</ex>"

MALFORMED = ("badjson", "truncbody", "nochoices", "empty", "wrongtype")
RANDOM_FAULTS = MALFORMED + ("500", "429", "timeout")
SLOW_SECONDS = 3.0  # a `timeout` fault answers after this long (tests use a shorter client timeout)


def judge_config(base_url: str, *, batch_size: int = 1, parser: str = "regex_parser", chat: bool = True,
                 concurrency: int = 4, timeout: float = 5.0, **kwargs) -> dict:
    """A judge config (as a YAML mapping) pointing at the fake server."""
    cfg = {
        "fn_completions": "openai_chat" if chat else "openai_completions",
        "completions_kwargs": {"model_name": "fake-gpt", "base_url": base_url, "api_key_env": "FAKE_API_KEY",
                               "temperature": 0, "max_tokens": 50, "timeout": timeout, "max_retries": 4,
                               "retry_backoff": 0.01},
        "fn_completion_parser": parser,
        "batch_size": batch_size,
        "max_concurrency": concurrency,
        "price_per_prompt_token": 1e-5,
        "price_per_completion_token": 3e-5,
    }
    if batch_size > 1:
        cfg["prompt_template"] = "Judge these {n_examples}:\n{examples}"
        cfg["example_template"] = EXAMPLE_TEMPLATE
    else:
        cfg["prompt_template"] = EXAMPLE_TEMPLATE
    if parser == "regex_parser":
        cfg["completion_parser_kwargs"] = {"outputs_to_match": {1: r"Output \(a\)", 2: r"Output \(b\)"}}
    elif parser == "json_parser":
        cfg["completion_parser_kwargs"] = {"annotation_key": "preference"}
    else:
        cfg["completion_parser_kwargs"] = {"first_token": "a", "second_token": "b"}
        cfg["completions_kwargs"].update(logprobs=True, top_logprobs=5, max_tokens=1)
    cfg["completions_kwargs"].update(kwargs)
    return cfg


def _fault_count(ex_id: str, name: str) -> int:
    m = re.search(rf"{name}x(\d+)", ex_id)
    return int(m.group(1)) if m else 0


class FakeOpenAI:
    """Start with `with FakeOpenAI(latency=0.0) as api:`; `api.base_url`, `api.requests`, `api.faults`."""

    def __init__(self, latency: float = 0.0, fault_rate: float = 0.0, retry_after: float = 0.005,
                 slow_seconds: float = SLOW_SECONDS):
        self.latency, self.fault_rate = latency, fault_rate
        self.retry_after, self.slow_seconds = retry_after, slow_seconds
        self.faults = Counter()  # fault name -> times injected
        self.times: dict[str, list[float]] = {}  # example id -> arrival time of each request
        self.requests: list[list[str]] = []  # example ids per request that got a valid answer (paid for)
        self.attempts: list[list[str]] = []  # example ids per request, every status
        self.seen = Counter()
        self.lock = threading.Lock()

    def __enter__(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, delay = api.respond(self.path, body, self.headers.get("Authorization", ""))
                if delay:
                    time.sleep(delay)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                cut = status == "truncbody"
                try:
                    self.send_response(200 if cut else status)
                    self.send_header("Content-Type", "application/json")
                    # a cut body promises more bytes than it sends, then the connection closes
                    self.send_header("Content-Length", str(len(data) + (50 if cut else 0)))
                    if status == 429:
                        self.send_header("Retry-After", str(api.retry_after))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2] if cut else data)
                    if cut:
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, ids: list[str], counts: dict[str, int]) -> str | None:
        """The fault to inject into this request, if any (named in an id, or drawn at `fault_rate`)."""
        for name in ("429", "500", "timeout", "echokey", "denied") + MALFORMED:
            if any(counts[i] < _fault_count(i, name) for i in ids):
                return name
        if self.fault_rate > 0 and ids:
            h = int.from_bytes(hashlib.sha256(repr((sorted(ids), counts[ids[0]])).encode()).digest()[:8], "big")
            u = h / 2.0**64
            if u < self.fault_rate:
                return RANDOM_FAULTS[int(u / self.fault_rate * len(RANDOM_FAULTS))]
        return None

    def _faulty_reply(self, fault: str, auth: str):
        """(status, payload, delay) of an injected fault."""
        if fault == "429":
            return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, 0
        if fault == "500":
            return 500, {"error": {"message": "server error", "type": "server"}}, 0
        if fault == "timeout":
            return 200, "{}", self.slow_seconds
        if fault == "echokey":
            return 400, {"error": {"message": f"bad request from {auth}", "type": "invalid_request_error"}}, 0
        if fault == "denied":
            return 403, {"error": {"message": f"forbidden for {auth}", "type": "permission_error"}}, 0
        if fault == "badjson":
            return 200, '{"id": "cmpl-fake", "choices": [{"message": <html>502 Bad Gateway</html>', 0
        if fault == "truncbody":
            return "truncbody", {"id": "cmpl-fake", "object": "chat.completion", "choices": []}, 0
        head = {"id": "cmpl-fake", "object": "chat.completion", "created": 0, "model": "fake"}
        if fault == "nochoices":
            return 200, {**head, "choices": []}, 0
        if fault == "wrongtype":
            return 200, {**head, "choices": "oops"}, 0
        return None  # "empty": a well-formed reply with empty content, built by the caller

    def respond(self, path: str, body: dict, auth: str = ""):
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return 404, {"error": {"message": "not found", "type": "invalid_request_error"}}, 0
        chat = path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        examples = _EX.findall(prompt)
        ids = [e[0] for e in examples]
        with self.lock:
            self.attempts.append(ids)
            counts = {i: self.seen[i] for i in ids}
            for i in ids:
                self.seen[i] += 1
                self.times.setdefault(i, []).append(time.monotonic())
            fault = self._fault(ids, counts)
            if fault:
                self.faults[fault] += 1
        if fault and fault != "empty":
            return self._faulty_reply(fault, auth)
        if not fault:
            with self.lock:
                self.requests.append(ids)
        prefs = [1 if ("GOOD" in a or ("GOOD" not in b and len(a) <= len(b))) else 2 for _, a, b in examples]
        text = "\n".join(f"Output ({'ab'[p - 1]})" for p in prefs)
        finish = "stop"
        if any("garbage-always" in i or counts[i] < _fault_count(i, "garbage") for i in ids):
            text = "I cannot decide, both are lovely."
        if any(counts[i] < _fault_count(i, "trunc") for i in ids):
            text, finish = "Output (", "length"
        if len(ids) > 1 and any("wrongcount" in i for i in ids):
            text = "\n".join(text.splitlines()[:-1])
        if body.get("max_tokens") == 1 or body.get("logprobs"):
            # One-letter answers with logprobs: P(better) = 0.8.
            p2 = 0.8 if prefs and prefs[0] == 2 else 0.2
            top = [{"token": "a", "logprob": math.log(1 - p2), "bytes": None, "top_logprobs": []},
                   {"token": "b", "logprob": math.log(p2), "bytes": None, "top_logprobs": []},
                   {"token": "The", "logprob": -9.0, "bytes": None, "top_logprobs": []}]
            top.sort(key=lambda t: -t["logprob"])
            text = top[0]["token"]
            logprobs = {"content": [{"token": text, "logprob": top[0]["logprob"], "bytes": None,
                                     "top_logprobs": [{k: t[k] for k in ("token", "logprob", "bytes")} for t in top]}]}
            legacy = {"tokens": [text], "token_logprobs": [top[0]["logprob"]],
                      "top_logprobs": [{t["token"]: t["logprob"] for t in top}], "text_offset": [0]}
        else:
            logprobs, legacy = None, None
        if fault == "empty":  # a well-formed reply without an answer
            text, logprobs, legacy = "", None, None
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                 "total_tokens": len(prompt.split()) + len(text.split())}
        common = {"id": "cmpl-fake", "created": int(time.time()), "model": body.get("model", "fake"), "usage": usage}
        if chat:
            choice = {"index": 0, "finish_reason": finish, "logprobs": logprobs,
                      "message": {"role": "assistant", "content": text}}
            return 200, {**common, "object": "chat.completion", "choices": [choice]}, self.latency
        choice = {"index": 0, "finish_reason": finish, "logprobs": legacy, "text": text}
        return 200, {**common, "object": "text_completion", "choices": [choice]}, self.latency


def make_fake_pairs(n: int, prefix: str = "ex", faults: dict[int, str] | None = None) -> list[dict]:
    """n pairs; output_1 is GOOD for even i. `faults` maps an index to a fault tag for its id."""
    faults = faults or {}
    pairs = []
    for i in range(n):
        good, bad = f"GOOD answer {i}", f"weak answer number {i} with more words"
        o1, o2 = (good, bad) if i % 2 == 0 else (bad, good)
        ex_id = f"{prefix}{i}" + (f"-{faults[i]}" if i in faults else "")
        pairs.append({"instruction": ex_id, "input": "", "output_1": o1, "output_2": o2})
    return pairs


def expected_preference(i: int) -> float:
    return 1.0 if i % 2 == 0 else 2.0


def pool_file(tmp_path, cfg: dict, name="fake"):
    """Write a one-judge pool YAML for `cfg` and return its path."""
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"judges": {name: cfg}}))
    return path


def ids_count(requests) -> Counter:
    """Example id -> number of requests that included it."""
    return Counter(i for req in requests for i in req)
