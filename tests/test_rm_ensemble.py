"""Reward-model ensembles (Coste et al. 2024): the scoring rules against a hand loop, training k
members, the ensemble scorer, and PPO / best-of-n / RLOO / expert iteration scoring with them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from prefgym.errors import ConfigError
from prefgym.methods import best_of_n, expert_iteration, ppo, reward_model, rloo
from prefgym.methods.reward_model import (ENSEMBLE_FILE, NORMALIZATION_FILE, EnsembleScorer, RewardScorer,
                                          combine_ensemble_scores, load_reward_scorer)
from test_prefdata_toy import make_toy_model, toy_pairs, toy_prompts, one_torch_thread  # noqa: F401 (autouse fixture)

RULES = ("mean", "worst", "uwo")


def hand_combine(scores, rule: str, uwo_coef: float = 1.0) -> list[float]:
    """The rules written out sample by sample, member by member."""
    k, n = len(scores), len(scores[0])
    out = []
    for j in range(n):
        column = [float(scores[i][j]) for i in range(k)]
        mean = sum(column) / k
        variance = sum((x - mean) ** 2 for x in column) / k  # population variance
        out.append({"mean": mean, "worst": min(column), "uwo": mean - uwo_coef * variance}[rule])
    return out


# ---------------------------------------------------------------------------------------------
# The rules


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_combine_rules_equal_a_hand_loop_in_numpy_and_torch(rule, k):
    scores = np.random.default_rng(k).normal(size=(k, 7)) * [[1.0], [3.0], [0.5], [2.0], [1.5]][:k]
    expected = hand_combine(scores, rule, uwo_coef=0.7)
    got_np = combine_ensemble_scores(scores, rule, uwo_coef=0.7)
    got_torch = combine_ensemble_scores(torch.tensor(scores), rule, uwo_coef=0.7)
    assert isinstance(got_np, np.ndarray) and isinstance(got_torch, torch.Tensor)
    np.testing.assert_allclose(got_np, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_torch.numpy(), expected, rtol=1e-12, atol=1e-12)
    if k == 1:  # an ensemble of one: every rule gives the member's score
        np.testing.assert_allclose(got_np, scores[0])


def test_combine_rules_by_hand_on_two_members():
    scores = np.array([[1.0, 0.0], [3.0, -2.0]])
    np.testing.assert_allclose(combine_ensemble_scores(scores, "mean"), [2.0, -1.0])
    np.testing.assert_allclose(combine_ensemble_scores(scores, "worst"), [1.0, -2.0])
    # population variance of (1, 3) is 1 and of (0, -2) is 1: mean − 0.5 · 1
    np.testing.assert_allclose(combine_ensemble_scores(scores, "uwo", uwo_coef=0.5), [1.5, -1.5])


def test_unknown_rule_or_negative_coefficient_is_a_config_error():
    with pytest.raises(ConfigError, match="mean, worst, uwo.*'max'"):
        combine_ensemble_scores(np.zeros((2, 3)), "max")
    with pytest.raises(ConfigError, match="uwo_coef"):
        combine_ensemble_scores(np.zeros((2, 3)), "uwo", uwo_coef=-1.0)
    with pytest.raises(ConfigError, match="reward_ensemble.*mean, worst, uwo"):
        ppo.PPOConfig(reward_ensemble="median")
    with pytest.raises(ConfigError, match="reward_ensemble"):
        best_of_n.BestOfNConfig(reward_ensemble="Worst")


# ---------------------------------------------------------------------------------------------
# Training an ensemble


def ensemble_config(root, sft, **kw) -> reward_model.RewardModelConfig:
    base = dict(model_name_or_path=str(sft), output_dir=str(root / "ensemble"), lr=3e-3, epochs=2,
                per_device_batch_size=16, eval_fraction=0.25, max_length=64, ensemble_size=2)
    return reward_model.RewardModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_ensemble")
    sft = make_toy_model(root / "sft")
    pairs = toy_pairs(96, seed=1, ties=True)
    path = reward_model.train(ensemble_config(root, sft), records=pairs)
    return root, sft, path, pairs


def records_of(pairs) -> list[dict]:
    return [{"instruction": p["instruction"], "input": "", "output": p[f"output_{j}"]} for p in pairs for j in (1, 2)]


def test_training_writes_members_and_ensemble_json(ensemble):
    from safetensors.torch import load_file

    from prefgym.seeding import rng_for

    _, _, path, pairs = ensemble
    info = json.loads((path / ENSEMBLE_FILE).read_text())
    assert info["members"] == ["member-0", "member-1"] and info["size"] == 2 and info["seeds"] == [0, 1]
    for name in info["members"]:  # each member is an ordinary reward-model folder
        for f in (NORMALIZATION_FILE, "eval_results.json", "metrics.jsonl", "tokenizer.json", "model.safetensors"):
            assert (path / name / f).exists(), (name, f)
    configs = [json.loads((path / m / "train_config.json").read_text()) for m in info["members"]]
    assert [c["seed"] for c in configs] == [0, 1] and [c["split_seed"] for c in configs] == [0, 0]
    # different head initialisation and data order: different weights and training losses
    w0, w1 = (load_file(path / m / "model.safetensors") for m in info["members"])
    assert not torch.equal(w0["score.weight"], w1["score.weight"])
    losses = [[json.loads(l)["loss"] for l in (path / m / "metrics.jsonl").read_text().splitlines()[:3]]
              for m in info["members"]]
    assert losses[0] != losses[1]
    # accuracy on the pairs both members held out: each member's own, and the mean ensemble's by hand
    member_results = [json.loads((path / m / "eval_results.json").read_text()) for m in info["members"]]
    assert info["eval_pairs"] == 24 == member_results[0]["eval_pairs"] == member_results[1]["eval_pairs"]
    assert info["member_eval_accuracy"] == pytest.approx([r["eval_accuracy"] for r in member_results])
    held_out = [pairs[i] for i in rng_for(0, "reward-model-split").permutation(len(pairs))[:24]]
    s = [RewardScorer(path / m).score(records_of(held_out)) for m in info["members"]]
    mean = (s[0] + s[1]) / 2
    s1, s2 = mean[0::2], mean[1::2]
    p1 = np.array([2 - p["preference"] for p in held_out])
    decided = p1 != 0.5
    hand = np.where(p1 > 0.5, s1 > s2, s2 > s1)[decided].mean()
    assert info["eval_accuracy"] == pytest.approx(hand)
    assert json.loads((path / "eval_results.json").read_text())["eval_accuracy"] == info["eval_accuracy"]


@pytest.mark.parametrize("rule", RULES)
def test_ensemble_scorer_equals_combining_the_member_scorers(ensemble, rule):
    from prefgym.methods.common import tokenize_prompt_response

    _, _, path, pairs = ensemble
    records = records_of(pairs[:6])
    scorer = load_reward_scorer(path, rule, uwo_coef=2.0)
    assert isinstance(scorer, EnsembleScorer) and len(scorer.members) == 2
    members = [RewardScorer(path / f"member-{i}").score(records) for i in range(2)]
    expected = hand_combine(members, rule, uwo_coef=2.0)
    np.testing.assert_allclose(scorer.score(records), expected, atol=1e-6)
    np.testing.assert_allclose(scorer.member_scores(records), np.stack(members), atol=1e-6)
    np.testing.assert_allclose(reward_model.score(path, records, rule=rule, uwo_coef=2.0), expected, atol=1e-6)
    # on token batches (as PPO and RLOO score) too
    batch = tokenize_prompt_response(scorer.tokenizer, [scorer.format(r) for r in records],
                                     [r["output"] for r in records], scorer.max_length)
    np.testing.assert_allclose(scorer.score_tokens(batch["input_ids"], batch["attention_mask"]).numpy(),
                               expected, atol=1e-5)


def test_a_plain_folder_loads_as_a_reward_scorer(ensemble):
    _, _, path, pairs = ensemble
    scorer = load_reward_scorer(path / "member-0", "worst")
    assert isinstance(scorer, RewardScorer) and scorer.members == [scorer]
    records = records_of(pairs[:3])
    np.testing.assert_allclose(scorer.member_scores(records), scorer.score(records)[None])


def test_rerun_does_not_retrain_finished_members(ensemble, tmp_path):
    root, sft, path, pairs = ensemble
    copy = tmp_path / "ensemble"
    shutil.copytree(path, copy)
    cfg = ensemble_config(root, sft, output_dir=str(copy))
    member_1 = (copy / "member-1" / "model.safetensors").read_bytes()
    stamp = lambda: {p.relative_to(copy): p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}  # noqa: E731
    before = stamp()
    assert reward_model.train(cfg, records=pairs) == copy
    assert stamp() == before  # complete: nothing rewritten
    # a crash after member-0: only member-1 is trained again, to the same weights
    shutil.rmtree(copy / "member-1")
    (copy / ENSEMBLE_FILE).unlink()
    reward_model.train(cfg, records=pairs)
    after = stamp()
    assert {k: v for k, v in after.items() if k.parts[0] == "member-0"} == \
        {k: v for k, v in before.items() if k.parts[0] == "member-0"}
    assert (copy / "member-1" / "model.safetensors").read_bytes() == member_1
    assert json.loads((copy / ENSEMBLE_FILE).read_text()) == json.loads((path / ENSEMBLE_FILE).read_text())
    # other settings in the same folder are refused, naming the key
    with pytest.raises(ConfigError, match="ensemble_size: 2 -> 3"):
        reward_model.train(ensemble_config(root, sft, output_dir=str(copy), ensemble_size=3), records=pairs)


def test_bad_ensemble_folders_are_config_errors(ensemble, tmp_path):
    _, _, path, _ = ensemble
    with pytest.raises(ConfigError, match="mean, worst, uwo"):
        load_reward_scorer(path, "best")
    copy = tmp_path / "ensemble"
    shutil.copytree(path, copy)
    shutil.rmtree(copy / "member-1")
    with pytest.raises(ConfigError, match="member 'member-1'.*holds no reward model"):
        load_reward_scorer(copy)
    (copy / ENSEMBLE_FILE).unlink()
    with pytest.raises(ConfigError, match="unfinished reward-model ensemble"):
        load_reward_scorer(copy)
    with pytest.raises(ConfigError, match="load_reward_scorer"):
        RewardScorer(path)
    with pytest.raises(ConfigError, match="ensemble_size"):
        reward_model.train(reward_model.RewardModelConfig(model_name_or_path="m", output_dir=str(tmp_path / "x"),
                                                          ensemble_size=0), records=[])


ENSEMBLE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from prefgym.methods import reward_model
from test_prefdata_toy import toy_pairs
from test_rm_ensemble import ensemble_config
cfg = ensemble_config(Path(sys.argv[1]), {sft!r}, per_device_batch_size=int(sys.argv[2]))
out = reward_model.train(cfg, records=toy_pairs(96, seed=1, ties=True))
print("ensemble.json there on return:", (out / "ensemble.json").exists())
"""


@pytest.mark.slow  # about 60 s: two launches of two processes, two members each
def test_ensemble_under_two_processes_matches_one_process(ensemble, tmp_path):
    """Every process trains every member (half the per-process batch: the same global batches), one
    process group from the first member to the last; the main process writes ensemble.json."""
    import os
    import sys

    from safetensors.torch import load_file

    from helpers import launch_two_cpu_processes, run_process

    root, sft, one, _ = ensemble
    script = tmp_path / "run_ensemble.py"
    script.write_text(ENSEMBLE_SCRIPT.format(tests=os.path.dirname(__file__), sft=str(sft)))
    launch = launch_two_cpu_processes(script, str(tmp_path), "8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = run_process(launch, env=env, check=True)
    assert result.stdout.count("ensemble.json there on return: True") == 2
    two = tmp_path / "ensemble"
    info_one, info_two = (json.loads((p / ENSEMBLE_FILE).read_text()) for p in (one, two))
    assert info_two["members"] == ["member-0", "member-1"] and info_two["eval_pairs"] == info_one["eval_pairs"]
    for name in info_one["members"]:
        a, b = load_file(one / name / "model.safetensors"), load_file(two / name / "model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)  # each process alone: 0.05 apart
    assert info_two["eval_accuracy"] == pytest.approx(info_one["eval_accuracy"])
    # the second member differs from the first (its own seed) under two processes too
    m0, m1 = (load_file(two / n / "model.safetensors") for n in info_two["members"])
    assert any(not torch.equal(m0[k], m1[k]) for k in m0)
    # every member trained, ensemble.json gone (a run stopped while writing it): the rerun trains
    # nothing, rank 0 writes it again, and no rank returns before it is there
    (two / ENSEMBLE_FILE).unlink()
    result = run_process(launch, env=env, check=True)
    assert result.stdout.count("ensemble.json there on return: True") == 2
    assert json.loads((two / ENSEMBLE_FILE).read_text()) == info_two
    for name in info_two["members"]:
        assert load_file(two / name / "model.safetensors").keys() == m0.keys()


# ---------------------------------------------------------------------------------------------
# Methods that optimise the ensemble


def test_ppo_scores_rollouts_by_the_rule_and_starts_its_value_model_from_member_0(ensemble, monkeypatch):
    from prefgym.models import loading

    root, sft, path, _ = ensemble
    loaded = []
    real_load = loading.load_score_model
    monkeypatch.setattr(loading, "load_score_model", lambda p, *a, **kw: loaded.append(p) or real_load(p, *a, **kw))
    prompts = toy_prompts(8, seed=5)
    metrics, samples = {}, {}
    for rule in RULES:
        cfg = ppo.PPOConfig(policy_model=str(sft), reward_model=str(path), output_dir=str(root / f"ppo-{rule}"),
                            steps=2, per_device_rollout_batch_size=4, ppo_epochs=1, lr=1e-2, max_new_tokens=5,
                            max_prompt_length=64, missing_eos_penalty=None, reward_ensemble=rule, uwo_coef=3.0)
        out = ppo.train(cfg, prompts=prompts)
        metrics[rule] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        samples[rule] = [json.loads(l)["response"] for l in (out / "samples.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics[rule]] == [1, 2]
    # per run: the two members for the scorer, and member-0 again for the value model
    assert sorted(p.name for p in loaded) == ["member-0"] * 6 + ["member-1"] * 3
    # the same step-1 rollouts, scored lower by the worst member and by the variance penalty
    assert samples["mean"][:4] == samples["worst"][:4] == samples["uwo"][:4]
    first = {rule: m[0]["raw_score"] for rule, m in metrics.items()}
    assert first["worst"] < first["mean"] and first["uwo"] < first["mean"]


def disagreeing_ensemble(path, out):
    """A copy of the ensemble whose member-1 has a random score head: its members rank samples differently."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, out)
    weights = load_file(out / "member-1" / "model.safetensors")
    weights["score.weight"] = torch.randn(weights["score.weight"].shape, generator=torch.Generator().manual_seed(3))
    save_file(weights, out / "member-1" / "model.safetensors", metadata={"format": "pt"})
    return out


def test_best_of_n_picks_by_the_rule(ensemble, tmp_path):
    from prefgym.io import write_jsonl

    _, sft, trained, _ = ensemble
    path = disagreeing_ensemble(trained, tmp_path / "ensemble")
    prompts = toy_prompts(6, seed=11)
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    picks = {}
    for rule in RULES:
        cfg = best_of_n.BestOfNConfig(policy_model=str(sft), reward_model=str(path), data=str(tmp_path / "prompts.jsonl"),
                                      output_file=str(tmp_path / f"{rule}.json"), n=6, max_new_tokens=5,
                                      missing_eos_penalty=None, progress=False, reward_ensemble=rule)
        rows = json.loads(best_of_n.run(cfg).read_text())
        for row in rows:  # every sample scored by each member on its own, combined by hand
            members = [RewardScorer(path / f"member-{i}").score([{**row, "output": s} for s in row["outputs"]])
                       for i in range(2)]
            expected = hand_combine(members, rule)
            np.testing.assert_allclose(row["rewards"], expected, atol=1e-5)
            assert row["best_index"] == int(np.argmax(expected))
        picks[rule] = [row["output"] for row in rows]
    # the same samples (same seed), but the worst member's ranking picks another one somewhere
    assert picks["worst"] != picks["mean"]


def test_rloo_scorer_combines_the_members_by_the_rule(ensemble):
    from prefgym.methods.common import load_tokenizer, tokenize_prompt_response

    _, sft, path, pairs = ensemble
    tokenizer = load_tokenizer(sft)
    records = records_of(pairs[:4])
    batch = tokenize_prompt_response(tokenizer, [f"Say {r['instruction']}" for r in records],
                                     [r["output"] for r in records], 64)
    rollout = rloo.GroupRollout(batch["input_ids"], batch["attention_mask"], None, None, None, None, [])
    members = [RewardScorer(path / f"member-{i}").score_tokens(batch["input_ids"], batch["attention_mask"])
               for i in range(2)]
    cfg = rloo.RLOOConfig(policy_model=str(sft), reward_model=str(path), reward_ensemble="uwo", uwo_coef=0.5)
    got = rloo.reward_model_scorer(cfg, tokenizer)(rollout, records)
    np.testing.assert_allclose(got.numpy(), hand_combine([m.numpy() for m in members], "uwo", 0.5), atol=1e-5)


def test_expert_iteration_passes_the_rule_to_best_of_n(monkeypatch, tmp_path):
    seen = []

    def fake_best_of_n(cfg):
        seen.append(cfg)
        raise RuntimeError("stop after best-of-n")

    monkeypatch.setattr(expert_iteration, "run_best_of_n", fake_best_of_n)
    cfg = expert_iteration.ExpertIterationConfig(model_name_or_path="m", reward_model="rm", prompts_file="p",
                                                 output_dir=str(tmp_path), reward_ensemble="uwo", uwo_coef=0.25)
    with pytest.raises(RuntimeError, match="stop after"):
        expert_iteration.train(cfg)
    assert (seen[0].reward_ensemble, seen[0].uwo_coef) == ("uwo", 0.25)


# ---------------------------------------------------------------------------------------------
# The pipeline

ENSEMBLE_STAGES = {"reward_model": {"ensemble_size": 3}, "ppo": {"reward_ensemble": "worst"},
                   "best_of_n": {"reward_ensemble": "uwo", "uwo_coef": 0.5}}


def test_pipeline_plans_ensemble_settings_into_the_fingerprints(tmp_path):
    from prefgym.pipeline import Pipeline, load_run_config

    def plan(stages):
        cfg = load_run_config(None, scale="quick", out_dir=str(tmp_path / "run"), methods=["ppo", "best_of_n"],
                              stages=stages)
        return {s.name: s.settings for s in Pipeline(cfg).stages()}

    plain, ensemble = plan({}), plan(ENSEMBLE_STAGES)
    assert (plain["sim/reward_model"]["ensemble_size"], ensemble["sim/reward_model"]["ensemble_size"]) == (1, 3)
    assert (plain["sim/ppo"]["reward_ensemble"], ensemble["sim/ppo"]["reward_ensemble"]) == ("mean", "worst")
    assert ensemble["sim/best_of_n"]["reward_ensemble"] == "uwo" and ensemble["sim/best_of_n"]["uwo_coef"] == 0.5
    # a bad rule is refused when the plan is made, before any stage runs
    with pytest.raises(ConfigError, match="stages.ppo: key .reward_ensemble. should be one of mean, worst, uwo"):
        plan({"ppo": {"reward_ensemble": "max"}})


@pytest.mark.slow
def test_run_with_an_ensemble_end_to_end(tiny_world, tmp_path):
    """`prefgym run` on the tiny world: 3 reward models, PPO on their worst case, best-of-n on uwo."""
    import pandas as pd
    import yaml

    from prefgym.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"scale": "quick", "world_dir": str(tiny_world), "methods": ["ppo", "best_of_n"],
                                      "stages": ENSEMBLE_STAGES}))
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(out)]) == 0
    info = json.loads((out / "sim" / "reward_model" / ENSEMBLE_FILE).read_text())
    assert info["members"] == ["member-0", "member-1", "member-2"] and len(info["member_eval_accuracy"]) == 3
    ppo_config = json.loads((out / "sim" / "methods" / "ppo" / "train_config.json").read_text())
    assert ppo_config["reward_ensemble"] == "worst"
    table = pd.read_csv(out / "leaderboard.csv", index_col=0)
    n_pairs = len(json.loads((out / "sim" / "preference" / "preferences.json").read_text()))
    assert (table.loc[["ppo", "best_of_n"], "labels"] == n_pairs).all()
