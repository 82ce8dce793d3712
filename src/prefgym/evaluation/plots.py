"""Figures for reports (matplotlib, no display needed) and a self-contained HTML report page.

Each `plot_*` function writes a PNG (or SVG, from the suffix) and returns its path; the
`*_figure` functions return the matplotlib Figure for embedding.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from prefgym.errors import DataError  # noqa: E402
from prefgym.io import read_records, write_text_atomic  # noqa: E402


def _as_frame(rows) -> pd.DataFrame:
    """Leaderboard rows as a DataFrame indexed by generator (from a DataFrame, a dict name -> row, or a list of rows)."""
    if isinstance(rows, pd.DataFrame):
        return rows
    if isinstance(rows, Mapping):
        return pd.DataFrame.from_dict(rows, orient="index")
    df = pd.DataFrame(list(rows))
    return df.set_index("generator") if "generator" in df.columns else df


def save_figure(fig, out_path) -> Path:
    """Write a Figure (PNG, or SVG from the suffix) and close it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_path


def leaderboard_figure(rows, metric: str = "win_rate", error: str = "standard_error", title: str | None = None):
    """Horizontal bars of `metric` per generator with ±1.96 SE error bars (95% interval), best on top."""
    df = _as_frame(rows).sort_values(metric)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(df) + 1.5))
    xerr = 1.96 * df[error].fillna(0) if error in df.columns else None
    ax.barh([str(i) for i in df.index], df[metric], xerr=xerr, capsize=3, color="#4C72B0")
    if metric.endswith("win_rate") or metric.endswith("winrate"):
        ax.axvline(50, color="grey", lw=0.8, ls="--")
        ax.set_xlim(0, 100)
    ax.set_xlabel(f"{metric.replace('_', ' ')} (%) ± 95% interval")
    ax.set_title(title or "Win-rate against the reference")
    fig.tight_layout()
    return fig


def plot_leaderboard(rows, out_path: str | os.PathLike, metric: str = "win_rate", error: str = "standard_error",
                     title: str | None = None) -> Path:
    """Leaderboard bar chart with error bars, written to `out_path`."""
    return save_figure(leaderboard_figure(rows, metric, error, title), out_path)


def plot_training_curves(metrics: str | os.PathLike | Sequence[dict], out_path: str | os.PathLike,
                         title: str | None = None) -> Path:
    """Reward, KL and (where logged) win-rate against training step, one panel each.

    `metrics`: a metrics JSONL (or its records) with `step` and any of `reward`, `kl`, `win_rate`
    (eval points may be rows with only `step` and `win_rate`).
    """
    records = read_records(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    df = pd.DataFrame(records)
    if "step" not in df.columns:
        raise DataError("training metrics need a 'step' field", path=metrics if isinstance(metrics, (str, os.PathLike)) else None)
    panels = [c for c in ("reward", "kl", "win_rate") if c in df.columns and df[c].notna().any()]
    if not panels:
        raise DataError("training metrics have none of reward, kl, win_rate to plot")
    labels = {"reward": "reward", "kl": "KL to reference\n(sample estimate)", "win_rate": "win-rate (%)"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, col in zip(axes[:, 0], panels):
        d = df[["step", col]].dropna()
        ax.plot(d["step"], d[col], marker="o" if col == "win_rate" else None, ms=4)
        err = f"{col}_se" if col == "win_rate" else None
        if err and err in df.columns:
            e = df.loc[d.index, err].fillna(0)
            ax.fill_between(d["step"], d[col] - 1.96 * e, d[col] + 1.96 * e, alpha=0.2)
        ax.set_ylabel(labels[col])
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title or "Training")
    fig.tight_layout()
    return save_figure(fig, out_path)


# (metric, its standard error, legend label, colour) of each evaluator's win-rate column
EVALUATOR_COLUMNS = [("win_rate", "standard_error", "pool", "#4C72B0"),
                     ("human_win_rate", "human_standard_error", "humans", "#DD8452"),
                     ("gold_win_rate", "gold_standard_error", "gold", "#55A868")]


def evaluators_figure(rows, labels: Mapping[str, str] | None = None, title: str | None = None):
    """Grouped horizontal bars: each method's win-rate by every evaluator present (pool, humans,
    gold), ± 95% interval, best (by the first evaluator) on top; the reference is the 50% line."""
    df = _as_frame(rows)
    df = df.drop(index="reference", errors="ignore").sort_values("win_rate")
    columns = [c for c in EVALUATOR_COLUMNS if c[0] in df.columns and df[c[0]].notna().any()]
    fig, ax = plt.subplots(figsize=(7.5, 0.22 * len(df) * max(1, len(columns)) + 1.5))
    height = 0.8 / len(columns)
    for k, (metric, error, label, colour) in enumerate(columns):
        ys = [i + ((len(columns) - 1) / 2 - k) * height for i in range(len(df))]  # first evaluator on top
        xerr = 1.96 * df[error].fillna(0) if error in df.columns else None
        ax.barh(ys, df[metric], height=height, xerr=xerr, capsize=2, color=colour,
                label=(labels or {}).get(label, label))
    ax.set_yticks(range(len(df)), [str(i) for i in df.index])
    ax.set_xlim(0, 100)
    reference = ax.axvline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("win-rate against the reference (%) ± 95% interval")
    handles, names = ax.get_legend_handles_labels()  # evaluators top-down as their bars, then the reference
    ax.legend(handles + [reference], names + ["reference (50%)"], loc="lower right", fontsize=8)
    ax.set_title(title or "Win-rate of each method by evaluator")
    fig.tight_layout()
    return fig


def overoptimization_figure(records: Sequence[dict], title: str | None = None):
    """PPO over training, side by side: the proxy reward it maximises (reward-model score) and the
    win-rates against the reference that it is meant to raise (gold, humans, pool; ± 95% interval).

    `records`: rows with `step` and any of `reward`, `win_rate`, `human_win_rate`, `gold_win_rate`
    (with `*_se` standard errors), as `Pipeline._ppo_curve_records` returns.
    """
    df = pd.DataFrame(list(records))
    if "step" not in df.columns:
        raise DataError("PPO curve records need a 'step' field")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    if "reward" in df.columns and df["reward"].notna().any():
        d = df[["step", "reward"]].dropna()
        left.plot(d["step"], d["reward"], color="#8172B3")
    left.set_title("proxy: reward-model score")
    left.set_ylabel("mean score of sampled responses")
    for metric, _, label, colour in reversed(EVALUATOR_COLUMNS):
        if metric not in df.columns or not df[metric].notna().any():
            continue
        d = df[["step", metric] + ([f"{metric}_se"] if f"{metric}_se" in df.columns else [])].dropna(subset=[metric])
        right.plot(d["step"], d[metric], marker="o", ms=4, color=colour, label=label)
        if f"{metric}_se" in d.columns:
            e = 1.96 * d[f"{metric}_se"].fillna(0)
            right.fill_between(d["step"], d[metric] - e, d[metric] + e, color=colour, alpha=0.15)
    right.axhline(50, color="grey", lw=0.8, ls="--", label="reference")
    right.set_title("true objective: win-rate against the reference")
    right.set_ylabel("win-rate (%)")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for ax in (left, right):
        ax.set_xlabel("PPO step (0 = SFT policy)")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "PPO: proxy reward vs win-rate over training")
    fig.tight_layout()
    return fig


def kl_figure(records: Sequence[dict], title: str | None = None):
    """KL(policy ‖ SFT) per response over PPO training: the k3 estimate (non-negative) where
    logged as `kl_k3`, else the logged `kl`, labelled as the k1 sample estimate it is."""
    df = pd.DataFrame(list(records))
    column = "kl_k3" if "kl_k3" in df.columns and df["kl_k3"].notna().any() else "kl"
    if column not in df.columns or not df[column].notna().any():
        raise DataError("PPO metrics have no KL to plot")
    d = df[["step", column]].dropna()
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.plot(d["step"], d[column], color="#C44E52")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("PPO step")
    ax.set_ylabel(KL_LABELS[column])
    ax.set_title(title or "PPO: KL from the SFT policy over training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_overoptimization(records: Sequence[dict], out_path: str | os.PathLike, title: str | None = None) -> Path:
    """`overoptimization_figure`, written to `out_path`."""
    return save_figure(overoptimization_figure(records, title), out_path)


KL_LABELS = {"kl_k3": "KL, k3 estimate\n(non-negative)",
             "kl": "KL, k1 sample estimate\n(Σ log π/π_ref; can dip below 0)"}


def plot_sim_vs_human(simulated: Mapping[str, float], human: Mapping[str, float], out_path: str | os.PathLike,
                      title: str | None = None) -> Path:
    """Scatter of simulated vs human win-rate per method, labelled, with Spearman/Pearson in the title."""
    from prefgym.evaluation.stats import rank_correlation

    names = [k for k in simulated if k in human]
    if not names:
        raise DataError("no method has both a simulated and a human win-rate")
    xs, ys = [human[k] for k in names], [simulated[k] for k in names]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(xs, ys, color="#C44E52")
    for n, x, y in zip(names, xs, ys):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    lo, hi = min(xs + ys) - 5, max(xs + ys) + 5
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("human win-rate (%)")
    ax.set_ylabel("simulated win-rate (%)")
    head = title or "Simulated vs human"
    if len(names) >= 3:
        c = rank_correlation(xs, ys)
        head += f"\nSpearman {c['spearman']:.2f}, Pearson {c['pearson']:.2f} (n={c['n']})"
    ax.set_title(head)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_path)


def embed_figure(figure, alt: str = "figure") -> str:
    """An <img> (PNG, base64) or inline <svg> for a Figure or an image file."""
    if isinstance(figure, (str, os.PathLike)):
        path = Path(figure)
        if path.suffix.lower() == ".svg":
            return path.read_text(encoding="utf-8")
        data = path.read_bytes()
    else:
        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        data = buf.getvalue()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


_STYLE = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:nth-child(2){text-align:left}img,svg{max-width:100%;height:auto}"""


def render_report_html_text(leaderboard_rows, figures: Mapping[str, object] | Sequence = (), title: str = "prefgym report") -> str:
    """The HTML text of `render_report_html`."""
    from prefgym.evaluation.leaderboard import sort_leaderboard, to_html_table

    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if leaderboard_rows is not None and len(leaderboard_rows):
        parts += ["<h2>Leaderboard</h2>", to_html_table(sort_leaderboard(_as_frame(leaderboard_rows)))]
    items = figures.items() if isinstance(figures, Mapping) else ((Path(f).stem, f) for f in figures)
    for caption, fig in items:
        parts.append(f"<figure><figcaption><h2>{html.escape(str(caption))}</h2></figcaption>{embed_figure(fig)}</figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_report_html(leaderboard_rows, figures: Mapping[str, object] | Sequence, out_path: str | os.PathLike,
                       title: str = "prefgym report") -> Path:
    """A self-contained HTML page: the leaderboard table and the figures, images embedded.

    leaderboard_rows: a leaderboard DataFrame, a dict generator -> row, or rows with `generator`.
    figures: caption -> figure (a PNG/SVG path or a matplotlib Figure), or a list of paths.
    """
    out_path = Path(out_path)
    write_text_atomic(out_path, render_report_html_text(leaderboard_rows, figures, title))
    return out_path
