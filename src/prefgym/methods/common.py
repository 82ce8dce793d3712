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
import time
import types
import typing
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import yaml
from transformers import LogitsProcessor, LogitsProcessorList

from prefgym.errors import ConfigError, DataError, PrefgymError
from prefgym.models import generation
from prefgym.io import atomic_path, write_json

# ---------------------------------------------------------------------------------------------
# Configs


class _Null:
    """An override that sets a field to None (`--set key=null`), told apart from an option not given."""

    def __repr__(self) -> str:
        return "null"


NULL = _Null()
"""The value `parse_overrides` gives `key=null` (`~`, empty YAML null): `load_config` sets None."""


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """`["lr=1e-5", "use_lora=true", "max_steps=null"]` -> `{"lr": 1e-05, "use_lora": True,
    "max_steps": NULL}` (values parsed as YAML; a YAML null becomes `NULL`, which sets None)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value) if value != "" else ""
        out[key.strip().replace("-", "_")] = NULL if parsed is None else parsed
    return out


def set_then_flags(set_items: Sequence[str] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """A command's config overrides: its `--set key=value` items, then the named options the user
    gave (an option left unset is None and does not cancel a `--set` of the same key)."""
    return {**parse_overrides(set_items), **{k: v for k, v in flags.items() if v is not None}}


def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                where: str = "config"):
    """Build the dataclass `cls` from a YAML file and/or a dict of overrides (overrides win).

    Unknown keys and values of the wrong type raise ConfigError naming the file (or `where`,
    e.g. "run.yaml: stages.sft") and the key. An override of None means "not given" (an option
    left unset); `NULL` (from `--set key=null`) sets the field to None.
    """
    values: dict[str, Any] = {}
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values = {k: None if v is NULL else v for k, v in values.items()}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{key}' for {cls.__name__}; known keys: {', '.join(sorted(fields))}"
            )
        values[key] = _coerce(value, hints[key], where, key)
    try:
        return cls(**values)
    except ConfigError as e:  # a value its __post_init__ refuses: say where it came from
        raise ConfigError(f"{where}: {e}") from None


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
        if (t is dict or typing.get_origin(t) is dict) and isinstance(value, dict):
            return value
        if t is Any:
            return value
    raise ConfigError(f"{where}: key '{key}' should be {type_name(hint)}, got {value!r}")


def type_name(hint) -> str:
    """A type as a user writes it: `int`, `str or None`, `list[str]` (not `<class 'int'>`)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(t) for t in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def save_config(cfg, path: str | Path) -> None:
    write_json(path, dataclasses.asdict(cfg))


RESULT_NEUTRAL_KEYS = frozenset({"output_dir", "resume", "progress", "save_steps", "save_every_seconds",
                                 "logging_steps", "vllm_gpu_memory_utilization"})
"""Config fields that change how a run is carried out or shown, not what it computes."""


def config_diff(old: dict, new: dict, ignore=RESULT_NEUTRAL_KEYS) -> list[str]:
    """`key: old -> new` for each key (outside `ignore`) whose value differs; nested dicts as
    dotted keys, a key on one side only as `(absent)`."""
    old, new = _flatten(old), _flatten(new)
    absent = "(absent)"
    return [f"{key}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}".replace(f"'{absent}'", absent)
            for key in sorted(old.keys() | new.keys())
            if key.split(".")[-1] not in ignore and old.get(key, absent) != new.get(key, absent)]


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_output_dir(cfg, config_file: str | Path) -> None:
    """Before training into a folder: the config an earlier run saved there (`config_file`) must
    match `cfg` on every field that changes the result, or the run would resume (or return) a
    model trained with other settings. ConfigError naming the folder and the differing keys;
    nothing to check when `cfg.resume` is False (the run starts over) or the folder is new.
    """
    path = Path(config_file)
    if not cfg.resume or not path.exists():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as saved: tuples as lists
    diff = config_diff({k: v for k, v in saved.items() if k in new}, {k: v for k, v in new.items() if k in saved})
    if diff:
        raise ConfigError(f"{path.parent} holds a run made with other settings ({'; '.join(diff)}); "
                          "rerun with --no-resume to start over there, or choose another output folder")


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
    """Turn dropout off everywhere: the same log-probs / scores in train mode as in eval mode.

    As TRL's `disable_dropout_in_model` (every `nn.Dropout` gets p = 0), plus the attention dropout
    that Llama-family models apply functionally (`attention_dropout`, not an `nn.Dropout` module).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def apply_lora(model, cfg, task_type: str, trainable_token_indices: Sequence[int] = ()):
    """Wrap `model` in LoRA adapters when `cfg.use_lora` (fields lora_r, lora_alpha, lora_dropout).

    LoRA adapts linear layers only, so tokens added to the vocabulary (Quark's and reward
    conditioning's control tokens) would keep the embedding rows they started with: their ids go in
    `trainable_token_indices`, and those rows train too (peft's trainable tokens; with tied input
    and output embeddings the output rows follow). `save_model` merges them like the adapters.
    """
    if not cfg.use_lora:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type=task_type,
                      trainable_token_indices=list(trainable_token_indices) or None)
    with warnings.catch_warnings():  # peft reads transformers 5's deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (adapters stay active), or the model itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def save_model(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """`save_pretrained` (safetensors) of a plain model, merging LoRA adapters first (`_merged_in_fp32`:
    a LoRA model on a bf16 / fp16 base is saved in float32, which keeps its update). A peft model is
    merged in place, on the CPU: it is not for training after this. `state_dict`: the full weights
    of a model FSDP or ZeRO-3 shards (`save_trained`), written instead of the model's own (a peft model's are
    merged on a CPU copy, `_unsharded_peft`)."""
    from peft import PeftModel

    out_dir = Path(out_dir)
    if isinstance(model, PeftModel):
        model = _merged_in_fp32(model if state_dict is None else _unsharded_peft(model, state_dict))
        state_dict = None
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_trained(accelerator, model, tokenizer, out_dir: str | Path, part: str = "") -> None:
    """`save_model` of the model a loop trained: `part` of its prepared `model` ("model", "policy";
    "" for `model` itself), written by the main process. Every process must call it: under FSDP
    and DeepSpeed ZeRO-3 each process holds a shard of each weight, so the full weights are
    gathered first (`accelerator.get_state_dict`, a collective) and the main process writes those."""
    from accelerate.utils import DistributedType

    from prefgym.methods.zero3 import is_zero3

    inner = accelerator.unwrap_model(model).get_submodule(part)
    if accelerator.distributed_type != DistributedType.FSDP and not is_zero3(accelerator):
        if accelerator.is_main_process:
            save_model(inner, tokenizer, out_dir)
        return
    state = accelerator.get_state_dict(model)  # the full weights on the main process, nothing on the others
    if accelerator.is_main_process:
        prefix = f"{part}." if part else ""
        save_model(inner, tokenizer, out_dir, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _unsharded_peft(model, state_dict: dict):
    """A CPU copy of the sharded (FSDP, ZeRO-3) peft `model` holding `state_dict`, its full weights:
    the same model class (not FSDP's subclass), config and adapter config, built without initialising."""
    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule
    from transformers.initialization import no_init_weights

    from prefgym.methods.zero3 import whole_weights

    base = model.get_base_model()
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    with no_init_weights(), whole_weights():
        copy = get_peft_model(cls(base.config), model.peft_config[model.active_adapter])
    copy.load_state_dict(state_dict, assign=True)
    return copy


def _merged_in_fp32(model):
    """The plain model of a peft `model`, its adapters merged in float32 and left float32.

    peft's `merge_and_unload` adds the fp32 update B·A to the base weights in their dtype: on a bf16
    base every weight is rounded to bf16 again (8 significant bits), and an update smaller
    than that step, which the unmerged model keeps (base output + x·A·B), is lost. Upcasting the
    model first merges W + ΔW in fp32; the folder is then an ordinary float32 checkpoint (twice a
    bf16 one), and its config says float32, so a load in the folder's dtype keeps the update. The
    merge runs on the CPU, where the weights go to be written anyway: an fp32 copy of a model
    trained in bf16 need not fit on its GPU beside the optimizer's state.
    """
    return model.to("cpu", torch.float32).merge_and_unload()


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


LOGSOFTMAX_CHUNK_ELEMENTS = 2**22
"""Logits per fp32 chunk in `token_logprobs` / `token_entropy` (16 MiB): at most this many are
converted to fp32 at once, so a 128k vocabulary never holds an fp32 (B, T, V) copy of the logits."""


def chunk_slices(n: int, logits_per_item: int) -> list[slice]:
    """Slices of items 0 .. n-1 (time steps, rows) holding about LOGSOFTMAX_CHUNK_ELEMENTS logits
    each, at least one item."""
    step = max(1, LOGSOFTMAX_CHUNK_ELEMENTS // max(1, logits_per_item))
    return [slice(t, min(t + step, n)) for t in range(0, n, step)]


def _time_slices(logits: torch.Tensor, end: int) -> list[slice]:
    """Slices of positions 0 .. end-1 of (B, T, V) logits (`chunk_slices` of B·V logits a step)."""
    B, _, V = logits.shape
    return chunk_slices(end, B * V)


def _next(s: slice) -> slice:
    """The positions of the tokens that the logits at positions `s` predict."""
    return slice(s.start + 1, s.stop + 1)


class _TokenLogprobs(torch.autograd.Function):
    """`token_logprobs`, one time-slice of the logits at a time.

    Forward and backward convert only a slice of the logits to fp32; backward recomputes the
    slice's log-softmax instead of keeping it, and writes the gradient (onehot - softmax) * g / T
    straight into one tensor of the logits' shape and dtype: the operations autograd runs through
    `log_softmax(logits.float() / T).gather(...)`, so the same values and gradients.
    """

    @staticmethod
    def forward(ctx, logits, input_ids, temperature):  # (B, T, V), (B, T) -> (B, T) fp32
        ctx.save_for_backward(logits, input_ids)
        ctx.temperature = temperature
        out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
        for s in _time_slices(logits, input_ids.shape[1] - 1):
            logps = torch.log_softmax(logits[:, s].float() / temperature, dim=-1)
            out[:, _next(s)] = logps.gather(2, input_ids[:, _next(s), None]).squeeze(-1)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # (B, T) -> (B, T, V) in the logits' dtype; the last position gets 0
        logits, input_ids = ctx.saved_tensors
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        for s in _time_slices(logits, input_ids.shape[1] - 1):
            g = grad_out[:, _next(s), None].float()  # (B, slice, 1)
            probs = torch.log_softmax(logits[:, s].float() / ctx.temperature, dim=-1).exp_()
            grad[:, s] = probs.mul_(-g).scatter_add_(2, input_ids[:, _next(s), None], g).div_(ctx.temperature)
        return grad, None, None


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) log p(token t | tokens < t) at `temperature`; column 0 is 0.

    Equals `log_softmax(logits[:, :-1].float() / temperature).gather(input_ids[:, 1:])`, values
    and gradients, without an fp32 (B, T, V) tensor (`_TokenLogprobs`).
    """
    return _TokenLogprobs.apply(logits, input_ids, temperature)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits and the (B, T) tokens they predict (position t's logits, token t) -> (B, T)
    log-probs: `log_softmax(logits.float() / temperature).gather(targets)` without an fp32
    (B, T, V) tensor, as `token_logprobs` (which it calls with the targets shifted one place right).
    The logits may have more positions than the targets: the trailing ones predict nothing (take
    no slice of them: its backward would allocate one more gradient of the logits' size).
    """
    return token_logprobs(logits, F.pad(targets, (1, 0)), temperature)[:, 1:]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the next-token distribution that predicts token t; column 0 is 0.

    Computed a time-slice at a time like `token_logprobs` (no fp32 (B, T, V) tensor without
    gradients; under autograd each slice's tensors are kept for the backward pass).
    """
    out = torch.zeros(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for s in _time_slices(logits, logits.shape[1] - 1):
        logps = torch.log_softmax(logits[:, s].float() / temperature, dim=-1)
        out[:, _next(s)] = -(logps.exp() * logps).sum(-1)
    return out


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


def no_split_modules(*models) -> list[str]:
    """Class names of the blocks (decoder layers) of these transformers models, peft wrappers read
    through: a wrapper module exposes them as `_no_split_modules`, so that FSDP's
    TRANSFORMER_BASED_WRAP (which reads that attribute of the module given to `prepare`) shards
    each decoder layer as its own unit instead of the whole model as one."""
    names = set()
    for model in models:
        names.update(getattr(model, "_no_split_modules", None) or ())
    return sorted(names)


class TokenScorer(torch.nn.Module):
    """`token_scores` as a module's forward, so that data-parallel wrappers see the call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str]:
        return no_split_modules(self.model)

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


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for int64 tensors of 32-bit values, in 16-bit halves (no int64 overflow)."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (fmix32): a bijection of 32-bit values with full avalanche."""
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """(B,) int64 seeds in [0, 2**63) and a step (or (B,) steps) -> (B,) float64 uniforms in [0, 1),
    a pure function of (seed, step).

    Counter-based, as Philox or JAX's keys: nothing carries state from one draw to the next, so a
    row's draws do not depend on the other rows, the batch or the process, and run on the seeds'
    device in one vectorised pass. Two 32-bit hashes of (seed, step, lane) give 53 random bits,
    assembled as numpy's `random_sample` does.
    """
    words = [seeds & _MASK32, seeds >> 32, torch.as_tensor(step, dtype=torch.long, device=seeds.device).expand_as(seeds)]
    lanes = []
    for lane in (0, 1):
        h = torch.full_like(seeds, 0x9E3779B9 + lane)
        for w in words:
            h = _mix32(h ^ w)
        lanes.append(h)
    return ((lanes[0] >> 5) * 2**26 + (lanes[1] >> 6)).double() / 2**53


class SeededSampler(LogitsProcessor):
    """Exact sampling at `temperature` by inverse transform, one seeded uniform per row and step.

    Used with greedy decoding: at decoding step k, row b takes the token where the cumulative
    softmax(scores / T) (fp32 probabilities, summed in fp64) first exceeds `counter_uniform(seed_b, k)`
    and returns scores with 0 there and -inf elsewhere. Each row's sample depends only on its own
    seed and logits, not on which other prompts share the batch or the process: runs on 1 or N
    processes draw the same responses, and a resumed run draws what the uninterrupted one would
    have. Everything runs on the scores' device, vectorised over the batch.

    When `raw_logits` is set (by a forward hook on the model: the logits the model computed), the
    scores `generate` hands over must equal them: anything else would sample from a distribution
    other than softmax(logits / T), the one the training losses score.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, max_steps: int = 0):
        self.seeds = torch.tensor([int(s) % (2**63) for s in seeds], dtype=torch.long)
        self.temperature = temperature
        self.step = 0
        self.raw_logits: torch.Tensor | None = None
        # the uniforms of the first `max_steps` steps, drawn in one pass (the same values as one by one)
        self.uniforms = counter_uniform(self.seeds[:, None].expand(-1, max_steps).contiguous(),
                                        torch.arange(max_steps)[None, :].expand(len(self.seeds), -1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.raw_logits is not None and not torch.equal(scores.float(), self.raw_logits):
            raise ConfigError("sampling: generate() altered the model's logits before sampling (a logits "
                              "processor of the generation config?); the samples would not come from the "
                              "distribution the training loss scores")
        if self.step < self.uniforms.shape[1]:
            u = self.uniforms[:, self.step].to(scores.device)  # (B,)
        else:
            u = counter_uniform(self.seeds.to(scores.device), self.step)
        self.step += 1
        cdf = torch.softmax(scores.float() / self.temperature, dim=-1).double().cumsum_(-1)  # (B, V)
        # first index whose cdf exceeds u * total: zero-probability tokens (empty intervals) are never taken
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[str], *, seeds: Sequence[int],
                     temperature: float, max_new_tokens: int, max_prompt_length: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per prompt from exactly softmax(logits / temperature).

    Whatever the model folder's generation_config.json says, no logits processor runs: each token
    is drawn from the distribution `token_logprobs(logits, ids, temperature)` scores (checked at
    every step against the logits the model computed). A response may be EOS alone.

    Returns (query_ids (B, P) left-padded, query_mask (B, P), response_ids (B, R)); response rows
    are padded with pad_token_id after EOS (or run to max_new_tokens without one).
    """
    from transformers import GenerationConfig

    query_ids, query_mask = encode_prompts(tokenizer, prompts, max_prompt_length, next(model.parameters()).device)
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    sampler = SeededSampler(seeds, temperature, max_steps=max_new_tokens)

    def keep_raw_logits(module, args, output):
        sampler.raw_logits = output.logits[:, -1].float()

    was_training = model.training
    model.eval()
    hook = unwrap_peft(model).register_forward_hook(keep_raw_logits)
    try:
        with generation.folder_generation_defaults_ignored(model):
            out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_cfg,
                                 logits_processor=LogitsProcessorList([sampler]))
    finally:
        hook.remove()
        model.train(was_training)
    return query_ids, query_mask, out[:, query_ids.shape[1]:]


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int, device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollout prompts as (ids (B, P), mask (B, P)): left-padded, each cut to its last max_prompt_length tokens."""
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # long prompts keep their end
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                    max_length=max_prompt_length)
    tokenizer.padding_side, tokenizer.truncation_side = sides
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


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


def rollout_engine(cfg, policy, tokenizer):
    """The vLLM engine a training loop samples its rollouts on (`cfg.engine` vllm, or auto on a
    machine with vLLM and a GPU), started once per run from `cfg.policy_model` (with LoRA the base
    folder the policy was loaded from) in the policy's dtype and kept after the run
    (`vllm_engine.kept_engine`: `release_engine` gives its memory back); None: the HF sampler."""
    from prefgym.models import vllm_engine

    if vllm_engine.resolve_engine(cfg.engine) != "vllm":
        return None
    return vllm_engine.kept_rollout_engine(
        cfg.policy_model, unwrap_peft(policy).dtype, cfg.seed, cfg.vllm_gpu_memory_utilization,
        cfg.vllm_max_model_len or cfg.max_prompt_length + cfg.max_new_tokens, tokenizer)


def sample_rollout(engine, policy, tokenizer, prompts: Sequence[str], *, seeds: Sequence[int], temperature: float,
                   max_new_tokens: int, max_prompt_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample_responses` of `policy`, on `engine` when there is one (`rollout_engine`, else None).

    On the engine, the policy's current weights go to it first (`full_weights`: LoRA merged in), then
    one response per prompt from softmax(logits / T), seeded per prompt by `seeds`. The same tensors
    as the HF sampler: left-padded query ids and mask (B, P), response ids (B, R) padded after EOS.
    """
    kw = dict(seeds=seeds, temperature=temperature, max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length)
    if engine is None:
        return sample_responses(policy, tokenizer, prompts, **kw)
    from prefgym.models.vllm_engine import full_weights

    device = next(policy.parameters()).device
    engine.update_weights(full_weights(policy))
    query_ids, query_mask = encode_prompts(tokenizer, prompts, max_prompt_length, device)
    responses = engine.sample_token_ids([ids[m.bool()].tolist() for ids, m in zip(query_ids, query_mask)], seeds,
                                        temperature, max_new_tokens)
    response_ids = torch.full((len(responses), max(map(len, responses))), tokenizer.pad_token_id, device=device)
    for row, ids in zip(response_ids, responses):
        row[:len(ids)] = torch.tensor(ids, device=device)
    return query_ids, query_mask, response_ids


def missing_eos_scores(scores, has_eos, penalty: float | None):
    """The one rule for responses cut off at max_new_tokens, shared by every sampling method.

    A response that never emitted EOS is scored `penalty` instead of its reward (AlpacaFarm's
    `penalty_reward_value`, TRL's `missing_eos_penalty` idea); `penalty=None` keeps the reward.
    Works on torch tensors and numpy arrays alike.
    """
    if penalty is None:
        return scores
    if isinstance(scores, torch.Tensor):
        has_eos = torch.as_tensor(has_eos, dtype=torch.bool, device=scores.device)
        return torch.where(has_eos, scores, torch.full_like(scores, penalty))
    import numpy as np

    return np.where(np.asarray(has_eos, dtype=bool), scores, penalty).astype(float)


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
    load_state(accelerator, ckpt_dir)
    return json.loads((ckpt_dir / "state.json").read_text())


def load_state(accelerator, ckpt_dir: Path) -> None:
    """`accelerator.load_state`, with a PrefgymError naming the folder when the checkpoint's tensors
    do not fit the model (written by an older prefgym whose model had other parameters, e.g. LoRA
    without trainable control-token rows, or with other settings) instead of torch's traceback."""
    _scheduler_from_older_layout(accelerator, ckpt_dir)
    try:
        accelerator.load_state(str(ckpt_dir))
    except RuntimeError as e:
        if not any(m in str(e) for m in ("state_dict", "size mismatch", "Number of custom checkpoints")):
            raise
        first = str(e).strip().splitlines()[0][:200]
        raise PrefgymError(f"{ckpt_dir}: this checkpoint does not fit the model being trained ({first}); it was "
                           "written by another prefgym version or other settings: remove it to start over, or "
                           "rerun with --no-resume") from None
    _reapply_schedules(accelerator)


def _scheduler_from_older_layout(accelerator, ckpt_dir: Path) -> None:
    """Checkpoints of DPO, KTO, SimPO, online DPO and the reward model written before their schedule
    was stepped by hand kept it as Accelerate's prepared `scheduler.bin`; it is now the loop's one
    registered object, `custom_checkpoint_0.pkl` (the same state dict), so such a run resumes.

    Accelerate's prepared scheduler advanced once per process at every step, so a checkpoint written
    on N processes (one `random_states_<rank>.pkl` each) holds N times the steps taken: the position
    is divided by N. The optimizer's saved learning rate came from that position too: `load_state`
    re-applies the schedule once loaded (`_reapply_schedules`), on this resume and any later one.
    No checkpoint the current code writes has `scheduler.bin`, so those skip the barriers; for an old
    one every process decides before the main one writes, so all of them take the same branch."""
    old, new = ckpt_dir / "scheduler.bin", ckpt_dir / "custom_checkpoint_0.pkl"
    if not old.exists():
        return
    migrate = not new.exists()
    accelerator.wait_for_everyone()
    if migrate and accelerator.is_main_process:
        state = torch.load(old, weights_only=True)
        n_old = max(1, len(list(ckpt_dir.glob("random_states_*.pkl"))))
        if n_old > 1 and "last_epoch" in state:
            state["last_epoch"] //= n_old
            state["_step_count"] = state["last_epoch"] + 1
        with atomic_path(new) as tmp:
            torch.save(state, tmp)
    accelerator.wait_for_everyone()


def _reapply_schedules(accelerator) -> None:
    """Set each registered LambdaLR's learning rates (and its optimizer's) from its restored position,
    as its last step would have (the same product LambdaLR computes): an identity for a checkpoint
    the schedule itself wrote, the rate of the steps taken for one migrated from an older layout."""
    for obj in accelerator._custom_objects:
        if isinstance(obj, torch.optim.lr_scheduler.LambdaLR):
            lrs = [base * f(obj.last_epoch) for base, f in zip(obj.base_lrs, obj.lr_lambdas)]
            for group, lr in zip(obj.optimizer.param_groups, lrs):
                group["lr"] = lr
            obj._last_lr = lrs


def resume_or_start(accelerator, cfg, out: Path, fresh: Sequence[str] = ("metrics.jsonl",)) -> dict | None:
    """A training loop's start in `out`: with `cfg.resume` and a checkpoint there, restore it, drop
    the metrics rows written after its step, and return its state; otherwise start over (the main
    process removes the `fresh` files an earlier run left and saves the config as
    train_config.json) and return None."""
    if cfg.resume and (state := load_checkpoint(accelerator, out / "checkpoint")):
        if accelerator.is_main_process:
            drop_metrics_after(out / "metrics.jsonl", state["step"])
        return state
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name in fresh:
            (out / name).unlink(missing_ok=True)
        save_config(cfg, out / "train_config.json")
    return None


class CheckpointSchedule:
    """When to save a checkpoint: every `save_steps` optimizer steps and whenever
    `save_every_seconds` have passed since the last save (0 turns either off), never after the
    last step (the final model is saved then). With several processes the main process's clock
    decides for all, so that they all save together.
    """

    def __init__(self, save_steps: int, save_every_seconds: float, accelerator=None,
                 clock: Callable[[], float] = time.monotonic):
        self.save_steps, self.save_every_seconds = save_steps, save_every_seconds
        self.accelerator, self.clock = accelerator, clock
        self.last_save = clock()

    def due(self, step: int, total_steps: int) -> bool:
        """Call once after optimizer step `step` (1-based): True when a checkpoint is due now."""
        by_steps = self.save_steps > 0 and step % self.save_steps == 0
        by_time = self.save_every_seconds > 0 and self.clock() - self.last_save >= self.save_every_seconds
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1 and self.save_every_seconds > 0:
            flag = torch.tensor(float(by_time and acc.is_main_process), device=acc.device)
            by_time = acc.reduce(flag, "sum").item() > 0
        if step >= total_steps or not (by_steps or by_time):
            return False
        self.last_save = self.clock()
        return True


_process_group_kept = False


def warmup_schedule(accelerator, optimizer, warmup_steps: int):
    """A learning-rate schedule linear from lr / warmup_steps up to lr over `warmup_steps` optimizer
    steps, constant after; registered for checkpoints and stepped by `step_scheduler`.

    Not passed to `accelerator.prepare`: Accelerate's wrapper steps a scheduler once per process at
    each call, so on N processes the warmup would end N times as early.
    """
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    accelerator.register_for_checkpointing(scheduler)
    return scheduler


def step_scheduler(accelerator, scheduler) -> float:
    """Advance a hand-stepped scheduler after an optimizer step, unless the fp16 loss scaler skipped
    that step (inf/NaN gradients), as Accelerate's prepared schedulers do. Returns the learning
    rate the step just taken used: the one every loop logs as `lr` in that step's metrics row."""
    lr = scheduler.get_last_lr()[0]
    if not accelerator.optimizer_step_was_skipped:
        scheduler.step()
    return lr


def end_training(accelerator) -> None:
    """End Accelerate's training and destroy the process group explicitly: gloo left to
    interpreter shutdown can hang there (two CPU processes on a loaded machine). Inside
    `process_group_kept()` the group stays up for the next training of the same launch (only
    the trackers end: Accelerate's own end_training destroys the group). A vLLM engine the loop
    sampled on goes first (`release_engine`): it joined torch.distributed itself (a world of one),
    and its own cleanup fails once that group is gone. Last, mixed precision is turned off for what
    runs next in a one-process run (`fields.end_mixed_precision`)."""
    from prefgym.methods.fields import end_mixed_precision
    from prefgym.models.vllm_engine import release_engine

    release_engine()
    if _process_group_kept:
        for tracker in accelerator.trackers:
            tracker.finish()
        end_mixed_precision()  # one process only: a launcher's trainings share one setting
        return
    accelerator.end_training()
    end_process_group()
    end_mixed_precision()


def end_process_group() -> None:
    """Wait for every process, then destroy the process group (nothing when there is none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextmanager
def process_group_kept():
    """Several trainings in one launch (a reward-model ensemble's members, one after another):
    inside, `end_training` leaves the process group up; it ends when the block ends without an
    error (after one, a process may be alone in the block, so nothing waits for the others)."""
    global _process_group_kept
    _process_group_kept = True
    try:
        yield
    finally:
        _process_group_kept = False
    end_process_group()


def drop_metrics_after(metrics_file: Path, step: int) -> None:
    """After a resume from `step`: forget the metrics rows a crashed run logged past it."""
    from prefgym.io import read_records, write_jsonl

    if metrics_file.exists():
        write_jsonl(metrics_file, [r for r in read_records(metrics_file) if r.get("step", 0) <= step])


def make_progress(accelerator=None):
    """A rich progress bar on stderr (shown on the main process only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from prefgym.progress import stderr_console

    disable = accelerator is not None and not accelerator.is_main_process
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=disable,
                    console=stderr_console())


@contextmanager
def no_sync_unless(accelerator, model, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation. Under
    DeepSpeed, whose engine takes the optimizer step inside `accelerator.backward` at the end of
    an accumulation, the others are marked as not ending one (as `accelerator.accumulate` does)."""
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        accelerator.gradient_state._set_sync_gradients(last)
    try:
        with nullcontext() if last else accelerator.no_sync(model):
            yield
    finally:
        if deepspeed:
            accelerator.gradient_state._set_sync_gradients(True)


def preference_target(preference, row: int | None = None, path=None) -> float:
    """P(output_1 is better) = 1 - `prefgym.data.preferences.prob_output_2` (a missing value is an error)."""
    from prefgym.data.preferences import prob_output_2

    p2 = prob_output_2(preference, row=row, path=path)
    if p2 is None:
        raise DataError("the pair has no preference", path=path, row=row, field="preference")
    return 1.0 - p2
