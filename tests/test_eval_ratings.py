"""Elo and Bradley–Terry: hand checks and recovery of known strengths from simulated battles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefgym.errors import DataError
from prefgym.evaluation import bootstrap_ratings, bradley_terry_ratings, elo_ratings, ratings_table
from prefgym.evaluation.ratings import validate_battles

TRUE = {"strong": 1200.0, "good": 1100.0, "fair": 1000.0, "weak": 850.0}


def simulate_battles(n, seed=0):
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    battles = []
    for _ in range(n):
        a, b = rng.choice(names, 2, replace=False)
        p_a = 1 / (1 + 10 ** ((TRUE[b] - TRUE[a]) / 400))
        battles.append({"model_a": str(a), "model_b": str(b), "winner": "model_a" if rng.random() < p_a else "model_b"})
    return battles


def test_elo_update_by_hand():
    r = elo_ratings([{"model_a": "x", "model_b": "y", "winner": "model_a"},
                     {"model_a": "y", "model_b": "x", "winner": "tie"}], k=32)
    # first battle: equal ratings, expected 0.5, x gains 16
    x1, y1 = 1016.0, 984.0
    e_y = 1 / (1 + 10 ** ((x1 - y1) / 400))
    assert r["y"] == pytest.approx(y1 + 32 * (0.5 - e_y))
    assert r["x"] == pytest.approx(x1 - 32 * (0.5 - e_y))


def test_bradley_terry_two_models_matches_closed_form():
    # with two models the MLE is the log-odds of the win fraction: r_a - r_b = 400 log10(w / l)
    battles = ([{"model_a": "a", "model_b": "b", "winner": "model_a"}] * 30
               + [{"model_a": "b", "model_b": "a", "winner": "model_a"}] * 10
               + [{"model_a": "a", "model_b": "b", "winner": "tie"}] * 4)
    r = bradley_terry_ratings(battles)
    wins_a = 30 + 2  # ties count half
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(wins_a / (44 - wins_a)), abs=1e-3)
    assert (r["a"] + r["b"]) / 2 == pytest.approx(1000)
    anchored = bradley_terry_ratings(battles, anchor=("b", 1114))
    assert anchored["b"] == pytest.approx(1114) and anchored["a"] - anchored["b"] == pytest.approx(r["a"] - r["b"])


def test_bradley_terry_recovers_known_strengths():
    battles = simulate_battles(4000, seed=1)
    r = bradley_terry_ratings(battles, anchor=("fair", 1000.0))
    assert sorted(r, key=r.get, reverse=True) == list(TRUE)
    for name, true in TRUE.items():
        assert r[name] == pytest.approx(true, abs=30), name


def test_online_elo_orders_known_strengths_and_bootstrap_covers_truth():
    battles = simulate_battles(4000, seed=2)
    r = elo_ratings(battles, k=4)
    assert sorted(r, key=r.get, reverse=True) == list(TRUE)
    bt = bootstrap_ratings(battles, method="bt", n_bootstrap=40, seed=0, anchor=("fair", 1000.0))
    assert list(bt.index) == list(TRUE)
    covered = sum(bt.loc[m, "lower"] - 10 <= TRUE[m] <= bt.loc[m, "upper"] + 10 for m in TRUE)
    assert covered >= 3
    assert (bt["upper"] - bt["lower"] < 80).all() and (bt["upper"] >= bt["lower"]).all()


def test_ties_only_give_equal_ratings_and_unbeaten_model_stays_finite():
    ties = [{"model_a": "a", "model_b": "b", "winner": "tie (bothbad)"}] * 10
    r = bradley_terry_ratings(ties)
    assert r["a"] == pytest.approx(r["b"], abs=1e-6)
    r = bradley_terry_ratings([{"model_a": "a", "model_b": "b", "winner": "model_a"}] * 10)
    assert math.isfinite(r["a"]) and r["a"] > r["b"]


def test_ratings_table_columns():
    table = ratings_table(simulate_battles(600, seed=3), n_bootstrap=10)
    assert list(table.columns) == ["bt_rating", "bt_lower", "bt_upper", "elo_rating", "elo_lower", "elo_upper",
                                   "n_battles", "win_fraction"]
    assert table.index[0] == "strong" and table["n_battles"].sum() == 1200


@pytest.mark.parametrize("bad,field", [({"model_a": "a", "model_b": "b", "winner": "a"}, "winner"),
                                       ({"model_a": "a", "winner": "tie"}, "model_b"),
                                       ({"model_a": "a", "model_b": "a", "winner": "tie"}, "model_b")])
def test_malformed_battles(bad, field):
    with pytest.raises(DataError, match=f"row 1, field '{field}'"):
        validate_battles([{"model_a": "a", "model_b": "b", "winner": "tie"}, bad])


def test_battles_from_annotations():
    from prefgym.evaluation import battles_from_annotations

    ann = [{"generator_1": "ref", "generator_2": "m", "preference": p} for p in (1, 2, 0, 1.5, 1.8, None)]
    assert [b["winner"] for b in battles_from_annotations(ann)] == ["model_a", "model_b", "tie", "tie", "model_b"]
    with pytest.raises(DataError, match="generator_2"):
        battles_from_annotations([{"generator_1": "ref", "preference": 1}])
