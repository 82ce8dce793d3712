"""Figures and the self-contained HTML report."""

from __future__ import annotations

import base64
import re

import pytest

from prefgym.errors import DataError
from prefgym.evaluation import plot_leaderboard, plot_sim_vs_human, plot_training_curves, render_report_html
from prefgym.io import append_jsonl

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [{"generator": "ppo", "win_rate": 55.0, "standard_error": 1.7, "n_wins": 10, "n_wins_base": 8, "n_draws": 2,
         "n_total": 20, "avg_length": 300, "length_controlled_winrate": 52.0},
        {"generator": "sft", "win_rate": 44.0, "standard_error": 1.6, "n_wins": 8, "n_wins_base": 11, "n_draws": 1,
         "n_total": 20, "avg_length": 200, "length_controlled_winrate": float("nan")}]


def test_figures_are_png_files(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    for step in range(5):
        append_jsonl(metrics, {"step": step, "reward": 0.1 * step, "kl": 0.5 * step})
    append_jsonl(metrics, {"step": 4, "win_rate": 51.0, "win_rate_se": 2.0})
    paths = [plot_leaderboard(ROWS, tmp_path / "lb.png"),
             plot_training_curves(metrics, tmp_path / "train.png"),
             plot_sim_vs_human({"a": 40, "b": 50, "c": 55}, {"a": 35, "b": 52, "c": 60, "d": 1}, tmp_path / "sim.png")]
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 2000


def test_training_curves_need_step(tmp_path):
    with pytest.raises(DataError, match="step"):
        plot_training_curves([{"reward": 1.0}], tmp_path / "x.png")


def test_report_html_is_self_contained(tmp_path):
    fig = plot_leaderboard(ROWS, tmp_path / "lb.png")
    out = render_report_html(ROWS, {"Leaderboard <chart>": fig}, tmp_path / "report.html", title="Run & report")
    page = out.read_text()
    assert "<title>Run &amp; report</title>" in page and "Leaderboard &lt;chart&gt;" in page
    assert page.index("<td>ppo</td>") < page.index("<td>sft</td>")  # sorted by win-rate
    (data,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert base64.b64decode(data) == fig.read_bytes()
    assert "src=\"http" not in page and "src='http" not in page
