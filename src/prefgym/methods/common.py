"""Pieces shared by the preference-learning methods.

Configs from YAML + `key=value` overrides; prompt+response batches with masks; per-token
log-probs at a sampling temperature; masked statistics and whitening; seeded sampling that does
not depend on how prompts are batched or split across processes; score heads over every token
(reward and value models); checkpoints through Accelerate.

Conventions: batches are right-padded `(B, T)` tensors; `response_mask[b, t] = 1` where token
`t` of row `b` belongs to the response; per-token log-probs are aligned with the tokens they score
(`logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`, column 0 is 0).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import yaml
from transformers import LogitsProcessor, LogitsProcessorList

from prefgym.errors import ConfigError, DataError
from prefgym.io import write_json

# ---------------------------------------------------------------------------------------------
# Configs


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """`["lr=1e-5", "use_lora=true"]` -> `{"lr": 1e-05, "use_lora": True}` (values parsed as YAML)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value != "" else ""
    return out


def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Build the dataclass `cls` from a YAML file and/or a dict of overrides (overrides win).

    Unknown keys and values of the wrong type raise ConfigError naming the file and the key.
    """
    values: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{key}' for {cls.__name__}; known keys: {', '.join(sorted(fields))}"
            )
        values[key] = _coerce(value, hints[key], where, key)
    return cls(**values)


def _coerce(value, hint, where: str, key: str):
    """Check (and gently convert: int -> float, "1e-5" -> float) a config value against its type."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is str and isinstance(value, (str, Path)):
            return str(value)
        if typing.get_origin(t) in (list, tuple) and isinstance(value, (list, tuple)):
            return list(value)
        if t is Any:
            return value
    raise ConfigError(f"{where}: key '{key}' should be {hint}, got {value!r}")


def save_config(cfg, path: str | Path) -> None:
    write_json(path, dataclasses.asdict(cfg))


def load_split(source: str | Path, required: Sequence[str]) -> list[dict]:
    """Validated records from a local file / folder / hub dataset (`prefgym.data.load_records`)."""
    from prefgym.data import load_records

    return load_records(source, required=tuple(required))


# ---------------------------------------------------------------------------------------------
# Models


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder, with a pad token (EOS if the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ConfigError(f"{path}: the tokenizer has no eos_token; responses must end with one")
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """RLHF needs the same log-probs at sampling and at training time: turn dropout off."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def apply_lora(model, cfg, task_type: str):
    """Wrap `model` in LoRA adapters when `cfg.use_lora` (fields lora_r, lora_alpha, lora_dropout)."""
    if not cfg.use_lora:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type=task_type)
    return get_peft_model(model, lora)


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (adapters stay active), or the model itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """`save_pretrained` (safetensors) of a plain model, merging LoRA adapters first."""
    from peft import PeftModel

    out_dir = Path(out_dir)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Batches and log-probs


def tokenize_prompt_response(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                             max_length: int, add_eos: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response batch: input_ids, attention_mask, response_mask, all (B, T).

    The prompt keeps its last tokens and the response its first tokens when the pair is longer
    than `max_length`; the response always keeps at least one token.
    """
    rows, masks = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if add_eos:
            r = r + [tokenizer.eos_token_id]
        r = r[: max(1, max_length - 1)]
        p = p[max(0, len(p) + len(r) - max_length):]
        rows.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    response_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        response_mask[i, : len(row)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as generation does with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) log p(token t | tokens < t) at `temperature`; column 0 is 0."""
    logps = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    picked = torch.gather(logps, 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return F.pad(picked, (1, 0))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the next-token distribution that predicts token t; column 0 is 0."""
    logps = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return F.pad(-(logps.exp() * logps).sum(-1), (1, 0))


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      temperature: float = 1.0, response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs (B, T) of a causal LM on a (left- or right-padded) batch.

    With `response_mask`, the LM head and softmax run only from the first position that predicts
    a response token on (`logits_to_keep`); the columns before it are 0.
    """
    T = input_ids.shape[1]
    start = 0 if response_mask is None else max(int(response_mask.float().argmax(-1).min()) - 1, 0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
                   logits_to_keep=T - start).logits  # (B, T - start, V): positions start .. T-1
    return F.pad(token_logprobs(logits, input_ids[:, start:], temperature), (start, 0))


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) output of a sequence-classification model's score head (num_labels=1) at every token.

    Reward models read it at the last real token; PPO's value model reads it at every token.
    """
    model = unwrap_peft(model)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from(attention_mask)).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


class TokenScorer(torch.nn.Module):
    """`token_scores` as a module's forward, so that data-parallel wrappers see the call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_scores(self.model, input_ids, attention_mask)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded row."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


# ---------------------------------------------------------------------------------------------
# Masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # `where`, not `*`: NaN * 0 is NaN
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all of them, or along `dim`)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean added back if not shift_mean).

    `reduce` sums a tensor across processes (e.g. `lambda t: accelerator.reduce(t, "sum")`) so the
    statistics are those of the global batch, whatever the number of processes.
    """
    reduce = reduce or (lambda t: t)
    m = mask.float()
    stats = reduce(torch.stack([masked_sum(x, m), m.sum()]).float())
    mean = stats[0] / stats[1]
    sq = reduce(masked_sum((x - mean) ** 2, m).reshape(1).float())[0]
    var = sq / (stats[1] - 1).clamp(min=1)  # unbiased, as torch.var
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------------
# Sampling


class GumbelSampler(LogitsProcessor):
    """Exact sampling at `temperature` as argmax(logits / T + Gumbel noise), one RNG per row.

    Used with greedy decoding, each row's sample depends only on its own seed, not on which
    other prompts share the batch or the process: runs on 1 or N processes draw the same
    responses, and a resumed run draws what the uninterrupted one would have.
    """

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        V = scores.shape[-1]
        u = torch.stack([torch.rand(V, generator=g) for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return scores.float() / self.temperature + gumbel


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[str], *, seeds: Sequence[int],
                     temperature: float, max_new_tokens: int, max_prompt_length: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per prompt.

    Returns (query_ids (B, P) left-padded, query_mask (B, P), response_ids (B, R)); response rows
    are padded with pad_token_id after EOS (or run to max_new_tokens without one).
    """
    from transformers import GenerationConfig

    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # long prompts keep their end
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                    max_length=max_prompt_length)
    tokenizer.padding_side, tokenizer.truncation_side = sides
    device = next(model.parameters()).device
    query_ids, query_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=1,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_cfg,
                         logits_processor=LogitsProcessorList([GumbelSampler(seeds, temperature)]))
    model.train(was_training)
    return query_ids, query_mask, out[:, query_ids.shape[1]:]


def truncate_after_eos(response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep tokens up to and including the first EOS; returns (ids, mask, has_eos) with (B, R), (B, R), (B,)."""
    is_eos = response_ids == eos_token_id
    has_eos = is_eos.any(-1)
    first_eos = torch.where(has_eos, is_eos.float().argmax(-1), torch.full_like(has_eos, response_ids.shape[1], dtype=torch.long))
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    mask = (positions[None, :] <= first_eos[:, None]).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask, has_eos


# ---------------------------------------------------------------------------------------------
# Checkpoints and runs


def save_checkpoint(accelerator, ckpt_dir: Path, state: dict) -> None:
    """Model(s), optimizer, RNG states (Accelerate) plus `state` (step, ...) in state.json.

    Written to a sibling folder then renamed, so a crash mid-save leaves the previous checkpoint.
    """
    import shutil

    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_json(tmp / "state.json", state)
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        tmp.rename(ckpt_dir)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, ckpt_dir: Path) -> dict | None:
    """Restore what save_checkpoint wrote; None when there is no checkpoint."""
    if not (ckpt_dir / "state.json").exists():
        return None
    accelerator.load_state(str(ckpt_dir))
    return json.loads((ckpt_dir / "state.json").read_text())


def drop_metrics_after(metrics_file: Path, step: int) -> None:
    """After a resume from `step`: forget the metrics rows a crashed run logged past it."""
    from prefgym.io import read_records, write_jsonl

    if metrics_file.exists():
        write_jsonl(metrics_file, [r for r in read_records(metrics_file) if r.get("step", 0) <= step])


def make_progress(accelerator=None):
    """A rich progress bar (shown on the main process only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    disable = accelerator is not None and not accelerator.is_main_process
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=disable)


def no_sync_unless(accelerator, model, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    return nullcontext() if last else accelerator.no_sync(model)


def preference_target(preference, row: int | None = None, path=None) -> float:
    """P(output_1 is better): 1 -> 1.0, 2 -> 0.0, tie (1.5, or AlpacaEval's 0) -> 0.5."""
    try:
        p = float(preference)
    except (TypeError, ValueError):
        raise DataError(f"preference must be 1, 2 or 1.5, got {preference!r}", path=path, row=row,
                        field="preference") from None
    if p == 0:
        return 0.5
    if not 1.0 <= p <= 2.0:
        raise DataError(f"preference must be 1, 2 or 1.5, got {preference!r}", path=path, row=row,
                        field="preference")
    return 2.0 - p
