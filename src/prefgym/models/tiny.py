"""Tiny tokenizers and randomly initialised causal LMs, for tests and benchmarks.

They are saved in Hugging Face format, so they go through exactly the code path of a real model
(`AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`).
"""

from __future__ import annotations

import os
from pathlib import Path

from prefgym.data.prompts import format_prompt

TINY_ARCHS = ("llama", "gpt2", "qwen2", "qwen3", "gemma2")

_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

_DEFAULT_TEXTS = [
    format_prompt("Add 3 and 4.") + "7",
    format_prompt("List two colors.") + "red, blue",
    format_prompt("Reverse the word.", "cat") + "tac",
    format_prompt("Sort these numbers.", "3 1 2") + "1 2 3",
    "The quick brown fox jumps over the lazy dog.",
    "Write a short description of a sunny day in the park with friends.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def make_tiny_tokenizer(out_dir: str | os.PathLike, texts: list[str] | None = None,
                        vocab_size: int = 512, pad_token: bool = True):
    """Train a byte-level BPE tokenizer on a few sentences; save it to `out_dir` and return it.

    It has `<s>`, `</s>` (EOS), `<unk>` and, unless `pad_token=False`, `<pad>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = dict(_SPECIAL_TOKENS)
    if not pad_token:
        del specials["pad_token"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts or _DEFAULT_TEXTS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **specials)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def make_tiny_model(arch: str, tokenizer, out_dir: str | os.PathLike | None = None, *,
                    hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                    max_positions: int = 512, seed: int = 0):
    """A randomly initialised causal LM of architecture `arch` (one of TINY_ARCHS).

    Sized to `tokenizer`; saved with the tokenizer (safetensors) to `out_dir` when given.
    Returns the model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                                      n_positions=max_positions, **ids)
    else:
        # Llama-family layouts: grouped-query attention where the family uses it; Gemma 2 brings
        # its own quirks (logit soft-capping, sliding-window layers, embeddings scaled by √d).
        extra = {"llama": dict(num_key_value_heads=num_heads, tie_word_embeddings=False),
                 "qwen2": dict(num_key_value_heads=max(1, num_heads // 2), tie_word_embeddings=True),
                 "qwen3": dict(num_key_value_heads=max(1, num_heads // 2), head_dim=hidden_size // num_heads,
                               tie_word_embeddings=True),
                 "gemma2": dict(num_key_value_heads=max(1, num_heads // 2), head_dim=hidden_size // num_heads,
                                sliding_window=16)}[arch]
        config = AutoConfig.for_model(arch, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                      max_position_embeddings=max_positions, **extra, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model


def set_tiny_chat_template(tokenizer) -> None:
    """Give a tiny tokenizer a ChatML-style chat template (as SmolLM2 and Qwen use), starting with BOS."""
    tokenizer.chat_template = TINY_CHAT_TEMPLATE


TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A small Jinja chat template for tests: BOS, then `<|role|>\ncontent</s>\n` per message."""


def make_tiny_checkpoint(out_dir: str | os.PathLike, arch: str = "llama", **model_kwargs) -> Path:
    """A tiny tokenizer and random `arch` model saved together in `out_dir`; returns `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = make_tiny_tokenizer(out_dir)
    make_tiny_model(arch, tokenizer, out_dir, **model_kwargs)
    return out_dir
