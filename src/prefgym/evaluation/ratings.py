"""Ratings from pairwise battles, Chatbot Arena style: online Elo and Bradley–Terry (MLE), with
bootstrap intervals.

A battle is a record with `model_a`, `model_b` and `winner` in {"model_a", "model_b", "tie",
"tie (bothbad)"}. Both ratings are on the Elo scale: P(a beats b) = 1 / (1 + 10^((r_b - r_a)/400)).
A tie counts as half a win for each side.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from prefgym.errors import DataError
from prefgym.evaluation.length_control import fit_logistic
from prefgym.io import read_records

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
_SCORE_A = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


def load_battles(path: str | os.PathLike) -> list[dict]:
    """Read battles (.json list or .jsonl), checking model_a, model_b and winner."""
    battles = read_records(path)
    validate_battles(battles, path=path)
    return battles


def validate_battles(battles: Sequence[dict], path=None) -> None:
    if not battles:
        raise DataError("no battles", path=path)
    for i, b in enumerate(battles):
        for field in ("model_a", "model_b", "winner"):
            if field not in b:
                raise DataError("missing field; a battle needs model_a, model_b and winner", path=path, row=i, field=field)
        if b["winner"] not in WINNERS:
            raise DataError(f"winner must be one of {', '.join(WINNERS)}, got {b['winner']!r}",
                            path=path, row=i, field="winner")
        if b["model_a"] == b["model_b"]:
            raise DataError("a model cannot battle itself", path=path, row=i, field="model_b")


def battles_from_annotations(annotations: Sequence[dict]) -> list[dict]:
    """Battles from pairwise annotations: model_a = generator_1, model_b = generator_2; preference
    1 -> model_a wins, 2 -> model_b, 1.5 / 0 -> tie (a weighted preference goes to the closer side)."""
    from prefgym.evaluation.winrate import parse_preference

    battles = []
    for i, a in enumerate(annotations):
        p = parse_preference(a.get("preference"), row=i)
        if p is None:
            continue
        for field in ("generator_1", "generator_2"):
            if not a.get(field):
                raise DataError("missing field; battles need both generators named", row=i, field=field)
        winner = "model_a" if p < 1.5 else "model_b" if p > 1.5 else "tie"
        battles.append({"model_a": a["generator_1"], "model_b": a["generator_2"], "winner": winner})
    return battles


def elo_ratings(battles: Sequence[dict], *, k: float = 4.0, scale: float = 400.0, base: float = 10.0,
                init_rating: float = 1000.0) -> dict[str, float]:
    """Online Elo: battles in the given order, each moving both ratings by k * (score - expected)."""
    ratings: dict[str, float] = {}
    for b in battles:
        ra = ratings.setdefault(b["model_a"], init_rating)
        rb = ratings.setdefault(b["model_b"], init_rating)
        expected_a = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        score_a = _SCORE_A[b["winner"]]
        ratings[b["model_a"]] = ra + k * (score_a - expected_a)
        ratings[b["model_b"]] = rb - k * (score_a - expected_a)
    return ratings


def bradley_terry_ratings(battles: Sequence[dict], *, scale: float = 400.0, base: float = 10.0,
                          init_rating: float = 1000.0, anchor: tuple[str, float] | None = None,
                          ridge: float = 1e-6) -> dict[str, float]:
    """Bradley–Terry maximum likelihood (a logistic regression on +-log(base) model indicators).

    Ratings are defined up to a constant: by default their mean is `init_rating`; with
    `anchor=(model, rating)` that model gets that rating (Chatbot Arena anchors one model).
    The tiny ridge keeps ratings finite when a model won (or lost) every battle.
    """
    models = sorted({b["model_a"] for b in battles} | {b["model_b"] for b in battles})
    index = {m: i for i, m in enumerate(models)}
    # one row per ordered pair (a, b): the number of battles and model a's mean score
    counts: dict[tuple[int, int], list[float]] = {}
    for b in battles:
        c = counts.setdefault((index[b["model_a"]], index[b["model_b"]]), [0.0, 0.0])
        c[0] += 1
        c[1] += _SCORE_A[b["winner"]]
    pairs = list(counts)
    X = np.zeros((len(pairs), len(models)))  # (pairs, models)
    rows = np.arange(len(pairs))
    X[rows, [a for a, _ in pairs]] = np.log(base)
    X[rows, [b for _, b in pairs]] = -np.log(base)
    n = np.array([counts[p][0] for p in pairs])
    y = np.array([counts[p][1] for p in pairs]) / n
    beta = fit_logistic(X, y, sample_weight=n, ridge=ridge)
    ratings = scale * (beta - beta.mean()) + init_rating
    if anchor is not None:
        if anchor[0] not in index:
            raise DataError(f"anchor model {anchor[0]!r} is in no battle")
        ratings += anchor[1] - ratings[index[anchor[0]]]
    return {m: float(ratings[index[m]]) for m in models}


def bootstrap_ratings(battles: Sequence[dict], *, method: str = "bt", n_bootstrap: int = 100, level: float = 0.95,
                      seed: int = 0, **kw) -> pd.DataFrame:
    """Ratings on battles resampled with replacement (for Elo the order is resampled too, as the
    Arena does); returns per model: rating (on all battles), median, lower, upper, sorted best first."""
    if method not in ("bt", "elo"):
        raise DataError(f"unknown rating method {method!r}; use 'bt' or 'elo'")
    rate = bradley_terry_ratings if method == "bt" else elo_ratings
    full = rate(battles, **kw)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(battles), len(battles))
        samples.append(rate([battles[i] for i in idx], **kw))
    boot = pd.DataFrame(samples)[list(full)]  # a model missing from a resample gets NaN there
    alpha = (1 - level) / 2
    out = pd.DataFrame({
        "rating": pd.Series(full),
        "median": boot.median(),
        "lower": boot.quantile(alpha),
        "upper": boot.quantile(1 - alpha),
    })
    return out.sort_values("rating", ascending=False)


def ratings_table(battles: Sequence[dict], *, n_bootstrap: int = 100, k: float = 4.0, seed: int = 0,
                  anchor: tuple[str, float] | None = None) -> pd.DataFrame:
    """Per model: Bradley–Terry rating with bootstrap interval, online Elo with interval, battles, win fraction."""
    validate_battles(battles)
    bt = bootstrap_ratings(battles, method="bt", n_bootstrap=n_bootstrap, seed=seed, anchor=anchor)
    elo = bootstrap_ratings(battles, method="elo", n_bootstrap=n_bootstrap, seed=seed, k=k)
    n_battles: dict[str, int] = {}
    wins: dict[str, float] = {}
    for b in battles:
        s = _SCORE_A[b["winner"]]
        for m, score in ((b["model_a"], s), (b["model_b"], 1 - s)):
            n_battles[m] = n_battles.get(m, 0) + 1
            wins[m] = wins.get(m, 0.0) + score
    table = pd.DataFrame({
        "bt_rating": bt["rating"], "bt_lower": bt["lower"], "bt_upper": bt["upper"],
        "elo_rating": elo["rating"], "elo_lower": elo["lower"], "elo_upper": elo["upper"],
        "n_battles": pd.Series(n_battles), "win_fraction": pd.Series(wins) / pd.Series(n_battles),
    })
    table.index.name = "model"
    return table.sort_values("bt_rating", ascending=False)
