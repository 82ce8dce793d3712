"""Length-controlled win-rate, bootstrap, paired tests and rank correlation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from prefgym.errors import DataError
from prefgym.evaluation import bootstrap_ci, length_controlled_win_rate, paired_comparison, rank_correlation, win_rate
from prefgym.evaluation.length_control import fit_logistic


def _judged(n, model_extra_len, quality_logit, length_weight, seed):
    """Annotations where the judge's preference depends on quality and (biasedly) on length."""
    rng = np.random.default_rng(seed)
    ref_len = rng.integers(100, 400, n)
    model_len = np.maximum(5, ref_len + rng.normal(model_extra_len, 120, n).astype(int))
    delta = ref_len - model_len
    p_model = expit(quality_logit - length_weight * np.tanh(delta / delta.std(ddof=1)))
    prefs = np.where(rng.random(n) < p_model, 2, 1)
    return [{"instruction": f"i{i}", "output_1": "r" * int(a), "output_2": "m" * int(b), "preference": int(p)}
            for i, (a, b, p) in enumerate(zip(ref_len, model_len, prefs))]


def test_lc_removes_a_pure_length_advantage():
    # same quality as the reference (quality logit 0) but longer, and the judge loves length
    ann = _judged(1500, model_extra_len=250, quality_logit=0.0, length_weight=2.5, seed=0)
    raw = win_rate([a["preference"] for a in ann])["win_rate"]
    lc = length_controlled_win_rate(ann, n_bootstrap=50)
    assert raw > 75
    assert abs(lc["length_controlled_winrate"] - 50) < 6
    assert lc["lc_ci_low"] - 1 < 50 < lc["lc_ci_high"] + 1
    assert lc["weight_length"] == pytest.approx(-2.5, abs=0.6)


def test_lc_keeps_a_quality_advantage():
    # truly better (logit 1 -> 73%), no length difference on average
    ann = _judged(1500, model_extra_len=0, quality_logit=1.0, length_weight=2.0, seed=1)
    lc = length_controlled_win_rate(ann, n_bootstrap=0)
    assert lc["length_controlled_winrate"] == pytest.approx(100 * expit(1.0), abs=4)


def test_logistic_fit_matches_closed_form_intercept():
    # intercept only: the MLE is the logit of the (weighted) mean label
    y = np.array([0.9, 0.2, 1.0, 0.0, 0.5])
    w = fit_logistic(np.ones((5, 1)), y, ridge=0)
    assert expit(w[0]) == pytest.approx(y.mean(), abs=1e-9)


def test_bootstrap_ci_of_mean():
    x = np.random.default_rng(0).normal(10, 2, 400)
    r = bootstrap_ci(x, n_bootstrap=1000)
    assert r["lower"] < 10 < r["upper"]
    assert r["standard_error"] == pytest.approx(2 / np.sqrt(400), rel=0.2)


def _ann(prefs):
    return [{"instruction": f"q{i}", "preference": p, "output_1": "", "output_2": ""} for i, p in enumerate(prefs)]


def test_paired_comparison_by_hand():
    a = _ann([2] * 9 + [1] + [2] * 10)  # A wins all but instruction 9
    b = _ann([1] * 9 + [2] + [2] * 10)  # B wins instruction 9 and ties A on the last 10
    r = paired_comparison(a, b, n_bootstrap=500)
    assert r["n"] == 20 and (r["n_a_better"], r["n_b_better"]) == (9, 1)
    assert r["difference"] == pytest.approx(100 * 8 / 20)
    assert r["p_sign_test"] == pytest.approx(2 * (1 + 10) / 2**10)  # exact binomial, two-sided
    assert r["lower"] > 0 and r["p_bootstrap"] < 0.05 and r["p_wilcoxon"] < 0.05
    same = paired_comparison(a, a, n_bootstrap=100)
    assert same["difference"] == 0 and same["p_sign_test"] == 1.0 and same["p_wilcoxon"] == 1.0


def test_paired_comparison_needs_shared_instructions():
    with pytest.raises(DataError, match="same instructions"):
        paired_comparison(_ann([1, 2]), [{"instruction": "other", "preference": 1}])


def test_rank_correlation():
    r = rank_correlation({"a": 1, "b": 2, "c": 3, "d": 4}, {"d": 40, "c": 9, "b": 5, "a": 1, "zz": 0})
    assert r["n"] == 4 and r["spearman"] == pytest.approx(1.0)
    assert r["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 5, 9, 40])[0, 1])
    assert rank_correlation([1, 2, 3], [3, 2, 1])["spearman"] == pytest.approx(-1.0)
    with pytest.raises(DataError):
        rank_correlation([1, 2], [1, 2])


def test_lc_without_length_differences_is_the_raw_win_rate():
    # equal lengths: the GLM is intercept-only, so LC = raw win-rate up to the L1 shrinkage: at the
    # optimum C * sum(q - y) + sign(w) = 0, i.e. the prediction is mean(y) - sign(w) / (C n). The
    # bootstrap interval is the usual +-1.96 SE, while AlpacaEval's lc_standard_error (the sem of
    # identical predictions) is 0.
    prefs = np.random.default_rng(3).choice([1, 2, 0], size=400, p=[0.55, 0.4, 0.05])
    ann = [{"output_1": "ab", "output_2": "cd", "preference": int(p)} for p in prefs]
    raw = win_rate(prefs)
    lc = length_controlled_win_rate(ann, n_bootstrap=400)
    shrink = 100 * np.sign(lc["weight_model"]) / (lc["C"] * 400)
    assert lc["weight_model"] < 0 and lc["C"] < 1e4  # CV picked a C whose shrinkage is visible
    assert lc["length_controlled_winrate"] == pytest.approx(raw["win_rate"] - shrink, abs=1e-8)
    assert lc["lc_standard_error"] == pytest.approx(0, abs=1e-9)
    half_width = (lc["lc_ci_high"] - lc["lc_ci_low"]) / 2
    assert half_width == pytest.approx(1.96 * raw["standard_error"], rel=0.15)
