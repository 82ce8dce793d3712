"""Win-rate, its standard error, evaluation against a reference, gold win-rate."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest

from prefgym.errors import DataError
from prefgym.evaluation import evaluate, evaluate_outputs, gold_win_rate, make_reference_pairs, win_rate
from prefgym.evaluation.winrate import avg_length


def test_win_rate_and_standard_error_by_hand():
    # p = preference - 1 = [1, 0, .5, 1, .5, 1]: mean 2/3; sample variance (5/6)/5 = 1/6; SE = sqrt(1/6)/sqrt(6) = 1/6
    r = win_rate([2, 1, 0, 2, 1.5, 2])
    assert r["win_rate"] == pytest.approx(100 * 4 / 6)
    assert r["standard_error"] == pytest.approx(100 / 6)
    assert (r["n_wins"], r["n_wins_base"], r["n_draws"], r["n_total"]) == (3, 1, 2, 6)
    assert r["discrete_win_rate"] == pytest.approx(100 * (3 + 1) / 6)


def test_weighted_preferences_and_missing_ones():
    r = win_rate([1.9, 1.2, None, float("nan"), 1.5])
    assert r["n_total"] == 3  # missing preferences are not counted
    assert r["win_rate"] == pytest.approx(100 * (0.9 + 0.2 + 0.5) / 3)
    assert (r["n_wins"], r["n_wins_base"], r["n_draws"]) == (1, 1, 1)
    assert r["discrete_win_rate"] == pytest.approx(100 * 1.5 / 3)


@pytest.mark.parametrize("bad", [3, -1, "left", True, 0.5])
def test_invalid_preference_is_a_data_error(bad):
    with pytest.raises(DataError, match="preference"):
        win_rate([1, bad])


def _eval_set():
    return [{"instruction": f"task {i}", "input": "", "output": "ref " * (i + 1), "generator": "ref-model",
             "dataset": "toy"} for i in range(6)]


def _longer_wins(pairs, *, annotators, seed, cache_dir):
    out = []
    for p in pairs:
        l1, l2 = len(p["output_1"]), len(p["output_2"])
        out.append({**p, "preference": 2 if l2 > l1 else 1 if l1 > l2 else 1.5, "annotator": str(annotators)})
    return out


def test_pairs_put_reference_first():
    model = [{"instruction": "task 2", "output": "mine", "generator": "m"}]
    (pair,) = make_reference_pairs(model, _eval_set())
    assert pair["output_1"] == "ref ref ref " and pair["generator_1"] == "ref-model"
    assert pair["output_2"] == "mine" and pair["generator_2"] == "m" and pair["dataset"] == "toy"


def test_unknown_instruction_names_the_row():
    with pytest.raises(DataError, match="row 1.*instruction"):
        make_reference_pairs([{"instruction": "task 0", "output": "a"}, {"instruction": "nope", "output": "b"}],
                             _eval_set())


def test_evaluate_outputs_with_a_fake_judge():
    ref = _eval_set()
    # 4 longer than the reference (wins), 1 equal (draw), 1 shorter (loss)
    model = [{"instruction": r["instruction"], "output": r["output"] + "x" * 3, "generator": "m"} for r in ref[:4]]
    model += [{"instruction": ref[4]["instruction"], "output": ref[4]["output"], "generator": "m"},
              {"instruction": ref[5]["instruction"], "output": "short", "generator": "m"}]
    row, annotations = evaluate_outputs(model, ref, annotators="fake", annotate_fn=_longer_wins)
    assert [a["preference"] for a in annotations] == [2, 2, 2, 2, 1.5, 1]
    assert row["win_rate"] == pytest.approx(100 * 4.5 / 6)
    p = np.array([1, 1, 1, 1, 0.5, 0])
    assert row["standard_error"] == pytest.approx(100 * p.std(ddof=1) / math.sqrt(6))
    assert row["avg_length"] == int(np.mean([len(m["output"]) for m in model]))
    assert not math.isnan(row["length_controlled_winrate"])


def test_evaluate_writes_alpaca_eval_files(tmp_path):
    ref_path = tmp_path / "eval.json"
    ref_path.write_text(json.dumps(_eval_set()))
    outputs_path = tmp_path / "outputs.json"
    outputs_path.write_text(json.dumps([{"instruction": r["instruction"], "output": r["output"] + "!", "generator": "m1"}
                                        for r in _eval_set()]))
    row = evaluate(outputs_path, ref_path, out_dir=tmp_path / "run", annotate_fn=_longer_wins)
    assert row["generator"] == "m1" and row["win_rate"] == 100.0
    annotations = json.loads((tmp_path / "run" / "annotations.json").read_text())
    assert len(annotations) == 6 and all(a["generator_2"] == "m1" for a in annotations)
    # a second model is added to the same leaderboard
    evaluate(outputs_path, ref_path, out_dir=tmp_path / "run", generator="m2",
             annotate_fn=lambda pairs, **kw: [{**p, "preference": 1} for p in pairs])
    import pandas as pd

    lb = pd.read_csv(tmp_path / "run" / "leaderboard.csv", index_col=0)
    assert list(lb.index) == ["m1", "m2"]
    assert lb.loc["m2", "win_rate"] == 0.0 and lb.loc["m1", "n_wins"] == 6


def test_evaluate_generates_with_a_model_when_no_outputs(tmp_path, monkeypatch):
    calls = {}

    def generate_outputs(model_path, records, cfg, generator=None):
        calls["n"] = len(records)
        return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": "generated " * 9,
                 "generator": generator} for r in records]

    fake = types.ModuleType("prefgym.models.generation")
    fake.SamplingConfig = lambda **kw: kw
    fake.generate_outputs = generate_outputs
    monkeypatch.setitem(sys.modules, "prefgym.models.generation", fake)
    row = evaluate(None, _eval_set(), model_path=tmp_path / "my-policy", annotate_fn=_longer_wins)
    assert calls["n"] == 6 and row["generator"] == "my-policy"
    assert row["n_total"] == 6


def test_gold_win_rate_counts_ties_half():
    ref = _eval_set()[:4]
    model = [{"instruction": r["instruction"], "output": o} for r, o in zip(ref, ["good", "good", "bad", "same"])]

    def gold(instruction, input, output):
        return {"good": 1.0, "bad": 0.0, "same": 0.5}.get(output, 0.5)

    r = gold_win_rate(model, ref, gold_fn=gold)
    assert r["win_rate"] == pytest.approx(100 * 2.5 / 4)
    assert (r["n_wins"], r["n_wins_base"], r["n_draws"]) == (2, 1, 1)
    assert r["standard_error"] == pytest.approx(100 * np.std([1, 1, 0, 0.5], ddof=1) / 2)
    assert r["mean_gold"] == pytest.approx(2.5 / 4)


def test_avg_length_truncates():
    assert avg_length(["ab", "abc"]) == 2


def test_evaluate_with_gold(monkeypatch):
    fake = types.ModuleType("prefgym.world.gold")
    fake.gold_quality = lambda instruction, input, output: len(output) / 100  # longer is better here
    monkeypatch.setitem(sys.modules, "prefgym.world.gold", fake)
    model = [{"instruction": r["instruction"], "output": r["output"] + ("+" if i % 2 else ""), "generator": "m"}
             for i, r in enumerate(_eval_set())]
    row = evaluate(model, _eval_set(), annotate_fn=_longer_wins, gold=True)
    assert row["gold_win_rate"] == pytest.approx(100 * (3 + 1.5) / 6)
    assert row["gold_standard_error"] == pytest.approx(100 * np.std([0.5, 1] * 3, ddof=1) / math.sqrt(6))
