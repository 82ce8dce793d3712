"""One definition of what a preference value means (`prefgym.data.preferences`), and every reader
of preferences (methods, metrics, validation) agreeing with it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from prefgym.cli import main
from prefgym.data.preferences import Preference, parse_preference, preferred_output, prob_output_2
from prefgym.errors import DataError

# value -> (P(output_2 better), rounded winner, P(winner better))
MEANINGS = [
    (1, 0.0, 1, 1.0),
    (2, 1.0, 2, 1.0),
    (1.0, 0.0, 1, 1.0),
    (2.0, 1.0, 2, 1.0),
    (1.2, 0.2, 1, 0.8),  # AlpacaEval logprob judge: 80% output_1
    (1.75, 0.75, 2, 0.75),
    (1.5, 0.5, None, 0.5),  # tie
    (0, 0.5, None, 0.5),  # AlpacaEval's draw code
    (0.0, 0.5, None, 0.5),
    (np.float64(1.25), 0.25, 1, 0.75),
    (np.int64(2), 1.0, 2, 1.0),
]


@pytest.mark.parametrize("value,p2,winner,p_winner", MEANINGS)
def test_each_value_means_one_thing(value, p2, winner, p_winner):
    pref = parse_preference(value)
    assert pref.p2 == pytest.approx(p2) and pref.p1 == pytest.approx(1 - p2)
    assert pref.value == pytest.approx(1 + p2)
    assert pref.winner == winner
    assert pref.p_winner == pytest.approx(p_winner)
    assert prob_output_2(value) == pytest.approx(p2)
    assert preferred_output(value) == winner


@pytest.mark.parametrize("missing", [None, float("nan"), np.nan])
def test_missing_preference_is_unannotated(missing):
    assert parse_preference(missing) is None and prob_output_2(missing) is None and preferred_output(missing) is None


@pytest.mark.parametrize("bad", [7, -1, 0.5, 0.999, 2.0001, 3, "a", "2", True, False, np.bool_(True), [1], {}])
def test_anything_else_is_a_data_error_naming_file_row_and_field(bad):
    with pytest.raises(DataError) as info:
        parse_preference(bad, row=4, path="pairs.json")
    msg = str(info.value)
    assert msg.startswith("pairs.json, row 4, field 'preference': ")
    assert "1.5 or 0 for a tie" in msg  # says what is accepted


def test_rounding_rule_at_the_boundary():
    assert Preference(0.5).winner is None
    assert Preference(0.5 + 1e-12).winner == 2 and Preference(0.5 - 1e-12).winner == 1


# ------------------------------------------------------------------------------------------
# Every reader agrees with the definition


VALUES = [1, 2, 1.2, 1.8, 1.5, 0, None, 1.35]


def _pairs():
    return [{"instruction": f"task {i}", "input": "", "output_1": f"one {i}", "output_2": f"two {i}", "preference": v}
            for i, v in enumerate(VALUES)]


def test_methods_and_metrics_read_preferences_the_same_way():
    from prefgym.evaluation.winrate import parse_preference as winrate_parse
    from prefgym.methods import common, dpo, feedme, reward_conditioning, reward_model

    pairs = _pairs()
    decided = [(p, parse_preference(p["preference"])) for p in pairs]
    decided = [(p, pref) for p, pref in decided if pref is not None and pref.winner is not None]
    # FeedME and reward conditioning: the rounded winner
    assert [r["output"] for r in feedme.feedme_records(pairs)] == [p[f"output_{pref.winner}"] for p, pref in decided]
    rc = reward_conditioning.reward_conditioning_records(pairs)
    assert [r["output"] for r in rc[0::2]] == [p[f"output_{pref.winner}"] for p, pref in decided]
    assert [r["output"] for r in rc[1::2]] == [p[f"output_{3 - pref.winner}"] for p, pref in decided]
    # DPO: oriented by the rounded winner, with P(chosen better)
    examples = dpo._chosen_rejected(pairs)
    assert [(c, r) for _, c, r, _ in examples] == [(p[f"output_{w.winner}"], p[f"output_{3 - w.winner}"])
                                                   for p, w in decided]
    assert [e[3] for e in examples] == pytest.approx([w.p_winner for _, w in decided])
    # reward model: soft target P(output_1 better); only unannotated pairs skipped
    kept, targets = reward_model._pairs_and_targets(pairs)
    assert [p["preference"] for p in kept] == [v for v in VALUES if v is not None]
    assert targets == pytest.approx([1 - prob_output_2(v) for v in VALUES if v is not None])
    # evaluation and the old helper
    for v in VALUES:
        assert winrate_parse(v) == (None if v is None else pytest.approx(1 + prob_output_2(v)))
        if v is not None:
            assert common.preference_target(v) == pytest.approx(1 - prob_output_2(v))


def test_soft_label_for_output_1_is_not_read_as_output_2():
    """The reported bug: a logprob judge's 1.2 (80% output_1) made DPO train on output_2."""
    from prefgym.methods import dpo

    (_, chosen, rejected, p), = dpo._chosen_rejected([{"instruction": "x", "output_1": "A", "output_2": "B",
                                                       "preference": 1.2}])
    assert (chosen, rejected) == ("A", "B") and p == pytest.approx(0.8)


@pytest.mark.parametrize("bad", [7, -1, True])
def test_every_reader_rejects_the_same_values(bad, tmp_path, capsys):
    from prefgym.evaluation.winrate import load_annotations, win_rate
    from prefgym.methods import dpo, feedme, reward_conditioning, reward_model

    pairs = _pairs()[:2] + [{**_pairs()[2], "preference": bad}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    readers = [lambda: dpo._chosen_rejected(pairs, path), lambda: reward_model._pairs_and_targets(pairs, path),
               lambda: feedme.feedme_records(pairs, path),
               lambda: reward_conditioning.reward_conditioning_records(pairs, path=path),
               lambda: load_annotations(path), lambda: win_rate([p["preference"] for p in pairs])]
    for read in readers:
        with pytest.raises(DataError, match=r"row 2, field 'preference'"):
            read()
    assert main(["data", "validate", str(path), "--require", "preference"]) == 2
    err = capsys.readouterr().err
    assert f"{path}, row 2, field 'preference'" in err and repr(bad) in err


def test_validate_accepts_what_the_readers_accept(tmp_path, capsys):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(_pairs()))
    assert main(["data", "validate", str(path), "--require", "instruction,output_1,output_2,preference"]) == 0
    assert "ok: 8 records" in capsys.readouterr().out


def test_win_rate_keeps_alpaca_eval_semantics_on_soft_and_draw_values():
    """AlpacaEval's AbsoluteScoringRule: 0 -> 1.5, win_rate = 100 * mean(preference - 1), NaN dropped."""
    from prefgym.evaluation.winrate import win_rate

    values = [1, 2, 1.2, 1.8, 1.5, 0, None, 1.35]
    p = [v - 1 if v else 0.5 for v in values if v is not None]
    r = win_rate(values)
    assert r["win_rate"] == pytest.approx(100 * sum(p) / len(p))
    assert (r["n_wins"], r["n_wins_base"], r["n_draws"], r["n_total"]) == (2, 3, 2, 7)
    assert not math.isnan(r["standard_error"])


def test_annotation_summary_reads_preferences_by_the_shared_definition():
    """AlpacaEval's 0 is a tie (P = 0.5), not -1; soft labels count by their probability."""
    from prefgym.annotators.annotate import summarize

    rows = [{"preference": 0}, {"preference": 1.2}, {"preference": 2}, {"preference": None, "error": "x"}]
    assert summarize(rows)["p_output_2"] == pytest.approx((0.5 + 0.2 + 1.0) / 3)
