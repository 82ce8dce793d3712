"""RLOO, GRPO, KTO and SimPO: losses against independent computations (python loops, hand values,
the papers' formulas written with `math`), and tiny end-to-end runs on the toy model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prefgym.data.prompts import format_prompt
from prefgym.errors import ConfigError, DataError
from prefgym.methods import common, grpo, kto, reward_model, rloo, simpo
from test_prefdata_toy import make_toy_model, toy_pairs, toy_prompts, toy_quality, one_torch_thread  # noqa: F401


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# RLOO


@pytest.mark.parametrize("k", [2, 3, 5])
def test_rloo_leave_one_out_baseline_equals_python_loop(k):
    rewards = torch.randn(4 * k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    got = rloo.leave_one_out_advantages(rewards, k)
    r = rewards.tolist()
    for p in range(4):  # prompt-major: samples p*k .. p*k + k-1 belong to prompt p
        for i in range(k):
            others = [r[p * k + j] for j in range(k) if j != i]
            assert got[p * k + i].item() == pytest.approx(r[p * k + i] - sum(others) / len(others), abs=1e-12)


def test_rloo_loss_by_hand():
    # two sequences of 2 and 1 response tokens; sequence ratio = exp(Σ_t (new - old))
    new = torch.tensor([[-1.0, -2.0], [-0.5, 9.0]])
    old = torch.tensor([[-1.1, -2.2], [-1.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -2.0])
    r0, r1 = math.exp(0.3), math.exp(1.0)  # 1.35 (clipped at 1.2 for A > 0), 2.72 (A < 0: unclipped max)
    expect = (max(-1.0 * r0, -1.0 * 1.2) + max(2.0 * r1, 2.0 * 1.2)) / 2
    out = rloo.rloo_loss(new, old, adv, mask, cliprange=0.2)
    assert out["loss"].item() == pytest.approx(expect, rel=1e-6)
    assert out["clipfrac"].item() == pytest.approx(0.5)
    # on-policy (ratio 1) the gradient is REINFORCE's: -A_i ∇ Σ_t log π(y_i,t), averaged
    new = old.clone().requires_grad_(True)
    rloo.rloo_loss(new, old, adv, mask, 0.2)["loss"].backward()
    np.testing.assert_allclose(new.grad.numpy(), [[-0.5, -0.5], [1.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# GRPO


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 7.0, 5.0, 5.0])  # k = 3: groups [1, 2, 3] and [7, 5, 5]
    # group 1: mean 2, unbiased std 1; group 2: mean 17/3, std sqrt(((4/3)^2 + 2 (2/3)^2) / 2)
    s2 = math.sqrt(((4 / 3) ** 2 + 2 * (2 / 3) ** 2) / 2)
    scaled = [-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), (4 / 3) / (s2 + 1e-4), (-2 / 3) / (s2 + 1e-4), (-2 / 3) / (s2 + 1e-4)]
    np.testing.assert_allclose(grpo.group_advantages(r, 3).numpy(), scaled, rtol=1e-6)
    centred = [-1, 0, 1, 4 / 3, -2 / 3, -2 / 3]
    np.testing.assert_allclose(grpo.group_advantages(r, 3, scale=False).numpy(), centred, rtol=1e-6)
    # Dr. GRPO drops the std scaling; GRPO and DAPO keep it
    np.testing.assert_allclose(grpo.advantages_for(r, 3, "dr_grpo").numpy(), centred, rtol=1e-6)
    for loss_type in ("grpo", "dapo"):
        np.testing.assert_allclose(grpo.advantages_for(r, 3, loss_type).numpy(), scaled, rtol=1e-6)


# ragged: 3, 1 and 2 response tokens out of R = 4; max_new_tokens 5
TOKENS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [5.0, 6.0, 100.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("loss_type, expect", [
    ("grpo", ((1 + 2 + 3) / 3 + 4 / 1 + (5 + 6) / 2) / 3),  # mean of per-sequence means
    ("dr_grpo", (1 + 2 + 3 + 4 + 5 + 6) / (3 * 5)),  # sum / (B × max_new_tokens)
    ("dapo", (1 + 2 + 3 + 4 + 5 + 6) / 6),  # sum / tokens in the batch
])
def test_grpo_normalisations_by_hand_on_ragged_lengths(loss_type, expect):
    assert grpo.normalise_token_losses(TOKENS, MASK, loss_type, max_new_tokens=5).item() == pytest.approx(expect)


def test_grpo_dapo_token_count_is_the_normaliser_and_unknown_type_is_an_error():
    assert grpo.normalise_token_losses(TOKENS, MASK, "dapo", 5, token_count=12.0).item() == pytest.approx(21 / 12)
    with pytest.raises(ConfigError, match="loss_type"):
        grpo.normalise_token_losses(TOKENS, MASK, "bnpo", 5)


def test_grpo_loss_with_k3_kl_by_hand():
    old = torch.tensor([[-1.0, -2.0], [-0.7, 0.0]])
    ref = torch.tensor([[-1.5, -1.0], [-0.2, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([0.5, -1.0])
    beta = 0.1
    out = grpo.grpo_loss(old, old, ref, adv, mask, loss_type="grpo", beta=beta, cliprange=0.2, cliprange_high=None,
                         max_new_tokens=4)

    def k3(logp, r):  # e^(ref - logp) - (ref - logp) - 1
        return math.exp(r - logp) - (r - logp) - 1

    seq0 = ((-0.5 + beta * k3(-1.0, -1.5)) + (-0.5 + beta * k3(-2.0, -1.0))) / 2
    seq1 = 1.0 + beta * k3(-0.7, -0.2)
    assert out["loss"].item() == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    # clip-higher: a token with ratio 1.25 and A > 0 is clipped at 1.2 but not at 1.28
    new = old + torch.log(torch.tensor(1.25))
    low = grpo.grpo_loss(new, old, None, adv.abs(), mask, loss_type="dapo", beta=0.0, cliprange=0.2,
                         cliprange_high=None, max_new_tokens=4)
    high = grpo.grpo_loss(new, old, None, adv.abs(), mask, loss_type="dapo", beta=0.0, cliprange=0.2,
                          cliprange_high=0.28, max_new_tokens=4)
    assert low["loss"].item() == pytest.approx(-(0.5 * 1.2 * 2 + 1.0 * 1.2) / 3, rel=1e-6)
    assert high["loss"].item() == pytest.approx(-(0.5 * 1.25 * 2 + 1.0 * 1.25) / 3, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# KTO


def test_kto_loss_against_the_formula():
    logps, ref = torch.tensor([-3.0, -5.0, -2.0, -4.0]), torch.tensor([-3.5, -4.0, -2.5, -4.0])
    kl_logps, kl_ref = torch.tensor([-6.0, -7.0, -5.0, -8.0]), torch.tensor([-6.5, -7.5, -5.0, -8.2])
    desirable = torch.tensor([True, False, False, True])
    beta, lam_d, lam_u = 0.5, 1.0, 1.5
    z0 = max(0.0, (0.5 + 0.5 + 0.0 + 0.2) / 4)
    r = [0.5, -1.0, 0.5, 0.0]
    expect = [lam_d * (1 - sigmoid(beta * (r[0] - z0))), lam_u * (1 - sigmoid(beta * (z0 - r[1]))),
              lam_u * (1 - sigmoid(beta * (z0 - r[2]))), lam_d * (1 - sigmoid(beta * (r[3] - z0)))]
    losses, rewards, got_z0 = kto.kto_loss(logps, ref, kl_logps, kl_ref, desirable, beta, lam_d, lam_u)
    np.testing.assert_allclose(losses.numpy(), expect, rtol=1e-6)
    np.testing.assert_allclose(rewards.numpy(), [beta * x for x in r], rtol=1e-6)
    assert got_z0.item() == pytest.approx(z0)
    # a negative KL estimate is clamped at 0
    _, _, z0_neg = kto.kto_loss(logps, ref, kl_ref, kl_logps, desirable, beta)
    assert z0_neg.item() == 0.0


def test_kto_reference_point_carries_no_gradient():
    logps = torch.tensor([-3.0, -5.0], requires_grad=True)
    kl_logps = torch.tensor([-1.0, -1.0], requires_grad=True)
    losses, _, _ = kto.kto_loss(logps, torch.tensor([-4.0, -4.0]), kl_logps, torch.tensor([-2.0, -2.0]),
                                torch.tensor([True, False]), 0.5)
    losses.sum().backward()
    assert kl_logps.grad is None or torch.all(kl_logps.grad == 0)
    assert logps.grad[0] < 0 and logps.grad[1] > 0  # raise the desirable, lower the undesirable


def test_kto_examples_from_pairs_follow_the_rounding_rule():
    recs = [{"instruction": "a", "output_1": "x", "output_2": "y", "preference": 1.2},
            {"instruction": "b", "output_1": "u", "output_2": "v", "preference": 1.5},
            {"instruction": "c", "input": "z", "output_1": "s", "output_2": "t", "preference": 2},
            {"instruction": "d", "output_1": "s", "output_2": "t", "preference": None}]
    assert kto.examples_from_pairs(recs) == [(format_prompt("a"), "x", True), (format_prompt("a"), "y", False),
                                             (format_prompt("c", "z"), "t", True), (format_prompt("c", "z"), "s", False)]
    mixed = kto.with_mismatched_completions([(f"p{i}", f"c{i}", i % 2 == 0) for i in range(7)], seed=3)
    assert [m[:2] for m in mixed] == [(f"p{i}", f"c{i}") for i in range(7)]  # order kept
    assert sorted(m[2] for m in mixed) == sorted(f"c{i}" for i in range(7))  # each completion used once
    assert all(m[1] != m[2] for m in mixed)  # never the example's own


@pytest.mark.parametrize("row, field", [({"instruction": "a", "output": "x", "label": "yes"}, "label"),
                                        ({"instruction": "a", "output": "x"}, "label"),
                                        ({"instruction": "a", "output": 3, "label": True}, "output")])
def test_kto_unpaired_rows_are_validated(row, field):
    rows = [{"instruction": "ok", "output": "fine", "label": False}, row]
    with pytest.raises(DataError, match=rf"data.jsonl, row 1, field '{field}'"):
        kto.examples_from_unpaired(rows, path="data.jsonl")


# ---------------------------------------------------------------------------------------------
# SimPO


def test_simpo_loss_against_the_formula():
    avg_c, avg_r = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    beta, gamma = 2.0, 0.7
    eps = torch.tensor([0.0, 0.25, 0.1])
    losses, cr, rr = simpo.simpo_loss(avg_c, avg_r, beta, gamma, eps)
    for i, (c, r, e) in enumerate(zip(avg_c.tolist(), avg_r.tolist(), eps.tolist())):
        h = c - r
        expect = -(1 - e) * math.log(sigmoid(beta * h - gamma)) - e * math.log(sigmoid(-beta * h - gamma))
        assert losses[i].item() == pytest.approx(expect, rel=1e-6)
    np.testing.assert_allclose(cr.numpy(), beta * avg_c.numpy())
    np.testing.assert_allclose(rr.numpy(), beta * avg_r.numpy())


def _by_hand_average_logp(model, tok, prompt, response) -> float:
    """Mean of log p(token | prefix) over the response and its EOS, from one full forward pass."""
    prompt_ids = tok(prompt)["input_ids"]
    resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids + resp])).logits[0, :-1].double(), -1)
    return sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(resp)) / len(resp)


def test_simpo_average_logps_are_length_normalised_on_ragged_lengths(toy):
    from transformers import AutoModelForCausalLM

    _, sft, _ = toy
    model = AutoModelForCausalLM.from_pretrained(sft).eval()
    tok = common.load_tokenizer(sft)
    examples = [(format_prompt("Say something about cats"), "good good good very good", "bad", 1.0),
                (format_prompt("Say something about rain"), "ok", "the bad is very bad fine", 1.0)]
    with torch.no_grad():
        c, r = simpo.average_pair_logps(simpo.PairLogps(model), tok, examples, 64, "cpu")
    for i, (prompt, chosen, rejected, _) in enumerate(examples):
        assert c[i].item() == pytest.approx(_by_hand_average_logp(model, tok, prompt, chosen), abs=1e-4)
        assert r[i].item() == pytest.approx(_by_hand_average_logp(model, tok, prompt, rejected), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Tiny end-to-end runs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("newmethods")
    return root, make_toy_model(root / "sft"), toy_pairs(48, seed=2)


@pytest.fixture(scope="module")
def toy_rm(toy):
    root, sft, _ = toy
    return reward_model.train(reward_model.RewardModelConfig(
        model_name_or_path=str(sft), output_dir=str(root / "rm"), lr=3e-3, epochs=3, per_device_batch_size=16,
        max_length=64), records=toy_pairs(96, seed=1, ties=True))


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_trained(sft, out, keys):
    from transformers import AutoModelForCausalLM

    before, after = load_file(sft / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    AutoModelForCausalLM.from_pretrained(out)  # the folder loads
    assert not (out / "checkpoint").exists() and (out / "train_config.json").exists()
    for row in metrics_of(out):
        assert all(math.isfinite(row[k]) for k in keys)


def test_rloo_runs_and_first_update_is_on_policy(toy, toy_rm):
    root, sft, _ = toy
    cfg = rloo.RLOOConfig(policy_model=str(sft), reward_model=str(toy_rm), output_dir=str(root / "rloo"), steps=3,
                          per_device_prompts=2, k=3, max_new_tokens=5, max_prompt_length=64, lr=1e-2,
                          ppo_epochs=1, num_mini_batches=1)
    out = rloo.train(cfg, prompts=toy_prompts(8, seed=3))
    m = metrics_of(out)
    assert [r["step"] for r in m] == [1, 2, 3] and m[0]["episodes"] == 6
    assert m[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and m[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    for r in m:  # the reward is the score minus β times the sequence KL
        assert r["rlhf_reward"] == pytest.approx(r["score"] - cfg.kl_coef * r["kl"], abs=1e-5)
    assert_trained(sft, out, ["loss", "score", "kl", "rlhf_reward"])


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_grpo_with_a_verifiable_reward_raises_it(toy, loss_type):
    """GRPO on the toy's programmatic quality (good words minus bad words) as the gold reward."""
    root, sft, _ = toy
    cfg = grpo.GRPOConfig(policy_model=str(sft), reward="gold", output_dir=str(root / f"grpo-{loss_type}"),
                          loss_type=loss_type, steps=10, per_device_prompts=4, k=4, max_new_tokens=4,
                          max_prompt_length=64, lr=2e-2, beta=0.01, missing_eos_penalty=None)
    out = grpo.train(cfg, prompts=toy_prompts(16, seed=4), gold_fn=lambda i, x, o: float(toy_quality(o)))
    scores = [r["score"] for r in metrics_of(out)]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.3
    assert_trained(sft, out, ["loss", "score", "k3_kl"])


def test_grpo_config_errors(toy):
    root, sft, _ = toy
    with pytest.raises(ConfigError, match="reward_model"):
        grpo.train(grpo.GRPOConfig(policy_model=str(sft), output_dir=str(root / "x")))
    with pytest.raises(ConfigError, match="loss_type"):
        grpo.train(grpo.GRPOConfig(policy_model=str(sft), output_dir=str(root / "x"), reward="gold", loss_type="ppo"))
    with pytest.raises(ConfigError, match="k must be"):
        rloo.train(rloo.RLOOConfig(policy_model=str(sft), reward_model="rm", output_dir=str(root / "x"), k=1))


def test_simpo_learns_the_toy_preference(toy):
    root, sft, pairs = toy
    cfg = simpo.SimPOConfig(model_name_or_path=str(sft), output_dir=str(root / "simpo"), lr=3e-3, epochs=3,
                            per_device_batch_size=16, max_length=64, beta=2.0, gamma=0.5)
    out = simpo.train(cfg, records=pairs)
    m = metrics_of(out)
    assert len(m) == 9 and m[-1]["loss"] < m[0]["loss"] - 0.1
    assert np.mean([r["rewards/accuracies"] for r in m[-3:]]) > 0.7
    assert_trained(sft, out, ["loss", "rewards/margins"])


def test_kto_learns_from_pairs_and_unpaired_rows(toy):
    root, sft, pairs = toy
    cfg = kto.KTOConfig(model_name_or_path=str(sft), output_dir=str(root / "kto"), lr=3e-3, epochs=3,
                        per_device_batch_size=16, max_length=64, beta=0.5, warmup_steps=2)
    unpaired = [{**p, "output": o, "label": toy_quality(o) > 0} for p in toy_prompts(16, seed=9)
                for o in ("good very good", "bad is bad")]
    out = kto.train(cfg, records=pairs, unpaired=unpaired)
    m = metrics_of(out)
    assert m[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # π == π_ref: every term is 1 - σ(0)
    assert [r["lr"] for r in m[:3]] == pytest.approx([1.5e-3, 3e-3, 3e-3])  # the rate each step used
    assert m[-1]["loss"] < m[0]["loss"] - 0.02
    assert m[-1]["rewards/desirable"] > m[-1]["rewards/undesirable"]
    assert torch.load(out / "reference_logps.pt").shape == (2 * len(pairs) + len(unpaired), 2)
    assert_trained(sft, out, ["loss", "kl"])


def test_commands_have_help_run_and_reject_unknown_keys(toy, tmp_path):
    import typer
    from typer.testing import CliRunner

    from prefgym.io import write_jsonl

    root, sft, pairs = toy
    app = typer.Typer()
    for module in (rloo, grpo, kto, simpo):
        module.add_commands(app)
    runner = CliRunner()
    for command in ("rloo", "grpo", "kto", "simpo"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Reads" in result.output, command
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    args = ["simpo", "--model", str(sft), "--preferences", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "s"),
            "--set", "per_device_batch_size=16", "--set", "epochs=1", "--set", "max_length=64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "model.safetensors").exists()
    result = runner.invoke(app, ["kto", "--model", str(sft), "--out", str(tmp_path / "k"), "--set", "learning_rate=1"])
    assert isinstance(result.exception, ConfigError) and "unknown key 'learning_rate'" in str(result.exception)
    write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "x", "label": "yes"}])
    result = runner.invoke(app, ["kto", "--model", str(sft), "--unpaired", str(tmp_path / "rows.jsonl"),
                                 "--out", str(tmp_path / "k2")])
    assert isinstance(result.exception, DataError) and "rows.jsonl, row 0, field 'label'" in str(result.exception)
    assert not (tmp_path / "k2" / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["grpo", "kto"])
def test_resume_after_crash_equals_uninterrupted(toy, method, monkeypatch):
    """Killed after step 3 (last checkpoint: step 2), rerun: the same weights as an uninterrupted run."""
    root, sft, pairs = toy
    if method == "grpo":
        module = rloo  # the loop GRPO runs in

        def run(name):
            cfg = grpo.GRPOConfig(policy_model=str(sft), reward="gold", output_dir=str(root / f"resume-{name}"),
                                  steps=4, save_steps=2, per_device_prompts=2, k=3, max_new_tokens=4,
                                  max_prompt_length=64, lr=1e-2, missing_eos_penalty=None)
            return grpo.train(cfg, prompts=toy_prompts(8, seed=5), gold_fn=lambda i, x, o: float(toy_quality(o)))
    else:
        module = simpo  # the loop KTO runs in

        def run(name):
            cfg = kto.KTOConfig(model_name_or_path=str(sft), output_dir=str(root / f"resume-kto-{name}"), lr=3e-3,
                                epochs=1, per_device_batch_size=16, max_length=64, save_steps=2)
            return kto.train(cfg, records=pairs[:32])

    full = run("full")
    real_append = module.append_jsonl

    def crash_at_step_3(path, row):
        real_append(path, row)
        if row.get("step") == 3 and path.name == "metrics.jsonl":
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "append_jsonl", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run("crashed")
    crashed = full.parent / full.name.replace("full", "crashed")
    assert json.loads((crashed / "checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(module, "append_jsonl", real_append)
    resumed = run("crashed")
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [r["step"] for r in metrics_of(resumed)] == [1, 2, 3, 4]


SIMPO_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from prefgym.methods import simpo
from test_prefdata_toy import toy_pairs
cfg = simpo.SimPOConfig(model_name_or_path={sft!r}, output_dir=sys.argv[1], lr=3e-3, epochs=1, beta=2.0, gamma=0.5,
                        per_device_batch_size=int(sys.argv[2]), max_length=64, resume=False, warmup_steps=3)
simpo.train(cfg, records=toy_pairs(32, seed=3))
"""


@pytest.mark.slow
def test_simpo_two_processes_match_one(toy, tmp_path):
    """The loop SimPO and KTO share, on 1 and 2 processes: the same weights and one warmup (a
    schedule stepped once per process would end it after 2 steps on 2)."""
    import os

    from test_dpo import assert_two_processes_match_one

    root, sft, _ = toy
    script = tmp_path / "run_simpo.py"
    script.write_text(SIMPO_SCRIPT.format(tests=os.path.dirname(__file__), sft=str(sft)))
    m1, m2 = assert_two_processes_match_one(script, tmp_path, 8, 4, atol=2e-5, rtol=1e-4)
    assert [m["lr"] for m in m2] == [m["lr"] for m in m1] == pytest.approx([3e-3 * min(1, k / 3) for k in (1, 2, 3, 4)])
