"""Generation through an OpenAI-compatible server, against a loopback fake server (http.server)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prefgym.data.prompts import format_record, user_turn
from prefgym.errors import ConfigError, PrefgymError
from prefgym.models.generation import SamplingConfig
from prefgym.models.openai_generation import ServerConfig, generate_outputs_openai, request_seed
from test_prefdata_toy import one_torch_thread, toy_model  # noqa: F401 (fixtures)

RECORDS = [{"instruction": f"Name a colour number {i}.", "input": "in one word" if i % 2 else "", "id": i}
           for i in range(6)]


class FakeServer:
    """Answers /v1/completions and /v1/chat/completions with `text_for(prompt, seed)`.

    `faults[prompt]` is a list of replies to give first, in order: "garbage" (a body that is not
    JSON), "no-choices", 500, 401.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.faults: dict[str, list] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                chat = self.path.endswith("/chat/completions")
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    fault = server.faults.get(prompt, []).pop(0) if server.faults.get(prompt) else None
                if isinstance(fault, int):
                    return self._send(fault, json.dumps({"error": {"message": "boom"}}))
                text = FakeServer.text_for(prompt, body.get("seed"))
                choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                reply = {"garbage": "<html>oops", "no-choices": json.dumps({"choices": []})}.get(
                    fault, json.dumps({"choices": [{**choice, "index": 0, "finish_reason": "stop"}]}))
                self._send(200, reply)

            def _send(self, code, text):
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @staticmethod
    def text_for(prompt: str, seed) -> str:
        return f"answer to {prompt[-25:]!r} with seed {seed}"


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def server_cfg(fake, **kw):
    return ServerConfig(**{"base_url": fake.url, "served_model": "smollm2", "retry_backoff": 0.0, **kw})


def test_records_carry_the_fields_of_generate_outputs_and_seeds_are_passed_through(fake, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    cfg = SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=17, num_samples=2, seed=5)
    out = generate_outputs_openai(server_cfg(fake, api_key_env="MY_KEY"), RECORDS, cfg)
    assert [set(r) for r in out] == [{"instruction", "input", "id", "output", "outputs", "generator"}] * 6
    for i, (record, row) in enumerate(zip(RECORDS, out)):
        prompt = format_record(record)
        expected = [FakeServer.text_for(prompt, request_seed(5, i, k)) for k in range(2)]
        assert row["outputs"] == expected and row["output"] == expected[0]
        assert row["generator"] == "smollm2" and row["input"] == record["input"] and row["id"] == i
    bodies = [r["body"] for r in fake.requests]
    assert len(bodies) == 12 and len({b["seed"] for b in bodies}) == 12  # one seed per response
    assert all(b["model"] == "smollm2" and b["max_tokens"] == 17 and b["temperature"] == 0.8 and b["top_p"] == 0.9
               and b["n"] == 1 for b in bodies)
    assert {r["path"] for r in fake.requests} == {"/v1/completions"}
    assert {r["auth"] for r in fake.requests} == {"Bearer sk-test"}


def test_same_fields_as_the_local_generation_path(fake, toy_model):
    """Local `generate_outputs` and the server backend write records with the same keys."""
    from prefgym.models.generation import generate_outputs

    cfg = SamplingConfig(temperature=0.7, max_new_tokens=4, num_samples=1, batch_size=4)
    local = generate_outputs(toy_model, RECORDS[:2], cfg)
    served = generate_outputs_openai(server_cfg(fake), RECORDS[:2], cfg)
    assert [set(r) for r in local] == [set(r) for r in served] == [{"instruction", "input", "id", "output", "generator"}] * 2


def test_outputs_do_not_depend_on_concurrency(fake):
    cfg = SamplingConfig(temperature=1.0, num_samples=1, seed=3)
    one = generate_outputs_openai(server_cfg(fake, max_concurrency=1), RECORDS, cfg)
    many = generate_outputs_openai(server_cfg(fake, max_concurrency=6), RECORDS, cfg)
    assert one == many
    other_seed = generate_outputs_openai(server_cfg(fake), RECORDS, SamplingConfig(temperature=1.0, seed=4))
    assert [r["output"] for r in other_seed] != [r["output"] for r in one]


def test_greedy_asks_once_and_copies(fake):
    out = generate_outputs_openai(server_cfg(fake), RECORDS[:2], SamplingConfig(temperature=0, num_samples=3))
    assert len(fake.requests) == 2 and all(len(set(r["outputs"])) == 1 and len(r["outputs"]) == 3 for r in out)


def test_chat_format_sends_the_user_turn(fake):
    out = generate_outputs_openai(server_cfg(fake, prompt_format="chat"), RECORDS[:2], SamplingConfig(seed=1))
    assert {r["path"] for r in fake.requests} == {"/v1/chat/completions"}
    sent = sorted((r["body"]["seed"], r["body"]["messages"]) for r in fake.requests)
    assert sent == sorted((request_seed(1, i, 0), [{"role": "user", "content": user_turn(rec)}])
                          for i, rec in enumerate(RECORDS[:2]))
    assert out[1]["output"] == FakeServer.text_for(user_turn(RECORDS[1]), request_seed(1, 1, 0))


def test_malformed_replies_and_server_errors_are_retried(fake):
    prompt = format_record(RECORDS[2])
    fake.faults[prompt] = ["garbage", "no-choices", 500]
    out = generate_outputs_openai(server_cfg(fake, max_retries=3), RECORDS[:3], SamplingConfig(seed=0))
    assert out[2]["output"] == FakeServer.text_for(prompt, request_seed(0, 2, 0))
    assert sum(format_record(RECORDS[2]) == r["body"]["prompt"] for r in fake.requests) == 4


def test_too_many_failures_name_the_record_and_keep_finished_ones(fake, tmp_path):
    fake.faults[format_record(RECORDS[4])] = ["garbage"] * 3
    partial = tmp_path / "out.partial.jsonl"
    with pytest.raises(PrefgymError, match=r"record 4 \(sample 0\).*after 2 tries.*not JSON"):
        generate_outputs_openai(server_cfg(fake, max_retries=1, max_concurrency=1), RECORDS, SamplingConfig(),
                                partial_file=partial)
    finished = len(partial.read_text().splitlines())
    assert finished >= 4  # records 0-3 came back before record 4 failed (one request at a time)
    fake.requests.clear()
    out = generate_outputs_openai(server_cfg(fake, max_retries=1), RECORDS, SamplingConfig(), partial_file=partial)
    assert len(fake.requests) == 6 - finished + 1  # the missing records only (record 4: one last fault, then ok)
    assert out == generate_outputs_openai(server_cfg(fake), RECORDS, SamplingConfig())


def test_refused_request_stops_at_once_and_names_the_key_variable(fake):
    fake.faults[format_record(RECORDS[0])] = [401]
    with pytest.raises(PrefgymError, match=r"refused the request \(HTTP 401\).*\$SERVER_KEY"):
        generate_outputs_openai(server_cfg(fake, api_key_env="SERVER_KEY", max_retries=5), RECORDS[:1],
                                SamplingConfig())
    assert len(fake.requests) == 1
    fake.faults[format_record(RECORDS[1])] = [400]  # a request the server rejects is not retried either
    with pytest.raises(PrefgymError, match=r"record 0 \(sample 0\): the server answered HTTP 400"):
        generate_outputs_openai(server_cfg(fake, max_retries=5), RECORDS[1:2], SamplingConfig())
    assert len(fake.requests) == 2


def test_unreachable_server_and_bad_settings():
    with pytest.raises(PrefgymError, match="no usable reply from http://127.0.0.1:9/v1 after 1 tries"):
        generate_outputs_openai(ServerConfig("http://127.0.0.1:9/v1", "m", max_retries=0, timeout=5), RECORDS[:1],
                                SamplingConfig())
    with pytest.raises(ConfigError, match="top_p"):
        generate_outputs_openai(ServerConfig("http://x/v1", "m"), RECORDS, SamplingConfig(top_p=0))
    with pytest.raises(ConfigError, match="base_url"):
        generate_outputs_openai(ServerConfig("localhost:8000", "m"), RECORDS, SamplingConfig())


def test_generate_command_with_the_openai_backend(fake, tmp_path, capsys):
    from prefgym.cli import main

    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(RECORDS[:3]))
    out = tmp_path / "outputs.json"
    argv = ["generate", "--backend", "openai", "--base-url", fake.url, "--served-model", "smollm2", "--data", str(data),
            "--out", str(out), "--temperature", "0.5", "--seed", "9", "--no-progress"]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["output"] for r in rows] == [FakeServer.text_for(format_record(r), request_seed(9, i, 0))
                                          for i, r in enumerate(RECORDS[:3])]
    assert not (tmp_path / "outputs.json.partial.jsonl").exists()
    capsys.readouterr()
    assert main(["generate", "--backend", "openai", "--data", str(data), "--out", str(tmp_path / "x.json")]) == 2
    assert "--backend openai needs --base-url and --served-model" in capsys.readouterr().err
    assert main(["generate", "--data", str(data), "--out", str(tmp_path / "x.json")]) == 2
    assert "--backend hf needs --model" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


GENERATE_SCRIPT = """
import sys
from prefgym.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_generate_command_under_two_processes_asks_each_request_once(fake, tmp_path):
    """`accelerate launch` of 2 processes: the main one asks the server (each process asking would
    send, and pay for, every request twice); both exit 0 and one file is written."""
    import os

    from helpers import launch_two_cpu_processes, run_process

    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(RECORDS[:5]))
    out = tmp_path / "outputs.json"
    script = tmp_path / "generate.py"
    script.write_text(GENERATE_SCRIPT)
    cmd = launch_two_cpu_processes(script, "generate", "--backend", "openai", "--base-url", fake.url, "--served-model",
                                   "smollm2", "--data", str(data), "--out", str(out), "--seed", "3", "--no-progress")
    run_process(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}, check=True)
    rows = json.loads(out.read_text())
    assert [r["output"] for r in rows] == [FakeServer.text_for(format_record(r), request_seed(3, i, 0))
                                          for i, r in enumerate(RECORDS[:5])]
    assert len(fake.requests) == 5, [r["body"]["prompt"][-20:] for r in fake.requests]


def test_a_command_ends_the_process_group_it_ran_in(fake, tmp_path):
    """Generation commands share work through the process group without ending it as training
    does; `main` ends it after the command, so no gloo group is left to interpreter shutdown."""
    import socket

    import torch.distributed as dist

    from prefgym.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        data = tmp_path / "instructions.json"
        data.write_text(json.dumps(RECORDS[:2]))
        argv = ["generate", "--backend", "openai", "--base-url", fake.url, "--served-model", "smollm2",
                "--data", str(data), "--out", str(tmp_path / "o.json"), "--no-progress"]
        assert main(argv) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_partial_file_resumes_whatever_the_local_loading_fields_say(fake, tmp_path):
    """dtype / attn_implementation / prompt_format of the SamplingConfig say how a local model would
    load; the server's outputs do not depend on them, so a rerun that changes them resumes."""
    partial = tmp_path / "out.partial.jsonl"
    first = generate_outputs_openai(server_cfg(fake), RECORDS[:3], SamplingConfig(), partial_file=partial)
    fake.requests.clear()
    again = generate_outputs_openai(server_cfg(fake), RECORDS[:3],
                                    SamplingConfig(dtype="bfloat16", attn_implementation="eager"), partial_file=partial)
    assert again == first and fake.requests == []
