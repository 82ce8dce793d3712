"""`prefgym study feedback-budget`: how many preference labels each method needs.

Per seed, one world and one SFT policy (`OUT/seed-<s>/`), and one large pool of annotated
preference pairs (the pipeline's stages, with more samples and pairs per instruction than the
default run so that the largest budget fits). Then, for each budget b, a random subset of b
labels, nested (the 500-label set holds the 250-label set), and on it the default run's reward
model, PPO, best-of-n (on that reward model) and DPO, each evaluated like the default run: pool,
simulated humans and gold win-rate against the reference, with standard errors. SFT is the
0-label point. Every stage is a pipeline `Stage` with a fingerprint, so a rerun resumes, and
adding a budget adds only its stages.

Writes OUT/study.json, OUT/figures/feedback_budget.png (win-rate against labels, one panel per
evaluator) and OUT/report.html; prints the table and the stage times.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from prefgym.errors import ConfigError
from prefgym.evaluation.report import COLUMNS as report_columns

METHODS = ("ppo", "best_of_n", "dpo")
"""The methods of the study: reward model + PPO, best-of-n on the reward model, DPO."""

BUDGETS = {"default": (250, 500, 1000, 2000, 4000), "tiny": (40, 80)}
"""Labels per budget, by scale ('tiny' is `--quick`)."""

POOL_SETTINGS = {"default": {"num_samples": 10, "pairs_per_instruction": 5}, "tiny": {}}
"""Preference-data settings of the label pool, over the scale's (default: 5 disjoint pairs of 10
samples per instruction, 9,312 labels from the 2,000 `preference` instructions at seed 0, against
the default run's 2 pairs of 4 samples, 3,852 labels). Tiny keeps quick's one pair per instruction."""

EVALUATORS = report_columns
"""Evaluator (pool, humans, gold) -> its win-rate and standard-error fields in the evaluation rows."""


@dataclass
class BudgetStudyConfig:
    """What `prefgym study feedback-budget` runs."""

    out_dir: str = "prefgym-runs/feedback-budget"
    """Study folder: one run folder per seed (seed-<s>/), study.json, figures/, report.html."""
    scale: str = "default"
    """World scale: 'default', or 'tiny' (`--quick`: a smoke test in 1–2 minutes)."""
    budgets: list[int] = field(default_factory=lambda: list(BUDGETS["default"]))
    """Preference labels per budget (each smaller budget's labels are part of every larger one's)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One world, SFT policy and label pool per seed; the subsets are drawn with the same seed."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods trained at every budget (each must learn from the pairs file, directly or through the reward model)."""


# --- nested subsets of labels ---------------------------------------------------------------------
def labelled_rows(pairs: list[dict]) -> list[int]:
    """Indices of the pairs that carry a label (`preference` not null): what a budget counts."""
    return [i for i, r in enumerate(pairs) if r.get("preference") is not None]


def nested_subsets(n_labels: int, budgets: list[int], seed: int, where: str = "the preference pairs") -> dict[int, list[int]]:
    """Budget -> sorted positions (in 0..n_labels-1) of its labels: the first b of one seeded
    permutation, so each smaller budget's set lies inside every larger one's."""
    import numpy as np

    too_many = [b for b in budgets if b > n_labels]
    if too_many:
        raise ConfigError(f"budget {max(too_many)} labels is more than the {n_labels} labels in {where}; "
                          f"choose budgets of at most {n_labels}")
    order = np.random.default_rng(seed).permutation(n_labels)
    return {b: sorted(order[:b].tolist()) for b in budgets}


def write_subset(pairs_file: str | Path, out_file: str | Path, budget: int, budgets: list[int], seed: int) -> None:
    """Write the `budget`-label subset of `pairs_file` (in its original order) to `out_file`."""
    from prefgym.io import read_records, write_json

    pairs = read_records(pairs_file)
    labelled = labelled_rows(pairs)
    chosen = nested_subsets(len(labelled), budgets, seed, where=str(pairs_file))[budget]
    write_json(out_file, [pairs[labelled[i]] for i in chosen])


def check_budgets(pairs_file: str | Path, budgets: list[int]) -> int:
    """The number of labels in `pairs_file`; ConfigError naming both numbers when a budget exceeds it."""
    from prefgym.io import read_records

    n_labels = len(labelled_rows(read_records(pairs_file)))
    nested_subsets(n_labels, budgets, seed=0, where=str(pairs_file))
    return n_labels


def check_config(cfg: BudgetStudyConfig) -> BudgetStudyConfig:
    """Budgets positive and distinct (sorted), seeds distinct, methods that learn from the pairs file."""
    from prefgym.methods import registry

    if not cfg.budgets or any(b <= 0 for b in cfg.budgets) or len(set(cfg.budgets)) < len(cfg.budgets):
        raise ConfigError(f"--budgets: give distinct positive numbers of labels, e.g. 250,500,1000; got {cfg.budgets}")
    if not cfg.seeds or len(set(cfg.seeds)) < len(cfg.seeds):
        raise ConfigError(f"--seeds: give distinct seeds, e.g. 0,1; got {cfg.seeds}")
    for name in cfg.methods:
        if name not in registry.METHODS:
            raise ConfigError(f"--methods: unknown method '{name}'; choose from {', '.join(registry.METHODS)}")
        if registry.spec(name).labels != "pairs":  # 'own', 'none', or decided by its config
            raise ConfigError(f"--methods: {name} does not learn from the run's preference pairs alone; "
                              f"the study varies only those (choose from methods such as {', '.join(METHODS)})")
    cfg.budgets = sorted(cfg.budgets)
    return cfg


# --- the stages of one seed ------------------------------------------------------------------------
def seed_pipeline(cfg: BudgetStudyConfig, seed: int):
    """The pipeline of one seed's run folder, its preference data made large enough for the budgets."""
    from prefgym.pipeline import Pipeline, load_run_config

    run = load_run_config(None, out_dir=str(Path(cfg.out_dir) / f"seed-{seed}"), scale=cfg.scale, seed=seed,
                          methods=list(cfg.methods), stages={"preference_data": POOL_SETTINGS[cfg.scale]})
    return Pipeline(run)


def eval_pools(p) -> dict[str, str]:
    pools = {"pool": p.cfg.eval_annotators}
    if p.cfg.human_annotators:
        pools["human"] = p.cfg.human_annotators
    return pools


def evaluate_stage(p, tag: str, generators: tuple[str, ...], after: tuple[str, ...]):
    """The stage judging `generators` of `tag` like the run's evaluation (same annotators, decoding, data)."""
    from prefgym.pipeline import Stage

    pools, fp = eval_pools(p), p.fingerprint_settings
    settings = {"annotators": pools, "sampling": fp(p.sampling()), "eval_data": fp({"split": p.split("eval")})["split"],
                "gold": p.has_gold, "generators": list(generators)}
    return Stage(f"{tag}/evaluate", lambda: p.evaluate(tag, pools, generators), 3, settings=settings, after=after)


def budget_stages(p, budget: int, budgets: list[int]) -> list:
    """Subset → reward model → each method → evaluation, in `budget-<b>/` of the seed's folder."""
    from prefgym.methods.reward_model import train as reward_model
    from prefgym.methods import registry
    from prefgym.pipeline import Stage

    tag, seed, fp = f"budget-{budget}", p.cfg.seed, p.fingerprint_settings
    pool_file, subset_file = p.pairs_file("sim"), p.pairs_file(tag)
    rm = p.reward_model_config(tag)
    stages = [Stage(f"{tag}/preference_data", lambda: write_subset(pool_file, subset_file, budget, budgets, seed), 0.1,
                    settings={"budget": budget, "seed": seed}, after=("sim/preference_data",),
                    outputs=(Path(subset_file).parent,)),
              Stage(f"{tag}/reward_model", lambda: reward_model(rm), 1, settings=fp(rm),
                    after=("sft", f"{tag}/preference_data"), outputs=(p.out / tag / "reward_model",))]
    for name in p.cfg.methods:
        method = p.method_config(name, tag)
        stages.append(Stage(f"{tag}/{name}", lambda n=name, c=method: p.train_method(n, c), registry.spec(name).weight,
                            settings=fp(method), after=("sft", f"{tag}/preference_data", f"{tag}/reward_model"),
                            outputs=(p.method_dir(name, tag),)))
    stages.append(evaluate_stage(p, tag, tuple(p.cfg.methods), after=("sft", *[f"{tag}/{m}" for m in p.cfg.methods])))
    return stages


def seed_stages(p, budgets: list[int]) -> tuple[list, list]:
    """(the shared stages: world, SFT, label pool, SFT's evaluation; every budget's stages)."""
    shared = [s for s in p.stages() if s.name in ("world", "sft", "sim/preference_data")]
    shared.append(evaluate_stage(p, "budget-0", ("sft",), after=("sft",)))
    return shared, [s for b in budgets for s in budget_stages(p, b, budgets)]


def run_seed(cfg: BudgetStudyConfig, seed: int, overwrite: bool) -> dict[str, float]:
    """Run (or resume) one seed's stages; the budgets are checked against the label pool before any trains."""
    from prefgym.pipeline import plan_stages, run_stages

    p = seed_pipeline(cfg, seed)
    shared, budgets = seed_stages(p, cfg.budgets)
    plan_stages(shared + budgets, p.out, overwrite)  # settings changed: stop before anything runs
    p.out.mkdir(parents=True, exist_ok=True)
    run_stages(shared, p.out, overwrite=overwrite)
    check_budgets(p.pairs_file("sim"), cfg.budgets)
    return run_stages(shared + budgets, p.out, overwrite=overwrite)


# --- results --------------------------------------------------------------------------------------
def seed_points(cfg: BudgetStudyConfig, seed: int) -> list[dict]:
    """One point per (budget, method) of a seed, SFT as budget 0: labels, price, seconds, win-rates ± SE."""
    p = seed_pipeline(cfg, seed)
    points = []
    for budget in (0, *cfg.budgets):
        tag = f"budget-{budget}"
        for row in json.loads((p.out / tag / "eval" / "results.json").read_text()):
            used = p.labels_used(row["generator"], tag)
            point = {"seed": seed, "budget": budget, "method": row["generator"], **used}
            for rate, se in EVALUATORS.values():
                point.update({rate: row.get(rate), se: row.get(se)})
            points.append(point)
    return points


def summarise(points: list[dict]) -> list[dict]:
    """Mean over seeds per (budget, method); the standard error of the mean of k independent
    evaluations is sqrt(Σ SE²) / k (evaluation noise; the seeds' spread is in the points)."""
    import math

    groups: dict[tuple[int, str], list[dict]] = {}
    for point in points:
        groups.setdefault((point["budget"], point["method"]), []).append(point)
    summary = []
    for (budget, method), group in groups.items():  # budgets ascending, methods in the run's order
        k = len(group)
        row = {"budget": budget, "method": method, "seeds": k,
               **{key: sum(g[key] or 0 for g in group) / k for key in ("labels", "label_price", "label_seconds")}}
        for rate, se in EVALUATORS.values():
            if all(g.get(rate) is not None for g in group):
                row[rate] = sum(g[rate] for g in group) / k
                row[se] = math.sqrt(sum(g[se] ** 2 for g in group)) / k
        summary.append(row)
    return summary


def markdown_table(summary: list[dict]) -> str:
    """labels | price | annotator time | method | win-rate per evaluator (± SE)."""
    from prefgym.evaluation.report import duration_text

    shown = [e for e, (rate, _) in EVALUATORS.items() if any(r.get(rate) is not None for r in summary)]
    lines = ["| labels | price | annotator time | method | " + " | ".join(f"win-rate ({e})" for e in shown) + " |",
             "|---:|---:|---:|---|" + "---:|" * len(shown)]
    for r in summary:
        cells = [str(round(r["labels"])), f"${r['label_price']:.2f}", duration_text(r["label_seconds"]), r["method"]]
        cells += [f"{r[EVALUATORS[e][0]]:.1f} ± {r[EVALUATORS[e][1]]:.1f}" if r.get(EVALUATORS[e][0]) is not None
                  else "" for e in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def budget_figure(summary: list[dict]):
    """Win-rate against labels (log x), one panel per evaluator, one line per method ± 95% interval;
    SFT (0 labels) as a dashed line with its band; x ticks also give the simulated $ and annotator time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefgym.evaluation.report import duration_text

    shown = [(e, rate, se) for e, (rate, se) in EVALUATORS.items() if any(r.get(rate) is not None for r in summary)]
    trained = [r for r in summary if r["budget"] > 0]
    budgets = sorted({r["budget"] for r in trained})
    cost = {r["budget"]: r for r in trained}
    ticks = [f"{b}\n${cost[b]['label_price']:.2f}\n{duration_text(cost[b]['label_seconds'])}" for b in budgets]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 4.2), squeeze=False)
    for ax, (evaluator, rate, se) in zip(axes[0], shown):
        for r in (r for r in summary if r["budget"] == 0 and r.get(rate) is not None):
            ax.axhline(r[rate], color="grey", ls="--", lw=1, label="sft (0 labels; band ± 95%)")
            ax.axhspan(r[rate] - 1.96 * r[se], r[rate] + 1.96 * r[se], color="grey", alpha=0.12)
        methods = list(dict.fromkeys(r["method"] for r in trained))
        for i, method in enumerate(methods):
            rows = sorted((r for r in trained if r["method"] == method and r.get(rate) is not None),
                          key=lambda r: r["budget"])
            shift = 1.05 ** (i - (len(methods) - 1) / 2)  # side by side, so that the error bars do not hide each other
            ax.errorbar([r["labels"] * shift for r in rows], [r[rate] for r in rows],
                        yerr=[1.96 * r[se] for r in rows], marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xticks(budgets, ticks, fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("preference labels (simulated $, annotator time)")
        ax.set_ylabel(f"win-rate vs reference ({evaluator}) %, ± 95%")
        ax.set_title(evaluator)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    fig.suptitle("Win-rate against the number of preference labels")
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the panels
    return fig


def report_html(summary: list[dict], facts: dict, figure_path: Path) -> str:
    """A self-contained page: what the study is, the table, the figure (embedded), stage times."""
    import html

    from prefgym.evaluation.plots import embed_figure

    table = markdown_table(summary).splitlines()
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table[0].strip("|").split("|"))
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|"))
                     + "</tr>" for line in table[2:])
    facts_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items()
                         if k != "stage_times")
    times = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in facts["stage_times"].items())
    caption = "Win-rate against the number of preference labels, ± 95% interval"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>prefgym feedback-budget study</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f4f4f4}}dl{{display:grid;grid-template-columns:max-content auto;gap:2px 1em}}dt{{font-weight:600}}
dd{{margin:0}}img{{max-width:100%;height:auto}}</style></head><body>
<h1>prefgym feedback-budget study</h1>
<dl id="facts">{facts_html}</dl>
<h2>Win-rate against the reference (%) ± standard error</h2>
<table id="budget-table"><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<figure><figcaption><h2>{caption}</h2></figcaption>{embed_figure(figure_path, alt=caption)}</figure>
<h2>Stage times (seconds)</h2>
<table id="stage-times"><thead><tr><th>stage</th><th>seconds</th></tr></thead><tbody>{times}</tbody></table>
</body></html>
"""


def write_outputs(cfg: BudgetStudyConfig, stage_times: dict[str, float], wall_seconds: float) -> dict:
    """study.json, figures/feedback_budget.png and report.html from every seed's evaluation."""
    from prefgym.evaluation.plots import save_figure
    from prefgym.evaluation.report import describe_annotators
    from prefgym.io import write_json, write_text_atomic

    out = Path(cfg.out_dir)
    points = [pt for seed in cfg.seeds for pt in seed_points(cfg, seed)]
    summary = summarise(points)
    p = seed_pipeline(cfg, cfg.seeds[0])
    facts = {"data": "the built-in world (synthetic)", "scale": cfg.scale, "seeds": ", ".join(map(str, cfg.seeds)),
             "budgets": ", ".join(map(str, cfg.budgets)), "methods": ", ".join(cfg.methods),
             "training feedback": describe_annotators(p.cfg.train_annotators),
             "eval instructions": len(p.records("eval")),
             "column pool": describe_annotators(p.cfg.eval_annotators),
             "column humans": describe_annotators(p.cfg.human_annotators),
             "column gold": "the built-in world's gold quality (its programmatic ground truth)",
             "stage times, total": f"{sum(stage_times.values()) / 60:.1f} min (every stage, also those of earlier invocations)",
             "wall time (this invocation)": f"{wall_seconds:.0f} s", "stage_times": stage_times}
    figure = save_figure(budget_figure(summary), out / "figures" / "feedback_budget.png")
    study = {"config": {**cfg.__dict__, "pool_settings": POOL_SETTINGS[cfg.scale]}, "facts": facts,
             "summary": summary, "points": points}
    write_json(out / "study.json", study)
    write_text_atomic(out / "report.html", report_html(summary, facts, figure))
    return study


def run_study(cfg: BudgetStudyConfig, overwrite: bool = False) -> dict:
    """Every seed's stages (resumable), then the study's files; returns study.json's content."""
    cfg = check_config(cfg)
    t0 = time.time()
    times: dict[str, float] = {}
    for seed in cfg.seeds:
        times.update({f"seed-{seed}/{k}": v for k, v in run_seed(cfg, seed, overwrite).items()})
    return write_outputs(cfg, times, time.time() - t0)


def add_commands(app: typer.Typer) -> None:
    @app.command("feedback-budget")
    def feedback_budget_command(
        out: Path = typer.Option(None, "--out", help="Study folder (default prefgym-runs/feedback-budget[-quick])."),
        budgets: str = typer.Option(None, help="Comma-separated numbers of labels (default 250,500,1000,2000,4000)."),
        seeds: str = typer.Option("0", help="Comma-separated seeds: one world, SFT and label pool each."),
        methods: str = typer.Option(",".join(METHODS), help="Comma-separated methods trained at every budget."),
        quick: bool = typer.Option(False, "--quick", help="A smoke test: tiny world, budgets 40,80 (1–2 minutes)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo stages made with other settings."),
    ) -> None:
        """Win-rate against the number of preference labels for reward model + PPO, best-of-n and DPO.

        Per seed: world, SFT and a pool of annotated pairs (OUT/seed-<s>/), then per budget a nested
        random subset of that many labels and the methods trained on it (OUT/seed-<s>/budget-<b>/),
        evaluated by the pool, the simulated humans and gold; SFT is the 0-label point. Writes
        OUT/study.json, OUT/figures/feedback_budget.png and OUT/report.html; prints the table with
        each budget's simulated price and annotator time. Rerunning resumes.
        """
        from prefgym.pipeline import parse_numbers, parse_seeds

        scale = "tiny" if quick else "default"
        cfg = BudgetStudyConfig(out_dir=str(out or f"prefgym-runs/feedback-budget{'-quick' if quick else ''}"),
                                scale=scale, budgets=parse_numbers(budgets, "--budgets", int) if budgets else list(BUDGETS[scale]),
                                seeds=parse_seeds(seeds),
                                methods=[m.strip() for m in methods.split(",") if m.strip()])
        study = run_study(cfg, overwrite=overwrite)
        typer.echo(markdown_table(study["summary"]))
        folder = Path(cfg.out_dir)
        typer.echo(f"wrote {folder / 'study.json'}, {folder / 'figures' / 'feedback_budget.png'}, "
                   f"{folder / 'report.html'} ({study['facts']['wall time (this invocation)']})")
