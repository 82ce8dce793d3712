"""Win-rate against a reference, the way AlpacaEval computes it.

Each example is judged on a pair whose `output_1` is the reference and `output_2` the model
(AlpacaEval's order). A preference is 1 (reference better), 2 (model better), 1.5 or 0 (a draw),
or any value in [1, 2] (a weighted judge's probability, plus 1): `prefgym.data.preferences`.
With p = preference - 1 = P(model better) in [0, 1] (AlpacaEval's `AbsoluteScoringRule`):

    win_rate       = 100 * mean(p)                  (draws count half)
    standard_error = 100 * std(p, ddof=1) / sqrt(n)
    n_wins = #(p > 0.5), n_wins_base = #(p < 0.5), n_draws = #(p == 0.5)
    discrete_win_rate = 100 * (n_wins + n_draws / 2) / n_total

Annotations whose preference is missing (null, NaN) are not counted, as in AlpacaEval.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from prefgym.data.preferences import parse_preference as _parse_preference
from prefgym.errors import DataError
from prefgym.io import read_records, write_json

LEADERBOARD_COLUMNS = [
    "win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total",
    "mode", "avg_length", "discrete_win_rate", "length_controlled_winrate", "lc_standard_error",
]


def parse_preference(value, *, path=None, row: int | None = None) -> float | None:
    """One annotation's preference as a float in [1, 2] (0 -> 1.5), or None when missing.

    The meaning of a value is defined once, in `prefgym.data.preferences`.
    """
    pref = _parse_preference(value, row=row, path=path)
    return None if pref is None else pref.value


def win_rate(preferences: Sequence) -> dict:
    """AlpacaEval's head-to-head metrics from preferences (1 = reference, 2 = model, 0/1.5 = draw)."""
    parsed = [parse_preference(v, row=i) for i, v in enumerate(preferences)]
    p = np.array([v for v in parsed if v is not None], dtype=float) - 1.0
    n = len(p)
    if n == 0:
        raise DataError("no annotation has a preference; nothing to compute a win-rate from")
    n_wins, n_wins_base, n_draws = int((p > 0.5).sum()), int((p < 0.5).sum()), int((p == 0.5).sum())
    se = float(p.std(ddof=1) / math.sqrt(n) * 100) if n > 1 else float("nan")
    return {
        "win_rate": float(p.mean() * 100),
        "standard_error": se,
        "n_wins": n_wins,
        "n_wins_base": n_wins_base,
        "n_draws": n_draws,
        "n_total": n,
        "discrete_win_rate": (n_wins + n_draws / 2) / n * 100,
    }


def avg_length(outputs: Sequence[str]) -> int:
    """AlpacaEval's `avg_length`: the mean number of characters of the outputs, truncated to int."""
    return int(np.mean([len(o) for o in outputs])) if len(outputs) else 0


def load_annotations(path: str | os.PathLike) -> list[dict]:
    """Read an AlpacaEval annotations file, checking the fields a win-rate needs."""
    rows = read_records(path)
    if not rows:
        raise DataError("no annotations in the file", path=path)
    for i, r in enumerate(rows):
        for field in ("preference", "output_1", "output_2"):
            if field not in r:
                raise DataError("missing field; an annotation needs output_1 (reference), output_2 (model) "
                                "and preference", path=path, row=i, field=field)
        if not isinstance(r["output_1"], str) or not isinstance(r["output_2"], str):
            raise DataError("outputs must be strings", path=path, row=i,
                            field="output_1" if not isinstance(r["output_1"], str) else "output_2")
        parse_preference(r["preference"], path=path, row=i)
    return rows


def key_of(record: dict) -> tuple[str, str]:
    """The key that matches an output with its reference: (instruction, input)."""
    return (record["instruction"], record.get("input") or "")


def make_reference_pairs(model_outputs: Sequence[dict], reference_outputs: Sequence[dict],
                         *, model_path=None, reference_path=None) -> list[dict]:
    """Pairs to judge: `output_1` = reference, `output_2` = model, matched on (instruction, input)."""
    reference = {}
    for i, r in enumerate(reference_outputs):
        for field in ("instruction", "output"):
            if not isinstance(r.get(field), str):
                raise DataError("missing or non-text field", path=reference_path, row=i, field=field)
        reference.setdefault(key_of(r), r)
    pairs = []
    for i, m in enumerate(model_outputs):
        for field in ("instruction", "output"):
            if not isinstance(m.get(field), str):
                raise DataError("missing or non-text field", path=model_path, row=i, field=field)
        ref = reference.get(key_of(m))
        if ref is None:
            raise DataError("instruction not found in the reference outputs; evaluate on the same "
                            "evaluation set as the reference", path=model_path, row=i, field="instruction")
        pair = {
            "instruction": m["instruction"],
            "input": m.get("input") or "",
            "output_1": ref["output"],
            "generator_1": ref.get("generator", "reference"),
            "output_2": m["output"],
            "generator_2": m.get("generator", "model"),
        }
        if "dataset" in ref:
            pair["dataset"] = ref["dataset"]
        pairs.append(pair)
    return pairs


def leaderboard_row(annotations: Sequence[dict], *, outputs: Sequence[str] | None = None,
                    mode: str = "community", length_controlled: bool = True, lc_bootstrap: int = 200) -> dict:
    """One leaderboard row (AlpacaEval's columns) from one model's annotations against the reference.

    `outputs`: the model's outputs for `avg_length` (default: the annotations' `output_2`).
    `length_controlled`: also fit the length-controlled GLM (see `length_controlled_win_rate`),
    with a bootstrap standard error from `lc_bootstrap` resamples (0: none).
    """
    row = win_rate([a["preference"] for a in annotations])
    row["mode"] = mode
    row["avg_length"] = avg_length(outputs if outputs is not None else [a["output_2"] for a in annotations])
    row["length_controlled_winrate"] = row["lc_standard_error"] = float("nan")
    if length_controlled:
        from prefgym.evaluation.length_control import length_controlled_win_rate

        lc = length_controlled_win_rate(annotations, n_bootstrap=lc_bootstrap)
        row["length_controlled_winrate"] = lc["length_controlled_winrate"]
        row["lc_standard_error"] = lc["lc_standard_error"]
    return {c: row[c] for c in LEADERBOARD_COLUMNS}


def _default_annotate(pairs, *, annotators, seed, cache_dir):
    from prefgym.annotators import annotate_pairs

    return annotate_pairs(pairs, annotators=annotators, seed=seed, cache_dir=cache_dir)


def evaluate_outputs(model_outputs: Sequence[dict], reference_outputs: Sequence[dict], *,
                     annotators="world_pool_noisy", seed: int = 0, cache_dir=None,
                     annotate_fn: Callable | None = None) -> tuple[dict, list[dict]]:
    """Judge a model's outputs against the reference outputs; return (leaderboard row, annotations).

    `annotate_fn(pairs, annotators=, seed=, cache_dir=)` defaults to `prefgym.annotators.annotate_pairs`.
    """
    pairs = make_reference_pairs(model_outputs, reference_outputs)
    annotate = annotate_fn or _default_annotate
    annotations = annotate(pairs, annotators=annotators, seed=seed, cache_dir=cache_dir)
    row = leaderboard_row(annotations, outputs=[m["output"] for m in model_outputs])
    return row, annotations


def gold_win_rate(model_outputs: Sequence[dict], reference_outputs: Sequence[dict], *,
                  gold_fn: Callable | None = None, tol: float = 1e-9) -> dict:
    """Win-rate judged by the built-in world's gold quality: model gold > reference gold wins, ties half.

    Returns the same metrics as `win_rate` (with standard error), plus `mean_gold` / `mean_gold_reference`.
    `gold_fn(instruction, input, output) -> float` defaults to `prefgym.world.gold.gold_quality`.
    """
    if gold_fn is None:
        from prefgym.world.gold import gold_quality as gold_fn
    pairs = make_reference_pairs(model_outputs, reference_outputs)
    gold_model = np.array([gold_fn(p["instruction"], p["input"], p["output_2"]) for p in pairs], dtype=float)
    gold_ref = np.array([gold_fn(p["instruction"], p["input"], p["output_1"]) for p in pairs], dtype=float)
    prefs = np.where(gold_model > gold_ref + tol, 2.0, np.where(gold_model < gold_ref - tol, 1.0, 1.5))
    out = win_rate(prefs)
    out["mean_gold"] = float(gold_model.mean())
    out["mean_gold_reference"] = float(gold_ref.mean())
    return out


def update_leaderboard_csv(path: str | os.PathLike, rows: dict[str, dict]) -> Path:
    """Add or replace rows (generator -> row) in a leaderboard CSV, sorted by win-rate, written atomically."""
    import pandas as pd

    from prefgym.evaluation.leaderboard import read_leaderboard, write_leaderboard

    path = Path(path)
    new = pd.DataFrame.from_dict(rows, orient="index")
    if path.exists():
        old = read_leaderboard(path)
        new = pd.concat([old[~old.index.isin(new.index)], new])
    write_leaderboard(new, path, fmt="csv")
    return path


def evaluate(model_outputs=None, reference_outputs=None, *, model_path=None, out_dir=None,
             annotators="world_pool_noisy", seed: int = 0, cache_dir=None, sampling=None,
             generator: str | None = None, annotate_fn: Callable | None = None, gold: bool = False) -> dict:
    """Evaluate a model against the reference: the `prefgym evaluate` command as a function.

    model_outputs: a list of records or a path to AlpacaEval `model_outputs.json` (instruction,
        input?, output, generator); or None with `model_path` to generate them first with
        `prefgym.models.generation.generate_outputs(model_path, reference_outputs, sampling)`.
    reference_outputs: records or a path (AlpacaEval eval set: `output` = reference, `generator`).
    out_dir: when given, writes `model_outputs.json`, `annotations.json` and `leaderboard.csv`
        (the row is added to an existing leaderboard there).
    gold: also judge by the built-in world's gold quality (`gold_win_rate`, `gold_standard_error`).
    Returns the leaderboard row with `generator` added.
    """
    if reference_outputs is None:
        raise DataError("no reference outputs given; pass the evaluation set with reference outputs")
    ref_path = reference_outputs if isinstance(reference_outputs, (str, os.PathLike)) else None
    if ref_path is not None:
        reference_outputs = read_records(ref_path)
    model_file = model_outputs if isinstance(model_outputs, (str, os.PathLike)) else None
    if model_file is not None:
        model_outputs = read_records(model_file)
    elif model_outputs is None:
        if model_path is None:
            raise DataError("give model outputs (a model_outputs.json) or a model to generate them with")
        from prefgym.models.generation import SamplingConfig, generate_outputs

        model_outputs = generate_outputs(model_path, reference_outputs, sampling or SamplingConfig(),
                                         generator=generator or Path(model_path).name)
    if not model_outputs:
        raise DataError("no model outputs to evaluate", path=model_file)
    if generator is not None:
        model_outputs = [{**m, "generator": generator} for m in model_outputs]
    # validate with file names in the messages before judging anything
    make_reference_pairs(model_outputs, reference_outputs, model_path=model_file, reference_path=ref_path)
    row, annotations = evaluate_outputs(model_outputs, reference_outputs, annotators=annotators, seed=seed,
                                        cache_dir=cache_dir, annotate_fn=annotate_fn)
    name = generator or model_outputs[0].get("generator", "model")
    extra = {}
    if gold:
        g = gold_win_rate(model_outputs, reference_outputs)
        extra = {"gold_win_rate": g["win_rate"], "gold_standard_error": g["standard_error"]}
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "model_outputs.json", list(model_outputs))
        write_json(out_dir / "annotations.json", list(annotations))
        update_leaderboard_csv(out_dir / "leaderboard.csv", {name: row})
    return {"generator": name, **row, **extra}
