"""Models: loading any Hugging Face causal LM + tokenizer, tokenisation, tiny models, generation."""

from prefgym.models.loading import (
    IGNORE_INDEX,
    collate,
    load_model_and_tokenizer,
    load_tokenizer,
    tokenize_example,
)

__all__ = ["IGNORE_INDEX", "collate", "load_model_and_tokenizer", "load_tokenizer", "tokenize_example"]
