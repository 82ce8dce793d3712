"""PPO: GAE, rewards, clipping and the KL controller against hand/loop computations; tiny end-to-end
runs; resume after a crash equals an uninterrupted run; 2 processes match 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prefgym.errors import ConfigError
from prefgym.methods import ppo, reward_model
from test_prefdata_toy import make_toy_model, toy_pairs, toy_prompts, one_torch_thread  # noqa: F401 (autouse fixture)


def gae_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one row and one token at a time, in plain Python."""
    adv = np.zeros_like(rewards)
    for b, L in enumerate(lengths):
        last = 0.0
        for t in reversed(range(L)):
            next_value = values[b, t + 1] if t + 1 < L else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, adv + values


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_vectorised_gae_equals_python_loop(gamma, lam):
    rng = np.random.default_rng(0)
    B, R = 4, 9
    rewards, values = rng.normal(size=(B, R)), rng.normal(size=(B, R))
    lengths = [9, 5, 1, 7]
    mask = np.array([[1] * L + [0] * (R - L) for L in lengths])
    values_padded = np.where(mask, values, 123.0)  # garbage outside the response must not matter
    adv, ret = ppo.gae(torch.tensor(rewards), torch.tensor(values_padded), torch.tensor(mask), gamma, lam)
    adv_loop, ret_loop = gae_loop(np.where(mask, rewards, 0), np.where(mask, values, 0), lengths, gamma, lam)
    np.testing.assert_allclose(adv.numpy()[mask == 1], adv_loop[mask == 1], atol=1e-10)
    np.testing.assert_allclose(ret.numpy()[mask == 1], ret_loop[mask == 1], atol=1e-10)


def test_per_token_rewards_kl_and_score_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    score = torch.tensor([2.0, -1.0])
    rewards, kl = ppo.per_token_rewards(score, logps, ref, mask, kl_coef=0.1)
    # kl = logp - ref on response tokens: row 0: .5, -1, 0 ; row 1: 1, -1, (masked) 0
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 0.0 + 2.0], [-0.1, 0.1 - 1.0, 0.0]]))


def test_ppo_clipping_by_hand():
    # three tokens: ratio 1.5 & A=+1 (clipped), ratio 0.5 & A=+1 (not clipped), ratio 0.5 & A=-1 (clipped)
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    # values: in range / clipped-and-worse / clipped-but-better
    old_v = torch.tensor([[0.0, 0.0, 0.0]])
    vpred = torch.tensor([[0.1, -1.0, 1.0]])
    returns = torch.tensor([[1.0, -2.0, 0.5]])
    mask = torch.ones(1, 3)
    out = ppo.ppo_losses(new, old, adv, vpred, old_v, returns, mask, cliprange=0.2, cliprange_value=0.2)
    pg = [max(-1.5, -1.2), max(-0.5, -0.5), max(0.5, 0.8)]
    vf = [max(0.81, 0.81), max(1.0, 1.8 ** 2), max(0.25, 0.09)]
    assert out["pg_loss"].item() == pytest.approx(sum(pg) / 3, abs=1e-6)
    assert out["pg_clipfrac"].item() == pytest.approx(2 / 3)
    assert out["vf_loss"].item() == pytest.approx(0.5 * sum(vf) / 3, abs=1e-6)
    assert out["vf_clipfrac"].item() == pytest.approx(1 / 3)
    logr = np.log([1.5, 0.5, 0.5])
    assert out["approx_kl"].item() == pytest.approx(0.5 * np.mean(logr ** 2), abs=1e-6)
    # a masked token changes nothing; token_count rescales the mean
    mask2 = torch.tensor([[1.0, 1.0, 0.0]])
    out2 = ppo.ppo_losses(new, old, adv, vpred, old_v, returns, mask2, 0.2, 0.2, token_count=4.0)
    assert out2["pg_loss"].item() == pytest.approx(sum(pg[:2]) / 4, abs=1e-6)
    # gradient of the clipped token is zero
    new_req = new.clone().requires_grad_(True)
    ppo.ppo_losses(new_req, old, adv, vpred, old_v, returns, mask, 0.2, 0.2)["pg_loss"].backward()
    assert new_req.grad[0, 0] == 0 and new_req.grad[0, 2] == 0 and new_req.grad[0, 1] != 0


def test_adaptive_kl_controller():
    assert ppo.update_kl_coef(0.1, 12.0, 6.0, 1000, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert ppo.update_kl_coef(0.1, 6.0, 6.0, 1000, 100) == pytest.approx(0.1)
    assert ppo.update_kl_coef(0.1, 5.4, 6.0, 1000, 100) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert ppo.update_kl_coef(0.1, 0.0, 6.0, 1000, 100) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


@pytest.fixture(scope="module")
def toy_rm(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    sft = make_toy_model(root / "sft")
    rm = reward_model.train(reward_model.RewardModelConfig(
        model_name_or_path=str(sft), output_dir=str(root / "rm"), lr=3e-3, epochs=3, per_device_batch_size=16,
        max_length=64), records=toy_pairs(96, seed=1, ties=True))
    return root, sft, rm


def small_cfg(root, sft, rm, name, **kw) -> ppo.PPOConfig:
    base = dict(policy_model=str(sft), reward_model=str(rm), output_dir=str(root / name), steps=4,
                per_device_rollout_batch_size=4, num_mini_batches=2, ppo_epochs=2, lr=1e-2, max_new_tokens=5,
                max_prompt_length=64, kl_coef=0.05, missing_eos_penalty=-1.0, save_steps=2, resume=True)
    base.update(kw)
    return ppo.PPOConfig(**base)


def read_metrics(path):
    return [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]


def test_ppo_end_to_end_first_step_ratio_is_one_and_weights_move(toy_rm):
    root, sft, rm = toy_rm
    cfg = small_cfg(root, sft, rm, "e2e", steps=3, ppo_epochs=1, num_mini_batches=1, adaptive_kl=True)
    out = ppo.train(cfg, prompts=toy_prompts(16, seed=5))
    m = read_metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    # one update on fresh rollouts: π == π_old exactly (same temperature, no dropout)
    assert m[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and m[0]["approx_kl"] < 1e-8
    assert m[0]["pg_clipfrac"] == 0 and m[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # π == π_ref at step 1
    assert m[1]["kl"] != 0
    for key in ("score", "kl", "non_score_reward", "entropy", "response_length", "pg_clipfrac", "vf_clipfrac",
                "value_error", "approx_kl", "kl_coef"):
        assert all(math.isfinite(r[key]) for r in m), key
    assert m[2]["kl_coef"] < m[0]["kl_coef"]  # adaptive: KL far below target shrinks the coefficient
    for r in m:  # the KL term in the rewards is the step's coefficient times the step's KL
        assert r["non_score_reward"] == pytest.approx(-r["kl_coef"] * r["kl"], abs=1e-6)
    # k3 is non-negative, 0 where π == π_ref (step 1), and positive once the policy moved
    assert m[0]["kl_k3"] == pytest.approx(0.0, abs=1e-6) and m[1]["kl_k3"] > 0
    assert all(r["kl_k3"] >= 0 for r in m)
    before, after = load_file(sft / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "samples.jsonl").exists() and not (out / "checkpoint").exists()


def test_ppo_raises_reward_on_learnable_toy(toy_rm):
    """PPO against the toy reward model: its score of PPO's samples rises above the SFT samples'."""
    root, sft, rm = toy_rm
    cfg = small_cfg(root, sft, rm, "learn", steps=12, per_device_rollout_batch_size=8, lr=2e-2,
                    missing_eos_penalty=None, kl_coef=0.01, max_new_tokens=4)
    out = ppo.train(cfg, prompts=toy_prompts(32, seed=6))
    scores = [r["score"] for r in read_metrics(out)]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.3


def test_ppo_resume_after_crash_equals_uninterrupted(toy_rm, monkeypatch):
    root, sft, rm = toy_rm
    prompts = toy_prompts(16, seed=7)
    full = ppo.train(small_cfg(root, sft, rm, "full"), prompts=prompts)

    real_append = ppo.append_jsonl

    def crash_at_step_3(path, row):
        real_append(path, row)
        if row.get("step") == 3 and path.name == "metrics.jsonl":
            raise KeyboardInterrupt  # killed after step 3; last checkpoint is step 2

    monkeypatch.setattr(ppo, "append_jsonl", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        ppo.train(small_cfg(root, sft, rm, "crashed"), prompts=prompts)
    assert json.loads((root / "crashed" / "checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(ppo, "append_jsonl", real_append)
    resumed = ppo.train(small_cfg(root, sft, rm, "crashed"), prompts=prompts)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    assert read_metrics(resumed)[-1]["score"] == pytest.approx(read_metrics(full)[-1]["score"], abs=1e-5)


def test_ppo_lora_reference_is_policy_without_adapters(toy_rm):
    root, sft, rm = toy_rm
    cfg = small_cfg(root, sft, rm, "lora", steps=2, use_lora=True, lora_r=4, lr=5e-2)
    out = ppo.train(cfg, prompts=toy_prompts(8, seed=8))
    m = read_metrics(out)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-5) and m[1]["kl"] != 0
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()


def test_ppo_config_errors(toy_rm):
    root, sft, rm = toy_rm
    with pytest.raises(ConfigError, match="reward_model"):
        ppo.train(ppo.PPOConfig(policy_model=str(sft), output_dir=str(root / "x")), prompts=[])
    with pytest.raises(ConfigError, match="divisible"):
        ppo.train(small_cfg(root, sft, rm, "y", num_mini_batches=3), prompts=toy_prompts(8))
    for key in ("ppo_epochs", "steps"):  # nothing to learn from: refused before anything loads or is written
        with pytest.raises(ConfigError, match=f"{key} must be at least 1, got 0"):
            ppo.train(small_cfg(root, sft, rm, f"z-{key}", **{key: 0}), prompts=toy_prompts(8))
        assert not (root / f"z-{key}").exists()


PPO_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from prefgym.methods import ppo
    from test_prefdata_toy import toy_prompts
    cfg = ppo.PPOConfig(policy_model={sft!r}, reward_model={rm!r}, output_dir=sys.argv[1], steps=2,
                        per_device_rollout_batch_size=int(sys.argv[2]), num_mini_batches=1, ppo_epochs=2, lr=1e-2,
                        max_new_tokens=5, max_prompt_length=64, kl_coef=0.05, resume=False)
    ppo.train(cfg, prompts=toy_prompts(16, seed=9))
""")


@pytest.mark.slow
def test_ppo_two_processes_match_one(toy_rm, tmp_path):
    from test_dpo import assert_two_processes_match_one

    root, sft, rm = toy_rm
    script = tmp_path / "run_ppo.py"
    script.write_text(PPO_SCRIPT.format(tests=os.path.dirname(__file__), sft=str(sft), rm=str(rm)))
    m1, m2 = assert_two_processes_match_one(script, tmp_path, 8, 4, atol=1e-4, rtol=1e-3)
    for a, b in zip(m1, m2):
        assert a["episodes"] == b["episodes"]  # really 2 processes × 4 prompts
        for key in ("score", "kl", "response_length", "pg_loss", "vf_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_ppo_cli_runs_and_rejects_unknown_keys(toy_rm, tmp_path, capsys):
    from prefgym.cli import main
    from prefgym.io import write_json

    root, sft, rm = toy_rm
    write_json(tmp_path / "prompts.json", toy_prompts(8, seed=10))
    base = ["ppo", "--policy", str(sft), "--reward-model", str(rm), "--prompts", str(tmp_path / "prompts.json"),
            "-o", str(tmp_path / "cli")]
    assert main(base + ["--set", "kl=0.1"]) == 2
    assert "unknown key 'kl'" in capsys.readouterr().err
    assert main(base + ["--steps", "1", "--kl-coef", "0.2", "--set", "per_device_rollout_batch_size=4",
                        "--set", "max_new_tokens=3"]) == 0
    m = read_metrics(tmp_path / "cli")
    assert len(m) == 1 and m[0]["kl_coef"] == 0.2


def test_ppo_missing_eos_penalty_replaces_score(toy_rm):
    root, sft, rm = toy_rm
    cfg = small_cfg(root, sft, rm, "noeos", steps=1, max_new_tokens=1, missing_eos_penalty=-5.0)
    m = read_metrics(ppo.train(cfg, prompts=toy_prompts(8, seed=11)))[0]
    assert m["no_eos_fraction"] == 1.0  # one sampled token from a random model: no EOS
    assert m["score"] == pytest.approx(-5.0) and m["raw_score"] != pytest.approx(-5.0)


def test_ppo_killed_in_a_subprocess_then_resumed_equals_uninterrupted(toy_rm, tmp_path):
    """A hard exit (as SIGKILL leaves it: no cleanup) after step 3, then a fresh process resumes."""
    root, sft, rm = toy_rm
    full = ppo.train(small_cfg(root, sft, rm, "full-kill"), prompts=toy_prompts(16, seed=7))
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        torch.set_num_threads(1)
        from pathlib import Path
        from test_ppo import small_cfg, toy_prompts
        from prefgym.methods import ppo
        ppo.train(small_cfg(Path({str(root)!r}), Path({str(sft)!r}), Path({str(rm)!r}), "killed"),
                  prompts=toy_prompts(16, seed=7))
    """)
    env = {**os.environ, "PREFGYM_CRASH_AFTER_STEP": "3"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (root / "killed" / "model.safetensors").exists()
    assert json.loads((root / "killed" / "checkpoint" / "state.json").read_text())["step"] == 2
    env.pop("PREFGYM_CRASH_AFTER_STEP")
    resumed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(full / "model.safetensors"), load_file(root / "killed" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
