"""The report of a `prefgym run`: `report.html` and the printed `leaderboard.md`.

Both say what they are (scale, seed, number of evaluation instructions, which annotators make
each column), rank the methods without the reference (the comparison point of every win-rate,
50% by construction), and warn where adjacent methods differ by less than the noise at this n.
The HTML adds versions, stage times and the figures, among them PPO's over-optimization picture:
the proxy reward it maximises beside the gold and human win-rates it is meant to raise.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
from pathlib import Path
from typing import Callable, Mapping, Sequence

REFERENCE = "reference"
TEMPLATES = Path(__file__).parent / "templates"

# column of the leaderboard -> (its win-rate and standard-error fields in the result rows)
COLUMNS = {"pool": ("win_rate", "standard_error"), "humans": ("human_win_rate", "human_standard_error"),
           "gold": ("gold_win_rate", "gold_standard_error")}


def describe_annotators(name: str) -> str:
    """'world_pool: 13 judges, one drawn per example; no label flips' (the name alone if it cannot be read)."""
    from prefgym.annotators.config import load_pool
    from prefgym.errors import PrefgymError

    try:
        pool = load_pool(name)
    except (PrefgymError, OSError):
        return name
    judges = f"{len(pool.judges)} judges, one drawn per example" if len(pool.judges) > 1 else _one_judge(pool.judges[0])
    flips = f"{pool.label_flip_prob:.0%} of labels flipped" if pool.label_flip_prob else "no label flips"
    return f"{name}: {judges}; {flips}"


def _one_judge(judge) -> str:
    if judge.description:
        return judge.description
    if judge.fn_completions == "world_humans":
        n = judge.completions_kwargs.get("n_labelers")
        return f"the built-in world's simulated humans, one of {n} labelers drawn per example"
    return f"1 judge ({judge.completions_kwargs.get('model_name', judge.name)})"


def library_versions() -> dict[str, str]:
    """Versions of prefgym and the libraries that decide its numbers (read without importing them)."""
    import prefgym

    versions = {"prefgym": prefgym.__version__, "python": platform.python_version()}
    for dist in ("torch", "transformers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def run_facts(cfg: Mapping, n_eval: int, on_world: bool, has_gold: bool,
              stage_times: Mapping[str, float]) -> dict:
    """What a run is: its data, scale, seed, n, the annotators behind each column, versions, stage times.

    `cfg`: the run config as a dict (`dataclasses.asdict(RunConfig)`).
    """
    columns = {"pool": describe_annotators(cfg["eval_annotators"])}
    if cfg.get("human_annotators"):
        columns["humans"] = describe_annotators(cfg["human_annotators"])
    if has_gold:
        columns["gold"] = "the built-in world's gold quality (its programmatic ground truth), no annotator"
    times = {k: v for k, v in stage_times.items() if k != "report"}
    return {
        "run_dir": str(cfg.get("out_dir") or ""),
        "data": "the built-in world (synthetic)" if on_world else "the run config's data and models",
        "scale": cfg["scale"] if on_world else "n/a (real model or data)",
        "seed": cfg["seed"],
        "n_eval": n_eval,
        "methods": list(cfg["methods"]),
        "train_annotators": describe_annotators(cfg["train_annotators"]),
        "columns": columns,
        "versions": library_versions(),
        "stage_times": times,
        "total_seconds": round(sum(times.values()), 1),
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def split_reference(rows: Sequence[dict]) -> tuple[list[dict], dict | None]:
    """(the methods, best pool win-rate first; the reference row or None)."""
    methods = sorted((r for r in rows if r["generator"] != REFERENCE), key=lambda r: -r["win_rate"])
    reference = next((r for r in rows if r["generator"] == REFERENCE), None)
    return methods, reference


def noise_notes(methods: Sequence[dict], annotations_of: Callable[[str], list[dict] | None],
                n_bootstrap: int = 2000, seed: int = 0) -> list[str]:
    """One line per pair of adjacent methods (by pool win-rate) whose difference is within noise.

    Paired over the same instructions when both methods' annotations are at hand (95% bootstrap
    interval of the difference includes 0), else unpaired: the gap is below 1.96 × the standard
    error of the difference, sqrt(SE_a² + SE_b²).
    """
    from prefgym.errors import DataError
    from prefgym.evaluation.stats import paired_comparison

    notes = []
    for a, b in zip(methods, methods[1:]):
        ann_a, ann_b = annotations_of(a["generator"]), annotations_of(b["generator"])
        try:
            c = paired_comparison(ann_a, ann_b, n_bootstrap=n_bootstrap, seed=seed) if ann_a and ann_b else None
        except DataError:  # fewer than 2 shared instructions: no pairing possible
            c = None
        if c is not None:
            diff, lower, upper, how = c["difference"], c["lower"], c["upper"], "paired 95% interval"
        else:
            diff = a["win_rate"] - b["win_rate"]
            half = 1.96 * (a["standard_error"] ** 2 + b["standard_error"] ** 2) ** 0.5
            lower, upper, how = diff - half, diff + half, "95% interval"
        if lower <= 0 <= upper:
            notes.append(f"{a['generator']} vs {b['generator']}: {diff:+.1f} points, {how} "
                         f"[{lower:.1f}, {upper:.1f}] includes 0")
    return notes


def _cell(row: dict, column: str) -> str:
    rate, se = COLUMNS[column]
    if row.get(rate) is None:
        return ""
    return f"{row[rate]:.1f} ± {row.get(se, float('nan')):.1f}"


def _lc_cell(row: dict) -> str:
    lc = row.get("length_controlled_winrate")
    return "" if lc is None or lc != lc else f"{lc:.1f}"  # absent or NaN


def duration_text(seconds: float) -> str:
    """'45 s', '15 min' or '2.3 h': an annotator time at a glance."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _labels_cell(row: dict) -> str:
    """'400', '400 ($2.10)' or '400 ($2.10, 15 min)': the labels a method used, with their simulated
    price and annotator time when there are any."""
    if row.get("labels") is None:
        return ""
    cost = [f"${row['label_price']:.2f}"] if row.get("label_price") else []
    cost += [duration_text(row["label_seconds"])] if row.get("label_seconds") else []
    return f"{row['labels']}" + (f" ({', '.join(cost)})" if cost else "")


def markdown_leaderboard(rows: Sequence[dict], facts: Mapping, notes: Sequence[str]) -> str:
    """The leaderboard as Markdown: a line saying what it is, the ranked methods, the reference
    and the noise warnings below."""
    methods, reference = split_reference(rows)
    columns = [c for c in COLUMNS if c in facts["columns"] and any(r.get(COLUMNS[c][0]) is not None for r in methods)]
    labels = any("labels" in r for r in methods)  # preference labels each method's training used
    head = ["generator", *(f"win-rate ({c})" for c in columns), "avg length", *(["labels"] if labels else [])]
    lines = [f"Win-rate (%) against the reference ± standard error on {facts['n_eval']} eval instructions; "
             f"scale {facts['scale']}, seed {facts['seed']}.", "",
             *(f"- {c}: {facts['columns'][c]}" for c in columns),
             *(["- labels: preference labels the method's training used (the pairs behind its reward model or "
                "its loss, or those it asked for itself), with their simulated price and annotator time"] if labels else []), "",
             "| rank | " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 1)]
    for rank, r in enumerate(methods, start=1):
        cells = [r["generator"], *(_cell(r, c) for c in columns), str(r.get("avg_length", ""))]
        if labels:
            cells.append(_labels_cell(r))
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    lines.append("")
    if reference is not None:
        lines.append(f"Not ranked: the reference (the eval set's own outputs, avg length "
                     f"{reference.get('avg_length', '?')}) is what every win-rate compares against: 50 by construction.")
    if notes:
        lines += ["", f"Differences within noise at this n ({facts['n_eval']} instructions, pool win-rate):"]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def ppo_curve_records(metrics: Sequence[dict], curve: Sequence[dict]) -> list[dict]:
    """PPO's logged metrics per step (`reward` = the reward-model score it maximises, `kl`,
    `kl_k3`) joined with the evaluated snapshots (`step` 0 = the SFT policy): win-rates and their
    standard errors as `<metric>` and `<metric>_se`."""
    records = [{**r, "reward": r.get("score")} for r in metrics if "step" in r]
    by_step = {p["step"]: p for p in curve}
    known = {r["step"] for r in records}  # snapshots without metrics: step 0, the SFT policy before PPO
    records += [{"step": s, "reward": None} for s in sorted(by_step) if s not in known]
    for r in records:
        point = by_step.get(r["step"])
        if point is None:
            continue
        for rate, se in COLUMNS.values():
            if point.get(rate) is not None:
                r[rate], r[f"{rate}_se"] = point[rate], point.get(se)
    return sorted(records, key=lambda r: r["step"])


def figure_titles(facts: Mapping) -> dict[str, str]:
    """The caption of each figure of the report (each one distinct)."""
    names = " / ".join(facts["columns"])
    return {
        "evaluators": f"Win-rate of each method against the reference by evaluator ({names}), ± 95% interval",
        "overoptimization": "PPO over training: proxy reward (reward model) beside gold and human win-rate",
        "kl": "PPO over training: KL from the SFT policy",
        "sim_vs_human": "Validation: methods ranked by simulated vs human feedback",
    }


def write_figures(folder: Path, rows: Sequence[dict], facts: Mapping, ppo_records: Sequence[dict],
                  validation: Mapping | None = None) -> dict[str, Path]:
    """The report's figures as PNG files in `folder`, by caption: win-rates by evaluator; with PPO's
    metrics, its over-optimization picture (once its snapshots are evaluated) and KL; with
    `validation` ({simulated, human, spearman, pearson}), the simulated-vs-human scatter."""
    from prefgym.evaluation import plots

    titles = figure_titles(facts)
    figures = {titles["evaluators"]: plots.save_figure(
        plots.evaluators_figure(rows, title="Win-rate against the reference by evaluator"), folder / "leaderboard.png")}
    if any(r.get("win_rate") is not None for r in ppo_records):  # PPO snapshots were evaluated
        figures[titles["overoptimization"]] = plots.plot_overoptimization(ppo_records, folder / "ppo_overoptimization.png")
    if any(r.get("kl") is not None or r.get("kl_k3") is not None for r in ppo_records):
        figures[titles["kl"]] = plots.save_figure(plots.kl_figure(ppo_records), folder / "ppo_kl.png")
    if validation is not None:
        caption = f"{titles['sim_vs_human']} (Spearman {validation['spearman']:.2f}, Pearson {validation['pearson']:.2f})"
        figures[caption] = plots.plot_sim_vs_human(validation["simulated"], validation["human"],
                                                   folder / "sim_vs_human.png", title="Simulated vs human win-rate")
    return figures


def render_html(rows: Sequence[dict], facts: Mapping, notes: Sequence[str], figures: Mapping[str, object],
                title: str = "prefgym run report") -> str:
    """The self-contained page (figures embedded) from `templates/report.html`."""
    import jinja2
    from markupsafe import Markup

    from prefgym.evaluation.plots import embed_figure

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    methods, reference = split_reference(rows)
    columns = [c for c in COLUMNS if c in facts["columns"]]
    return env.get_template("report.html").render(
        title=title, facts=facts, notes=notes, methods=methods, reference=reference, columns=columns,
        show_labels=any("labels" in r for r in methods), labels=_labels_cell,
        cell=_cell, lc=_lc_cell, figures=[(caption, Markup(embed_figure(fig, alt=caption))) for caption, fig in figures.items()])
