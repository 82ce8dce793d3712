"""RLOO, GRPO and online DPO sample on the vLLM engine (`engine: vllm`), against the stand-in of vLLM's
offline API in tests/fake_vllm: the engine gets the policy's weights (LoRA merged) before each
rollout, as the last update left them; it gets the HF path's per-sequence seeds; the rollout
tensors are laid out as the HF sampler lays them out."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from prefgym.errors import ConfigError
from prefgym.methods import common, grpo, online_dpo, rloo
from prefgym.models import load_model_and_tokenizer
from prefgym.seeding import stable_hash
from test_ppo import toy_rm  # noqa: F401 (module fixture: toy SFT model and reward model)
from test_prefdata_toy import one_torch_thread, toy_prompts, toy_quality  # noqa: F401 (autouse fixture)
from test_vllm_engine import fake_vllm  # noqa: F401 (fixture: the stand-in importable as vllm)

Q = "model.layers.0.self_attn.q_proj.weight"


def merged_weights(model) -> dict[str, torch.Tensor]:
    """The model's weights by name; a peft model's with its adapters merged by peft (`merge_and_unload`)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def record_trained_weights(monkeypatch, policy_of) -> list[dict[str, torch.Tensor]]:
    """The policy's weights each time a checkpoint is written (after every step with save_steps=1,
    after every round but the last for online DPO); `policy_of(prepared model)` finds the policy."""
    trained, save = [], common.save_checkpoint

    def recording(accelerator, *args):
        trained.append(merged_weights(policy_of(accelerator.unwrap_model(accelerator._models[0]))))
        return save(accelerator, *args)

    monkeypatch.setattr(common, "save_checkpoint", recording)
    return trained


def assert_rollouts_ran_on(llm, weights: list[dict[str, torch.Tensor]]) -> None:
    """Rollout r was sampled on `weights[r]`: what the engine was sent before it and what it held."""
    assert len(llm.generate_calls) == len(llm.model.loads) == llm.prefix_cache_resets == len(weights)
    for r, (call, loaded, expected) in enumerate(zip(llm.generate_calls, llm.model.loads, weights)):
        assert loaded.keys() == expected.keys(), r
        for name, weight in expected.items():
            assert torch.allclose(loaded[name], weight, atol=1e-6), (r, name)
            assert torch.allclose(call["weights"][name], weight, atol=1e-6), (r, name)


def sent_seeds(llm) -> list[list[int]]:
    return [[p.seed for p in call["params"]] for call in llm.generate_calls]


def group_seeds(name: str, seed: int, rollouts: list, k: int) -> list[list[int]]:
    """The HF path's seeds of each step's rollout (`sample_groups`: per prompt row and sample, prompt-major)."""
    return [[stable_hash(seed, f"{name}-sample", step, r, j) % 2**63 for r in ro.rows[::k] for j in range(k)]
            for step, ro in enumerate(rollouts)]


def record_rollouts(monkeypatch) -> list[rloo.GroupRollout]:
    rollouts, sample = [], rloo.sample_groups

    def recording(*args, **kw):
        rollouts.append(sample(*args, **kw))
        return rollouts[-1]

    monkeypatch.setattr(rloo, "sample_groups", recording)
    return rollouts


# ---------------------------------------------------------------------------------------------
# RLOO and GRPO


@pytest.mark.parametrize("use_lora", [False, True])
def test_rloo_rollouts_sample_on_the_policy_after_each_update(toy_rm, fake_vllm, monkeypatch, use_lora):
    """Rollout s runs on the weights update s-1 left (the SFT model's for the first), merged with LoRA;
    each sequence gets the HF path's seed; the log-probs stay the policy's, so the first ratio is 1."""
    root, sft, rm = toy_rm
    trained = record_trained_weights(monkeypatch, lambda policy: policy)
    rollouts = record_rollouts(monkeypatch)
    lora = dict(use_lora=True, lora_r=4, lr=5e-2) if use_lora else dict(lr=1e-2)
    cfg = rloo.RLOOConfig(policy_model=str(sft), reward_model=str(rm), output_dir=str(root / f"rloo-{use_lora}"),
                          steps=3, per_device_prompts=2, k=3, max_new_tokens=5, max_prompt_length=64, save_steps=1,
                          missing_eos_penalty=None, engine="vllm", **lora)  # the scores differ without EOS too
    out = rloo.train(cfg, prompts=toy_prompts(8, seed=3))
    (llm,) = fake_vllm.LLM.instances
    assert llm.model_path == str(sft) and llm.dtype == "float32" and llm.engine_args["max_model_len"] == 64 + 5
    sft_weights = load_file(sft / "model.safetensors")
    assert len(trained) == 2 and not torch.equal(trained[0][Q], sft_weights[Q])  # the updates moved it
    assert_rollouts_ran_on(llm, [sft_weights] + trained)
    assert sent_seeds(llm) == group_seeds("rloo", cfg.seed, rollouts, cfg.k)
    params = llm.generate_calls[0]["params"]
    assert {(p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) for p in params} == {(1, 1.0, 1.0, 0, 5)}
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and m[0]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_grpo_rollouts_sample_on_the_policy_after_each_update(toy_rm, fake_vllm, monkeypatch):
    """GRPO runs RLOO's loop: the same weight sync and seeds, here with LoRA and a verifiable reward."""
    root, sft, _ = toy_rm
    trained = record_trained_weights(monkeypatch, lambda policy: policy)
    rollouts = record_rollouts(monkeypatch)
    cfg = grpo.GRPOConfig(policy_model=str(sft), reward="gold", output_dir=str(root / "grpo"), steps=3,
                          per_device_prompts=2, k=3, max_new_tokens=5, max_prompt_length=64, save_steps=1,
                          use_lora=True, lora_r=4, lr=5e-2, seed=4, missing_eos_penalty=None, engine="vllm")
    grpo.train(cfg, prompts=toy_prompts(8, seed=4), gold_fn=lambda i, x, o: float(toy_quality(o) + len(o)))
    (llm,) = fake_vllm.LLM.instances
    sft_weights = load_file(sft / "model.safetensors")
    assert llm.model_path == str(sft) and len(trained) == 2 and not torch.equal(trained[1][Q], trained[0][Q])
    assert_rollouts_ran_on(llm, [sft_weights] + trained)
    assert sent_seeds(llm) == group_seeds("grpo", cfg.seed, rollouts, cfg.k)


def test_group_rollout_tensors_on_the_engine_are_laid_out_as_on_hf(toy_rm, fake_vllm, monkeypatch):
    """`sample_groups` on the engine: the HF path's query tensors (left-padded, cut to max_prompt_length
    from the left) and seeds; each response the engine's token ids up to EOS, padded after it."""
    root, sft, _ = toy_rm
    policy, tokenizer = load_model_and_tokenizer(sft)
    texts = ["a", "Say something about the much longer prompt than the others", "Say"]
    kw = dict(seed_parts=(1, "rloo-sample", 0), temperature=1.0, max_new_tokens=12, max_prompt_length=6,
              with_reference=False)
    hf_seeds, sample_responses = [], common.sample_responses

    def recording(*args, seeds, **more):
        hf_seeds.append(list(seeds))
        return sample_responses(*args, seeds=seeds, **more)

    monkeypatch.setattr(common, "sample_responses", recording)
    hf = rloo.sample_groups(policy, None, tokenizer, texts, [1, 0, 2], 3, **kw)
    engine = common.rollout_engine(rloo.RLOOConfig(policy_model=str(sft), engine="vllm", max_new_tokens=12,
                                                   max_prompt_length=6), policy, tokenizer)
    on_engine = rloo.sample_groups(policy, None, tokenizer, texts, [1, 0, 2], 3, engine=engine, **kw)
    (llm,) = fake_vllm.LLM.instances
    (call,) = llm.generate_calls
    assert [p.seed for p in call["params"]] == [s % 2**63 for s in hf_seeds[0]]
    P = on_engine.P
    assert P == hf.P == 6 and on_engine.rows == hf.rows == [1, 1, 1, 0, 0, 0, 2, 2, 2]
    assert torch.equal(on_engine.ids[:, :P], hf.ids[:, :P]) and torch.equal(on_engine.mask[:, :P], hf.mask[:, :P])
    assert on_engine.mask[3, :P].tolist() == [0] * (P - 1) + [1]  # "a": one token, left-padded
    sent = [p["prompt_token_ids"] for p in call["prompts"]]
    assert sent[0] == tokenizer(texts[1])["input_ids"][-6:] and sent[3] == tokenizer("a")["input_ids"]
    responses = [llm._request(prompt, params).outputs[0].token_ids for prompt, params in zip(call["prompts"],
                                                                                             call["params"])]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert any(ids[-1] == eos for ids in responses) and any(ids[-1] != eos for ids in responses), responses
    width = max(map(len, responses))
    padded = [ids + [pad] * (width - len(ids)) for ids in responses]
    assert on_engine.ids[:, P:].tolist() == padded
    q_ids, q_mask, r_ids = common.sample_rollout(engine, policy, tokenizer, [texts[r] for r in hf.rows],
                                                 seeds=hf_seeds[0], temperature=1.0, max_new_tokens=12,
                                                 max_prompt_length=6)  # the shared helper itself, before EOS cuts
    assert r_ids.tolist() == padded and torch.equal(q_ids, hf.ids[:, :P]) and torch.equal(q_mask, hf.mask[:, :P])
    assert on_engine.response_mask.tolist() == [[1] * len(ids) + [0] * (width - len(ids)) for ids in responses]
    assert on_engine.has_eos.tolist() == [ids[-1] == eos for ids in responses]
    expected_logps = rloo.response_token_logps(policy, on_engine.ids, on_engine.mask, P, 1.0)
    assert torch.allclose(on_engine.logps, expected_logps)


# ---------------------------------------------------------------------------------------------
# Online DPO


@pytest.mark.parametrize("use_lora", [False, True])
def test_online_dpo_pairs_sample_on_the_policy_after_each_round(toy_rm, fake_vllm, monkeypatch, use_lora):
    """Round r's pairs are sampled on the weights round r-1's DPO steps left (merged with LoRA), with the
    HF path's seeds (seed, round, prompt, sample)."""
    root, sft, _ = toy_rm
    trained = record_trained_weights(monkeypatch, lambda pair_model: pair_model.model)
    rows_of, round_rows = [], online_dpo.round_rows
    monkeypatch.setattr(online_dpo, "round_rows", lambda *a: rows_of.append(round_rows(*a)) or rows_of[-1])
    lora = dict(use_lora=True, lora_r=4, lr=5e-2) if use_lora else dict(lr=1e-2)
    cfg = online_dpo.OnlineDPOConfig(policy_model=str(sft), output_dir=str(root / f"odpo-{use_lora}"), rounds=3,
                                     pairs_per_round=4, steps_per_round=2, per_device_batch_size=4, max_new_tokens=5,
                                     max_prompt_length=64, max_length=128, seed=2, engine="vllm", **lora)
    online_dpo.train(cfg, toy_prompts(8, seed=6))
    (llm,) = fake_vllm.LLM.instances
    assert llm.model_path == str(sft) and llm.engine_args["max_model_len"] == 64 + 5
    sft_weights = load_file(sft / "model.safetensors")
    assert len(trained) == 2 and not torch.equal(trained[0][Q], sft_weights[Q])  # round 0 trained
    assert_rollouts_ran_on(llm, [sft_weights] + trained)
    expected = [[stable_hash(cfg.seed, "online-dpo-sample", r, i, j) % 2**63 for i in rows for j in (0, 1)]
                for r, rows in enumerate(rows_of)]
    assert len(rows_of) == 3 and sent_seeds(llm) == expected


def test_online_dpo_pair_texts_are_the_engine_responses(toy_rm, fake_vllm):
    """`sample_pairs` on the engine: each output is the engine's token ids decoded, up to EOS."""
    root, sft, _ = toy_rm
    policy, tokenizer = load_model_and_tokenizer(sft)
    prompts = toy_prompts(3, seed=1)
    texts = [p["instruction"] for p in prompts]
    cfg = online_dpo.OnlineDPOConfig(policy_model=str(sft), max_new_tokens=5, max_prompt_length=64, engine="vllm")
    engine = common.rollout_engine(cfg, policy, tokenizer)
    pairs = online_dpo.sample_pairs(policy, tokenizer, prompts, texts, [2, 0], cfg, 1, engine=engine)
    (call,) = fake_vllm.LLM.instances[0].generate_calls
    responses = [fake_vllm.LLM.instances[0]._request(p, sp).outputs[0].token_ids
                 for p, sp in zip(call["prompts"], call["params"])]
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
    assert [(p["output_1"], p["output_2"]) for p in pairs] == list(zip(decoded[::2], decoded[1::2]))
    assert [p["instruction"] for p in pairs] == [texts[2], texts[0]] and len(set(decoded)) > 1


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("config", [rloo.RLOOConfig, grpo.GRPOConfig, online_dpo.OnlineDPOConfig])
def test_engine_fields_are_checked(config, tmp_path):
    """`engine` and its memory share are fields of the three configs, checked when a config file is read."""
    assert config(engine="vllm", vllm_gpu_memory_utilization=0.5).vllm_gpu_memory_utilization == 0.5
    (tmp_path / "c.yaml").write_text("engine: bogus\n")
    with pytest.raises(ConfigError, match="key 'engine'"):
        common.load_config(config, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        common.load_config(config, None, {"vllm_gpu_memory_utilization": 0})


@pytest.mark.parametrize("command", ["rloo", "grpo", "online-dpo"])
def test_set_engine_on_the_command_line(command, capsys):
    """`--set engine=bogus` is refused with a message naming the key, before anything loads (exit 2)."""
    from prefgym.cli import main

    assert main([command, "--set", "engine=bogus", "--set", "policy_model=missing", "--set", "output_dir=x"]) == 2
    err = capsys.readouterr().err
    assert "key 'engine'" in err and "Traceback" not in err


def test_several_processes_are_refused_on_the_engine(toy_rm, fake_vllm, monkeypatch):
    """Under accelerate launch / torchrun the engine refuses to start (vLLM batches the requests itself)."""
    from prefgym.models import generation

    root, sft, rm = toy_rm
    monkeypatch.setattr(generation, "world_size", lambda: 2)
    cfg = rloo.RLOOConfig(policy_model=str(sft), reward_model=str(rm), output_dir=str(root / "rloo-2"), steps=1,
                          per_device_prompts=2, k=2, engine="vllm")
    with pytest.raises(ConfigError, match="engine 'vllm' runs in one process"):
        rloo.train(cfg, prompts=toy_prompts(4, seed=1))
    assert fake_vllm.LLM.instances == [] and not (root / "rloo-2" / "metrics.jsonl").exists()
