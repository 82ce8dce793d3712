"""Length-controlled win-rate: AlpacaEval 2's prediction step against its published rows, its fit
against an independent solver and hand-computed optima, and AlpacaEval's meaning of lc_standard_error."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from scipy.special import expit

from prefgym.errors import DataError
from prefgym.evaluation.length_control import (
    C_GRID, WEIGHT_COLUMNS, cross_validated_c, fit_l1_logistic, glm_features, group_kfold_folds, lc_metrics,
    length_controlled_win_rate, load_instruction_difficulty, predict_from_weights,
)
from prefgym.evaluation.winrate import load_annotations

BASELINE = "gpt4_1106_preview"
# Published rows that the published weights do not reproduce (the leaderboard row predates the
# weights file); every other model with weights reproduces to 1e-6.
STALE_ROWS = {"gpt35_turbo_instruct", "llama-2-70b-chat-hf", "minotaur-13b", "platolm-7b", "text_davinci_001",
              "alpaca-7b_verbose", "alpaca-7b_concise", "phi-2", "dbrx-instruct", "NullModel"}


@pytest.fixture(scope="module")
def published(alpaca_eval_dir):
    weights = pd.read_csv(alpaca_eval_dir / "glm_weights_weighted_alpaca_eval_gpt4_turbo.csv", index_col=0)
    board = pd.read_csv(alpaca_eval_dir / "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv", index_col=0)
    records = json.loads((alpaca_eval_dir / "instruction_difficulty.json").read_text())
    return weights, board, np.array([r["difficulty"] for r in records])


@pytest.fixture(scope="module")
def alpaca_7b(alpaca_eval_dir):
    ann = load_annotations(alpaca_eval_dir / "alpaca-7b" / "annotations_weighted_alpaca_eval_gpt4_turbo.json")
    return ann, load_instruction_difficulty(alpaca_eval_dir / "instruction_difficulty.json")


def test_published_weights_reproduce_every_published_lc_row(published):
    weights, board, difficulty = published
    models = [m for m in weights.index if m in board.index and m != BASELINE]
    assert len(models) >= 190
    errors = {}
    for m in models:
        p = predict_from_weights(weights, m, BASELINE, difficulty)
        errors[m] = abs(lc_metrics(p)["length_controlled_winrate"] - board.loc[m, "length_controlled_winrate"])
    reproduced = {m for m, e in errors.items() if e < 1e-6}
    assert set(models) - reproduced == STALE_ROWS
    assert all(errors[m] > 1e-3 for m in STALE_ROWS)  # stale by more than rounding
    assert "alpaca-7b" in reproduced and len(reproduced) == len(models) - len(STALE_ROWS)


def test_lc_standard_error_is_the_sem_of_the_predictions(published):
    # AlpacaEval: pd.Series(predicted_preferences).sem() * 100; published for some rows
    weights, board, difficulty = published
    rows = [m for m in board.index[board["lc_standard_error"].notna()] if m in weights.index and m not in STALE_ROWS]
    assert len(rows) >= 30
    for m in rows:
        p = predict_from_weights(weights, m, BASELINE, difficulty)
        ours = lc_metrics(p)["lc_standard_error"]
        assert ours == pytest.approx(statistics.stdev(p) / math.sqrt(len(p)) * 100, rel=1e-12)
        assert ours == pytest.approx(board.loc[m, "lc_standard_error"], abs=1e-6), m


def test_prediction_by_hand(published):
    weights, _, difficulty = published
    w_model, w_base = weights.loc["alpaca-7b"], weights.loc[BASELINE]
    i = 7
    logit = (w_model[WEIGHT_COLUMNS[2]] - w_base[WEIGHT_COLUMNS[2]]) + \
        (w_model[WEIGHT_COLUMNS[1]] - w_base[WEIGHT_COLUMNS[1]]) * difficulty[i]
    assert predict_from_weights(weights, "alpaca-7b", BASELINE, difficulty)[i] == pytest.approx(1 / (1 + math.exp(-logit)))
    with pytest.raises(DataError, match="no GLM weights for 'nope'"):
        predict_from_weights(weights, "nope", BASELINE, difficulty)


# ----------------------------------------------------------------------------- the fit


def _independent_l1_fit(X, y, s, C):
    """|w|_1 + C sum s CE, with w = u - v, u, v >= 0 (smooth, bound-constrained), by L-BFGS-B."""
    d = X.shape[1]

    def f(uv):
        w = uv[:d] - uv[d:]
        z = X @ w
        q = expit(z)
        g = C * X.T @ (s * (q - y))
        return uv.sum() + C * np.sum(s * (np.logaddexp(0, z) - y * z)), np.concatenate([1 + g, 1 - g])

    res = minimize(f, np.zeros(2 * d), jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * d),
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
    return res.x[:d] - res.x[d:]


@pytest.mark.parametrize("C", [0.05, 0.36, 2.78, 100.0])
def test_l1_fit_matches_an_independent_solver(C):
    rng = np.random.default_rng(int(C * 100))
    n = 300
    X = np.column_stack([np.tanh(rng.normal(size=n)), rng.normal(size=n), np.ones(n)])
    y = expit(X @ np.array([-1.5, 0.8, 0.3]) + rng.normal(0, 0.5, n))  # soft labels
    s = np.where(rng.random(n) < 0.2, 0.1, 1.0)
    ours, ref = fit_l1_logistic(X, y, s, C), _independent_l1_fit(X, y, s, C)
    assert ours == pytest.approx(ref, abs=1e-5)
    if C == 0.05:
        assert np.sum(ours == 0) >= 1  # strong L1 sets a weight exactly to 0


def test_l1_fit_intercept_only_by_hand():
    # stationarity: C * sum(q - y) + sign(w) = 0  =>  q = mean(y) - sign(w) / (C n)
    y = np.array([0.9, 0.2, 1.0, 0.0, 0.5, 0.8, 1.0])
    for C in (2.0, 10.0):
        (w,) = fit_l1_logistic(np.ones((7, 1)), y, None, C)
        assert w > 0
        assert expit(w) == pytest.approx(y.mean() - np.sign(w) / (C * 7), abs=1e-10)
    # |C * sum(0.5 - y)| <= 1 at w = 0: the penalty wins, w = 0 exactly
    assert abs(1.0 * np.sum(0.5 - y)) < 1 and fit_l1_logistic(np.ones((7, 1)), y, None, 1.0)[0] == 0.0


def test_folds_are_dealt_like_group_kfold():
    # sklearn 1.9 GroupKFold(5) on AlpacaEval's duplicated rows (805 groups of two): fold 0 holds
    # groups 0, 5, 10, ..., fold 4 holds 4, 9, 14, ... (listed in reverse order of dealing)
    folds = group_kfold_folds(805)
    assert [int(folds[i]) for i in (4, 9, 3, 8, 2, 1, 0, 804, 803)] == [0, 0, 1, 1, 2, 3, 4, 0, 1]
    assert np.bincount(folds).tolist() == [161] * 5


def test_cross_validation_picks_the_best_held_out_log_loss():
    rng = np.random.default_rng(0)
    n = 200
    X = np.column_stack([np.tanh(rng.normal(size=n)), rng.normal(size=n), np.ones(n)])
    y = (rng.random(n) < expit(X @ np.array([-1.0, 0.5, 0.2]))).astype(float)
    s = np.ones(n)
    folds = np.array([(n - 1 - i) % 5 for i in range(n)])
    totals = []
    for C in C_GRID:  # brute force: summed held-out log loss per C, loops
        total = 0.0
        for k in range(5):
            w = _independent_l1_fit(X[folds != k], y[folds != k], s[folds != k], C)
            q = expit(X[folds == k] @ w)
            total += -np.mean(y[folds == k] * np.log(q) + (1 - y[folds == k]) * np.log(1 - q))
        totals.append(total)
    assert cross_validated_c(X, y, s) == C_GRID[int(np.argmin(totals))]


def test_alpaca_7b_fit_equals_liblinear_and_its_distance_to_the_published_row(alpaca_7b, published):
    # Reference: sklearn 1.9 LogisticRegressionCV as AlpacaEval's fit_LogisticRegressionCV calls it
    # (L1, liblinear, GroupKFold(5), soft-label log loss) picks C = 2.7826 on these annotations with
    # the difficulty file and no gamed-baseline rows; refitted at tol=1e-12 it gives the weights below
    # (at liblinear's default tol=1e-4: LC 6.6442). The published row (5.8755) also used the gamed rows.
    ann, difficulty = alpaca_7b
    lc = length_controlled_win_rate(ann, instruction_difficulty=difficulty, n_bootstrap=0)
    assert lc["C"] == pytest.approx(2.782559402207126)
    assert [lc[c] for c in WEIGHT_COLUMNS] == pytest.approx([-3.13141862, 1.18576469, -3.88213556], abs=1e-7)
    assert lc["length_controlled_winrate"] == pytest.approx(6.627727478836586, abs=1e-6)
    _, board, _ = published
    assert abs(lc["length_controlled_winrate"] - board.loc["alpaca-7b", "length_controlled_winrate"]) < 0.76


def test_lc_standard_error_of_a_fit_is_the_sem_of_its_predictions(alpaca_7b):
    ann, difficulty = alpaca_7b
    lc = length_controlled_win_rate(ann[:200], instruction_difficulty=difficulty, n_bootstrap=30)
    preds = [1 / (1 + math.exp(-(lc[WEIGHT_COLUMNS[2]] + lc[WEIGHT_COLUMNS[1]] * difficulty[a["instruction"]])))
             for a in ann[:200]]
    assert lc["length_controlled_winrate"] == pytest.approx(100 * statistics.mean(preds), abs=1e-9)
    assert lc["lc_standard_error"] == pytest.approx(100 * statistics.stdev(preds) / math.sqrt(200), abs=1e-9)
    assert lc["lc_ci_low"] < lc["length_controlled_winrate"] < lc["lc_ci_high"]


def test_difficulty_is_looked_up_by_instruction(alpaca_7b):
    ann, difficulty = alpaca_7b
    X, _ = glm_features(ann[::-1], difficulty)
    assert X[0, 1] == difficulty[ann[-1]["instruction"]]
    with pytest.raises(DataError, match="row 1, field 'instruction': instruction not in the instruction-difficulty"):
        glm_features([ann[0], {**ann[1], "instruction": "unknown"}], difficulty)


def _rows(lengths_1, lengths_2, prefs, instructions=None):
    instructions = instructions or [f"i{i}" for i in range(len(prefs))]
    return [{"instruction": q, "output_1": "a" * l1, "output_2": "b" * l2, "preference": p}
            for q, l1, l2, p in zip(instructions, lengths_1, lengths_2, prefs)]


def test_baseline_annotations_enter_with_model_term_0_and_weight_lambda_over_2():
    rng = np.random.default_rng(1)
    n = 120

    def judged(length_weight, quality):
        l1, l2 = rng.integers(50, 500, n), rng.integers(50, 500, n)
        p2 = expit(quality - length_weight * np.tanh((l1 - l2) / np.std(l1 - l2)))
        return _rows(l1, l2, np.where(rng.random(n) < p2, 2, 1).tolist())

    model = judged(3.0, -0.5)
    gamed = [judged(0.5, 0.0) for _ in range(2)]  # the judge barely cares about length on these
    lc = length_controlled_win_rate(model, baseline_annotations=gamed, n_bootstrap=0)
    alone = length_controlled_win_rate(model, n_bootstrap=0)
    assert lc[WEIGHT_COLUMNS[0]] > alone[WEIGHT_COLUMNS[0]] + 0.2  # pulled towards the gamed rows' weak length weight
    # the same fit, assembled by hand: gamed rows first, model term 0, weight 0.2 / 2
    parts = [glm_features(g, model_term=0.0) for g in gamed] + [glm_features(model)]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    s = np.concatenate([np.full(n, 0.1), np.full(n, 0.1), np.ones(n)])
    assert X[:2 * n, 2].sum() == 0 and X[2 * n:, 2].sum() == n
    w = fit_l1_logistic(X, y, s, cross_validated_c(X, y, s))
    assert [lc[c] for c in WEIGHT_COLUMNS] == pytest.approx(w.tolist(), abs=1e-9)


def test_rows_without_a_preference_are_predicted_but_not_fitted():
    rows = _rows([100, 300, 200, 50, 400, 120], [200, 100, 250, 60, 90, 300], [2, 1, 2, None, 1, 2])
    lc = length_controlled_win_rate(rows, n_bootstrap=0)
    X, y = glm_features(rows)
    assert np.isnan(y[3])
    keep = ~np.isnan(y)
    w = fit_l1_logistic(X[keep], y[keep], np.ones(5), cross_validated_c(X[keep], y[keep], np.ones(5)))
    assert lc["length_controlled_winrate"] == pytest.approx(100 * expit(np.full(6, w[2])).mean(), abs=1e-9)
