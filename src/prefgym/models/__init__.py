"""Models: loading any Hugging Face causal LM + tokenizer, tokenisation, tiny models, generation."""

from prefgym.lazy_exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {  # loaded on first use (torch): `prefgym --help` stays fast
    "loading": ["IGNORE_INDEX", "collate", "load_model_and_tokenizer", "load_tokenizer", "tokenize_example"],
})
