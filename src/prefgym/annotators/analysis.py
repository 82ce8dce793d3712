"""How good is an annotator? AlpacaEval's annotator table, measured against human
cross-annotations (several labelers per pair), with bootstrap intervals.

Each column follows `alpaca_eval.analyze` (scoring rule "absolute": the score of a label `x`
against a label `y` is 1 - |x - y| on the 1 / 1.5 / 2 scale, so a draw earns half), with one
change that keeps the expected value and removes noise: where AlpacaEval draws a mode at random
among tied values, prefgym averages over the tied values.

- human agreement: the score of one label against the mode of the human labels. For the humans,
  each human is held out in turn against the mode of the others (1 vs rest); an annotator's runs
  are each scored against the mode of all the humans (`agreement_of_annotations(...,
  n_majority_vote_1=1)`).
- bias: 1 - score of the annotator's mode (over `n_samples` seeded runs) against the humans' mode
  (`estimate_bias`); 0 for the humans by definition.
- variance: 1 - score of one run against the mode of its other runs, averaged over the held-out run
  (`estimate_variance`); for the humans, 1 - human agreement.
- spearman / pearson: correlation of the per-`generator` win-rates (P(output_2 preferred)) under
  the annotator and under the humans (`estimate_correlations`); only when the rows name at least
  3 generators.
- proba. prefer longer: among labels of pairs whose outputs differ by more than
  `significant_delta_length` characters (30 in AlpacaEval), how often the longer one is chosen;
  a draw is left out (`get_length_biases`).
- proba. prefer lists: among labels of pairs where exactly one output contains a list (bullets,
  numbered or lettered lines), how often that one is chosen (`get_list_biases`).
- proba. prefer 1: 2 - mean preference, i.e. how often output_1 is chosen (position bias).
- price and seconds per 1000 examples.

AlpacaEval computes the two "prefer" probabilities on the first label of each pair; prefgym
averages over all of them (same expected value). The pseudo-annotator `longer` always picks the
longer output (AlpacaEval's `longest` row: output_2 unless output_1 is strictly longer), for
free, in no time.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict

import numpy as np

from prefgym.annotators.annotate import annotate_pairs, example_key, summarize
from prefgym.annotators.config import load_pool
from prefgym.errors import DataError
from prefgym.io import read_records
from prefgym.seeding import rng_for

HUMAN_ID_FIELDS = ("annotator_index", "labeler", "worker_id", "annotator")
LONGER = "longer"
"""The pseudo-annotator that always picks the longer output."""
COLUMNS = ("human_agreement", "bias", "variance", "spearman", "pearson", "proba_prefer_longer",
           "proba_prefer_lists", "proba_prefer_1")
# alpaca_eval.utils.contains_list: bullets, numbered and lettered list lines.
_LIST_PATTERNS = (r"(?m)^\s*[\*\•\-]\s*[^\w]*\w+", r"(?m)^\s*\d+[\.\)]\s*[^\w]*\w+",
                  r"(?m)^\s*[a-zA-Z][\.\)]\s+[^\w]*\w+")


def make_world_cross_annotations(n_pairs: int = 500, n_humans: int = 4, seed: int = 0,
                                 pairs: list[dict] | None = None, population_seed: int = 0) -> list[dict]:
    """A cross-annotation set from the built-in world: each pair labelled by `n_humans` distinct
    simulated humans. Pairs default to `policy_like_pairs` (two independent demonstrations of
    mixed quality for the same instruction); their `generator` is the style of output_2, so that
    the table can rank styles as AlpacaEval ranks models."""
    from prefgym.world.agreement import policy_like_pairs
    from prefgym.world.humans import HumanPopulation

    if pairs is None:
        pairs = [{"instruction": p["instruction"], "input": p["input"], "output_1": p["output_1"],
                  "output_2": p["output_2"], "generator": p["style_2"]}
                 for p in policy_like_pairs(n_pairs, seed=seed, with_styles=True)]
    population = HumanPopulation(seed=population_seed)
    rows = []
    for p in pairs:
        args = (p["instruction"], p.get("input") or "", p["output_1"], p["output_2"])
        labelers = rng_for("cross-annotation", seed, example_key(*args)).choice(
            population.n_labelers, size=n_humans, replace=False)
        extra = {"generator": p["generator"]} if "generator" in p else {}
        for lab in labelers:
            rows.append({"instruction": args[0], "input": args[1], "output_1": args[2], "output_2": args[3],
                         "preference": population.preference(int(lab), *args), "annotator_index": int(lab),
                         **extra})
    return rows


def load_cross_annotations(path: str | os.PathLike) -> list[dict]:
    """Human cross-annotations (AlpacaEval's format): instruction, [input], output_1, output_2,
    preference (1, 2; 0 or 1.5 for a draw), a labeler id (annotator_index or similar) and,
    optionally, the `generator` of output_2 (for the rank correlations)."""
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
    """Unique pairs (with their `generator` if any) and their human labels (pairs with fewer than
    2 labels are dropped)."""
    groups, pair_of = defaultdict(list), {}
    for r in cross:
        key = example_key(r["instruction"], r["input"], r["output_1"], r["output_2"])
        groups[key].append(float(r["preference"]))
        pair_of.setdefault(key, {f: r[f] for f in ("instruction", "input", "output_1", "output_2", "generator")
                                 if f in r})
    keys = [k for k in groups if len(groups[k]) >= 2]
    return [pair_of[k] for k in keys], [groups[k] for k in keys]


# ------------------------------------------------------------------ the columns, per pair


def _agree(a: float, b: float) -> float:
    """AlpacaEval's absolute scoring rule: 1 - |a - b| (a draw against a side earns half)."""
    return 1.0 - abs(float(a) - float(b))


def _mode_dist(labels: list[float]) -> dict[float, float]:
    """The mode of `labels` as a distribution: each most frequent value, equally likely."""
    values, counts = np.unique(np.asarray(labels, dtype=float), return_counts=True)
    modes = values[counts == counts.max()]
    return {float(v): 1.0 / len(modes) for v in modes}


def _agree_dist(a: dict[float, float], b: dict[float, float]) -> float:
    """Expected score of a label drawn from `a` against one drawn from `b`."""
    return sum(pa * pb * _agree(x, y) for x, pa in a.items() for y, pb in b.items())


def _one_vs_rest(labels: list[float]) -> float:
    """Mean over held-out j of the score of labels[j] against the mode of the others."""
    return float(np.mean([_agree_dist({labels[j]: 1.0}, _mode_dist(labels[:j] + labels[j + 1:]))
                          for j in range(len(labels))]))


def _one_vs_mode(labels: list[float], reference: list[float]) -> float:
    """Mean over `labels` of their score against the mode of `reference`."""
    mode = _mode_dist(reference)
    return float(np.mean([_agree_dist({x: 1.0}, mode) for x in labels]))


def contains_list(text: str) -> bool:
    """Whether `text` has list lines (bullets, numbered, lettered), as AlpacaEval detects them."""
    return any(re.search(p, text) for p in _LIST_PATTERNS)


def _prefers(labels: list[float], side: float) -> float:
    """How often `labels` choose `side` (1.0 or 2.0), draws left out; nan when all are draws."""
    decided = [x for x in labels if x != 1.5]
    return float(np.mean([x == side for x in decided])) if decided else math.nan


def _prefers_longer(pair: dict, labels: list[float], significant_delta_length: int) -> float:
    l1, l2 = len(pair["output_1"]), len(pair["output_2"])
    if abs(l1 - l2) <= significant_delta_length:
        return math.nan
    return _prefers(labels, 2.0 if l2 > l1 else 1.0)


def _prefers_lists(pair: dict, labels: list[float]) -> float:
    list1, list2 = contains_list(pair["output_1"]), contains_list(pair["output_2"])
    if list1 == list2:
        return math.nan
    return _prefers(labels, 2.0 if list2 else 1.0)


def pair_metrics(pairs: list[dict], human: list[list[float]], runs: list[list[float]] | None = None,
                 significant_delta_length: int = 30) -> dict[str, list[float]]:
    """Per-pair values of every averaged column: for the humans (`runs` None) or for an annotator
    whose labels of pair i are runs[i] (one per seeded run; nan where it has none)."""
    out = {k: [] for k in ("human_agreement", "bias", "variance", "proba_prefer_longer", "proba_prefer_lists",
                           "proba_prefer_1")}
    for i, (pair, h) in enumerate(zip(pairs, human)):
        a = h if runs is None else [x for x in runs[i] if x is not None]
        if not a:
            for vals in out.values():
                vals.append(math.nan)
            continue
        if runs is None:
            agreement = _one_vs_rest(h)
            bias, variance = 0.0, 1.0 - agreement
        else:
            agreement = _one_vs_mode(a, h)
            bias = 1.0 - _agree_dist(_mode_dist(a), _mode_dist(h))
            variance = 1.0 - _one_vs_rest(a) if len(a) > 1 else math.nan
        out["human_agreement"].append(agreement)
        out["bias"].append(bias)
        out["variance"].append(variance)
        out["proba_prefer_longer"].append(_prefers_longer(pair, a, significant_delta_length))
        out["proba_prefer_lists"].append(_prefers_lists(pair, a))
        out["proba_prefer_1"].append(float(np.mean([2.0 - x for x in a])))
    return out


def generator_win_rates(pairs: list[dict], labels: list[list[float]]) -> dict[str, float]:
    """Per generator (of output_2), the mean of P(output_2 preferred) over its pairs' labels."""
    by_gen = defaultdict(list)
    for pair, ls in zip(pairs, labels):
        ls = [x for x in ls if x is not None]
        if "generator" in pair and ls:
            by_gen[pair["generator"]].append(float(np.mean([x - 1.0 for x in ls])))
    return {g: float(np.mean(v)) for g, v in sorted(by_gen.items())}


def rank_correlations(pairs: list[dict], human: list[list[float]], labels: list[list[float]]) -> dict:
    """Spearman and Pearson of the generators' win-rates under `labels` vs under the humans
    (nan when fewer than 3 generators)."""
    from prefgym.evaluation.stats import rank_correlation

    sim, ref = generator_win_rates(pairs, labels), generator_win_rates(pairs, human)
    if len(set(sim) & set(ref)) < 3:
        return {"spearman": math.nan, "pearson": math.nan}
    c = rank_correlation(sim, ref)
    return {"spearman": c["spearman"], "pearson": c["pearson"]}


def _with_ci(values: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    idx = rng_for("bootstrap", seed).integers(len(values), size=(n_bootstrap, len(values)))
    boots = values[idx].mean(axis=1)
    return float(values.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def table_row(name: str, pairs: list[dict], human: list[list[float]], runs: list[list[float]] | None, *,
              price: float, seconds: float, n_bootstrap: int = 1000, seed: int = 0,
              significant_delta_length: int = 30) -> dict:
    """One row of the annotator table (fractions; `_ci` keys hold 95% bootstrap intervals over pairs)."""
    out = {"annotator": name, "n_pairs": len(pairs)}
    for metric, vals in pair_metrics(pairs, human, runs, significant_delta_length).items():
        mean, lo, hi = _with_ci(np.asarray(vals, dtype=float), n_bootstrap, seed)
        out[metric], out[f"{metric}_ci"] = mean, [lo, hi]
    out.update(rank_correlations(pairs, human, human if runs is None else runs))
    out["price_per_1000"], out["seconds_per_1000"] = price, seconds
    return out


def _longer_runs(pairs: list[dict], n_samples: int) -> list[list[float]]:
    return [[1.0 if len(p["output_1"]) > len(p["output_2"]) else 2.0] * n_samples for p in pairs]


def analyze_annotators(cross: list[dict], annotators: list[str], *, seed: int = 0, n_samples: int = 4,
                       n_bootstrap: int = 1000, cache_dir=None, progress: bool = False,
                       human_price_per_1000: float = math.nan, human_seconds_per_1000: float = math.nan,
                       significant_delta_length: int = 30) -> list[dict]:
    """The annotator table: one row for the humans, then one per annotator (a pool name or YAML,
    or `longer`), with every column of AlpacaEval's table (see the module docstring)."""
    pairs, human = _group(cross)
    if not pairs:
        raise DataError("no pair has two or more human labels; a cross-annotation set needs several per pair")
    opts = dict(n_bootstrap=n_bootstrap, seed=seed, significant_delta_length=significant_delta_length)
    results = [table_row("humans", pairs, human, None, price=human_price_per_1000,
                         seconds=human_seconds_per_1000, **opts)]
    for name in annotators:
        if name == LONGER:
            results.append(table_row(LONGER, pairs, human, _longer_runs(pairs, n_samples), price=0.0, seconds=0.0,
                                     **opts))
            continue
        load_pool(name)  # fail early on a bad config
        annotated = [annotate_pairs(pairs, name, seed=seed + s, cache_dir=cache_dir, progress=progress)
                     for s in range(n_samples)]
        runs = [[r[i]["preference"] for r in annotated] for i in range(len(pairs))]
        s = summarize(annotated[0])
        results.append(table_row(name, pairs, human, runs, price=s["price_per_1000_labels"],
                                 seconds=s["seconds_per_1000_labels"], **opts))
    return results
