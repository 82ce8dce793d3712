"""Online DPO on the tiny world: labels counted exactly per round, each round's pairs sampled from the
policy the previous round left, resume after a crash."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from prefgym.errors import ConfigError
from prefgym.io import read_records
from prefgym.methods import online_dpo
from prefgym.methods.online_dpo import OnlineDPOConfig


@pytest.fixture(scope="module")
def world(tiny_world):
    """The tiny world's base model as the starting policy, and its preference instructions."""
    return tiny_world / "base_model", read_records(tiny_world / "data" / "preference.json")


def _config(out, sft, **changes) -> OnlineDPOConfig:
    values = dict(policy_model=str(sft), output_dir=str(out), rounds=2, pairs_per_round=12, steps_per_round=2,
                  per_device_batch_size=8, max_new_tokens=8, max_prompt_length=128, max_length=128, lr=1e-2,
                  annotators="world_pool_noisy", seed=3)
    return OnlineDPOConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """Finished runs by number of rounds (each trained once per test module)."""
    sft, prompts = world
    root, done = tmp_path_factory.mktemp("online_dpo"), {}

    def get(rounds: int, **changes):
        key = (rounds, tuple(sorted(changes.items())))
        if key not in done:
            done[key] = online_dpo.train(_config(root / f"r{len(done)}", sft, rounds=rounds, **changes), prompts)
        return done[key]

    return get


def test_round_rows_walk_through_a_seeded_permutation_epoch_by_epoch():
    rows = [online_dpo.round_rows(0, r, 3, 10) for r in range(6)]  # 3 rounds per epoch of 10 prompts
    assert all(len(r) == 3 for r in rows)
    first_epoch = rows[0] + rows[1] + rows[2]
    assert len(set(first_epoch)) == 9  # no prompt twice within an epoch
    assert rows[3:] != rows[:3]  # the next epoch is another permutation
    assert online_dpo.round_rows(1, 0, 3, 10) != rows[0]  # and the seed matters


def test_labels_per_round_are_counted_exactly(runs):
    out = runs(2, max_new_tokens=2, temperature=0.3)  # short, cool samples: some pairs identical (free ties)
    pairs = read_records(out / "pairs.jsonl")
    rounds = read_records(out / "rounds.jsonl")
    used = json.loads((out / "labels_used.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        mine = [p for p in pairs if p["round"] == r["round"]]
        # asked: exactly the distinct pairs; labelled: those with a preference
        assert all(p["output_1"] != p["output_2"] for p in mine)
        assert r["labels"] == sum(p["preference"] is not None for p in mine)
        assert r["prompts"] == 12 == r["labels"] + r["identical"] + r["failed"]
        assert r["price"] == pytest.approx(sum(p["price_per_example"] for p in mine))
        assert r["seconds"] == pytest.approx(sum(p["time_per_example"] for p in mine))
    assert sum(r["identical"] for r in rounds) > 0, "the test needs some identical pairs to mean something"
    assert used["labels_per_round"] == [r["labels"] for r in rounds]
    assert used["labels"] == len([p for p in pairs if p["preference"] is not None]) < 24
    assert used["price"] == pytest.approx(sum(p["price_per_example"] for p in pairs)) and used["price"] > 0
    metrics = read_records(out / "metrics.jsonl")
    assert [m["labels"] for m in metrics if m["round"] == 0][-1] == rounds[0]["labels"]
    assert metrics[-1]["labels"] == used["labels"]


def test_round_r_pairs_are_sampled_from_the_policy_after_round_r_minus_1(world, runs):
    """Round 1's recorded pairs are what the policy saved after one round samples with round 1's seeds,
    not what the SFT policy samples."""
    from prefgym.data.prompts import make_prompt_formatter
    from prefgym.models.loading import load_model_and_tokenizer

    sft, prompts = world
    after_one, after_two = runs(1), runs(2)
    recorded = read_records(after_two / "pairs.jsonl")
    assert [p for p in recorded if p["round"] == 0] == read_records(after_one / "pairs.jsonl")  # same first round
    cfg = _config(after_two, sft)

    def sample(model_dir):
        model, tok = load_model_and_tokenizer(str(model_dir))
        texts = [make_prompt_formatter(tok, cfg.prompt_format)(p) for p in prompts]
        rows = online_dpo.round_rows(cfg.seed, 1, cfg.pairs_per_round, len(prompts))
        pairs = online_dpo.sample_pairs(model, tok, prompts, texts, rows, cfg, 1)
        return [(p["output_1"], p["output_2"]) for p in pairs if p["output_1"] != p["output_2"]]

    round_1 = [(p["output_1"], p["output_2"]) for p in recorded if p["round"] == 1]
    assert sample(after_one) == round_1
    assert sample(sft) != round_1


def test_the_reference_is_the_frozen_sft_policy(world, runs):
    """Step 1: π = π_ref, loss -log σ(0) = log 2. Round 1 starts from the policy round 0 trained, still
    measured against the SFT policy: its first loss and implicit rewards are no longer at the reference."""
    out = runs(2)
    metrics = read_records(out / "metrics.jsonl")
    first, round_1 = metrics[0], next(m for m in metrics if m["round"] == 1)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert abs(round_1["loss"] - math.log(2)) > 1e-3 and abs(round_1["rewards/chosen"]) > 1e-3
    before, after = load_file(world[0] / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)
    assert not (out / "checkpoint").exists()


def test_resume_after_a_crash_equals_uninterrupted(world, runs, tmp_path, monkeypatch):
    sft, prompts = world
    full = runs(3)
    cfg = _config(tmp_path / "crashed", sft, rounds=3)
    real_append = online_dpo.append_jsonl

    def crash_in_round_2(path, row):
        real_append(path, row)
        if path.name == "metrics.jsonl" and row["round"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(online_dpo, "append_jsonl", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        online_dpo.train(cfg, prompts)
    assert json.loads((tmp_path / "crashed" / "checkpoint" / "state.json").read_text())["round"] == 2
    monkeypatch.setattr(online_dpo, "append_jsonl", real_append)
    resumed = online_dpo.train(cfg, prompts)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    for name in ("rounds.jsonl", "pairs.jsonl"):
        assert read_records(resumed / name) == read_records(full / name)
    assert json.loads((resumed / "labels_used.json").read_text()) == json.loads((full / "labels_used.json").read_text())
    assert [m["step"] for m in read_records(resumed / "metrics.jsonl")] == list(range(1, 7))


@pytest.mark.parametrize("change, message", [({"rounds": 0}, "rounds must be at least 1"),
                                             ({"temperature": 0.0}, "temperature must be > 0"),
                                             ({"loss_type": "hinge"}, "loss_type must be")])
def test_bad_settings_are_refused_before_anything_runs(world, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        online_dpo.train(_config(tmp_path / "o", world[0], **change), world[1])
    assert not (tmp_path / "o").exists()


def test_command_line_options_and_set_both_reach_the_config(world, tmp_path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    online_dpo.add_commands(app)
    runner = CliRunner()
    assert "--pairs-per-round" in runner.invoke(app, ["--help"]).output
    base = ["--policy", str(world[0]), "--prompts", str(tmp_path / "p.json"), "--out", str(tmp_path / "o")]
    result = runner.invoke(app, [*base, "--set", "rounds=0"])  # --set is not lost when --rounds is not given
    assert isinstance(result.exception, ConfigError) and "rounds must be at least 1" in str(result.exception)
    result = runner.invoke(app, [*base, "--pairs-per-round", "0"])
    assert isinstance(result.exception, ConfigError) and "pairs_per_round must be at least 1" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_each_metrics_row_logs_the_rate_its_step_used(runs):
    """A 3-step warmup over 2 rounds of 2 steps: lr/3, 2lr/3, lr, lr (not the next step's rate)."""
    out = runs(2, warmup_steps=3)
    metrics = read_records(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["lr"] for m in metrics] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])
