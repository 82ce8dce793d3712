"""Judges behind any OpenAI-compatible endpoint, through the official `openai` client.

The API key is read from the environment variable named in the config (`api_key_env`) and is
never logged, cached or written. Rate limits (429), server errors (5xx), connection errors and
timeouts are retried by the client with exponential backoff (honouring Retry-After).
"""

from __future__ import annotations

import os
import time

import openai

from prefgym.annotators.backends import BackendError, Completion, check_kwargs
from prefgym.annotators.config import JudgeConfig
from prefgym.annotators.prompts import Item
from prefgym.errors import ConfigError, PrefgymError

_KNOWN = {"model_name", "base_url", "api_key_env", "temperature", "top_p", "max_tokens", "logprobs",
          "top_logprobs", "stop", "seed", "timeout", "max_retries", "extra_body"}
_SAMPLING = ("temperature", "top_p", "max_tokens", "stop", "seed", "extra_body")


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
        self.judge, self.chat = judge, judge.fn_completions == "openai_chat"
        self.client = openai.OpenAI(api_key=api_key, base_url=kw.get("base_url"),
                                    timeout=float(kw.get("timeout", 60.0)),
                                    max_retries=int(kw.get("max_retries", 6)))

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
        start = time.perf_counter()
        try:
            if self.chat:
                messages = ([{"role": "system", "content": self.judge.system_prompt}]
                            if self.judge.system_prompt else []) + [{"role": "user", "content": prompt}]
                resp = self.client.chat.completions.create(messages=messages, **self._request_kwargs())
            else:
                resp = self.client.completions.create(prompt=prompt, **self._request_kwargs())
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise PrefgymError(f"judge '{self.judge.name}' ({self.judge.source}): the endpoint refused the "
                               f"request ({type(e).__name__}, HTTP {e.status_code}); check base_url, "
                               "model_name and the API key variable") from None
        except openai.APIError as e:
            raise BackendError(f"{type(e).__name__}: {str(e)[:200]}") from None
        seconds = time.perf_counter() - start
        if not resp.choices:
            raise BackendError("the response has no choices")
        choice = resp.choices[0]
        if self.chat:
            text = choice.message.content or ""
            logprobs = ([c.model_dump() for c in choice.logprobs.content]
                        if choice.logprobs is not None and choice.logprobs.content else None)
        else:
            text = choice.text or ""
            logprobs = _legacy_logprobs(choice.logprobs)
        usage = resp.usage
        return Completion(text=text, logprobs=logprobs,
                          prompt_tokens=usage.prompt_tokens if usage else 0,
                          completion_tokens=usage.completion_tokens if usage else 0,
                          seconds=seconds, raw={"finish_reason": choice.finish_reason})


def _legacy_logprobs(lp) -> list[dict] | None:
    """The completions API's logprobs in the chat API's shape."""
    if lp is None or not lp.tokens:
        return None
    tops = lp.top_logprobs or [{}] * len(lp.tokens)
    return [{"token": t, "logprob": l,
             "top_logprobs": [{"token": k, "logprob": v} for k, v in (top or {}).items()]}
            for t, l, top in zip(lp.tokens, lp.token_logprobs, tops)]
