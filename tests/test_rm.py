"""Reward model: Bradley–Terry maths (ties), and a tiny end-to-end run on a learnable toy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prefgym.data.prompts import format_prompt
from prefgym.errors import ConfigError
from prefgym.methods import reward_model
from test_prefdata_toy import make_toy_model, toy_pairs, one_torch_thread  # noqa: F401 (autouse fixture)


def _logsig(x):
    return math.log(1 / (1 + math.exp(-x)))


def test_bradley_terry_loss_with_ties_by_hand():
    s1 = torch.tensor([0.3, 0.3, 0.3, -1.0])
    s2 = torch.tensor([-0.2, -0.2, -0.2, 2.0])
    target = torch.tensor([1.0, 0.0, 0.5, 0.5])
    by_hand = [-_logsig(0.5), -_logsig(-0.5), -(0.5 * _logsig(0.5) + 0.5 * _logsig(-0.5)),
               -(0.5 * _logsig(-3.0) + 0.5 * _logsig(3.0))]
    got = reward_model.bradley_terry_loss(s1, s2, target)
    assert got.item() == pytest.approx(sum(by_hand) / 4, abs=1e-6)
    # a tie is minimised by equal scores: its gradient at d=0 is zero
    d = torch.zeros(1, requires_grad=True)
    reward_model.bradley_terry_loss(d, torch.zeros(1), torch.tensor([0.5])).backward()
    assert d.grad.abs().item() < 1e-7


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    sft = make_toy_model(root / "sft")
    pairs = toy_pairs(160, seed=1, ties=True)
    cfg = reward_model.RewardModelConfig(model_name_or_path=str(sft), output_dir=str(root / "rm"),
                                         lr=3e-3, epochs=4, per_device_batch_size=16, eval_fraction=0.2,
                                         max_length=64, save_steps=5, warmup_steps=3)
    path = reward_model.train(cfg, records=pairs)
    return sft, path, pairs


def test_reward_model_learns_toy_preferences(trained_rm):
    sft, path, pairs = trained_rm
    results = json.loads((path / "eval_results.json").read_text())
    assert results["eval_pairs"] == 32
    assert results["eval_accuracy"] > 0.7
    metrics = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    assert np.mean(train_losses[-3:]) < np.mean(train_losses[:3])
    # each row logs the rate its step used: a 3-step warmup, then constant
    assert [m["lr"] for m in metrics if "lr" in m][:5] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, 3e-3])
    # the backbone's weights moved away from the SFT model's
    before, after = load_file(sft / "model.safetensors"), load_file(path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(before[key], after[key])
    assert not (path / "checkpoint").exists()


def test_scores_are_normalised_on_sft_samples(trained_rm):
    _, path, pairs = trained_rm
    samples = {(p["instruction"], p["output_1"]) for p in pairs} | {(p["instruction"], p["output_2"]) for p in pairs}
    records = [{"instruction": i, "input": "", "output": o} for i, o in sorted(samples)]
    scores = reward_model.score(path, records, batch_size=32)
    assert scores.shape == (len(records),)
    assert abs(scores.mean()) < 1e-3 and abs(scores.std() - 1) < 1e-3
    recorded = json.loads((path / "reward_normalization.json").read_text())
    assert recorded["n_samples"] == len(records)  # the distinct outputs the statistics came from
    assert (recorded["dtype"], recorded["mixed_precision"]) == ("float32", "no")
    good = reward_model.score(path, [{"instruction": "Say something about cats", "input": "", "output": "good good good"},
                                     {"instruction": "Say something about cats", "input": "", "output": "bad bad bad"}])
    assert good[0] > good[1]


def test_scorer_on_tokens_equals_texts(trained_rm):
    from prefgym.methods.common import tokenize_prompt_response

    _, path, _ = trained_rm
    scorer = reward_model.RewardScorer(path)
    prompts, responses = ["Say something about rain", "Say"], ["good ok", "bad is very bad"]
    batch = tokenize_prompt_response(scorer.tokenizer, prompts, responses, 64)
    # left-pad the same tokens: scores must not depend on the padding side
    ids, mask = batch["input_ids"], batch["attention_mask"]
    shift = (mask == 0).sum(-1)
    left_ids, left_mask = ids.clone(), mask.clone()
    for b in range(2):
        left_ids[b] = torch.roll(ids[b], int(shift[b]))
        left_mask[b] = torch.roll(mask[b], int(shift[b]))
    a = scorer.score_texts(prompts, responses)
    c = scorer.score_tokens(left_ids, left_mask).numpy()
    np.testing.assert_allclose(a, c, atol=1e-4)


def test_accuracy_counts_by_hand():
    s1 = [0.3, 0.3, 0.3, -1.0, 2.0, 1.0, 0.0]
    s2 = [-0.2, -0.2, 0.9, 2.0, 2.0, 0.0, 0.0]
    p1 = [0.8, 0.2, 0.5, 0.3, 1.0, 0.6, 0.0]  # P(output_1 better)
    # favoured: 1, 2, tie, 2, 1, 1, 2 -> right, wrong, -, right, wrong (equal), right, wrong (equal)
    assert reward_model.accuracy_counts(s1, s2, p1) == (3, 6)


def _soften(pairs: list[dict]) -> list[dict]:
    """Logprob-judge style labels: hard 1 / 2 become 1.2, 1.3 / 1.8, 1.9; ties stay 1.5; one hard pair of each left."""
    soft = {1: [1.2, 1.3], 2: [1.8, 1.9]}
    return [{**p, "preference": p["preference"] if p["preference"] == 1.5 or i < 2 else soft[p["preference"]][i % 2]}
            for i, p in enumerate(pairs)]


def test_accuracy_on_soft_labels_and_dropout_off_against_a_hand_count(tmp_path):
    """lr = 0 on a model with dropout: the logged step-1 loss and accuracy and the held-out accuracy
    equal a hand count from the saved model's eval-mode scores (higher score to the favoured
    output, ties excluded)."""
    from prefgym.seeding import rng_for
    from test_dpo import _with_attention_dropout

    sft = _with_attention_dropout(make_toy_model(tmp_path / "sft0"), tmp_path / "sft", 0.5)
    pairs = _soften(toy_pairs(40, seed=7, ties=True))
    assert any(p["preference"] == 1.5 for p in pairs) and any(p["preference"] == 1.2 for p in pairs)
    cfg = reward_model.RewardModelConfig(model_name_or_path=str(sft), output_dir=str(tmp_path / "rm"), lr=0.0,
                                         epochs=1, per_device_batch_size=20, eval_fraction=0.5, max_length=64,
                                         normalize=False)
    path = reward_model.train(cfg, records=pairs)
    order = rng_for(cfg.seed, "reward-model-split").permutation(len(pairs))
    scorer = reward_model.RewardScorer(path)

    def hand(idx):
        ps = [pairs[i] for i in idx]
        prompts = [format_prompt(p["instruction"]) for p in ps]
        s1 = scorer.score_texts(prompts, [p["output_1"] for p in ps])
        s2 = scorer.score_texts(prompts, [p["output_2"] for p in ps])
        p1 = np.array([2 - p["preference"] for p in ps])
        favoured, decided = np.where(p1 > 0.5, s1 > s2, s2 > s1), p1 != 0.5
        loss = np.mean(-(p1 * np.log(1 / (1 + np.exp(s2 - s1))) + (1 - p1) * np.log(1 / (1 + np.exp(s1 - s2)))))
        return favoured[decided].mean(), loss

    train_acc, train_loss = hand(order[20:])
    eval_acc, _ = hand(order[:20])
    metrics = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["accuracy"] == pytest.approx(train_acc)
    assert metrics[0]["loss"] == pytest.approx(train_loss, abs=1e-5)  # dropout off: eval-mode scores
    assert json.loads((path / "eval_results.json").read_text())["eval_accuracy"] == pytest.approx(eval_acc)


def test_reward_model_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model_name_or_path"):
        reward_model.train(reward_model.RewardModelConfig(), records=[])


def test_reward_model_cli_errors(tmp_path, capsys):
    from prefgym.cli import main

    (tmp_path / "rm.yaml").write_text("epochs: 1\nbogus_key: 3\n")
    assert main(["reward-model", "--config", str(tmp_path / "rm.yaml"), "--model", "x", "-o", str(tmp_path)]) == 2
    assert "bogus_key" in capsys.readouterr().err
    assert main(["reward-model", "--model", str(tmp_path / "missing"), "--preferences",
                 str(tmp_path / "nope.json"), "-o", str(tmp_path / "o")]) == 2


def test_reward_model_lora_saves_merged_model(tmp_path):
    sft = make_toy_model(tmp_path / "sft")
    cfg = reward_model.RewardModelConfig(model_name_or_path=str(sft), output_dir=str(tmp_path / "rm"), lr=1e-2,
                                         epochs=1, per_device_batch_size=16, max_length=64, use_lora=True, lora_r=4)
    path = reward_model.train(cfg, records=toy_pairs(48, seed=4))
    assert not (path / "adapter_config.json").exists()
    weights = load_file(path / "model.safetensors")
    assert "score.weight" in weights and not any("lora" in k for k in weights)
    s = reward_model.score(path, [{"instruction": "Say", "input": "", "output": "good"}] * 2)
    assert np.isfinite(s).all() and s[0] == pytest.approx(s[1], abs=1e-4)


RM_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from prefgym.methods import reward_model
from test_prefdata_toy import toy_pairs
cfg = reward_model.RewardModelConfig(model_name_or_path={sft!r}, output_dir=sys.argv[1], lr=3e-3, epochs=1,
                                     per_device_batch_size=int(sys.argv[2]), max_length=64, resume=False,
                                     eval_fraction=0.25, seed=1, warmup_steps=3)
reward_model.train(cfg, records=toy_pairs(40, seed=5, ties=True))
"""


@pytest.mark.slow
def test_reward_model_two_processes_match_one(tmp_path):
    import os

    from test_dpo import assert_two_processes_match_one

    sft = make_toy_model(tmp_path / "sft")
    script = tmp_path / "run_rm.py"
    script.write_text(RM_SCRIPT.format(tests=os.path.dirname(__file__), sft=str(sft)))
    assert_two_processes_match_one(script, tmp_path, 10, 5, atol=2e-5, rtol=1e-4)
    n1 = json.loads((tmp_path / "one" / "reward_normalization.json").read_text())
    n2 = json.loads((tmp_path / "two" / "reward_normalization.json").read_text())
    assert n1["mean"] == pytest.approx(n2["mean"], abs=1e-4) and n1["std"] == pytest.approx(n2["std"], abs=1e-4)
    assert json.loads((tmp_path / "one" / "eval_results.json").read_text()) == pytest.approx(
        json.loads((tmp_path / "two" / "eval_results.json").read_text()), abs=1e-4)


def test_held_out_scoring_runs_as_many_batches_on_every_process(monkeypatch):
    """Under FSDP / ZeRO-3 each forward of the prepared reward model is a collective: a process with
    a batch less than another would leave it waiting. 17 pairs, 2 processes, batches of 8: both run
    2 batches (rank 1, with 8 pairs, scores a stand-in in its second), and only real pairs come back."""
    import types

    from prefgym.methods import common

    pairs = [{"instruction": f"i{k}", "input": "", "output_1": "a", "output_2": "b"} for k in range(17)]
    cfg = reward_model.RewardModelConfig(per_device_batch_size=8, max_length=32)
    monkeypatch.setattr(common, "tokenize_prompt_response", lambda tok, prompts, responses, n: {
        "input_ids": torch.ones(len(prompts), 4, dtype=torch.long),
        "attention_mask": torch.ones(len(prompts), 4, dtype=torch.long)})
    calls, scores = {0: 0, 1: 0}, {}
    for rank in (0, 1):
        def model(ids, mask, rank=rank):
            calls[rank] += 1
            return torch.zeros(ids.shape)

        accelerator = types.SimpleNamespace(num_processes=2, process_index=rank, device="cpu")
        scores[rank] = reward_model._raw_scores_sharded(accelerator, model, None, pairs, cfg, both=True,
                                                        fmt=lambda p: p["instruction"])
    assert calls == {0: 2, 1: 2}
    assert len(scores[0]) == 2 * 9 and len(scores[1]) == 2 * 8  # output_1 then output_2 scores of its own pairs
