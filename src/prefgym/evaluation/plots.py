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


def _save(fig, out_path) -> Path:
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
    return _save(leaderboard_figure(rows, metric, error, title), out_path)


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
    labels = {"reward": "reward", "kl": "KL(policy || reference)", "win_rate": "win-rate (%)"}
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
    return _save(fig, out_path)


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
    return _save(fig, out_path)


def _embed(figure) -> str:
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
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


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
        parts.append(f"<figure><figcaption><h2>{html.escape(str(caption))}</h2></figcaption>{_embed(fig)}</figure>")
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
