"""Uncertainty and agreement: bootstrap intervals, a paired comparison of two models on the same
instructions, and rank correlation between two leaderboards (e.g. simulated vs human win-rates)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from prefgym.errors import DataError
from prefgym.evaluation.winrate import key_of, parse_preference


def bootstrap_ci(values: Sequence[float], statistic: Callable = np.mean, *, n_bootstrap: int = 2000,
                 level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of `statistic(values)`; returns estimate, lower, upper, standard_error."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise DataError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    boot = np.array([statistic(x[rng.integers(0, len(x), len(x))]) for _ in range(n_bootstrap)])
    alpha = (1 - level) / 2
    return {"estimate": float(statistic(x)), "lower": float(np.quantile(boot, alpha)),
            "upper": float(np.quantile(boot, 1 - alpha)), "standard_error": float(boot.std(ddof=1))}


def scores_by_instruction(annotations: Sequence[dict], *, path=None) -> dict[tuple[str, str], float]:
    """Per-example model score p = preference - 1 in [0, 1] (1 = model beat the reference), by (instruction, input).

    A row without an instruction is an error (the pairing keys on it); rows without a preference are skipped.
    """
    out = {}
    for i, a in enumerate(annotations):
        if not isinstance(a.get("instruction"), str):
            raise DataError("missing or non-text instruction; a paired comparison matches the two files by it",
                            path=path, row=i, field="instruction")
        p = parse_preference(a.get("preference"), path=path, row=i)
        if p is not None:
            out[key_of(a)] = p - 1.0
    return out


def paired_comparison(annotations_a: Sequence[dict], annotations_b: Sequence[dict], *, n_bootstrap: int = 2000,
                      level: float = 0.95, seed: int = 0, path_a=None, path_b=None) -> dict:
    """Compare two models judged against the same reference on the same instructions.

    The per-instruction difference d = score_a - score_b (scores in [0, 1], draws 0.5) is tested with:
    a paired bootstrap (interval of the win-rate difference in points, and a two-sided p-value from
    the bootstrap distribution), the sign test (exact binomial on instructions where d != 0) and the
    Wilcoxon signed-rank test. `path_a` / `path_b` name the files in error messages.
    """
    a = scores_by_instruction(annotations_a, path=path_a)
    b = scores_by_instruction(annotations_b, path=path_b)
    common = [k for k in a if k in b]
    if len(common) < 2:
        raise DataError(f"the two annotation sets share {len(common)} instructions; a paired test needs "
                        "both models judged on the same instructions")
    d = np.array([a[k] - b[k] for k in common]) * 100
    rng = np.random.default_rng(seed)
    boot = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(n_bootstrap)])
    alpha = (1 - level) / 2
    # two-sided bootstrap p-value: how often the resampled mean difference falls on the other side of 0
    p_boot = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
    n_pos, n_neg = int((d > 0).sum()), int((d < 0).sum())
    p_sign = float(sps.binomtest(n_pos, n_pos + n_neg, 0.5).pvalue) if n_pos + n_neg else 1.0
    p_wilcoxon = float(sps.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return {
        "n": len(common),
        "win_rate_a": float(np.mean([a[k] for k in common]) * 100),
        "win_rate_b": float(np.mean([b[k] for k in common]) * 100),
        "difference": float(d.mean()),
        "lower": float(np.quantile(boot, alpha)),
        "upper": float(np.quantile(boot, 1 - alpha)),
        "level": level,
        "n_bootstrap": n_bootstrap,
        "p_bootstrap": p_boot,
        "n_a_better": n_pos,
        "n_b_better": n_neg,
        "p_sign_test": p_sign,
        "p_wilcoxon": p_wilcoxon,
    }


def _p_text(p: float, n_bootstrap: int | None = None) -> str:
    if p == 0 and n_bootstrap:
        return f"p < {1 / n_bootstrap:.2g}"
    return f"p = {p:.3g}"


def format_comparison(r: dict) -> str:
    """One readable paragraph of `paired_comparison`'s result; `a` / `b` in r name the two models."""
    a, b = r.get("a", "A"), r.get("b", "B")
    diff, low, high = r["difference"], r["lower"], r["upper"]
    if diff > 0:
        verdict = f"A better by {diff:.2f} points [{low:.2f}, {high:.2f}]"
    elif diff < 0:
        verdict = f"B better by {-diff:.2f} points [{0.0 - high:.2f}, {0.0 - low:.2f}]"
    else:
        verdict = f"no difference (0.00 points [{low:.2f}, {high:.2f}])"
    level = int(round(100 * r.get("level", 0.95)))
    return (f"A = {a}\nB = {b}\n"
            f"A vs B on {r['n']} shared instructions: {verdict} ({level}% paired bootstrap), "
            f"{_p_text(r['p_bootstrap'], r.get('n_bootstrap'))}\n"
            f"win-rate against the reference: A {r['win_rate_a']:.2f}, B {r['win_rate_b']:.2f}\n"
            f"A better on {r['n_a_better']} instructions, B on {r['n_b_better']} "
            f"(sign test {_p_text(r['p_sign_test'])}; Wilcoxon signed-rank {_p_text(r['p_wilcoxon'])})")


def rank_correlation(x: Sequence[float] | Mapping[str, float], y: Sequence[float] | Mapping[str, float]) -> dict:
    """Spearman and Pearson correlation of two score lists (or two dicts name -> score, on shared names)."""
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        names = [k for k in x if k in y]
        xs, ys = [x[k] for k in names], [y[k] for k in names]
    else:
        xs, ys = list(x), list(y)
        if len(xs) != len(ys):
            raise DataError(f"the two score lists differ in length ({len(xs)} vs {len(ys)})")
    if len(xs) < 3:
        raise DataError(f"a correlation needs at least 3 shared entries, got {len(xs)}")
    spearman = sps.spearmanr(xs, ys)
    pearson = sps.pearsonr(xs, ys)
    return {"n": len(xs), "spearman": float(spearman.statistic), "spearman_p": float(spearman.pvalue),
            "pearson": float(pearson.statistic), "pearson_p": float(pearson.pvalue)}
