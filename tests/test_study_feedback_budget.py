"""`prefgym study feedback-budget`: nested label subsets, what they cost, budget checks, and a quick run."""

from __future__ import annotations

import json
import math

import pytest

from prefgym.cli import main
from prefgym.errors import ConfigError
from prefgym.studies import feedback_budget as fb


def _pairs(n: int, unlabelled: tuple[int, ...] = ()) -> list[dict]:
    """n pairs, each with its own price and time (row i: price (i+1) cents, time 3i+1 s); some without a label."""
    return [{"instruction": f"task {i}", "input": "", "output_1": "a", "output_2": "b",
             "preference": None if i in unlabelled else 1 + i % 2, "price_per_example": (i + 1) / 100,
             "time_per_example": 3.0 * i + 1} for i in range(n)]


def test_nested_subsets_have_the_exact_sizes_and_each_lies_inside_the_next():
    budgets = [5, 10, 20, 40]
    subsets = fb.nested_subsets(50, budgets, seed=3)
    assert [len(subsets[b]) for b in budgets] == budgets
    for b in budgets:
        assert len(set(subsets[b])) == b and all(0 <= i < 50 for i in subsets[b])
    for small, large in zip(budgets, budgets[1:]):
        assert set(subsets[small]) < set(subsets[large])
    assert fb.nested_subsets(50, budgets, seed=3) == subsets  # seeded
    assert fb.nested_subsets(50, budgets, seed=4)[10] != subsets[10]
    assert fb.nested_subsets(50, [10], seed=3)[10] == subsets[10]  # a budget's set does not depend on the others


def test_a_subset_counts_labels_and_costs_the_sum_of_its_labels_prices_and_times(tmp_path):
    """Through the study's own accounting (the pipeline's `labels_used` on the subset file)."""
    unlabelled = (0, 7, 8, 19)
    pool = _pairs(30, unlabelled)
    study = fb.BudgetStudyConfig(out_dir=str(tmp_path / "study"), scale="tiny", budgets=[6, 12])
    p = fb.seed_pipeline(study, seed=0)
    pool_file = tmp_path / "pool.json"
    pool_file.write_text(json.dumps(pool))
    labelled = [i for i in range(30) if i not in unlabelled]  # what a budget may draw from
    for budget in (6, 12):
        subset_file = p.pairs_file(f"budget-{budget}")
        fb.write_subset(pool_file, subset_file, budget, [6, 12], seed=0)
        rows = json.loads(open(subset_file).read())
        chosen = [labelled[k] for k in fb.nested_subsets(len(labelled), [6, 12], seed=0)[budget]]
        assert rows == [pool[i] for i in chosen]  # the chosen labelled rows, in the pool's order
        used = p.labels_used("dpo", f"budget-{budget}")
        assert used["labels"] == budget
        assert used["label_price"] == pytest.approx(sum((i + 1) / 100 for i in chosen), abs=1e-4)
        assert used["label_seconds"] == pytest.approx(sum(3.0 * i + 1 for i in chosen), abs=0.05)
    assert p.labels_used("sft", "budget-0") == {"labels": 0, "label_price": 0.0, "label_seconds": 0.0}


def test_a_budget_above_the_labels_available_names_both_numbers(tmp_path):
    pool_file = tmp_path / "pool.json"
    pool_file.write_text(json.dumps(_pairs(30, unlabelled=(1, 2))))
    with pytest.raises(ConfigError, match=r"budget 29 labels is more than the 28 labels in .*pool.json"):
        fb.check_budgets(pool_file, [10, 29])
    assert fb.check_budgets(pool_file, [10, 28]) == 28
    with pytest.raises(ConfigError, match="budget 29 labels is more than the 28 labels"):
        fb.write_subset(pool_file, tmp_path / "subset.json", 10, [10, 29], seed=0)
    assert not (tmp_path / "subset.json").exists()


def test_the_command_stops_with_exit_2_when_a_budget_exceeds_the_label_pool(tmp_path, monkeypatch, capsys):
    """Checked once the label pool exists and before any budget's stage runs; nothing of the study written."""
    import prefgym.pipeline

    out = tmp_path / "study"
    ran: list[list[str]] = []
    monkeypatch.setattr(prefgym.pipeline, "run_stages", lambda stages, *a, **k: ran.append([s.name for s in stages]))
    pool_file = out / "seed-0" / "sim" / "preference" / "preferences.json"
    pool_file.parent.mkdir(parents=True)
    pool_file.write_text(json.dumps(_pairs(30)))
    assert main(["study", "feedback-budget", "--quick", "--budgets", "10,50", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "budget 50 labels is more than the 30 labels in" in err and "preferences.json" in err
    assert ran == [["world", "sft", "sim/preference_data", "budget-0/evaluate"]]  # no budget stage ran
    assert not (out / "study.json").exists() and not (out / "seed-0" / "budget-10").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--budgets", "100,0", "distinct positive"), ("--budgets", "100,100", "distinct positive"),
    ("--budgets", "1e3", "comma-separated whole numbers"), ("--seeds", "0,0", "given more than once"),
    ("--methods", "ppo,online_dpo", "online_dpo does not learn from the run's preference pairs alone"),
    ("--methods", "ppo,nope", "unknown method 'nope'")])
def test_bad_options_stop_before_anything_runs(tmp_path, capsys, option, value, message):
    out = tmp_path / "study"
    assert main(["study", "feedback-budget", "--quick", option, value, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_summary_over_seeds_is_the_mean_with_the_standard_error_of_the_mean():
    points = [{"seed": s, "budget": 100, "method": "dpo", "labels": 100, "label_price": price, "label_seconds": 60.0,
               "win_rate": rate, "standard_error": se, "human_win_rate": None, "human_standard_error": None,
               "gold_win_rate": 30.0, "gold_standard_error": 2.0}
              for s, price, rate, se in [(0, 1.0, 40.0, 3.0), (1, 2.0, 44.0, 4.0)]]
    [row] = fb.summarise(points)
    assert row["win_rate"] == pytest.approx(42.0) and row["standard_error"] == pytest.approx(2.5)  # sqrt(9+16)/2
    assert row["gold_standard_error"] == pytest.approx(math.sqrt(8) / 2) and row["label_price"] == pytest.approx(1.5)
    assert "human_win_rate" not in row  # not measured: left out, not zero


def test_labels_cell_shows_price_and_annotator_time():
    from prefgym.evaluation.report import _labels_cell, duration_text

    assert _labels_cell({"labels": 400, "label_price": 2.104, "label_seconds": 893.0}) == "400 ($2.10, 15 min)"
    assert _labels_cell({"labels": 0, "label_price": 0.0, "label_seconds": 0.0}) == "0"
    assert [duration_text(s) for s in (45, 119.4, 893, 7199, 9000)] == ["45 s", "119 s", "15 min", "120 min", "2.5 h"]


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "feedback-budget", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    study = json.loads((out / "study.json").read_text())
    budgets = list(fb.BUDGETS["tiny"])
    points = {(r["budget"], r["method"]): r for r in study["summary"]}
    assert set(points) == {(0, "sft")} | {(b, m) for b in budgets for m in fb.METHODS}
    for (budget, method), r in points.items():
        assert r["labels"] == budget and (r["label_price"] > 0) == (budget > 0)
        for rate, se in fb.EVALUATORS.values():
            assert 0 <= r[rate] <= 100 and r[se] > 0
    assert points[(budgets[0], "dpo")]["label_price"] < points[(budgets[1], "dpo")]["label_price"]
    small, large = (json.loads((out / "seed-0" / f"budget-{b}" / "preference" / "preferences.json").read_text())
                    for b in budgets)
    assert len(small) == budgets[0] and len(large) == budgets[1]
    assert all(row in large for row in small)  # nested on disk too
    assert (out / "figures" / "feedback_budget.png").stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and 'id="budget-table"' in html
    assert "| labels | price | annotator time | method |" in printed.out
    assert "budget-80/ppo" in printed.err  # stage times printed
    # rerun: every stage resumes from its record
    assert main(["study", "feedback-budget", "--quick", "--out", str(out)]) == 0
    assert "budget-80/dpo: done already, skipped" in capsys.readouterr().err
