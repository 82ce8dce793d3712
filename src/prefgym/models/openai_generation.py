"""Generation through any OpenAI-compatible completion server (`vllm serve`, llama.cpp's
`llama-server`, sglang): the same AlpacaEval-format records as `generation.generate_outputs`.

Each response is one request (`n=1`) with its own seed, `stable_hash(cfg.seed, record index,
sample index)`, so the outputs depend on the seed and the records alone, not on the concurrency
or on which requests were retried; servers that honour `seed` (vLLM, sglang, llama.cpp) then give
the same text on a rerun. Requests run `max_concurrency` at a time (the server batches them).

A failed request (connection refused or dropped, timeout, 408/409/429/5xx, or a malformed reply:
a body that is not JSON, no `choices`, no text) is retried up to `max_retries` times with
exponential backoff; a refused one (401/403/404) stops the run at once. The API key comes from the
environment variable named by `api_key_env` (local servers need none: a placeholder is sent).

The prompt format is chosen as the local path chooses it (`prompt_format: auto`): the format the
served model's folder records it was trained with, else chat when its tokenizer has a template,
else alpaca; the folder is `model_folder`, or `served_model` when that names a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Optional

from prefgym.data.prompts import format_record, has_chat_template, resolve_prompt_format, user_turn
from prefgym.methods.fields import ModelFields
from prefgym.errors import ConfigError, PrefgymError
from prefgym.models.generation import SamplingConfig, output_records, read_partial, track_progress

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Where and how to reach an OpenAI-compatible completion server."""

    base_url: str
    """The server's OpenAI API root, e.g. http://localhost:8000/v1."""
    served_model: str
    """The model name the server serves (each request's `model`)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; unset: a placeholder key is sent."""
    prompt_format: str = "auto"
    """alpaca: text completions of prefgym's Alpaca prompt; chat: chat completions with the
    instruction (and input) as the user turn, the server's chat template; auto: as
    `generate_outputs` chooses for the model's folder (`server_prompt_format`)."""
    model_folder: Optional[str] = None
    """The served model's local folder, read for its prompt format (None: `served_model` when it names one)."""
    max_concurrency: int = 8
    """Requests in flight at once."""
    max_retries: int = 3
    """Retries of a failed request before the run stops."""
    retry_backoff: float = 1.0
    """Seconds before the first retry, doubled at each further one."""
    timeout: float = 300.0
    """Seconds to wait for one reply."""


class _Retryable(Exception):
    """A failure worth another try (the message says what happened)."""


def check_config(server: ServerConfig, cfg: SamplingConfig) -> None:
    """ConfigError naming the first setting out of range."""
    checks = {"prompt_format": server.prompt_format in ("auto", "alpaca", "chat"),
              "max_concurrency": server.max_concurrency >= 1,
              "max_retries": server.max_retries >= 0, "temperature": cfg.temperature >= 0,
              "top_p": 0 < cfg.top_p <= 1, "top_k": cfg.top_k >= 0, "max_new_tokens": cfg.max_new_tokens >= 1,
              "num_samples": cfg.num_samples >= 1}
    for key, ok in checks.items():
        if not ok:
            value = getattr(server, key) if hasattr(server, key) else getattr(cfg, key)
            raise ConfigError(f"openai generation: {key}={value!r} is out of range")
    if not server.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"openai generation: base_url {server.base_url!r} should start with http:// or https://")


def server_prompt_format(server: ServerConfig) -> str:
    """"alpaca" or "chat": `server.prompt_format` resolved for the served model's folder as the
    local path resolves it (`resolve_prompt_format`: auto is the format the folder records, else
    chat when its tokenizer has a template, else alpaca; another format than the recorded one is
    used as asked, with a warning; chat without a template in the folder too, since the server
    applies its own). Without a local folder: the format asked for, auto being alpaca."""
    from pathlib import Path

    from prefgym.models.loading import check_model_folder, load_tokenizer

    folder = server.model_folder or (server.served_model if Path(server.served_model).is_dir() else None)
    if folder is None:
        if server.prompt_format == "auto":
            log.warning("openai generation: no local folder of %r to read its prompt format from; sending Alpaca "
                        "prompts (give --model FOLDER, or --prompt-format chat for a chat model)", server.served_model)
        return "alpaca" if server.prompt_format == "auto" else server.prompt_format
    check_model_folder(folder)
    try:
        tokenizer = load_tokenizer(folder)
    except OSError as e:
        raise ConfigError(f"openai generation: cannot read the tokenizer of {folder} for its prompt format "
                          f"({str(e)[:200]}); give --prompt-format alpaca or chat") from None
    if server.prompt_format == "chat" and not has_chat_template(tokenizer):
        # The server formats chat requests with its own template (`vllm serve --chat-template`, ...),
        # not the folder's: asked for explicitly, chat is the user's call.
        log.warning("openai generation: %s has no chat template; sending chat requests as asked (the server "
                    "must have a template of its own)", folder)
        return "chat"
    return resolve_prompt_format(tokenizer, server.prompt_format)


def request_seed(seed: int, index: int, sample: int) -> int:
    """The seed of sample `sample` of record `index` (fits the 32-bit seeds of every server)."""
    from prefgym.seeding import stable_hash

    return stable_hash(seed, index, sample) % 2**31


def generate_outputs_openai(server: ServerConfig, records: list[dict], cfg: SamplingConfig,
                            generator: str | None = None, progress: bool = False,
                            partial_file: str | os.PathLike | None = None) -> list[dict]:
    """`generation.generate_outputs`, with the responses from the server: the input fields plus
    `output` and `generator` (the served model's name by default), and `outputs` (all samples)
    when `cfg.num_samples > 1`. With `partial_file`, each finished record is appended there and a
    rerun with the same server model, records and settings asks only for what is missing.
    """
    import dataclasses

    import openai

    from prefgym.io import append_jsonl
    from prefgym.seeding import stable_hash

    check_config(server, cfg)
    server = dataclasses.replace(server, prompt_format=server_prompt_format(server))
    # Keyed by the decoding and engine settings (how a local model would load is not the server's).
    model_fields = {f.name for f in dataclasses.fields(ModelFields)}
    decoding = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in model_fields}
    run_key = stable_hash(server.served_model, server.prompt_format, json.dumps(decoding, sort_keys=True))
    keys = [str(stable_hash(run_key, i, r["instruction"], r.get("input") or "")) for i, r in enumerate(records)]
    done = read_partial(partial_file)
    samples: list[list[str] | None] = [done.get(k) for k in keys]
    client = openai.OpenAI(api_key=os.environ.get(server.api_key_env) or "EMPTY", base_url=server.base_url,
                           timeout=server.timeout, max_retries=0)  # retried here, malformed replies too
    todo = [i for i, s in enumerate(samples) if s is None]
    pool = ThreadPoolExecutor(max_workers=server.max_concurrency)
    try:
        futures = {pool.submit(_record_samples, client, server, cfg, records[i], i): i for i in todo}
        for future in track_progress(as_completed(futures), progress, "generating", total=len(futures)):
            i = futures[future]
            samples[i] = future.result()
            if partial_file is not None:
                append_jsonl(partial_file, {"key": keys[i], "outputs": samples[i]})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return output_records(records, samples, generator or server.served_model, cfg.num_samples)


def _record_samples(client, server: ServerConfig, cfg: SamplingConfig, record: dict, index: int) -> list[str]:
    """The `cfg.num_samples` responses to one record (one request when greedy: all samples equal)."""
    greedy = cfg.temperature == 0
    texts = [_complete(client, server, cfg, record, index, k) for k in range(1 if greedy else cfg.num_samples)]
    return texts * cfg.num_samples if greedy else texts


def _complete(client, server: ServerConfig, cfg: SamplingConfig, record: dict, index: int, sample: int) -> str:
    import openai

    chat = server.prompt_format == "chat"
    kwargs = {"model": server.served_model, "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
              "top_p": cfg.top_p, "seed": request_seed(cfg.seed, index, sample), "n": 1}
    extra = {k: v for k, v, off in (("top_k", cfg.top_k, 0), ("repetition_penalty", cfg.repetition_penalty, 1.0))
             if v != off}
    if extra:
        kwargs["extra_body"] = extra  # vLLM / sglang sampling parameters beyond OpenAI's
    where = f"openai generation: record {index} (sample {sample})"
    for attempt in range(server.max_retries + 1):
        try:
            if chat:
                resp = client.chat.completions.with_raw_response.create(
                    messages=[{"role": "user", "content": user_turn(record)}], **kwargs)
            else:
                resp = client.completions.with_raw_response.create(prompt=format_record(record), **kwargs)
            return _reply_text(resp.http_response.text, chat)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise PrefgymError(f"{where}: {server.base_url} refused the request (HTTP {e.status_code}); check "
                               f"--base-url, --served-model and the API key in ${server.api_key_env}") from None
        except openai.APIStatusError as e:
            if not (e.status_code in (408, 409, 429) or e.status_code >= 500):
                raise PrefgymError(f"{where}: the server answered HTTP {e.status_code}: {str(e)[:200]}") from None
            error = f"HTTP {e.status_code}"
        except openai.APIError as e:  # connection refused or dropped, timeouts
            error = f"{type(e).__name__}: {str(e)[:200]}"
        except _Retryable as e:
            error = str(e)
        if attempt < server.max_retries:
            time.sleep(server.retry_backoff * 2**attempt)
    raise PrefgymError(f"{where}: no usable reply from {server.base_url} after {server.max_retries + 1} tries "
                       f"(last: {error}); rerun to resume from the finished records")


def _reply_text(body: str, chat: bool) -> str:
    """The completion's text in a reply body (may be empty: a response can be EOS alone)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise _Retryable(f"malformed reply: not JSON ({e.msg})") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Retryable("malformed reply: 'choices' is not a non-empty list of objects")
    choice = choices[0]
    message = choice.get("message")
    text = (message.get("content") if isinstance(message, dict) else None) if chat else choice.get("text")
    if not isinstance(text, str):
        raise _Retryable(f"malformed reply: choices[0] has no text ({type(text).__name__})")
    return text
