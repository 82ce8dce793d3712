"""Judges behind any OpenAI-compatible endpoint, through the official `openai` client.

The API key is read from the environment variable named in the config (`api_key_env`) and is
never logged, cached or written: it is masked (`***`) in every error message and answer text.

Every failure of a call is a failure of its examples, retried here up to `max_retries` times with
exponential backoff (`retry_backoff` seconds, doubled each time, with jitter; at least what a
Retry-After header asks): rate limits (429), server errors (5xx), timeouts, dropped connections,
and malformed replies (a body that is not JSON, no `choices`, empty content, wrong types).
A request the endpoint refuses (401/403/404) stops the run; other 4xx fail their examples at once.
"""

from __future__ import annotations

import json
import os
import random
import time

import httpx
import openai

from prefgym.annotators.backends import BackendError, Completion, check_kwargs
from prefgym.annotators.config import JudgeConfig
from prefgym.annotators.prompts import Item
from prefgym.errors import ConfigError, PrefgymError

_KNOWN = {"model_name", "base_url", "api_key_env", "temperature", "top_p", "max_tokens", "logprobs",
          "top_logprobs", "stop", "seed", "timeout", "max_retries", "retry_backoff", "extra_body"}
_SAMPLING = ("temperature", "top_p", "max_tokens", "stop", "seed", "extra_body")
MAX_WAIT_SECONDS = 60.0
"""The longest wait between two tries, whatever the backoff or Retry-After say."""


class OpenAIBackend:
    """Chat (`openai_chat`) or text (`openai_completions`) completions from an OpenAI-compatible API."""

    seeded = False

    def __init__(self, judge: JudgeConfig):
        check_kwargs(judge, _KNOWN)
        kw = judge.completions_kwargs
        if "model_name" not in kw:
            raise ConfigError(f"{judge.source}: judge '{judge.name}': missing key 'completions_kwargs.model_name'")
        key_env = kw.get("api_key_env", "OPENAI_API_KEY")
        api_key = os.environ.get(key_env)
        if not api_key:
            raise ConfigError(f"{judge.source}: judge '{judge.name}': set the environment variable {key_env} "
                              "to the API key (key 'completions_kwargs.api_key_env' names the variable)")
        for name in ("timeout", "max_retries", "retry_backoff"):
            value = kw.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{judge.source}: judge '{judge.name}': key 'completions_kwargs.{name}' "
                                  "must be a number >= 0")
        self.judge, self.chat = judge, judge.fn_completions == "openai_chat"
        self.max_retries = int(kw.get("max_retries", 6))
        self.retry_backoff = float(kw.get("retry_backoff", 1.0))
        self._api_key = api_key
        # prefgym retries (below), so that a malformed reply is retried like a 500
        self.client = openai.OpenAI(api_key=api_key, base_url=kw.get("base_url"),
                                    timeout=float(kw.get("timeout", 60.0)), max_retries=0)

    def _request_kwargs(self) -> dict:
        kw = self.judge.completions_kwargs
        out = {"model": kw["model_name"], **{k: kw[k] for k in _SAMPLING if k in kw}}
        if kw.get("logprobs"):
            if self.chat:
                out["logprobs"] = True
                out["top_logprobs"] = int(kw.get("top_logprobs", 5))
            else:
                out["logprobs"] = int(kw.get("top_logprobs", 5))
        return out

    def complete(self, prompt: str, items: list[Item]) -> Completion:
        """One answer, tried up to 1 + max_retries times; BackendError (key masked) if none came."""
        for attempt in range(self.max_retries + 1):
            try:
                completion = self._complete_once(prompt)
                completion.text = self._mask(completion.text)
                return completion
            except BackendError as e:
                if not e.retryable or attempt == self.max_retries:
                    raise BackendError(self._mask(str(e)), retryable=False) from None
                time.sleep(self._wait_seconds(attempt, e.retry_after))
            except PrefgymError as e:
                raise PrefgymError(self._mask(str(e))) from None
        raise AssertionError("unreachable")

    def _wait_seconds(self, attempt: int, retry_after: float | None) -> float:
        backoff = self.retry_backoff * 2**attempt * random.uniform(0.75, 1.0)  # jitter spreads concurrent retries
        return min(max(backoff, retry_after or 0.0), MAX_WAIT_SECONDS)

    def _mask(self, text: str) -> str:
        return text.replace(self._api_key, "***")

    def _complete_once(self, prompt: str) -> Completion:
        start = time.perf_counter()
        try:
            if self.chat:
                messages = ([{"role": "system", "content": self.judge.system_prompt}]
                            if self.judge.system_prompt else []) + [{"role": "user", "content": prompt}]
                resp = self.client.chat.completions.with_raw_response.create(messages=messages,
                                                                             **self._request_kwargs())
            else:
                resp = self.client.completions.with_raw_response.create(prompt=prompt, **self._request_kwargs())
            body = resp.http_response.text
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise PrefgymError(f"judge '{self.judge.name}' ({self.judge.source}): the endpoint refused the "
                               f"request ({type(e).__name__}, HTTP {e.status_code}); check base_url, "
                               "model_name and the API key variable") from None
        except openai.APIStatusError as e:
            code = e.status_code
            raise BackendError(f"{type(e).__name__}: {str(e)[:200]}", retryable=code in (408, 409, 429) or code >= 500,
                               retry_after=_retry_after(e.response)) from None
        except (openai.APIError, httpx.HTTPError) as e:  # timeouts, refused or dropped connections
            cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
            raise BackendError(f"{type(e).__name__}: {str(e)[:200]}{cause[:200]}") from None
        text, logprobs, usage, finish_reason = _read_reply(body, self.chat)
        return Completion(text=text, logprobs=logprobs, prompt_tokens=usage[0], completion_tokens=usage[1],
                          seconds=time.perf_counter() - start, raw={"finish_reason": finish_reason})


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a `retry-after-ms` or `retry-after` header (a number; HTTP dates are ignored)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(response.headers[name]) * scale
        except (KeyError, ValueError):
            continue
    return None


def _malformed(what: str) -> BackendError:
    return BackendError(f"malformed reply: {what}")


def _read_reply(body: str, chat: bool) -> tuple[str, list[dict] | None, tuple[float, float], str | None]:
    """(text, logprobs, (prompt tokens, completion tokens), finish_reason) of a reply body;
    BackendError("malformed reply: ...") for anything that is not a usable answer."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise _malformed(f"the body is not valid JSON ({e.msg} at character {e.pos} of {len(body)})") from None
    if not isinstance(data, dict):
        raise _malformed(f"expected a JSON object, got {type(data).__name__}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _malformed(f"'choices' must be a non-empty list of objects, got {json.dumps(choices)[:60]}")
    choice = choices[0]
    if chat:
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        lp = choice.get("logprobs")
        logprobs = _chat_logprobs(lp.get("content") if isinstance(lp, dict) else lp)
    else:
        text, logprobs = choice.get("text"), _legacy_logprobs(choice.get("logprobs"))
    if not isinstance(text, str):
        raise _malformed(f"choices[0] has no text content (got {type(text).__name__})")
    if not text and not logprobs:
        raise _malformed("empty content")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = tuple(float(v) if isinstance(v := usage.get(k), (int, float)) else 0.0
                   for k in ("prompt_tokens", "completion_tokens"))
    finish = choice.get("finish_reason")
    return text, logprobs, tokens, finish if isinstance(finish, str) else None


def _token(entry) -> dict:
    if not (isinstance(entry, dict) and isinstance(entry.get("token"), str)
            and isinstance(entry.get("logprob"), (int, float))):
        raise _malformed(f"a logprobs entry is not {{token, logprob}}: {json.dumps(entry)[:60]}")
    return {"token": entry["token"], "logprob": float(entry["logprob"])}


def _chat_logprobs(content) -> list[dict] | None:
    """The chat API's logprobs per generated token: {"token", "logprob", "top_logprobs": [...]}."""
    if not content:
        return None
    if not isinstance(content, list):
        raise _malformed("'logprobs.content' is not a list")
    out = []
    for entry in content:
        tops = entry.get("top_logprobs") if isinstance(entry, dict) else None
        out.append({**_token(entry), "top_logprobs": [_token(t) for t in tops or []]})
    return out


def _legacy_logprobs(lp) -> list[dict] | None:
    """The completions API's logprobs in the chat API's shape."""
    if not lp:
        return None
    tokens, values, tops = (lp.get(k) if isinstance(lp, dict) else None
                            for k in ("tokens", "token_logprobs", "top_logprobs"))
    if not tokens:
        return None
    if not isinstance(tokens, list) or not isinstance(values, list) or len(values) != len(tokens):
        raise _malformed("'logprobs.tokens' and 'logprobs.token_logprobs' are not lists of one length")
    tops = tops if isinstance(tops, list) else [{}] * len(tokens)
    return [{**_token({"token": t, "logprob": v}),
             "top_logprobs": [_token({"token": k, "logprob": x})
                              for k, x in (top if isinstance(top, dict) else {}).items()]}
            for t, v, top in zip(tokens, values, tops)]
