"""Load any Hugging Face causal LM with its tokenizer, and tokenise prompt+response examples."""

from __future__ import annotations

import contextlib
import os

import torch

from prefgym.errors import ConfigError

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding positions)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name ("float32", "bf16", ...); "auto" is `auto_dtype()`; None passes through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype()
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or auto")
    return _DTYPES[dtype]


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bfloat16 where the device computes in it natively, else float32.

    CUDA: `torch.cuda.is_bf16_supported()` (Ampere and later). CPU: oneDNN's bf16 kernels
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: AVX512-BF16 or AMX); elsewhere bf16 on a CPU
    is emulated and slower than fp32. `device` defaults to CUDA when there is one.
    """
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):
        return torch.float32


def model_kwargs(cfg) -> dict:
    """`from_pretrained` keyword arguments from a config with ModelFields (dtype, attn_implementation)."""
    kwargs = {"dtype": resolve_dtype(getattr(cfg, "dtype", "float32")) or torch.float32}
    if getattr(cfg, "attn_implementation", None):
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


def load_policy(path: str | os.PathLike, cfg, trainable: bool = True):
    """A causal LM from `path` in cfg.dtype with cfg.attn_implementation. When `trainable`: in train
    mode (from_pretrained gives eval mode, where transformers skips gradient checkpointing) with
    gradient checkpointing when cfg.gradient_checkpointing. Stays on the CPU (Accelerate places it)."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, path, cfg, trainable)


def load_score_model(path: str | os.PathLike, cfg, num_labels: int | None = 1, trainable: bool = True):
    """A sequence-classification model (score head) from `path`, as `load_policy`. `num_labels=None`
    keeps the folder's head (a trained reward model); 1 makes a fresh scalar head when there is none."""
    from transformers import AutoModelForSequenceClassification

    extra = {} if num_labels is None else {"num_labels": num_labels}
    return _load(AutoModelForSequenceClassification, path, cfg, trainable, **extra)


def _from_pretrained(auto_class, path, frozen: bool, **kwargs):
    """`auto_class.from_pretrained(path, **kwargs)`, loaded whole under DeepSpeed ZeRO-3 when `frozen`
    (no `prepare` would gather its weights), its parameters in the dtype a DeepSpeed bf16 / fp16
    engine computes in (`zero3.to_engine_dtype`)."""
    from prefgym.methods.zero3 import to_engine_dtype, whole_weights

    with whole_weights() if frozen else contextlib.nullcontext():
        model = auto_class.from_pretrained(str(path), **kwargs)
    return to_engine_dtype(model)


def _load(auto_class, path, cfg, trainable: bool, **extra):
    check_model_folder(path)
    try:
        model = _from_pretrained(auto_class, path, frozen=not trainable, **model_kwargs(cfg), **extra)
    except (OSError, ValueError, ImportError) as e:  # a missing folder, an unknown attn_implementation, no flash-attn
        raise ConfigError(f"could not load {path} (dtype={getattr(cfg, 'dtype', None)}, "
                          f"attn_implementation={getattr(cfg, 'attn_implementation', None)}): {str(e)[:300]}") from None
    if trainable:  # from_pretrained returns eval mode, where checkpointing (and dropout, if kept) never run
        model.train()
        if getattr(cfg, "gradient_checkpointing", False):
            enable_gradient_checkpointing(model, lora=getattr(cfg, "use_lora", False))
    return model


def enable_gradient_checkpointing(model, lora: bool = False) -> None:
    """Non-reentrant activation checkpointing (TRL's default); with LoRA the embeddings' outputs
    require grad so that gradients reach adapters behind frozen layers. The KV cache is off while
    training (transformers turns it off under checkpointing anyway)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()


def load_tokenizer(path: str | os.PathLike, padding_side: str = "right"):
    """The tokenizer at `path`, with a pad token (EOS if it has none) and the given padding side."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token is None:
        raise ConfigError(f"the tokenizer at {path} has no EOS token; set eos_token in its "
                          "tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model_and_tokenizer(path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                             device: str | torch.device | None = None, padding_side: str = "right",
                             cfg=None, trainable: bool = False, **model_kwargs):
    """Load a causal LM and its tokenizer from a folder (save_pretrained format) or Hub name.

    The tokenizer gets a pad token (EOS) when it has none, and `padding_side` ("right" for
    training, "left" for batched generation); the model's config learns the pad token id.
    `dtype` is a torch dtype or a name ("float32", "bfloat16", "auto"); default float32.
    `device` defaults to "cpu" (pass "cuda" or "auto" to use a GPU when one is there).
    With `cfg` (a config with ModelFields), the model loads as `load_policy(path, cfg, trainable)`
    says (dtype, attn_implementation; train mode and gradient checkpointing when `trainable`) and
    `dtype` is not used. Otherwise the model is in eval mode, as for generation.
    """
    from transformers import AutoModelForCausalLM

    check_model_folder(path)
    tokenizer = load_tokenizer(path, padding_side=padding_side)
    if cfg is not None:
        model = load_policy(path, cfg, trainable=trainable)
    else:
        try:  # a model for generation or scoring: frozen
            model = _from_pretrained(AutoModelForCausalLM, path, frozen=True,
                                     dtype=resolve_dtype(dtype) or torch.float32, **model_kwargs)
        except OSError as e:
            raise ConfigError(f"could not load a causal LM from {path}: {e}") from None
    if "device_map" not in model_kwargs:  # with a device_map, Accelerate has placed the weights
        model.to(resolve_device(device))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_generator(path: str | os.PathLike, engine: str, device: str | torch.device | None = None,
                   padding_side: str = "left", cfg=None):
    """The policy a stage samples from and its tokenizer, for the stage's `engine` (hf, vllm, auto).

    On hf: `load_model_and_tokenizer(path, device=device, padding_side=padding_side, cfg=cfg)`. On
    vllm: the tokenizer and a `vllm_engine.EngineModel` in place of the model, with no weights: the
    engine loads the folder itself (`engine_for`), in the dtype the hf path would load (cfg's
    `dtype`; float32 without cfg), so the weights are on the GPU once. Its `.device` is where the
    hf path would put the model (for the stage's reward model).
    """
    from prefgym.models.vllm_engine import EngineModel, resolve_engine

    if resolve_engine(engine) != "vllm":
        return load_model_and_tokenizer(path, device=device, padding_side=padding_side, cfg=cfg)
    check_model_folder(path)
    dtype = model_kwargs(cfg)["dtype"] if cfg is not None else torch.float32
    return EngineModel(str(path), dtype, resolve_device(device)), load_tokenizer(path, padding_side=padding_side)


def check_model_folder(path: str | os.PathLike) -> None:
    """ConfigError when `path` names a local folder (it starts with ., / or ~) that is not there."""
    if not os.path.exists(path) and str(path).startswith((".", "/", "~")):
        raise ConfigError(f"model folder not found: {path}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Where a model goes: "auto" is CUDA when there is a GPU, else the CPU; None is the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device or "cpu")


def tokenize_example(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + response + EOS, with labels masked (-100) on the prompt.

    The prompt and the response are tokenised separately, so that the prompt's tokens are the
    ones generation will see. The sequence is cut to `max_length` from the right (a response
    cut short loses its EOS, as in AlpacaFarm).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenised examples into `input_ids`, `attention_mask`, `labels` (B, T) tensors."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
