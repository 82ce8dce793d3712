"""Backends answer a judge's prompt: the built-in world's judges and humans, an OpenAI-compatible
endpoint (`openai_backend.py`) or a local Hugging Face causal LM (`hf_backend.py`).

Every backend returns a `Completion` that goes through the judge's parser, so a simulated judge
and a real one are read the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from prefgym.annotators.config import JudgeConfig
from prefgym.annotators.prompts import Item, count_tokens
from prefgym.errors import ConfigError, PrefgymError


class BackendError(PrefgymError):
    """A call failed: an HTTP error, a timeout, a malformed reply. Retried with backoff when
    `retryable`; a call still failing after its retries leaves its rows with `error`."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        """Seconds the server asked to wait (its Retry-After header), if it said."""


@dataclass
class Completion:
    """What one call returned, with its cost."""

    text: str
    logprobs: list[dict] | None = None
    """Per generated token: {"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}."""
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    seconds: float = 0.0
    """Wall time of the call (or the simulated time)."""
    price: float | None = None
    """USD, when the backend knows it; otherwise computed from the judge's per-token prices."""
    raw: dict = field(default_factory=dict)
    """JSON-able extra details (finish_reason, labeler, ...)."""


def make_backend(judge: JudgeConfig):
    """The backend named by `judge.fn_completions`."""
    if judge.fn_completions == "world_judges":
        return WorldJudgesBackend(judge)
    if judge.fn_completions == "world_humans":
        return WorldHumansBackend(judge)
    if judge.fn_completions in ("openai_chat", "openai_completions"):
        from prefgym.annotators.openai_backend import OpenAIBackend

        return OpenAIBackend(judge)
    from prefgym.annotators.hf_backend import HFLogprobBackend

    return HFLogprobBackend(judge)


def check_kwargs(judge: JudgeConfig, known: set[str]) -> None:
    """ConfigError naming the file and key for an unknown key of `completions_kwargs`."""
    for key in judge.completions_kwargs:
        if key not in known:
            raise ConfigError(f"{judge.source}: judge '{judge.name}': unknown key 'completions_kwargs.{key}' "
                              f"for {judge.fn_completions} (known: {', '.join(sorted(known))})")


def _answer_text(judge: JudgeConfig, prefs: list[int]) -> tuple[str, list[dict] | None]:
    """Write the answers in the form the judge's parser reads (and logprobs for logprob_parser)."""
    kw = judge.completion_parser_kwargs
    if judge.fn_completion_parser == "json_parser":
        key = kw.get("annotation_key", "preference")
        objs = [{key: p} for p in prefs]
        return json.dumps(objs[0] if len(objs) == 1 else objs), None
    if judge.fn_completion_parser == "regex_parser":
        answers = judge.completions_kwargs.get("answer_texts", {1: "Output (a)", 2: "Output (b)"})
        answers = {int(float(k)): v for k, v in answers.items()}
        return "\n".join(str(answers[p]) for p in prefs), None
    raise AssertionError("logprob answers are written by the caller")


class WorldJudgesBackend:
    """The built-in world's simulated API judges (`prefgym.world.judges`).

    The prompt is rendered as a real judge would get it (for token and price accounting); the
    answer is drawn from `world_judge_prob` with the example's seeded generator, or is its argmax
    when `temperature` is 0 (the greedy judge).
    """

    def __init__(self, judge: JudgeConfig):
        from prefgym.world.judges import WORLD_JUDGES

        check_kwargs(judge, {"model_name", "temperature", "answer_texts"})
        model = judge.completions_kwargs.get("model_name")
        if model not in WORLD_JUDGES:
            raise ConfigError(f"{judge.source}: judge '{judge.name}': key 'completions_kwargs.model_name' "
                              f"must be one of {', '.join(WORLD_JUDGES)}")
        self.judge, self.params = judge, WORLD_JUDGES[model]
        self.temperature = float(judge.completions_kwargs.get("temperature", 1.0))
        self.seeded = self.temperature > 0

    def complete(self, prompt: str, items: list[Item]) -> Completion:
        from prefgym.world.judges import world_judge_prob

        shown_prefs, logprobs = [], None
        for it in items:
            p2 = world_judge_prob(self.params, it.instruction, it.input, it.output_1, it.output_2,
                                  position_swapped=it.swapped)
            p_second = 1.0 - p2 if it.swapped else p2  # probability for the output shown second
            if self.temperature == 0 and p_second != 0.5:
                shown_prefs.append(2 if p_second > 0.5 else 1)
            elif self.temperature == 0:  # an exact tie: a seeded coin
                shown_prefs.append(1 + int(np.random.default_rng(it.sample_seed).integers(2)))
            else:
                logit = math.log(max(p_second, 1e-12)) - math.log(max(1.0 - p_second, 1e-12))
                p_t = 1.0 / (1.0 + math.exp(-logit / self.temperature))
                shown_prefs.append(2 if np.random.default_rng(it.sample_seed).random() < p_t else 1)
            if self.judge.fn_completion_parser == "logprob_parser":
                kw = self.judge.completion_parser_kwargs
                t1, t2 = kw.get("first_token", "m"), kw.get("second_token", "M")
                lp1, lp2 = math.log(max(1.0 - p_second, 1e-12)), math.log(max(p_second, 1e-12))
                top = sorted([{"token": t1, "logprob": lp1}, {"token": t2, "logprob": lp2}],
                             key=lambda t: -t["logprob"])
                logprobs = [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]
        if logprobs is not None:
            text = logprobs[0]["token"]
        else:
            text, _ = _answer_text(self.judge, shown_prefs)
        n_prompt, n_completion = count_tokens(prompt), max(1, count_tokens(text))
        k_tokens = (n_prompt + n_completion) / 1000
        return Completion(text=text, logprobs=logprobs, prompt_tokens=n_prompt, completion_tokens=n_completion,
                          seconds=self.params.seconds_per_1k_tokens * k_tokens,
                          price=self.params.price_per_1k_tokens * k_tokens)


class WorldHumansBackend:
    """The built-in world's simulated human labelers: a labeler drawn at random per example."""

    seeded = True

    def __init__(self, judge: JudgeConfig):
        from prefgym.world.humans import HumanPopulation

        check_kwargs(judge, {"population_seed", "n_labelers"})
        kw = judge.completions_kwargs
        self.judge = judge
        self.population = HumanPopulation(seed=int(kw.get("population_seed", 0)),
                                          n_labelers=int(kw.get("n_labelers", 16)))

    def complete(self, prompt: str, items: list[Item]) -> Completion:
        shown_prefs, labelers = [], []
        for it in items:
            labeler = int(np.random.default_rng(it.sample_seed).integers(self.population.n_labelers))
            pref = self.population.preference(labeler, it.instruction, it.input, it.output_1, it.output_2)
            shown_prefs.append(3 - pref if it.swapped else pref)
            labelers.append(labeler)
        text, _ = _answer_text(self.judge, shown_prefs)
        return Completion(text=text, prompt_tokens=count_tokens(prompt), completion_tokens=0,
                          seconds=0.0, raw={"labelers": labelers})
