"""Batched sampling from a causal LM (HF `generate`: KV cache, left padding) and AlpacaEval outputs.

Decoding is stated in full by `SamplingConfig`: the model folder's `generation_config.json`
(repetition_penalty, no_repeat_ngram_size, top_k, bad_words_ids, ...) is ignored, and what it
would have changed is logged once per model.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from prefgym.data.prompts import make_prompt_formatter
from prefgym.errors import ConfigError, PrefgymError
from prefgym.methods.fields import GenerationFields, ModelFields
from prefgym.models.vllm_engine import EngineFields, resolve_engine

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig(GenerationFields, ModelFields):
    """How to sample responses, which engine samples them (`EngineFields`), and how
    `generate_outputs` loads and prompts the policy (`ModelFields`: dtype, attn_implementation,
    prompt_format; a stage that loads its policy itself sets them on its own config)."""

    temperature: float = 0.7
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this total probability."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    repetition_penalty: float = 1.0
    """CTRL's repetition penalty on tokens already in the prompt or response (1.0: off)."""
    max_new_tokens: int = 300
    """Most tokens generated per response (a response stops earlier at EOS)."""
    num_samples: int = 1
    """Responses per prompt."""
    batch_size: int = 16
    """Prompts per call to `generate`."""
    seed: int = 0
    """Seed of the sampling random state."""


@contextmanager
def folder_generation_defaults_ignored(model):
    """Within the block, `generate` sees a blank generation config instead of the model folder's.

    transformers fills every field a call leaves unset from the folder's `generation_config.json`
    (repetition_penalty, no_repeat_ngram_size, top_k, bad_words_ids, suppress_tokens, ...), which
    changes the distribution sampled from. prefgym states every decoding setting itself, so the
    folder's are set aside here (and restored after); yields the folder's config.
    """
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft copies its config
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield saved
    finally:
        target.generation_config = saved


# Folder settings that do not change the next-token distribution, or are neutral.
_NOT_SAMPLING = {"max_length", "max_new_tokens", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
                 "decoder_start_token_id", "transformers_version", "cache_implementation", "cache_config",
                 "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                 "output_hidden_states", "_from_model_config", "compile_config"}
_NEUTRAL = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "top_p": 1.0, "typical_p": 1.0,
            "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
            "num_beams": 1, "num_return_sequences": 1, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
            "guidance_scale": 1.0, "length_penalty": 1.0, "renormalize_logits": False, "remove_invalid_values": False,
            "do_sample": False}


def ignored_folder_settings(folder_config) -> dict[str, Any]:
    """The settings of a model folder's generation config that prefgym's decoding sets aside."""
    if folder_config is None:
        return {}
    return {k: v for k, v in folder_config.to_dict().items()
            if v is not None and k not in _NOT_SAMPLING and _NEUTRAL.get(k, object()) != v}


def generation_config(cfg: SamplingConfig, tokenizer):
    """The complete transformers GenerationConfig of `cfg` (to be used with the folder's ignored)."""
    from transformers import GenerationConfig

    check_sampling(cfg)
    common = dict(max_new_tokens=cfg.max_new_tokens, num_beams=1, repetition_penalty=cfg.repetition_penalty,
                  use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if cfg.temperature == 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            num_return_sequences=cfg.num_samples, **common)


def check_sampling(cfg: SamplingConfig) -> None:
    """ConfigError naming the first decoding setting out of range."""
    checks = {"temperature": cfg.temperature >= 0, "top_p": 0 < cfg.top_p <= 1, "top_k": cfg.top_k >= 0,
              "repetition_penalty": cfg.repetition_penalty > 0, "max_new_tokens": cfg.max_new_tokens >= 1}
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"sampling: {key}={getattr(cfg, key)!r} is out of range")


def batch_seed(seed: int, position: int) -> int:
    """The seed of the batch whose first prompt is at `position` (on the vLLM engine: of that prompt's request)."""
    from prefgym.seeding import stable_hash

    return stable_hash(seed, position) % 2**63


_warned: set[int] = set()


def _log_ignored(model, folder_config) -> None:
    ignored = ignored_folder_settings(folder_config)
    if ignored and id(model) not in _warned:
        _warned.add(id(model))
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or "the model"
        log.warning("generation: ignoring %s's generation_config.json settings %s; decoding uses only "
                    "prefgym's sampling settings (temperature, top_p, top_k, repetition_penalty, max_new_tokens)",
                    name, ", ".join(f"{k}={v!r}" for k, v in sorted(ignored.items())))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig,
             progress: bool = False, first_index: int = 0) -> list[list[str]]:
    """`cfg.num_samples` responses for each prompt (text after the prompt, up to EOS).

    As `generate_with_eos`, without the flags.
    """
    return generate_with_eos(model, tokenizer, prompts, cfg, progress, first_index)[0]


@torch.no_grad()
def generate_with_eos(model, tokenizer, prompts: list[str], cfg: SamplingConfig, progress: bool = False,
                      first_index: int = 0) -> tuple[list[list[str]], list[list[bool]]]:
    """`cfg.num_samples` responses for each prompt, and whether each ended with EOS (False: cut off
    at max_new_tokens; `common.missing_eos_scores` scores those).

    Prompts are batched `cfg.batch_size` at a time with left padding, so that every prompt ends
    where generation starts. Decoding follows `cfg` alone (the folder's generation config is
    ignored). Greedy when `cfg.temperature == 0` (then all samples are equal).
    Each batch is seeded by `cfg.seed` and its position; `first_index` is the position of
    `prompts[0]` in a longer list that is generated piece by piece.
    With `cfg.engine` vllm (or auto on a machine with vLLM and a GPU), the vLLM engine serving the
    model's folder samples instead (`vllm_engine.engine_for`), one request per prompt.
    """
    if resolve_engine(cfg.engine) == "vllm":
        from prefgym.models.vllm_engine import engine_for

        return engine_for(model, cfg).generate_with_eos(prompts, cfg, first_index, progress)

    greedy = cfg.temperature == 0
    gen_cfg = generation_config(cfg, tokenizer)
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    # Sampling seeds the torch RNG; fork it so that the caller's random state is left as it was.
    cuda_devices = [model.device.index or 0] if model.device.type == "cuda" else []
    outputs: list[list[str]] = []
    finished: list[list[bool]] = []
    try:
        with torch.random.fork_rng(devices=cuda_devices), folder_generation_defaults_ignored(model) as folder:
            _log_ignored(model, folder)
            for start in track_progress(range(0, len(prompts), cfg.batch_size), progress, "generating"):
                batch = tokenizer(prompts[start:start + cfg.batch_size], return_tensors="pt",
                                  padding=True).to(model.device)
                # Seeded by (seed, first prompt's position): results do not depend on what ran before.
                torch.manual_seed(batch_seed(cfg.seed, first_index + start))
                sequences = model.generate(**batch, generation_config=gen_cfg)
                new_tokens = sequences[:, batch["input_ids"].shape[1]:]  # (B * n, new)
                rows = new_tokens.tolist()
                texts = [tokenizer.decode(until_eos(ids, tokenizer.eos_token_id), skip_special_tokens=True)
                         for ids in rows]
                ended = [tokenizer.eos_token_id in ids for ids in rows]
                per_prompt = 1 if greedy else cfg.num_samples
                copies = cfg.num_samples if greedy else 1
                for i in range(0, len(texts), per_prompt):
                    outputs.append(texts[i:i + per_prompt] * copies)
                    finished.append(ended[i:i + per_prompt] * copies)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs, finished


# ---------------------------------------------------------------------------------------------
# Several processes (`accelerate launch --num_processes N`): each generates its share of the
# batches and every process ends with all of them. A batch is generated exactly as on one process
# (same prompts, same padding, seeded by its position), so N processes write what one writes.


def processes():
    """Accelerate's process state, set up as training sets it up (CPU data-parallel over gloo
    when several processes run without a GPU)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() and world_size() > 1)


def world_size() -> int:
    """How many processes run this command (torchrun / `accelerate launch` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes the files (rank 0; the only one without a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def process_device() -> str | torch.device:
    """Where this process runs its models: "auto" alone, its own device among several."""
    return processes().device if world_size() > 1 else "auto"


def wait_for_everyone() -> None:
    """A barrier among the processes (nothing with one process)."""
    if world_size() > 1:
        processes().wait_for_everyone()


def map_sharded(work: Callable[[Any], Any], blocks: Sequence, on_round: Callable[[list], None] | None = None,
                progress: bool = False, description: str = "generating") -> list:
    """`[work(b) for b in blocks]`, with the blocks shared among the processes; every process
    gets the whole list, in the order of `blocks`.

    Round r: process p works on `blocks[r * N + p]` (the last round may leave some idle); then
    the round's results are gathered (`accelerate.utils.gather_object`, in rank order, which is
    block order) and `on_round([(block, result), ...])` runs on the main process (to append them
    to a partial file). If `work` fails on any process, every process raises after that round
    (the failed one its own error, the others a PrefgymError naming it) instead of hanging.
    """
    n, rank = world_size(), int(os.environ.get("RANK", "0"))
    results: list = []
    for first in track_progress(range(0, len(blocks), n), progress and rank == 0, description):
        mine = list(blocks[first + rank:first + rank + 1])  # this process's block of the round, or none
        done = [work(b) for b in mine] if n == 1 else _work_and_gather(work, mine, description)
        if on_round is not None and rank == 0:
            on_round(list(zip(blocks[first:first + n], done)))
        results.extend(done)
    return results


def _work_and_gather(work: Callable[[Any], Any], mine: list, description: str) -> list:
    """`work` on this process's blocks, then every process's results, concatenated in rank order;
    raises on every process when `work` failed on any."""
    from accelerate.utils import gather_object

    error, outcomes = None, []
    for block in mine:
        try:
            outcomes.append((True, work(block)))
        except Exception as e:  # noqa: BLE001 (re-raised below, once the others know)
            error = e
            outcomes.append((False, f"{type(e).__name__}: {e}"))
    processes()  # gather_object reads Accelerate's process state: make sure it is set up
    outcomes = gather_object(outcomes)
    failed = [message for ok, message in outcomes if not ok]
    if failed:
        _leave_process_group()
    if error is not None:
        raise error
    if failed:
        raise PrefgymError(f"{description}: another process failed ({failed[0]})")
    return [result for _, result in outcomes]


def _leave_process_group() -> None:
    """Before raising on every process: destroy the process group, as `common.end_training` does
    (gloo left to interpreter shutdown can hang there)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main_process_only(what: str, work: Callable[[], Any]) -> None:
    """Run `work` on the main process only; the others wait for its outcome (a broadcast).

    If `work` fails on the main process, it re-raises there and every other process raises a
    PrefgymError naming `what`, instead of waiting forever.
    """
    if world_size() == 1:
        work()
        return
    from accelerate.utils import broadcast_object_list

    processes()  # the broadcast reads Accelerate's process state: make sure it is set up
    error = None
    if is_main_process():
        try:
            work()
        except BaseException as e:  # noqa: BLE001 (re-raised below, once the others know)
            error = e
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    broadcast_object_list(outcome, from_process=0)
    if outcome[0] is not None:
        _leave_process_group()
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise PrefgymError(f"the main process failed during {what} ({outcome[0]})")


def generate_sharded(model, tokenizer, prompts: list[str], cfg: SamplingConfig, first_index: int = 0
                     ) -> tuple[list[list[str]], list[list[bool]]]:
    """`generate_with_eos`, its batches shared among the processes (the same result on every process,
    and the same as one process gets)."""
    starts = range(0, len(prompts), cfg.batch_size)
    parts = map_sharded(lambda s: generate_with_eos(model, tokenizer, prompts[s:s + cfg.batch_size], cfg,
                                                    first_index=first_index + s), starts)
    return [o for texts, _ in parts for o in texts], [f for _, ended in parts for f in ended]


def generate_outputs(model_path: str | os.PathLike, records: list[dict], cfg: SamplingConfig,
                     generator: str | None = None, progress: bool = False,
                     partial_file: str | os.PathLike | None = None, prompt_format: str | None = None) -> list[dict]:
    """Sample responses for `records` (instruction, input) from the model at `model_path`, loaded
    in `cfg.dtype` with `cfg.attn_implementation`, each record prompted as `cfg.prompt_format`
    (or `prompt_format`, when given) says (`prefgym.data.prompts.make_prompt_formatter`).

    Returns AlpacaEval-format records: the input fields plus `output` and `generator` (the
    model folder's name by default); with `cfg.num_samples > 1`, `output` is the first sample
    and `outputs` the list of all. With `partial_file`, each finished batch is appended there
    and a rerun with the same model, records and settings generates only what is missing.
    Under several processes they share the batches (`map_sharded`; the main process writes the
    partial file) and each returns all the records, the same as one process returns.
    On the vLLM engine (`cfg.engine`) only the tokenizer is loaded here (`load_generator`): the
    engine holds the weights, and is released when the records are done (`releasing_engine`).
    """
    import dataclasses

    from prefgym.io import append_jsonl
    from prefgym.models.loading import load_generator
    from prefgym.models.vllm_engine import releasing_engine
    from prefgym.seeding import stable_hash

    generator = generator or Path(model_path).name
    prompt_format = prompt_format or cfg.prompt_format
    # Keyed by the decoding settings, and by the engine and the loading settings where they are
    # not at their defaults (the keys of earlier partial files).
    set_aside = {f.name for f in (*dataclasses.fields(EngineFields), *dataclasses.fields(ModelFields))}
    decoding = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in set_aside}
    loading = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(ModelFields)
               if f.name != "prompt_format" and getattr(cfg, f.name) != f.default]  # dtype, attn_implementation
    engine = resolve_engine(cfg.engine)
    run_key = stable_hash(str(model_path), json.dumps(decoding, sort_keys=True),
                          *([] if prompt_format == "auto" else [prompt_format]), *([] if engine == "hf" else [engine]),
                          *loading)
    keys = [str(stable_hash(run_key, i, r["instruction"], r.get("input") or "")) for i, r in enumerate(records)]
    done = read_partial(partial_file)
    samples: list[list[str] | None] = [done.get(k) for k in keys]
    todo = [start for start in range(0, len(records), cfg.batch_size)
            if any(s is None for s in samples[start:start + cfg.batch_size])]
    if todo:
        model, tokenizer = load_generator(model_path, cfg.engine, device=process_device(), cfg=cfg)
        fmt = make_prompt_formatter(tokenizer, prompt_format)

        def batch(start: int) -> list[list[str]]:
            return generate(model, tokenizer, [fmt(r) for r in records[start:start + cfg.batch_size]], cfg,
                            first_index=start)

        def keep(finished: list) -> None:  # main process: append each finished batch to the partial file
            for start, outs in finished:
                for k, o in zip(keys[start:start + len(outs)], outs):
                    append_jsonl(partial_file, {"key": k, "outputs": o})

        # The batches are shared among the processes (one process: all of them, in order).
        with releasing_engine():
            outputs = map_sharded(batch, todo, on_round=keep if partial_file is not None else None,
                                  progress=progress)
        for start, outs in zip(todo, outputs):
            samples[start:start + len(outs)] = outs
    return output_records(records, samples, generator, cfg.num_samples)


def read_partial(partial_file) -> dict[str, list[str]]:
    """The samples a partial file (one `{"key", "outputs"}` line per record) already holds, by key."""
    done: dict[str, list[str]] = {}
    if partial_file is not None and Path(partial_file).exists():
        for line in Path(partial_file).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            done[row["key"]] = row["outputs"]
    return done


def output_records(records: list[dict], samples: list[list[str]], generator: str, num_samples: int) -> list[dict]:
    """AlpacaEval-format records: the input fields plus `output` (the first sample) and `generator`,
    and `outputs` (all samples) when there are several."""
    results = []
    for record, outs in zip(records, samples):
        row = {**record, "input": record.get("input") or "", "output": outs[0], "generator": generator}
        if num_samples > 1:
            row["outputs"] = outs
        results.append(row)
    return results


def until_eos(ids: list[int], eos_token_id: int) -> list[int]:
    return ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids


def track_progress(iterable, enabled: bool, description: str, total: int | None = None):
    if not enabled:
        return iterable
    from rich.progress import track

    from prefgym.progress import stderr_console

    return track(iterable, total=total, description=description, console=stderr_console())
