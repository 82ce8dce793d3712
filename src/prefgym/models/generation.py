"""Batched sampling from a causal LM (HF `generate`: KV cache, left padding) and AlpacaEval outputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from prefgym.data.prompts import format_record


@dataclass
class SamplingConfig:
    """How to sample responses."""

    temperature: float = 0.7
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this total probability."""
    max_new_tokens: int = 300
    """Most tokens generated per response (a response stops earlier at EOS)."""
    num_samples: int = 1
    """Responses per prompt."""
    batch_size: int = 16
    """Prompts per call to `generate`."""
    seed: int = 0
    """Seed of the sampling random state."""


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig,
             progress: bool = False, first_index: int = 0) -> list[list[str]]:
    """`cfg.num_samples` responses for each prompt (text after the prompt, up to EOS).

    Prompts are batched `cfg.batch_size` at a time with left padding, so that every prompt ends
    where generation starts. Greedy when `cfg.temperature == 0` (then all samples are equal).
    Each batch is seeded by `cfg.seed` and its position; `first_index` is the position of
    `prompts[0]` in a longer list that is generated piece by piece.
    """
    from prefgym.seeding import stable_hash

    greedy = cfg.temperature == 0
    if greedy:
        sampling = dict(do_sample=False)
    else:  # top_k=0: nucleus sampling alone, not transformers' default top-50 on top of it
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                        num_return_sequences=cfg.num_samples)
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    # Sampling seeds the torch RNG; fork it so that the caller's random state is left as it was.
    cuda_devices = [model.device.index or 0] if model.device.type == "cuda" else []
    outputs: list[list[str]] = []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for start in _progress(range(0, len(prompts), cfg.batch_size), progress, "generating"):
                batch = tokenizer(prompts[start:start + cfg.batch_size], return_tensors="pt",
                                  padding=True).to(model.device)
                # Seeded by (seed, first prompt's position): results do not depend on what ran before.
                torch.manual_seed(stable_hash(cfg.seed, first_index + start) % 2**63)
                sequences = model.generate(**batch, max_new_tokens=cfg.max_new_tokens, use_cache=True,
                                           pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, **sampling)
                new_tokens = sequences[:, batch["input_ids"].shape[1]:]  # (B * n, new)
                texts = [tokenizer.decode(_until_eos(ids, tokenizer.eos_token_id), skip_special_tokens=True)
                         for ids in new_tokens.tolist()]
                per_prompt = 1 if greedy else cfg.num_samples
                for i in range(0, len(texts), per_prompt):
                    group = texts[i:i + per_prompt]
                    outputs.append(group * cfg.num_samples if greedy else group)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def generate_outputs(model_path: str | os.PathLike, records: list[dict], cfg: SamplingConfig,
                     generator: str | None = None, progress: bool = False,
                     partial_file: str | os.PathLike | None = None) -> list[dict]:
    """Sample responses for `records` (instruction, input) from the model at `model_path`.

    Returns AlpacaEval-format records: the input fields plus `output` and `generator` (the
    model folder's name by default); with `cfg.num_samples > 1`, `output` is the first sample
    and `outputs` the list of all. With `partial_file`, each finished batch is appended there
    and a rerun with the same model, records and settings generates only what is missing.
    """
    import dataclasses
    import json

    from prefgym.io import append_jsonl
    from prefgym.models.loading import load_model_and_tokenizer
    from prefgym.seeding import stable_hash

    generator = generator or Path(model_path).name
    run_key = stable_hash(str(model_path), json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    keys = [str(stable_hash(run_key, i, r["instruction"], r.get("input") or "")) for i, r in enumerate(records)]
    done: dict[str, list[str]] = {}
    if partial_file is not None and Path(partial_file).exists():
        for line in Path(partial_file).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            done[row["key"]] = row["outputs"]
    samples: list[list[str] | None] = [done.get(k) for k in keys]
    todo = [start for start in range(0, len(records), cfg.batch_size)
            if any(s is None for s in samples[start:start + cfg.batch_size])]
    if todo:
        model, tokenizer = load_model_and_tokenizer(model_path, device="auto", padding_side="left")
        for start in _progress(todo, progress, "generating"):
            chunk = records[start:start + cfg.batch_size]
            outs = generate(model, tokenizer, [format_record(r) for r in chunk], cfg, first_index=start)
            samples[start:start + len(chunk)] = outs
            if partial_file is not None:
                for k, o in zip(keys[start:start + len(chunk)], outs):
                    append_jsonl(partial_file, {"key": k, "outputs": o})
    results = []
    for record, outs in zip(records, samples):
        row = {**record, "input": record.get("input") or "", "output": outs[0], "generator": generator}
        if cfg.num_samples > 1:
            row["outputs"] = outs
        results.append(row)
    return results


def _until_eos(ids: list[int], eos_token_id: int) -> list[int]:
    return ids[:ids.index(eos_token_id)] if eos_token_id in ids else ids


def _progress(iterable, enabled: bool, description: str):
    if not enabled:
        return iterable
    from rich.progress import track

    return track(iterable, description=description)
