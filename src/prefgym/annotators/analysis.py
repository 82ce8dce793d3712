"""How good is an annotator? The columns of AlpacaEval's evaluator leaderboard, measured against
human cross-annotations (several labelers per pair), with bootstrap intervals.

- human agreement: hold one human out, predict the mode of the others; averaged over the held-out
  human and the examples. The annotator gets exactly the same computation (it replaces the
  held-out human), so the two numbers compare.
- bias: 1 - agreement between the annotator's mode (over `n_samples` seeded runs: order, judge
  drawn, sampling, batch) and the humans' mode. 0 for humans by definition.
- variance: 1 - leave-one-out agreement of the annotator's runs with their own mode (for humans:
  1 - human agreement).
- P(longer): probability of preferring the longer output, on pairs of different lengths.
- price and seconds per 1000 labels.
A tie (1.5) counts as half an agreement; a mode that is not unique is drawn at random (seeded).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np

from prefgym.annotators.annotate import annotate_pairs, example_key, summarize
from prefgym.annotators.config import load_pool
from prefgym.errors import DataError
from prefgym.io import read_records
from prefgym.seeding import rng_for

HUMAN_ID_FIELDS = ("annotator_index", "labeler", "worker_id", "annotator")


def make_world_cross_annotations(n_pairs: int = 500, n_humans: int = 4, seed: int = 0,
                                 pairs: list[dict] | None = None, population_seed: int = 0) -> list[dict]:
    """A cross-annotation set from the built-in world: each pair labelled by `n_humans` distinct
    simulated humans. Pairs default to `policy_like_pairs` (two independent demonstrations of
    mixed quality for the same instruction)."""
    from prefgym.world.agreement import policy_like_pairs
    from prefgym.world.humans import HumanPopulation

    pairs = pairs if pairs is not None else policy_like_pairs(n_pairs, seed=seed)
    population = HumanPopulation(seed=population_seed)
    rows = []
    for p in pairs:
        args = (p["instruction"], p.get("input") or "", p["output_1"], p["output_2"])
        labelers = rng_for("cross-annotation", seed, example_key(*args)).choice(
            population.n_labelers, size=n_humans, replace=False)
        for lab in labelers:
            rows.append({"instruction": args[0], "input": args[1], "output_1": args[2], "output_2": args[3],
                         "preference": population.preference(int(lab), *args), "annotator_index": int(lab)})
    return rows


def load_cross_annotations(path: str | os.PathLike) -> list[dict]:
    """Human cross-annotations (AlpacaEval's format): instruction, [input], output_1, output_2,
    preference (1, 2; 0 or 1.5 for a draw) and a labeler id (annotator_index or similar)."""
    rows = read_records(path)
    for i, r in enumerate(rows):
        for f in ("instruction", "output_1", "output_2"):
            if not isinstance(r.get(f), str):
                raise DataError("missing or not a string", path=path, row=i, field=f)
        if not isinstance(r.get("preference"), (int, float)) or r["preference"] not in (0, 1, 1.5, 2):
            raise DataError("must be 1, 2, or 0 / 1.5 for a draw", path=path, row=i, field="preference")
        if not any(f in r for f in HUMAN_ID_FIELDS):
            raise DataError(f"needs a labeler id ({', '.join(HUMAN_ID_FIELDS)})", path=path, row=i)
    return [dict(r, input=r.get("input") or "", preference=1.5 if r["preference"] == 0 else float(r["preference"]))
            for r in rows]


def _group(cross: list[dict]) -> tuple[list[dict], list[list[float]]]:
    """Unique pairs and their human labels (pairs with fewer than 2 labels are dropped)."""
    groups, pair_of = defaultdict(list), {}
    for r in cross:
        key = example_key(r["instruction"], r["input"], r["output_1"], r["output_2"])
        groups[key].append(float(r["preference"]))
        pair_of.setdefault(key, {f: r[f] for f in ("instruction", "input", "output_1", "output_2")})
    keys = [k for k in groups if len(groups[k]) >= 2]
    return [pair_of[k] for k in keys], [groups[k] for k in keys]


def _agree(a: float, b: float) -> float:
    if a == 1.5 or b == 1.5:
        return 0.5
    return float((a > 1.5) == (b > 1.5))


def _mode(labels: list[float], rng: np.random.Generator) -> float:
    """The most frequent side (a tie label counts half each way); a tie between sides is drawn."""
    frac2 = float(np.mean([(l - 1.0) if l == 1.5 else float(l > 1.5) for l in labels]))
    if frac2 == 0.5:
        return float(rng.choice([1.0, 2.0]))
    return 2.0 if frac2 > 0.5 else 1.0


def _loo(labels: list[float], others: list[float] | None, rng) -> float:
    """Mean over held-out j of agree(others[j] or labels[j], mode(labels without j))."""
    held = others if others is not None else labels
    return float(np.mean([_agree(held[j], _mode(labels[:j] + labels[j + 1:], rng)) for j in range(len(labels))]))


def _longer(pair: dict, labels: list[float]) -> float:
    l1, l2 = len(pair["output_1"]), len(pair["output_2"])
    if l1 == l2:
        return math.nan
    longer = 2.0 if l2 > l1 else 1.0
    return float(np.mean([0.5 if l == 1.5 else float((l > 1.5) == (longer == 2.0)) for l in labels]))


def _with_ci(values: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    idx = rng_for("bootstrap", seed).integers(len(values), size=(n_bootstrap, len(values)))
    boots = values[idx].mean(axis=1)
    return float(values.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def analyze_annotators(cross: list[dict], annotators: list[str], *, seed: int = 0, n_samples: int = 4,
                       n_bootstrap: int = 1000, cache_dir=None, progress: bool = False,
                       human_price_per_1000: float = math.nan, human_seconds_per_1000: float = math.nan) -> list[dict]:
    """One row per annotator (plus "humans"): agreement, bias, variance, P(longer), price, time."""
    pairs, human = _group(cross)
    if not pairs:
        raise DataError("no pair has two or more human labels; a cross-annotation set needs several per pair")
    rng = rng_for("analysis-modes", seed)

    def row(name, per_example: dict, price, seconds):
        out = {"annotator": name, "n_pairs": len(pairs)}
        for metric, vals in per_example.items():
            mean, lo, hi = _with_ci(np.asarray(vals, dtype=float), n_bootstrap, seed)
            out[metric], out[f"{metric}_ci"] = mean, [lo, hi]
        out["price_per_1000"], out["seconds_per_1000"] = price, seconds
        return out

    results = [row("humans", {
        "human_agreement": [_loo(h, None, rng) for h in human],
        "bias": [0.0] * len(pairs),
        "variance": [1.0 - _loo(h, None, rng) for h in human],
        "proba_prefer_longer": [_longer(p, h) for p, h in zip(pairs, human)],
    }, human_price_per_1000, human_seconds_per_1000)]

    for name in annotators:
        load_pool(name)  # fail early on a bad config
        runs = [annotate_pairs(pairs, name, seed=seed + s, cache_dir=cache_dir, progress=progress)
                for s in range(n_samples)]
        labels = [[r[i]["preference"] for r in runs] for i in range(len(pairs))]
        agreement, bias, variance, longer = [], [], [], []
        for p, h, a in zip(pairs, human, labels):
            a = [x for x in a if x is not None]
            if not a:
                agreement.append(math.nan), bias.append(math.nan), variance.append(math.nan), longer.append(math.nan)
                continue
            # The annotator replaces the held-out human: agree(annotator, mode of the other humans).
            agreement.append(float(np.mean([_loo(h, [x] * len(h), rng) for x in a])))
            bias.append(1.0 - _agree(_mode(a, rng), _mode(h, rng)))
            variance.append(1.0 - _loo(a, None, rng) if len(a) > 1 else math.nan)
            longer.append(_longer(p, a))
        s = summarize(runs[0])
        results.append(row(name, {"human_agreement": agreement, "bias": bias, "variance": variance,
                                  "proba_prefer_longer": longer},
                           s["price_per_1000_labels"], s["seconds_per_1000_labels"]))
    return results
