"""Nothing Llama-specific: every method runs a few steps on tiny random models of five architectures.

Llama, GPT-2, Qwen2, Qwen3 and Gemma 2 (soft-capped logits, sliding-window layers), built from
local configs (`prefgym.models.tiny`). Each run checks that the method finishes, writes finite
metrics and a model whose weights moved. Marked `archs` (25 tests, about 30 s on two loaded
cores, so in the default run too): pytest -m archs tests/test_archs.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prefgym.io import write_jsonl
from prefgym.models.tiny import TINY_ARCHS, make_tiny_checkpoint

pytestmark = pytest.mark.archs

PROMPTS = [{"instruction": f"Add {i} and {i + 2}.", "input": "" if i % 2 else f"{i} {i + 2}"} for i in range(8)]
DEMOS = [{**p, "output": str(2 * i + 2)} for i, p in enumerate(PROMPTS)]
PAIRS = [{**p, "output_1": str(2 * i + 2), "output_2": f"{i} plus more", "preference": 1 + i % 2}
         for i, p in enumerate(PROMPTS)]
SMALL = dict(max_length=64)


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch(request, tmp_path_factory):
    """(arch, root, policy folder, reward-model folder) for one architecture."""
    root = tmp_path_factory.mktemp(request.param)
    return (request.param, root, *make_arch_folder(root, request.param))


def make_arch_folder(root: Path, arch: str) -> tuple[Path, Path]:
    """A tiny random policy of `arch` (root/policy), a reward model of the same shape (root/rm), and
    root/prompts.jsonl, root/pairs.jsonl; returns the two model folders."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from prefgym.methods.common import load_tokenizer

    policy = make_tiny_checkpoint(root / "policy", arch)
    config = AutoConfig.from_pretrained(policy)
    config.num_labels = 1
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "rm")
    load_tokenizer(policy).save_pretrained(root / "rm")
    write_jsonl(root / "prompts.jsonl", PROMPTS)
    write_jsonl(root / "pairs.jsonl", PAIRS)
    return policy, root / "rm"


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _check_trained(before, after, metrics_file=None):
    a, b = _weights(before), _weights(after)
    moved = [k for k in a if k in b and a[k].shape == b[k].shape and not torch.equal(a[k], b[k])]
    assert moved, f"no weight of {after} moved"
    if metrics_file is not None:
        rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
        assert rows
        for row in rows:
            for key, value in row.items():
                if isinstance(value, float):
                    assert math.isfinite(value), f"{metrics_file}: {key} = {value}"


def test_sft_reward_model_and_preference_methods(arch, extra: dict | None = None):
    """`extra`: fields every config here gets (the SmolLM2 lane's bf16 + LoRA run passes them)."""
    from prefgym.methods import dpo, feedme, kto, reward_conditioning, reward_model, simpo
    from prefgym.methods.sft import SFTConfig, train_sft

    name, root, policy, _ = arch
    SMALL = dict(globals()["SMALL"], **(extra or {}))
    pairs = str(root / "pairs.jsonl")
    out = train_sft(SFTConfig(model_name_or_path=str(policy), output_dir=str(root / "sft"), max_steps=2,
                              per_device_batch_size=4, lr=1e-2, progress=False, **SMALL), records=DEMOS)
    _check_trained(policy, out, out / "metrics.jsonl")
    out = reward_model.train(reward_model.RewardModelConfig(
        model_name_or_path=str(policy), preference_file=pairs, output_dir=str(root / "rm_trained"),
        per_device_batch_size=4, eval_fraction=0.0, lr=1e-2, **SMALL))
    assert (out / reward_model.NORMALIZATION_FILE).exists()
    _check_trained(policy, out, out / "metrics.jsonl")  # the backbone moved
    _check_finite_rm(out)
    common = dict(model_name_or_path=str(policy), preference_file=pairs, per_device_batch_size=4, epochs=1,
                  lr=1e-2, **SMALL)
    for module, cls in ((dpo, dpo.DPOConfig), (simpo, simpo.SimPOConfig), (kto, kto.KTOConfig)):
        out = module.train(cls(output_dir=str(root / module.__name__.rsplit(".", 1)[1]), **common))
        _check_trained(policy, out, out / "metrics.jsonl")
    sft_like = dict(model_name_or_path=str(policy), preference_file=pairs, max_steps=2, per_device_batch_size=4,
                    lr=1e-2, progress=False, **SMALL)
    out = feedme.train(feedme.FeedMEConfig(output_dir=str(root / "feedme"), **sft_like))
    _check_trained(policy, out, out / "metrics.jsonl")
    out = reward_conditioning.train(reward_conditioning.RewardConditioningConfig(
        output_dir=str(root / "reward_conditioning"), **sft_like))
    assert (out / "model.safetensors").exists() and (out / "conditioning.json").exists()


def _check_finite_rm(folder):
    norm = json.loads((folder / "reward_normalization.json").read_text())
    assert math.isfinite(norm["mean"]) and math.isfinite(norm["std"])


def test_online_methods(arch, extra: dict | None = None):
    from prefgym.methods import grpo, ppo, quark, rloo

    name, root, policy, rm = arch
    prompts = str(root / "prompts.jsonl")
    SMALL = dict(globals()["SMALL"], **(extra or {}))
    rl = dict(policy_model=str(policy), reward_model=str(rm), prompt_file=prompts, steps=2, lr=1e-2,
              max_new_tokens=4, max_prompt_length=48, missing_eos_penalty=None, **(extra or {}))
    out = ppo.train(ppo.PPOConfig(output_dir=str(root / "ppo"), per_device_rollout_batch_size=4, **rl))
    _check_trained(policy, out, out / "metrics.jsonl")
    for module, cls in ((rloo, rloo.RLOOConfig), (grpo, grpo.GRPOConfig)):
        out = module.train(cls(output_dir=str(root / module.__name__.rsplit(".", 1)[1]), per_device_prompts=2, k=2,
                               **rl))
        _check_trained(policy, out, out / "metrics.jsonl")
    out = quark.train(quark.QuarkConfig(
        policy_model=str(policy), reward_model=str(rm), prompts_file=prompts, output_dir=str(root / "quark"),
        num_quantiles=2, iterations=1, rollout_batch_size=4, steps_per_iteration=1, per_device_batch_size=2,
        lr=1e-2, warmup_steps=1, max_new_tokens=4, progress=False, **SMALL))
    assert (out / "conditioning.json").exists()


def test_sampling_methods(arch, extra: dict | None = None):
    from prefgym.methods import best_of_n, expert_iteration

    name, root, policy, rm = arch
    prompts = str(root / "prompts.jsonl")
    SMALL = dict(globals()["SMALL"], **(extra or {}))
    no_lora = {k: v for k, v in (extra or {}).items() if not k.startswith("lora_") and k != "use_lora"}
    out = best_of_n.run(best_of_n.BestOfNConfig(
        policy_model=str(policy), reward_model=str(rm), data=prompts, output_file=str(root / "bon" / "out.json"),
        n=2, max_new_tokens=4, generation_batch_size=4, progress=False, **no_lora))
    rows = json.loads(Path(out).read_text())
    assert len(rows) == len(PROMPTS) and all(math.isfinite(r["reward"]) for r in rows)
    out = expert_iteration.train(expert_iteration.ExpertIterationConfig(
        model_name_or_path=str(policy), reward_model=str(rm), prompts_file=prompts, prompts_split=None,
        output_dir=str(root / "expert_iteration"), n=2, max_new_tokens=4, max_steps=1, per_device_batch_size=4,
        lr=1e-2, progress=False, **SMALL))
    _check_trained(policy, out, out / "metrics.jsonl")


def test_preference_data_with_world_judges(arch, tiny_world):
    from prefgym.methods import preference_data

    name, root, policy, _ = arch
    path = preference_data.run(preference_data.PreferenceDataConfig(
        policy_model=str(policy), prompt_file=str(tiny_world / "data" / "preference.json"),
        output_dir=str(root / "prefs"), max_instructions=4, num_samples=2, max_new_tokens=6, batch_size=4))
    rows = json.loads(Path(path).read_text())
    assert all(r["preference"] in (1, 2, 1.5) for r in rows)


def test_bf16_with_lora_and_gradient_checkpointing(arch):
    """bf16 weights, LoRA (adapters kept in fp32 by peft) and checkpointing together: DPO and PPO."""
    from prefgym.methods import dpo, ppo

    name, root, policy, rm = arch
    extra = dict(dtype="bfloat16", use_lora=True, lora_r=4, gradient_checkpointing=True)
    out = dpo.train(dpo.DPOConfig(model_name_or_path=str(policy), preference_file=str(root / "pairs.jsonl"),
                                  output_dir=str(root / "dpo_bf16"), per_device_batch_size=4, epochs=1, lr=1e-2,
                                  **SMALL, **extra))
    assert {t.dtype for t in _weights(out).values()} == {torch.float32}  # LoRA merged in fp32 (save_model)
    before = {k: v.to(torch.bfloat16).float() for k, v in _weights(policy).items()}
    after = _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)
    out = ppo.train(ppo.PPOConfig(policy_model=str(policy), reward_model=str(rm), prompt_file=str(root / "prompts.jsonl"),
                                  output_dir=str(root / "ppo_bf16"), steps=1, per_device_rollout_batch_size=4,
                                  max_new_tokens=4, max_prompt_length=48, lr=1e-2, **extra))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(rows[0][k]) for k in ("pg_loss", "vf_loss", "kl", "score"))
