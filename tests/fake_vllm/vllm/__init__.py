"""A stand-in for the part of vLLM's offline API that prefgym calls, over a Hugging Face model, for
tests on machines without a GPU (where vLLM cannot be installed).

What it mimics: `LLM(model=..., **engine_args)`, `LLM.generate(prompts, sampling_params, use_tqdm)`
with token prompts and one `SamplingParams` per prompt, request outputs (`outputs[i].index`,
`.token_ids`, `.text`, `.finish_reason` "stop" / "length"), the in-process model's `load_weights`
under `llm_engine.model_executor.driver_worker.model_runner.model`, and `reset_prefix_cache`.
Each request is sampled on its own, from a generator seeded with the request's seed (vLLM seeds a
request's own generator), by transformers' `generate` with the request's settings, so its samples
do not depend on the other requests. The tests record what it was asked through its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

__version__ = "0.20.1"


@dataclass
class SamplingParams:
    """vLLM's sampling parameters (the ones prefgym sets); unknown keywords fail, as a typo would."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class _Model:
    """The worker's model: `load_weights((name, tensor), ...)` copies checkpoint-named tensors in."""

    def __init__(self, hf_model):
        self.hf_model = hf_model
        self.loads: list[dict[str, torch.Tensor]] = []  # a copy of what each call loaded

    def load_weights(self, weights) -> set[str]:
        params = dict(self.hf_model.named_parameters())
        loaded = {}
        with torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    raise KeyError(f"fake vllm: no parameter {name!r} in the model")
                if params[name].shape != tensor.shape:
                    raise ValueError(f"fake vllm: {name} has shape {tuple(params[name].shape)}, got {tuple(tensor.shape)}")
                params[name].copy_(tensor)
                loaded[name] = tensor.detach().clone()
        self.loads.append(loaded)
        return set(loaded)


class LLM:
    instances: list["LLM"] = []

    def __init__(self, model: str, dtype: str = "auto", seed: int = 0, **engine_args):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.model_path, self.dtype, self.seed, self.engine_args = model, dtype, seed, engine_args
        if engine_args.get("distributed_executor_backend") == "external_launcher":
            from vllm.distributed import _join_process_group

            _join_process_group()
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        # As vLLM (`update_from_generation_config`): unless a request sets ignore_eos, it also stops at
        # the tokenizer's EOS and at every eos_token_id of the folder's generation_config.json, even
        # with generation_config="vllm" (which only drops the folder's sampling defaults).
        eos = hf_model.generation_config.eos_token_id if hf_model.generation_config is not None else None
        self.eos_token_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        if engine_args.get("generation_config") == "vllm":
            hf_model.generation_config = GenerationConfig()  # the folder's sampling defaults set aside
        self.model = _Model(hf_model)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.model))))
        self.generate_calls: list[dict] = []  # per call: the requests and the weights that served them
        self.prefix_cache_resets = 0
        LLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("fake vllm: one SamplingParams per prompt, or one for all")
        self.generate_calls.append({"prompts": prompts, "params": params, "weights": {
            k: v.detach().clone() for k, v in self.model.hf_model.named_parameters()}})
        return [self._request(p, sp) for p, sp in zip(prompts, params)]

    def reset_prefix_cache(self) -> bool:
        self.prefix_cache_resets += 1
        return True

    @torch.no_grad()
    def _request(self, prompt, sp: SamplingParams) -> RequestOutput:
        from transformers import GenerationConfig

        ids = list(prompt["prompt_token_ids"])
        stops = set(sp.stop_token_ids or ()) | (set() if sp.ignore_eos else self.eos_token_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(stops)
        common = dict(max_new_tokens=sp.max_tokens, num_beams=1, repetition_penalty=sp.repetition_penalty,
                      eos_token_id=sorted(stops) or None, pad_token_id=pad, use_cache=True)
        greedy = sp.temperature == 0
        gen = (GenerationConfig(do_sample=False, **common) if greedy else
               GenerationConfig(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                num_return_sequences=sp.n, **common))
        model = self.model.hf_model
        with torch.random.fork_rng(devices=[]):
            if sp.seed is not None:
                torch.manual_seed(sp.seed)
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=gen)
        rows = out[:, len(ids):].tolist() * (sp.n if greedy else 1)
        result = RequestOutput(prompt_token_ids=ids)
        for i, row in enumerate(rows):
            end = next((j for j, t in enumerate(row) if t in stops), None)
            stop = end is not None
            tokens = row[:end + 1] if stop else row  # vLLM keeps the stop token, stops after it
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            result.outputs.append(CompletionOutput(i, text, tokens, "stop" if stop else "length"))
        return result
