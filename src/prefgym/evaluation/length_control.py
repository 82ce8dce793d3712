"""Length-controlled win-rate: AlpacaEval 2's GLM (`length_controlled_v1`, Dubois et al. 2024).

A logistic regression predicts the judge's preference for the model (y = preference - 1, soft
labels in [0, 1], a draw 0 -> 0.5) from AlpacaEval's three features, in its column names:

    np.tanh(std_delta_len)            tanh((len(output_1) - len(output_2)) / std), the length term
    instruction_difficulty            the instruction's difficulty (AlpacaEval's per-instruction term)
    not_gamed_baseline.astype(float)  1 on the model's rows: the model term

with no intercept. The fit is AlpacaEval's `fit_LogisticRegressionCV`: L1-regularised logistic
regression (liblinear's objective |w|_1 + C * sum_i s_i * CE(y_i, sigma(x_i w))), C chosen from
`np.logspace(-4, 4, 10)` by 5-fold cross-validation (folds as sklearn's GroupKFold deals them)
on the soft-label log loss, then refitted on all rows. With `baseline_annotations` (the
baseline judged against its verbose and concise variants) those rows join the fit with the
model term 0 and weight lambda / 2 (lambda = 0.2), which regularises the length weight.

The LC win-rate is 100 x the mean of the per-instruction predictions with the length term set
to 0 ("what if both outputs had the same length"); `lc_standard_error` is, as in AlpacaEval,
100 x the standard error of the mean of those per-instruction predictions (pandas' `sem`).
That is not a sampling uncertainty of the LC win-rate: `lc_ci_low` / `lc_ci_high` are a
percentile bootstrap interval over instructions (refitting the GLM at the cross-validated C).

Without an instruction-difficulty table the difficulty column is left out (AlpacaEval's
`length_controlled_minimal` formula when no baseline annotations are given either).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Mapping, Sequence

import numpy as np

from prefgym.errors import DataError
from prefgym.evaluation.winrate import parse_preference

WEIGHT_COLUMNS = ("np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)")
C_GRID = np.logspace(-4, 4, 10)  # sklearn LogisticRegressionCV's default grid (Cs=10)
N_SPLITS = 5
REGULARIZE_TO_BASELINE_LAMBDA = 0.2


def _logistic(x):
    """AlpacaEval's logistic: exp(-log(1 + exp(-x))), stable for large |x|."""
    return np.exp(-np.logaddexp(0, -np.asarray(x, dtype=float)))


# --------------------------------------------------------------------------- inputs


def load_instruction_difficulty(path: str | os.PathLike) -> dict[str, float]:
    """Instruction -> difficulty from AlpacaEval's difficulty file (records with `instruction` and `difficulty`)."""
    from prefgym.io import read_records

    table = {}
    for i, r in enumerate(read_records(path)):
        if not isinstance(r.get("instruction"), str):
            raise DataError("missing or non-text field", path=path, row=i, field="instruction")
        value = r.get("difficulty")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"difficulty must be a finite number, got {value!r}", path=path, row=i, field="difficulty")
        if r["instruction"] in table and table[r["instruction"]] != float(value):
            raise DataError("the instruction appears twice with different difficulties", path=path, row=i,
                            field="instruction")
        table[r["instruction"]] = float(value)
    if not table:
        raise DataError("no instruction difficulties in the file", path=path)
    return table


def load_glm_weights(path: str | os.PathLike):
    """AlpacaEval's GLM weights CSV (index = model, columns = WEIGHT_COLUMNS) as a DataFrame."""
    import pandas as pd

    try:
        df = pd.read_csv(path, index_col=0)
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"not a GLM weights CSV: {e}", path=path) from None
    for col in WEIGHT_COLUMNS:
        if col not in df.columns:
            raise DataError("missing column", path=path, field=col)
    return df


def _difficulties(annotations: Sequence[dict], instruction_difficulty) -> np.ndarray:
    """One difficulty per annotation: looked up by instruction (a mapping) or given in order (a sequence)."""
    if isinstance(instruction_difficulty, Mapping):
        out = []
        for i, a in enumerate(annotations):
            instruction = a.get("instruction")
            if not isinstance(instruction, str):
                raise DataError("an instruction-difficulty table needs each annotation's instruction", row=i,
                                field="instruction")
            if instruction not in instruction_difficulty:
                raise DataError(f"instruction not in the instruction-difficulty table: {instruction[:60]!r}",
                                row=i, field="instruction")
            out.append(instruction_difficulty[instruction])
        return np.array(out, dtype=float)
    values = np.asarray(instruction_difficulty, dtype=float)
    if values.shape != (len(annotations),):
        raise DataError(f"instruction_difficulty has {values.size} values for {len(annotations)} annotations")
    return values


def glm_features(annotations: Sequence[dict], instruction_difficulty=None, *,
                 model_term: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """AlpacaEval's design matrix (N, 3) in WEIGHT_COLUMNS order, and y = preference - 1 (NaN when missing).

    std_delta_len = (len(output_1) - len(output_2)) / std over all rows (ddof=1, as pandas).
    The difficulty column is 0 when `instruction_difficulty` is None.
    """
    delta = np.array([len(a["output_1"]) - len(a["output_2"]) for a in annotations], dtype=float)
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    length = np.tanh(delta / std) if std > 0 else np.zeros_like(delta)
    difficulty = np.zeros_like(delta) if instruction_difficulty is None else _difficulties(annotations, instruction_difficulty)
    prefs = [parse_preference(a.get("preference"), row=i) for i, a in enumerate(annotations)]
    y = np.array([np.nan if p is None else p - 1.0 for p in prefs], dtype=float)
    return np.column_stack([length, difficulty, np.full_like(delta, model_term)]), y


# --------------------------------------------------------------------------- fitting


def fit_l1_logistic(X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None, C: float = 1.0,
                    *, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Weights minimising |w|_1 + C * sum_i s_i [-y_i log sigma(x_i w) - (1 - y_i) log(1 - sigma(x_i w))].

    liblinear's L1-regularised logistic regression (no intercept) with soft labels y in [0, 1]:
    AlpacaEval duplicates each row with labels 1 and 0 weighted y and 1 - y, the same objective.
    Solved by proximal Newton steps (the L1-penalised quadratic model solved exactly, backtracking).
    """
    n, d = X.shape
    s = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=float)

    def objective(w):
        z = X @ w
        return np.abs(w).sum() + C * np.sum(s * (np.logaddexp(0, z) - y * z))

    w = np.zeros(d)
    for _ in range(max_iter):
        q = _logistic(X @ w)
        grad = C * X.T @ (s * (q - y))
        hess = C * (X * (s * q * (1 - q))[:, None]).T @ X
        step = _l1_newton_step(w, grad, hess)
        if np.max(np.abs(step)) <= tol * (1.0 + np.max(np.abs(w))):
            break
        decrease = grad @ step + np.abs(w + step).sum() - np.abs(w).sum()  # < 0 away from the optimum
        t, f0, f1 = 1.0, objective(w), objective(w + step)
        while f1 > f0 + 1e-4 * t * decrease and t > 1e-10:
            t /= 2
            f1 = objective(w + t * step)
        w = w + t * step
        if f0 - f1 <= 1e-15 * (1.0 + abs(f0)):  # no progress left (e.g. separable data, weights drifting out)
            break
    return w


def _l1_newton_step(w, grad, hess) -> np.ndarray:
    """argmin_step grad.step + step'H step / 2 + |w + step|_1, exactly (a handful of features).

    For each support F and sign pattern s of v = w + step, the stationary point solves
    H_FF v_F = H_F. w - grad_F - s; the minimum is the best sign-consistent one (or v = 0).
    """
    def model(v):
        step = v - w
        return grad @ step + step @ hess @ step / 2 + np.abs(v).sum()

    best = np.zeros_like(w)
    best_value = model(best)
    active = np.flatnonzero(np.diag(hess) > 0)
    for size in range(1, len(active) + 1):
        for support in itertools.combinations(active, size):
            F = list(support)
            signs = np.array(list(itertools.product((-1.0, 1.0), repeat=size))).T  # (size, 2**size)
            try:
                V = np.linalg.solve(hess[np.ix_(F, F)], (hess[F] @ w - grad[F])[:, None] - signs)
            except np.linalg.LinAlgError:
                continue
            for k in np.flatnonzero(np.all(V * signs >= 0, axis=0)):
                v = np.zeros_like(w)
                v[F] = V[:, k]
                if (value := model(v)) < best_value:
                    best, best_value = v, value
    return best - w


def group_kfold_folds(n: int, n_splits: int = N_SPLITS) -> np.ndarray:
    """Fold of each row as sklearn's GroupKFold deals groups of equal size (each row is one group of two)."""
    order = np.argsort(np.full(n, 2))[::-1]  # GroupKFold: groups by decreasing size, ties as numpy orders them
    folds = np.empty(n, dtype=int)
    folds[order] = np.arange(n) % n_splits  # each group goes to the lightest fold: round robin
    return folds


def _log_loss(y, q, s):
    q = np.clip(q, 1e-15, 1 - 1e-15)
    return -np.mean(s * (y * np.log(q) + (1 - y) * np.log(1 - q)))


def cross_validated_c(X, y, s, *, Cs=C_GRID, n_splits: int = N_SPLITS) -> float:
    """The C of `Cs` with the best summed held-out log loss over the folds (first on ties), as LogisticRegressionCV."""
    if len(y) < n_splits:
        return float(Cs[-1])
    folds = group_kfold_folds(len(y), n_splits)
    scores = np.zeros(len(Cs))
    for k in range(n_splits):
        train, test = folds != k, folds == k
        for c, C in enumerate(Cs):
            w = fit_l1_logistic(X[train], y[train], s[train], C)
            scores[c] -= _log_loss(y[test], _logistic(X[test] @ w), s[test])
    return float(Cs[int(np.argmax(scores))])


# --------------------------------------------------------------------------- predictions


def predict_from_weights(weights, model: str, baseline: str, difficulty: Sequence[float]) -> np.ndarray:
    """Per-instruction predictions of AlpacaEval's `predict_winrate`: sigma(dw_model + dw_difficulty * difficulty).

    weights: DataFrame (or CSV path) of AlpacaEval GLM weights, index = model; dw = weights[model] - weights[baseline].
    """
    if not hasattr(weights, "loc"):
        weights = load_glm_weights(weights)
    for name in (model, baseline):
        if name not in weights.index:
            raise DataError(f"no GLM weights for {name!r}")
    delta = weights.loc[model] - weights.loc[baseline]
    return _logistic(delta[WEIGHT_COLUMNS[2]] + delta[WEIGHT_COLUMNS[1]] * np.asarray(difficulty, dtype=float))


def lc_metrics(predictions: np.ndarray) -> dict:
    """length_controlled_winrate and lc_standard_error (AlpacaEval's: 100 x sem of the predictions)."""
    p = np.asarray(predictions, dtype=float)
    sem = float(p.std(ddof=1) / math.sqrt(len(p)) * 100) if len(p) > 1 else float("nan")
    return {"length_controlled_winrate": float(p.mean() * 100), "lc_standard_error": sem}


def _as_annotation_sets(baseline_annotations) -> list[Sequence[dict]]:
    if not baseline_annotations:
        return []
    if isinstance(baseline_annotations[0], Mapping):  # one set given as a plain list of annotations
        return [baseline_annotations]
    return list(baseline_annotations)


def length_controlled_win_rate(annotations: Sequence[dict], *, instruction_difficulty=None,
                               baseline_annotations=None,
                               regularize_to_baseline_lambda: float = REGULARIZE_TO_BASELINE_LAMBDA,
                               n_bootstrap: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """Length-controlled win-rate of one model against the reference, fitted as AlpacaEval 2 does.

    annotations: AlpacaEval annotations (output_1 = reference, output_2 = model, preference).
    instruction_difficulty: instruction -> difficulty (see `load_instruction_difficulty`), or one
        value per annotation; None leaves the difficulty term out.
    baseline_annotations: optional annotation sets of the baseline against its length-gamed
        (verbose, concise) variants; each set is featurised on its own, model term 0, weight lambda / 2.
    Returns length_controlled_winrate, lc_standard_error (AlpacaEval's: sem of the per-instruction
    predictions), lc_ci_low / lc_ci_high (bootstrap over instructions; NaN when n_bootstrap == 0),
    the chosen C and the GLM weights under AlpacaEval's column names.
    """
    X, y = glm_features(annotations, instruction_difficulty)
    if all(a.get("generator_1") is not None and a.get("generator_1") == a.get("generator_2") for a in annotations):
        # the baseline against itself: 0.5 on every instruction by construction, as in AlpacaEval
        return {**lc_metrics(np.full(len(y), 0.5)), "lc_ci_low": 50.0, "lc_ci_high": 50.0, "C": float("nan"),
                **{col: 0.0 for col in WEIGHT_COLUMNS}, "weight_length": 0.0, "weight_difficulty": 0.0, "weight_model": 0.0}
    s = np.ones(len(y))
    baseline_sets = _as_annotation_sets(baseline_annotations)
    if baseline_sets and instruction_difficulty is not None and not isinstance(instruction_difficulty, Mapping):
        raise DataError("with baseline annotations, give instruction_difficulty as a mapping instruction -> difficulty")
    gamed = [glm_features(b, instruction_difficulty, model_term=0.0) for b in baseline_sets]
    Xg = np.vstack([g[0] for g in gamed]) if gamed else np.zeros((0, 3))
    yg = np.concatenate([g[1] for g in gamed]) if gamed else np.zeros(0)
    sg = np.full(len(yg), regularize_to_baseline_lambda / 2)

    def train(rows):
        Xt, yt, st = np.vstack([Xg, X[rows]]), np.concatenate([yg, y[rows]]), np.concatenate([sg, s[rows]])
        keep = ~np.isnan(yt)  # annotations without a preference are not fitted, but are predicted
        return Xt[keep], yt[keep], st[keep]

    X_test = X.copy()
    X_test[:, 0] = 0.0  # "what if both outputs had the same length"
    all_rows = np.arange(len(y))
    Xt, yt, st = train(all_rows)
    if len(yt) == 0:
        raise DataError("no annotation has a preference; nothing to fit the length-controlled GLM on")
    C = cross_validated_c(Xt, yt, st)
    w = fit_l1_logistic(Xt, yt, st, C)
    out = lc_metrics(_logistic(X_test @ w))

    low = high = float("nan")
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        boot = []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, len(y), len(y))
            wb = fit_l1_logistic(*train(idx), C)
            boot.append(_logistic(X_test[idx] @ wb).mean() * 100)
        alpha = (1 - level) / 2
        low, high = float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))
    return {**out, "lc_ci_low": low, "lc_ci_high": high, "C": C,
            **{col: float(v) for col, v in zip(WEIGHT_COLUMNS, w)},
            "weight_length": float(w[0]), "weight_difficulty": float(w[1]), "weight_model": float(w[2])}


def fit_logistic(X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None,
                 ridge: float = 1e-6, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Weights w maximising sum_i s_i [y_i log sigma(x_i w) + (1 - y_i) log(1 - sigma(x_i w))] - ridge |w|^2 / 2.

    Soft labels y in [0, 1]; no intercept (put a column of ones in X). Newton's method. Used by the
    Bradley-Terry ratings; the LC GLM uses `fit_l1_logistic`.
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
