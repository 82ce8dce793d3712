"""Length-controlled win-rate (AlpacaEval 2's GLM, Dubois et al. 2024).

A logistic regression predicts the judge's preference for the model (p = preference - 1, soft
labels in [0, 1]) from

    logit P(model wins) = w_len * tanh(delta_len / std(delta_len))   (the mediator to control)
                        + w_diff * instruction_difficulty             (optional)
                        + w_model                                     (the model term)

with delta_len = len(output_1) - len(output_2) in characters (reference minus model). The
length-controlled win-rate answers "what if both outputs had the same length": the mean of the
predictions with the length term set to 0, times 100. Its standard error is bootstrapped over
instructions (refitting the GLM each time).

AlpacaEval also regularises the fit towards annotations of its baseline against length-gamed
(verbose / concise) versions of itself, entered with the model term at 0 and weight lambda/2;
pass those as `baseline_annotations` to do the same. AlpacaEval fits with sklearn's L1
LogisticRegressionCV; here the fit is a plain maximum-likelihood Newton solve with a tiny ridge
(for separable data), which gives the same estimate up to that regularisation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from prefgym.evaluation.winrate import parse_preference


def _features(annotations: Sequence[dict], instruction_difficulty, model_term: float):
    """Design matrix (N, 3): [tanh(std delta_len), difficulty, model term] and soft labels (N,)."""
    rows = [(i, parse_preference(a["preference"], row=i)) for i, a in enumerate(annotations)]
    keep = [i for i, p in rows if p is not None]
    y = np.array([rows[i][1] for i in keep], dtype=float) - 1.0
    delta = np.array([len(annotations[i]["output_1"]) - len(annotations[i]["output_2"]) for i in keep], dtype=float)
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    length = np.tanh(delta / std) if std > 0 else np.zeros_like(delta)
    if instruction_difficulty is None:
        difficulty = np.zeros_like(delta)
    else:
        difficulty = np.asarray(instruction_difficulty, dtype=float)
        if len(difficulty) != len(annotations):
            raise ValueError(f"instruction_difficulty has {len(difficulty)} values for {len(annotations)} annotations")
        difficulty = difficulty[keep]
    X = np.column_stack([length, difficulty, np.full_like(delta, model_term)])
    return X, y


def fit_logistic(X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None,
                 ridge: float = 1e-6, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Weights w maximising sum_i s_i [y_i log sigma(x_i w) + (1 - y_i) log(1 - sigma(x_i w))] - ridge |w|^2 / 2.

    Soft labels y in [0, 1]; no intercept (put a column of ones in X). Newton's method.
    """
    n, d = X.shape
    s = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    w = np.zeros(d)
    for _ in range(max_iter):
        prob = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (s * (y - prob)) - ridge * w
        hess = (X * (s * prob * (1 - prob))[:, None]).T @ X + ridge * np.eye(d)
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.max(np.abs(step)) < tol:
            break
    return w


def _lc_from_fit(X, y, s, X_test):
    active = np.flatnonzero(np.abs(X).sum(axis=0) > 0)  # drop all-zero columns (no difficulty, equal lengths)
    w = np.zeros(X.shape[1])
    w[active] = fit_logistic(X[:, active], y, s)
    return float(np.mean(1.0 / (1.0 + np.exp(-(X_test @ w)))) * 100), w


def length_controlled_win_rate(annotations: Sequence[dict], *, instruction_difficulty: Sequence[float] | None = None,
                               baseline_annotations: Sequence[dict] | None = None,
                               regularize_to_baseline_lambda: float = 0.2,
                               n_bootstrap: int = 200, seed: int = 0) -> dict:
    """Length-controlled win-rate of one model against the reference, with a bootstrap standard error.

    annotations: AlpacaEval annotations (output_1 = reference, output_2 = model, preference).
    instruction_difficulty: one value per annotation (optional, AlpacaEval's third feature).
    baseline_annotations: optional annotations of the reference against length-gamed versions of
        itself; they regularise the length weight (model term 0, weight lambda / 2 each).
    Returns length_controlled_winrate, lc_standard_error (NaN when n_bootstrap == 0) and the
    GLM weights (`weight_length`, `weight_difficulty`, `weight_model`).
    """
    X, y = _features(annotations, instruction_difficulty, model_term=1.0)
    s = np.ones(len(y))
    if baseline_annotations:
        Xb, yb = _features(baseline_annotations, None, model_term=0.0)
        X_all, y_all = np.vstack([X, Xb]), np.concatenate([y, yb])
        s_all = np.concatenate([s, np.full(len(yb), regularize_to_baseline_lambda / 2)])
    else:
        Xb = np.zeros((0, 3))
        X_all, y_all, s_all = X, y, s
    X_test = X.copy()
    X_test[:, 0] = 0.0  # "what if both outputs had the same length"
    lc, w = _lc_from_fit(X_all, y_all, s_all, X_test)

    se = float("nan")
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        n, boot = len(y), []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, n, n)
            Xi = np.vstack([X[idx], Xb]) if len(Xb) else X[idx]
            yi = np.concatenate([y[idx], y_all[n:]])
            si = np.concatenate([s[idx], s_all[n:]])
            boot.append(_lc_from_fit(Xi, yi, si, X_test[idx])[0])
        se = float(np.std(boot, ddof=1))
    return {
        "length_controlled_winrate": lc,
        "lc_standard_error": se,
        "weight_length": float(w[0]),
        "weight_difficulty": float(w[1]),
        "weight_model": float(w[2]),
    }
