"""AlpacaEval's annotator table: every column against a hand computation on a tiny cross-annotation set."""

import json

import pytest

from prefgym.annotators.analysis import (LONGER, analyze_annotators, contains_list, generator_win_rates,
                                         load_cross_annotations, make_world_cross_annotations, table_row)

# Three pairs, four human labels each, and an annotator's four seeded runs.
#   P1: output_2 longer by 40 characters;       humans 2,2,2,1;   annotator 2,2,1,2
#   P2: output_1 is a list, lengths close (10);  humans 1,1,2,2;   annotator 1,1,1,1
#   P3: output_1 longer by 40 characters;       humans 1,1.5,1,1; annotator 1,1,1,2
PAIRS = [
    {"instruction": "q1", "input": "", "output_1": "a" * 10, "output_2": "b" * 50, "generator": "g1"},
    {"instruction": "q2", "input": "", "output_1": "- x\n- y", "output_2": "plain text answer", "generator": "g2"},
    {"instruction": "q3", "input": "", "output_1": "c" * 60, "output_2": "d" * 20, "generator": "g3"},
]
HUMANS = [[2.0, 2.0, 2.0, 1.0], [1.0, 1.0, 2.0, 2.0], [1.0, 1.5, 1.0, 1.0]]
RUNS = [[2.0, 2.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 2.0]]


def _row(runs):
    return table_row("x", PAIRS, HUMANS, runs, price=1.0, seconds=2.0, n_bootstrap=20)


def _pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / (sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)) ** 0.5


def test_humans_row_by_hand():
    row = _row(None)
    # 1 vs the mode of the other 3: P1 3 of 4 held-out labels match (0.75); P2 none (0);
    # P3 three 1s match (1 each) and the draw scores 1 - |1.5 - 1| = 0.5: 3.5 / 4.
    assert row["human_agreement"] == pytest.approx((0.75 + 0 + 0.875) / 3)
    assert row["bias"] == 0
    assert row["variance"] == pytest.approx(1 - (0.75 + 0 + 0.875) / 3)
    # longer: P1 (output_2 longer) 3 of 4; P2 not counted (10 characters apart); P3 (output_1
    # longer) the draw is left out, 3 of 3.
    assert row["proba_prefer_longer"] == pytest.approx((0.75 + 1.0) / 2)
    assert row["proba_prefer_lists"] == pytest.approx(0.5)  # P2 only: two of four pick the list
    assert row["proba_prefer_1"] == pytest.approx((0.25 + 0.5 + 0.875) / 3)
    assert row["spearman"] == pytest.approx(1.0) and row["pearson"] == pytest.approx(1.0)
    assert (row["price_per_1000"], row["seconds_per_1000"]) == (1.0, 2.0)


def test_annotator_row_by_hand():
    row = _row(RUNS)
    # each run against the mode of all four humans: P1 mode 2 -> 3 of 4; P2 modes 1 and 2 tie ->
    # 1/2 each; P3 mode 1 -> 3 of 4.
    assert row["human_agreement"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    # annotator's mode against the humans' mode: P1 2 vs 2; P2 1 vs (1 or 2); P3 1 vs 1.
    assert row["bias"] == pytest.approx((0 + 0.5 + 0) / 3)
    # 1 vs the mode of its other 3 runs: P1 and P3 each have a lone dissenting run: 1 - 0.75.
    assert row["variance"] == pytest.approx((0.25 + 0 + 0.25) / 3)
    assert row["proba_prefer_longer"] == pytest.approx((0.75 + 0.75) / 2)
    assert row["proba_prefer_lists"] == pytest.approx(1.0)
    assert row["proba_prefer_1"] == pytest.approx((0.25 + 1.0 + 0.75) / 3)
    # generator win-rates P(output_2): humans g1 .75, g2 .5, g3 .125; annotator .75, 0, .25.
    assert generator_win_rates(PAIRS, HUMANS) == pytest.approx({"g1": 0.75, "g2": 0.5, "g3": 0.125})
    assert generator_win_rates(PAIRS, RUNS) == pytest.approx({"g1": 0.75, "g2": 0.0, "g3": 0.25})
    # ranks (3,2,1) vs (3,1,2): d = 0, 1, -1, rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert row["spearman"] == pytest.approx(0.5)
    assert row["pearson"] == pytest.approx(_pearson([0.75, 0.5, 0.125], [0.75, 0.0, 0.25]))
    lo, hi = row["human_agreement_ci"]
    assert lo <= row["human_agreement"] <= hi


def test_longer_pseudo_annotator_and_cross_file(tmp_path):
    rows = [dict(p, preference=(0 if h == 1.5 else h), annotator_index=k)
            for p, hs in zip(PAIRS, HUMANS) for k, h in enumerate(hs)]
    path = tmp_path / "cross.json"
    path.write_text(json.dumps(rows))
    humans, longer = analyze_annotators(load_cross_annotations(path), [LONGER], n_bootstrap=20)
    assert humans["human_agreement"] == pytest.approx((0.75 + 0 + 0.875) / 3)
    # longer picks 2, 2 (7 < 17 characters), 1: P1 matches the mode 2; P2 half; P3 matches 1.
    assert longer["human_agreement"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert longer["variance"] == 0 and longer["proba_prefer_longer"] == 1.0
    assert longer["price_per_1000"] == 0 and longer["seconds_per_1000"] == 0


def test_contains_list_as_alpaca_eval():
    assert contains_list("- apples\n- pears") and contains_list("1. first\n2. second") and contains_list("a) one")
    assert not contains_list("apple, pear, plum") and not contains_list("The answer is 4.")


def test_world_cross_annotations_name_a_generator():
    cross = make_world_cross_annotations(n_pairs=30, n_humans=4, seed=0)
    assert len(cross) == 120 and all(r["generator"] for r in cross)
    humans, longer = analyze_annotators(cross, [LONGER], n_bootstrap=20)
    assert humans["spearman"] == pytest.approx(1.0)  # the humans ranked against themselves
    assert longer["proba_prefer_longer"] == 1.0


def test_cli_prints_alpaca_eval_columns_and_writes_json(tmp_path, capsys):
    from prefgym.cli import main

    rows = [dict(p, preference=h, annotator_index=k) for p, hs in zip(PAIRS, HUMANS) for k, h in enumerate(hs)]
    src, out = tmp_path / "cross.json", tmp_path / "table.json"
    src.write_text(json.dumps(rows))
    rc = main(["analyze-annotators", "--human-annotations", str(src), "--annotators", "longer", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for col in ("agreement %", "spearman", "bias %", "variance %", "P(longer)", "P(lists)", "P(1)"):
        assert col in printed
    table = json.loads(out.read_text())
    assert [r["annotator"] for r in table] == ["humans", "longer"]
    assert table[1]["human_agreement"] == pytest.approx(2.5 / 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([dict(rows[0], preference=7)]))
    assert main(["analyze-annotators", "--human-annotations", str(bad), "--annotators", "longer"]) == 2
    assert "row 0" in capsys.readouterr().err
