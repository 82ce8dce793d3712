"""Sampling through vLLM's offline engine (`pip install 'prefgym[vllm]'`), imported only when asked for.

`engine: vllm` (a field of `SamplingConfig` and of every generating method's config) sends the
sampling of `generation.generate_with_eos` here, so preference data, best-of-n, expert iteration
and evaluation write the same records as with `engine: hf`; PPO and Quark sample their rollouts on
an engine of their own (RLOO, GRPO and online DPO too) and send it the policy's weights before
each rollout (`update_weights`).
These sampling stages load the policy once, on the engine: `loading.load_generator` gives
them the tokenizer and an `EngineModel` (folder, dtype, device) in place of the HF model, and the
engine `engine_for` keeps is released when the stage ends (`releasing_engine`).
`engine: auto` is vllm when it is installed and a CUDA device exists, else hf.

Each prompt is one request seeded by `generation.batch_seed(cfg.seed, its position)`, the seed
the HF path gives a batch of one prompt, so the random draws do not depend on the batching (on a
GPU vLLM's logits may, by a rounding, as they are not batch-invariant by default), and a
request with n samples is vLLM's n sequences of one request. Decoding follows the sampling
settings alone, as on the HF path: `generation_config="vllm"` sets aside the folder's sampling
defaults, and a response ends at the tokenizer's EOS only (`ignore_eos=True` with that EOS as the
one stop token: otherwise vLLM also stops at every eos_token_id of the folder's
generation_config.json, as Llama-3 and Qwen instruct folders list several); prompts go in as the
token ids prefgym's tokenizer makes, and responses come back as token ids that the same tokenizer
decodes.

The engine runs inside this process (`distributed_executor_backend="external_launcher"`, as TRL's
colocate mode), which is what lets `update_weights` reach the model; one process only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

from prefgym.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

VLLM_VERSIONS = ("0.17.0", "0.31.0")
"""The vllm versions the engine supports, both included (pyproject's `vllm` extra says the same):
those TRL's colocated engine, which makes the same calls (`LLM(..., distributed_executor_backend=
"external_launcher")`, per-request `SamplingParams`, `model_runner.model.load_weights`,
`reset_prefix_cache`), is tested against: 0.17.0 to 0.25.1 by TRL 1.9.0, 0.22.0 to 0.31.0 by
TRL 1.16.0."""
INSTALL = "pip install 'prefgym[vllm]'"
ENGINES = ("hf", "vllm", "auto")


@dataclass
class EngineFields:
    """Which engine samples responses (shared by `SamplingConfig` and the generating methods' configs)."""

    engine: str = "hf"
    """Who samples: hf (transformers' generate), vllm (vLLM; pip install 'prefgym[vllm]'), or auto
    (vllm when it is installed and a CUDA device exists, else hf)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory vLLM takes for its weights and KV cache (engine vllm; TRL's colocate
    default, which leaves room for the models a method trains beside it)."""
    vllm_max_model_len: Optional[int] = None
    """Longest prompt + response, in tokens, the engine of a sampling stage serves (None: the model's
    context length). vLLM refuses to start when one sequence of that length does not fit in the KV
    cache its memory share leaves: set it for long-context models. Training loops' engines take
    max_prompt_length + max_new_tokens unless it is set (Quark: the model's context length)."""


def engine_settings(cfg) -> dict:
    """The EngineFields of `cfg` (a method's config), to build its SamplingConfig with."""
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EngineFields)}


def check_engine_fields(cfg) -> None:
    """ConfigError naming the key when `engine` is unknown, the memory share not in (0, 1] or the length below 1."""
    if cfg.engine not in ENGINES:
        raise ConfigError(f"key 'engine' should be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        raise ConfigError("key 'vllm_gpu_memory_utilization' should be in (0, 1], got "
                          f"{cfg.vllm_gpu_memory_utilization!r}")
    if cfg.vllm_max_model_len is not None and cfg.vllm_max_model_len < 1:
        raise ConfigError(f"key 'vllm_max_model_len' should be a number of tokens (at least 1) or null, got "
                          f"{cfg.vllm_max_model_len!r}")


def import_vllm():
    """The vllm module; ConfigError naming the extra when it is missing or its version unsupported."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"engine 'vllm': vllm cannot be imported ({e}); {INSTALL} on a machine with a CUDA "
                          "GPU, or set engine: hf") from None
    check_vllm_version(vllm.__version__)
    return vllm


def check_vllm_version(version: str) -> None:
    """ConfigError when `version` is outside VLLM_VERSIONS (a local tag such as +cu129 is ignored)."""
    from packaging.version import Version

    low, high = VLLM_VERSIONS
    release = Version(Version(version).base_version)
    if not Version(low) <= release <= Version(high):
        raise ConfigError(f"engine 'vllm': vllm {version} is installed, but prefgym's engine supports vllm "
                          f"{low} to {high}; {INSTALL} installs one of those, or set engine: hf")


def resolve_engine(engine: str) -> str:
    """hf or vllm: `engine` itself, or for auto what this machine has (`auto_engine`)."""
    return auto_engine() if engine == "auto" else engine


@cache
def auto_engine() -> str:
    """vllm when a supported vllm is installed and a CUDA device exists, else hf; logs which, once."""
    import torch

    if importlib.util.find_spec("vllm") is None:
        reason = "vllm is not installed"
    elif not torch.cuda.is_available():
        reason = "no CUDA device"
    else:
        try:
            import_vllm()
            log.info("generation engine: vllm (engine=auto)")
            return "vllm"
        except ConfigError as e:
            reason = str(e)
    log.info("generation engine: hf (engine=auto: %s)", reason)
    return "hf"


class VLLMEngine:
    """An in-process `vllm.LLM` on a model folder, sampling as `generation.generate_with_eos` does.

    `tokenizer` (default: the folder's, as prefgym loads it) encodes the prompts and decodes the
    responses; `dtype` is the weights' dtype name (float32, bfloat16, float16).
    """

    def __init__(self, model_path, dtype: str = "float32", seed: int = 0, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, tokenizer=None):
        from prefgym.models.generation import world_size
        from prefgym.models.loading import load_tokenizer

        vllm = import_vllm()
        if world_size() > 1:
            raise ConfigError("engine 'vllm' runs in one process (vLLM batches the requests itself); start the "
                              "command without accelerate launch / torchrun, or set engine: hf")
        self.tokenizer = tokenizer or load_tokenizer(model_path)
        self._sampling_params = vllm.SamplingParams
        self.max_model_len = max_model_len
        with _single_process_rendezvous():
            self.llm = vllm.LLM(model=str(model_path), dtype=dtype, seed=seed,
                                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                distributed_executor_backend="external_launcher", generation_config="vllm")

    def generate_with_eos(self, prompts: Sequence[str], cfg, first_index: int = 0, progress: bool = False
                          ) -> tuple[list[list[str]], list[list[bool]]]:
        """`generation.generate_with_eos` on this engine: responses and whether each ended with EOS.

        `prompts[i]` is request `first_index + i`, seeded as the HF path seeds a batch of that one
        prompt; greedy (temperature 0) samples once and repeats the response num_samples times.
        """
        from prefgym.models.generation import batch_seed, check_sampling

        check_sampling(cfg)
        greedy = cfg.temperature == 0
        n, copies = (1, cfg.num_samples) if greedy else (cfg.num_samples, 1)
        params = [self._params(cfg, n, batch_seed(cfg.seed, first_index + i)) for i in range(len(prompts))]
        requests = self._requests(prompts)
        longest = max((len(r["prompt_token_ids"]) for r in requests), default=0)
        if self.max_model_len is not None and longest + cfg.max_new_tokens > self.max_model_len:
            raise ConfigError(f"key 'vllm_max_model_len' is {self.max_model_len} tokens, but a prompt of {longest} "
                              f"tokens and max_new_tokens {cfg.max_new_tokens} need {longest + cfg.max_new_tokens}; "
                              "raise it (or leave it null: the model's context length)")
        results = self.llm.generate(requests, sampling_params=params, use_tqdm=progress)
        texts, ended = [], []
        for result in results:
            samples = sorted(result.outputs, key=lambda o: o.index)
            texts.append([self._decode(o.token_ids) for o in samples] * copies)
            ended.append([o.finish_reason == "stop" for o in samples] * copies)
        return texts, ended

    def sample_token_ids(self, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int], temperature: float,
                         max_new_tokens: int) -> list[list[int]]:
        """One response per prompt (token ids), drawn from softmax(logits / temperature) with no
        top-p / top-k, seeded per prompt; a response that stopped at EOS ends with it (PPO's rollouts)."""
        eos = self.tokenizer.eos_token_id
        params = [self._sampling_params(n=1, temperature=temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                        max_tokens=max_new_tokens, seed=seed % 2**63, stop_token_ids=[eos],
                                        ignore_eos=True)
                  for seed in seeds]
        results = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids],
                                    sampling_params=params, use_tqdm=False)
        responses = []
        for result in results:
            out = result.outputs[0]
            ids = list(out.token_ids)
            if out.finish_reason == "stop" and (not ids or ids[-1] != eos):
                ids.append(eos)  # a version that leaves the stop token out
            responses.append(ids)
        return responses

    def update_weights(self, named_weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load `(checkpoint name, tensor)` pairs into the engine's model (`full_weights(policy)`), then
        drop the prefix cache, whose KV entries the old weights computed."""
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        model.load_weights(iter(named_weights))  # streamed: one merged tensor alive at a time
        self.llm.reset_prefix_cache()

    def _params(self, cfg, n: int, seed: int):
        return self._sampling_params(n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                     repetition_penalty=cfg.repetition_penalty, max_tokens=cfg.max_new_tokens,
                                     seed=seed, stop_token_ids=[self.tokenizer.eos_token_id], ignore_eos=True)

    def _requests(self, prompts: Sequence[str]) -> list[dict]:
        """vLLM token prompts: the ids prefgym's tokenizer gives (special tokens as on the HF path)."""
        return [{"prompt_token_ids": ids} for ids in self.tokenizer(list(prompts))["input_ids"]]

    def _decode(self, token_ids: Sequence[int]) -> str:
        from prefgym.models.generation import until_eos

        return self.tokenizer.decode(until_eos(list(token_ids), self.tokenizer.eos_token_id),
                                     skip_special_tokens=True)


@dataclass(frozen=True)
class EngineModel:
    """The policy of a stage that samples on the vLLM engine, in place of the HF model
    (`loading.load_generator`): the folder and dtype `engine_for` starts the engine with, and the
    device the stage's other models (a reward model) go to. It holds no weights, so the folder's
    weights are on the GPU once (the engine's); anything else asked of it (a forward pass,
    `generate`, `.training`) is an error that says so."""

    name_or_path: str
    dtype: torch.dtype
    device: torch.device

    def __getattr__(self, name: str):
        raise AttributeError(f"{self._what()} has no {name!r}: its weights are on the vLLM engine only; sample "
                             "with generation.generate_with_eos, or load the model with load_model_and_tokenizer")

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self._what()} has no forward pass: its weights are on the vLLM engine only; load the "
                        "model with load_model_and_tokenizer to run it")

    def _what(self) -> str:
        return f"EngineModel({self.__dict__.get('name_or_path')!r}, engine: vllm)"


_engine: tuple[tuple, VLLMEngine] | None = None


def engine_for(model, cfg) -> VLLMEngine:
    """The engine serving the folder `model` was loaded from (an HF model or an `EngineModel`), in
    `model`'s dtype, kept (`kept_engine`) for the next call with the same folder, dtype, memory
    share and length: a stage's batches and chunks share it, and each stage that samples here
    releases it at its end (`releasing_engine`). It holds the folder's weights: a caller that
    trains `model` sends them with `update_weights(full_weights(model))`."""
    key = (str(model.name_or_path), dtype_name(model.dtype), cfg.vllm_gpu_memory_utilization, cfg.vllm_max_model_len)
    return kept_engine(key, lambda: VLLMEngine(key[0], dtype=key[1], gpu_memory_utilization=key[2],
                                               max_model_len=key[3]))


def kept_engine(key: tuple, make: Callable[[], VLLMEngine]) -> VLLMEngine:
    """The one engine a process keeps: the kept one when it was made for `key`, else `make()`'s,
    after the old one is released (`release_engine`: two engines would not fit beside each other).
    Sampling stages (`engine_for`) and training loops (`common.rollout_engine`) keep theirs here,
    so `release_engine` gives back either, as `prefgym run` does after every stage."""
    global _engine
    if _engine is None or _engine[0] != key:
        release_engine()
        _engine = (key, make())
    return _engine[1]


def kept_rollout_engine(folder, dtype, seed: int, gpu_memory_utilization: float, max_model_len: int | None,
                        tokenizer) -> VLLMEngine:
    """A training loop's engine (`kept_engine`): the kept one when it was made with these settings,
    else a new one started from `folder`; `dtype` is a torch dtype."""
    key = ("rollouts", str(folder), dtype_name(dtype), seed, gpu_memory_utilization, max_model_len)
    return kept_engine(key, lambda: VLLMEngine(folder, dtype=key[2], seed=seed, tokenizer=tokenizer,
                                               gpu_memory_utilization=gpu_memory_utilization,
                                               max_model_len=max_model_len))


def release_engine() -> None:
    """Drop the engine this process keeps (`kept_engine`) and give its GPU memory back, so that
    what runs next (the next stage of `prefgym run`) has it; nothing when no engine is kept. vLLM's
    own cleanup (`vllm.distributed.cleanup_dist_env_and_memory`: its process groups, garbage
    collection, the CUDA cache) frees it; the next `engine_for` or training loop starts a new one."""
    global _engine
    if _engine is None:
        return
    _engine = None
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


@contextmanager
def releasing_engine():
    """A stage's sampling: `engine_for`'s engine is kept between the calls inside the block and
    released (`release_engine`) when it ends, by an error too."""
    try:
        yield
    finally:
        release_engine()


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (vLLM's name of the dtype)."""
    return str(dtype).removeprefix("torch.")


def full_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under its checkpoint's names, as vLLM's `load_weights` takes them, one
    at a time: each merged tensor is made when the engine asks for it and dropped once loaded, so
    a sync holds one layer's fp32 merge beside the model, not all of them (~4 bytes a parameter).

    A peft model's LoRA adapters are merged in: each adapted layer's weight is base + its active
    adapters' deltas (`get_delta_weight`: scale · B A), computed beside the model, which is left as
    it was. (peft's merge_adapter / unmerge_adapter would round the base weights, and with them the
    reference PPO reads with the adapters off, a little at every sync.) LoRA, not vLLM's
    LoRARequest: no adapter files written per update, no LoRA kernels, any target module.
    The merged weights are fp32 whatever the base's dtype (on a bf16 base, W + ΔW in bf16 would lose
    an update below bf16's step); the engine casts them to its own dtype as it loads them.
    """
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    if not isinstance(model, PeftModel):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
    base = model.get_base_model()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for key, p in module.get_base_layer().named_parameters():
                if key != "weight":
                    yield f"{name}.{key}", p.detach()
                    continue
                with torch.no_grad():  # not around the yield: grad mode is the caller's while suspended
                    merged = p.detach().float() + sum(module.get_delta_weight(a) for a in module.active_adapters
                                                      if a in module.lora_A)
                yield f"{name}.{key}", merged
                del merged
        elif isinstance(module, TrainableTokensLayer):  # trained rows of an embedding (Quark's reward tokens)
            with torch.no_grad():
                merged = module.get_merged_weights(module.active_adapters).detach()
            yield f"{name.removesuffix('.token_adapter')}.weight", merged
            del merged
    for name, p in base.named_parameters():
        if any(part in name for part in (".base_layer.", ".lora_", ".original_module.", ".token_adapter.")):
            continue  # adapted layers are above; a modules_to_save copy replaces its original
        yield name.replace(".modules_to_save.default.", "."), p.detach()


@contextmanager
def _single_process_rendezvous():
    """The variables vLLM's external launcher reads while the engine starts (it joins
    torch.distributed from them: a world of one), for a single process started without a launcher;
    those set here are removed again after, since Accelerate takes a LOCAL_RANK in the environment
    for a launch and would make a later training run a one-GPU DDP run."""
    import socket

    added = {key: value for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                                           ("MASTER_ADDR", "127.0.0.1")) if key not in os.environ}
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            added["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
