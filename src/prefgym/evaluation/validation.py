"""Multi-seed validation: how well simulated feedback ranks the methods as human feedback does.

Each seed of `prefgym run --validate --seeds ...` trains every method twice (on the simulated
pool's preferences and on the simulated humans'), and judges each with its own evaluator (pool,
humans) against the reference on the same eval instructions. Per seed, the Spearman and Pearson
correlation of the two win-rates across methods; across seeds, their mean with a percentile
bootstrap interval.

What the interval covers: evaluation noise given the trained models. Each replicate resamples
the eval instructions of every seed (the same indices for every method and both evaluators of
that seed: paired), recomputes the win-rates and the correlations per seed, and averages them
over seeds. It does not retrain anything, so seed-to-seed variation of training is not in it;
that shows as the spread (min / max) of the per-seed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as sps

from prefgym.errors import DataError
from prefgym.evaluation.stats import rank_correlation, scores_by_instruction

SIDES = ("simulated", "human")


def score_matrices(annotations: Mapping[str, Mapping[str, Sequence[dict]]], *, where: str = "seed"
                   ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(methods, sim, human): per-instruction scores in [0, 1] of each method, (n_methods, n_instructions).

    `annotations`: {"simulated": {method: annotation records}, "human": {method: records}}; a method
    counts when both sides judged it; instructions are those every such method and side has.
    """
    methods = [m for m in annotations["simulated"] if m in annotations["human"]]
    if len(methods) < 3:
        raise DataError(f"{where}: {len(methods)} methods judged by both the simulated pool and the humans; "
                        "a correlation needs at least 3")
    scores = {(side, m): scores_by_instruction(annotations[side][m], path=f"{where} {side} {m}")
              for side in SIDES for m in methods}
    keys = sorted(set.intersection(*(set(s) for s in scores.values())))
    if len(keys) < 2:
        raise DataError(f"{where}: the methods share {len(keys)} judged instructions; a bootstrap needs at least 2")
    sim, human = (np.array([[scores[side, m][k] for k in keys] for m in methods]) for side in SIDES)
    return methods, sim, human


def batch_correlations(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(spearman, pearson) of each column pair of x and y, (n_methods, B) each; NaN where a column is constant."""
    def pearson(a, b):
        a, b = a - a.mean(0), b - b.mean(0)
        denominator = np.sqrt((a * a).sum(0) * (b * b).sum(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, (a * b).sum(0) / denominator, np.nan)

    ranks = lambda a: sps.rankdata(a, axis=0)  # noqa: E731  ties get their mean rank, as in spearmanr
    return pearson(ranks(x), ranks(y)), pearson(x, y)


def seed_validation(per_seed: Mapping[int, Mapping[str, Mapping[str, Sequence[dict]]]], *, n_bootstrap: int = 1000,
                    level: float = 0.95, seed: int = 0) -> dict:
    """Per-seed and mean Spearman / Pearson of simulated vs human win-rates, with bootstrap intervals.

    `per_seed`: {seed: {"simulated": {method: annotations}, "human": {method: annotations}}}, the
    annotations of each method against the reference (AlpacaEval records with `instruction` and
    `preference`). Each bootstrap replicate draws one set of instruction indices per seed, shared by
    every method and both sides of that seed (see the module docstring for what this covers).
    """
    if not per_seed:
        raise DataError("no seeds to aggregate")
    rng = np.random.default_rng(seed)
    alpha = (1 - level) / 2
    seeds, boot = {}, {"spearman": [], "pearson": []}
    for s, seed_annotations in per_seed.items():
        methods, sim, human = score_matrices(seed_annotations, where=f"seed {s}")
        sim_rates, human_rates = sim.mean(1) * 100, human.mean(1) * 100
        point = rank_correlation(list(sim_rates), list(human_rates))
        idx = rng.integers(0, sim.shape[1], (n_bootstrap, sim.shape[1]))  # one draw per replicate, paired
        spearman, pearson = batch_correlations(sim[:, idx].mean(2), human[:, idx].mean(2))
        boot["spearman"].append(spearman)
        boot["pearson"].append(pearson)
        n_methods = point.pop("n")
        seeds[s] = {**point, "n_methods": n_methods, "n_instructions": int(sim.shape[1]),
                    "simulated": dict(zip(methods, map(float, sim_rates))),
                    "human": dict(zip(methods, map(float, human_rates))),
                    **{f"{name}_interval": _interval(values[-1], alpha) for name, values in boot.items()}}
    summary = {"seeds": list(seeds), "n_bootstrap": n_bootstrap, "level": level, "bootstrap_seed": seed,
               "per_seed": seeds}
    for name, values in boot.items():
        per = [seeds[s][name] for s in seeds]
        mean_boot = np.mean(values, axis=0)  # (B,): each replicate's mean over seeds
        summary[name] = {"mean": float(np.mean(per)), "interval": _interval(mean_boot, alpha),
                         "min": float(np.min(per)), "max": float(np.max(per)),
                         "undefined_replicates": int(np.isnan(mean_boot).sum())}
    return summary


def _interval(values: np.ndarray, alpha: float) -> list[float]:
    """Percentile interval, leaving out replicates where a correlation is undefined (a constant side)."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return [float("nan"), float("nan")]
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def read_run_annotations(run_dir: str | Path, eval_label: str = "pool", human_label: str = "human") -> dict:
    """{"simulated": {method: records}, "human": {...}} of a `prefgym run --validate` folder: the
    annotations of each generator but the reference, as its evaluate stages wrote them."""
    from prefgym.io import read_records

    run_dir = Path(run_dir)
    out = {}
    for side, tag, label in (("simulated", "sim", eval_label), ("human", "human", human_label)):
        results = run_dir / tag / "eval" / "results.json"
        if not results.exists():
            raise DataError(f"{run_dir}: no {tag}/eval/results.json; run it with --validate to the end first")
        generators = [r["generator"] for r in read_records(results) if r["generator"] != "reference"]
        out[side] = {g: read_records(run_dir / tag / "eval" / g / f"annotations_{label}.json") for g in generators}
    return out


def markdown_table(summary: dict) -> str:
    """validation_seeds.md: correlations per seed and their mean with its interval, then the win-rates."""
    level = int(round(100 * summary["level"]))
    fmt = lambda v: f"{v:.2f}"  # noqa: E731
    lines = ["# Simulated vs human method rankings, per seed", "",
             f"| seed | methods | instructions | Spearman | {level}% interval | p | Pearson | {level}% interval | p |",
             "|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for s, r in summary["per_seed"].items():
        lines.append(f"| {s} | {r['n_methods']} | {r['n_instructions']} | {fmt(r['spearman'])} | "
                     f"[{', '.join(map(fmt, r['spearman_interval']))}] | {r['spearman_p']:.3g} | {fmt(r['pearson'])} | "
                     f"[{', '.join(map(fmt, r['pearson_interval']))}] | {r['pearson_p']:.3g} |")
    sp, pe = summary["spearman"], summary["pearson"]
    lines.append(f"| **mean** | | | **{fmt(sp['mean'])}** | [{', '.join(map(fmt, sp['interval']))}] | | "
                 f"**{fmt(pe['mean'])}** | [{', '.join(map(fmt, pe['interval']))}] | |")
    lines += ["", f"Per-seed range: Spearman {fmt(sp['min'])} to {fmt(sp['max'])}, Pearson {fmt(pe['min'])} to "
              f"{fmt(pe['max'])}.", "",
              f"Intervals: {level}% percentile bootstrap over the eval instructions ({summary['n_bootstrap']} "
              "replicates, the same resampled instructions for every method and both evaluators of a seed). "
              "They cover evaluation noise given the trained models, not retraining: seed-to-seed variation "
              "shows as the per-seed range.", "", "## Win-rates against the reference (simulated / human, %)", ""]
    seeds = list(summary["per_seed"])
    methods = list(dict.fromkeys(m for r in summary["per_seed"].values() for m in r["simulated"]))
    lines += ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for m in methods:
        cells = [f"{r['simulated'][m]:.1f} / {r['human'][m]:.1f}" if m in r["simulated"] else ""
                 for r in summary["per_seed"].values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_seeds(summary: dict, out_path: str | Path) -> Path:
    """Scatter of simulated vs human win-rate per method, one colour per seed, labelled."""
    import matplotlib.pyplot as plt

    from prefgym.evaluation.plots import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    values = []
    for i, (s, r) in enumerate(summary["per_seed"].items()):
        names = list(r["simulated"])
        xs, ys = [r["human"][m] for m in names], [r["simulated"][m] for m in names]
        values += xs + ys
        ax.scatter(xs, ys, color=f"C{i}", label=f"seed {s}: Spearman {r['spearman']:.2f}, Pearson {r['pearson']:.2f}")
        for n, x, y in zip(names, xs, ys):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=f"C{i}")
    lo, hi = min(values) - 3, max(values) + 3
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("human win-rate (%)")
    ax.set_ylabel("simulated win-rate (%)")
    sp, pe, level = summary["spearman"], summary["pearson"], int(round(100 * summary["level"]))
    ax.set_title(f"Simulated vs human, {len(summary['per_seed'])} seeds\nmean Spearman {sp['mean']:.2f} "
                 f"[{sp['interval'][0]:.2f}, {sp['interval'][1]:.2f}], mean Pearson {pe['mean']:.2f} "
                 f"[{pe['interval'][0]:.2f}, {pe['interval'][1]:.2f}] ({level}%)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_path)


def write_seed_validation(out_dir: str | Path, run_dirs: Mapping[int, str | Path], *, n_bootstrap: int = 1000,
                          seed: int = 0) -> dict:
    """Aggregate the run folders of each seed: OUT/validation_seeds.json, .md and figures/sim_vs_human_seeds.png."""
    from prefgym.io import write_json, write_text_atomic

    out_dir = Path(out_dir)
    summary = seed_validation({s: read_run_annotations(d) for s, d in run_dirs.items()},
                              n_bootstrap=n_bootstrap, seed=seed)
    write_json(out_dir / "validation_seeds.json", summary)
    write_text_atomic(out_dir / "validation_seeds.md", markdown_table(summary))
    plot_seeds(summary, out_dir / "figures" / "sim_vs_human_seeds.png")
    return summary
