"""A local Hugging Face causal LM as judge: the log-probabilities of the two answer tokens as the
next token after the prompt, returned in the OpenAI logprobs shape for `logprob_parser`.

`completions_kwargs.prompt_format`: `chat` sends the judge prompt as the user turn (after the
judge's system_prompt, as `openai_chat` does) through the tokenizer's chat template, `raw` sends
it as it is, `auto` (default) is chat when the tokenizer has a template: a chat judge sees the
formatting the policies are trained with (`prefgym.data.prompts`).
"""

from __future__ import annotations

import threading
import time

from prefgym.annotators.backends import BackendError, Completion, check_kwargs
from prefgym.annotators.config import JudgeConfig
from prefgym.annotators.prompts import Item
from prefgym.errors import ConfigError
from prefgym.models.loading import auto_dtype, resolve_device, resolve_dtype


class HFLogprobBackend:
    """Next-token log-probabilities of a local causal LM (`completions_kwargs.model_name` = path or hub name)."""

    seeded = False

    def __init__(self, judge: JudgeConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_kwargs(judge, {"model_name", "top_logprobs", "device", "dtype", "max_length", "prompt_format"})
        if judge.fn_completion_parser != "logprob_parser":
            raise ConfigError(f"{judge.source}: judge '{judge.name}': huggingface_logprobs needs "
                              "fn_completion_parser: logprob_parser")
        kw = judge.completions_kwargs
        if "model_name" not in kw:
            raise ConfigError(f"{judge.source}: judge '{judge.name}': missing key 'completions_kwargs.model_name'")
        self.judge = judge
        device = resolve_device(kw.get("device", "auto"))
        try:  # auto: what the judge's own device computes in natively
            dtype = auto_dtype(device) if kw.get("dtype") == "auto" else resolve_dtype(str(kw.get("dtype", "float32")))
        except ConfigError:
            raise ConfigError(f"{judge.source}: judge '{judge.name}': key 'completions_kwargs.dtype' is "
                              f"{kw['dtype']!r}; use float32, bfloat16, float16 or auto") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(kw["model_name"])
            self.model = AutoModelForCausalLM.from_pretrained(kw["model_name"], dtype=dtype)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{judge.source}: judge '{judge.name}': cannot load the model "
                              f"'{kw['model_name']}' (key 'completions_kwargs.model_name'): {str(e)[:200]}") from None
        self.model = self.model.to(device).eval()
        self.chat = _use_chat(judge, self.tokenizer, kw.get("prompt_format", "auto"))
        self.top_k = int(kw.get("top_logprobs", 5))
        self.max_length = int(kw.get("max_length", 2048))
        pkw = judge.completion_parser_kwargs
        # Each answer token is the first token of its string (as it follows the prompt).
        self.answer_ids = {}
        for tok in (pkw.get("first_token", "m"), pkw.get("second_token", "M")):
            ids = self.tokenizer(tok, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"{judge.source}: judge '{judge.name}': answer token {tok!r} is empty "
                                  "for this tokenizer")
            self.answer_ids[tok] = ids[0]
        self._lock = threading.Lock()

    def complete(self, prompt: str, items: list[Item]) -> Completion:
        import torch

        start = time.perf_counter()
        if self.chat:
            from prefgym.data.prompts import chat_prompt

            system = [{"role": "system", "content": self.judge.system_prompt}] if self.judge.system_prompt else []
            prompt = chat_prompt(self.tokenizer, system + [{"role": "user", "content": prompt}])
        enc = self.tokenizer(prompt, return_tensors="pt")
        n_tokens = int(enc["input_ids"].shape[1])
        if n_tokens > self.max_length:  # cut, it would lose its end: the outputs and the answer cue
            raise BackendError(f"judge '{self.judge.name}' ({self.judge.source}): the prompt is {n_tokens} tokens, "
                               f"more than completions_kwargs.max_length ({self.max_length})", retryable=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        with self._lock, torch.no_grad():
            logits = self.model(**enc, logits_to_keep=1).logits[0, -1]  # (vocab,): only the next token's
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, k=min(self.top_k, logprobs.numel()))
        entries = {self.tokenizer.decode([i]): float(v) for v, i in zip(top.values.tolist(), top.indices.tolist())}
        for tok, i in self.answer_ids.items():  # the two answers are always reported
            entries[tok] = float(logprobs[i])
        tops = sorted(({"token": t, "logprob": v} for t, v in entries.items()), key=lambda t: -t["logprob"])
        return Completion(text=tops[0]["token"], logprobs=[{**tops[0], "top_logprobs": tops}],
                          prompt_tokens=int(enc["input_ids"].shape[1]), completion_tokens=1,
                          seconds=time.perf_counter() - start)


def _use_chat(judge: JudgeConfig, tokenizer, prompt_format: str) -> bool:
    """Whether the judge prompt goes through the chat template (prompt_format auto, chat or raw)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format not in ("auto", "chat", "raw"):
        raise ConfigError(f"{judge.source}: judge '{judge.name}': key 'completions_kwargs.prompt_format' is "
                          f"{prompt_format!r}; use auto, chat or raw")
    if prompt_format == "chat" and not has_template:
        raise ConfigError(f"{judge.source}: judge '{judge.name}': completions_kwargs.prompt_format is chat but "
                          f"the tokenizer of {judge.completions_kwargs['model_name']!r} has no chat template")
    return prompt_format == "chat" or (prompt_format == "auto" and has_template)
