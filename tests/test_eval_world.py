"""Evaluation in the built-in world, with the real annotators and gold quality."""

from __future__ import annotations

import json

import pytest

from prefgym.evaluation import evaluate, gold_win_rate


@pytest.fixture(scope="module")
def eval_set(tiny_world):
    return json.loads((tiny_world / "data" / "eval.json").read_text())


def test_degraded_outputs_lose_to_the_reference(eval_set, tmp_path):
    # the reference cut to its first word: worse by gold quality and by the (noise-free) judges
    model = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"].split()[0],
              "generator": "truncated"} for r in eval_set]
    row = evaluate(model, eval_set, annotators="world_pool", out_dir=tmp_path, gold=True)
    assert row["n_total"] == len(eval_set)
    assert row["win_rate"] < 40 and row["gold_win_rate"] < 30
    assert (tmp_path / "annotations.json").exists() and (tmp_path / "leaderboard.csv").exists()


def test_reference_against_itself_is_a_draw(eval_set):
    model = [{**r, "generator": "copy"} for r in eval_set]
    row = evaluate(model, eval_set, annotators="world_pool_noisy")
    assert row["win_rate"] == 50.0 and row["n_draws"] == len(eval_set)
    assert gold_win_rate(model, eval_set)["win_rate"] == 50.0


@pytest.mark.slow
def test_evaluate_generates_with_the_base_model(tiny_world, tmp_path):
    from prefgym.models.generation import SamplingConfig

    row = evaluate(None, tiny_world / "data" / "eval.json", model_path=tiny_world / "base_model", out_dir=tmp_path,
                   sampling=SamplingConfig(max_new_tokens=32, batch_size=20), gold=True)
    outputs = json.loads((tmp_path / "model_outputs.json").read_text())
    assert len(outputs) == row["n_total"] and all(o["generator"] == "base_model" for o in outputs)
    assert 0 <= row["win_rate"] <= 100 and 0 <= row["gold_win_rate"] <= 100
