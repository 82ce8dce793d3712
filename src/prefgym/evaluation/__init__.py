"""Evaluation: win-rate against a reference (± standard error), length-controlled win-rate,
leaderboards, paired tests, Elo / Bradley–Terry ratings, rank correlation, plots and reports."""

from prefgym.evaluation.leaderboard import leaderboard_from_annotations, read_leaderboard, to_markdown, write_leaderboard
from prefgym.evaluation.length_control import length_controlled_win_rate
from prefgym.evaluation.plots import plot_leaderboard, plot_sim_vs_human, plot_training_curves, render_report_html
from prefgym.evaluation.ratings import (
    battles_from_annotations,
    bootstrap_ratings,
    bradley_terry_ratings,
    elo_ratings,
    load_battles,
    ratings_table,
)
from prefgym.evaluation.stats import bootstrap_ci, paired_comparison, rank_correlation
from prefgym.evaluation.winrate import (
    evaluate,
    evaluate_outputs,
    gold_win_rate,
    leaderboard_row,
    load_annotations,
    make_reference_pairs,
    win_rate,
)

__all__ = [
    "win_rate", "leaderboard_row", "load_annotations", "make_reference_pairs", "evaluate_outputs", "evaluate",
    "gold_win_rate", "length_controlled_win_rate", "leaderboard_from_annotations", "read_leaderboard",
    "write_leaderboard", "to_markdown", "bootstrap_ci", "paired_comparison", "rank_correlation",
    "battles_from_annotations", "elo_ratings", "bradley_terry_ratings", "bootstrap_ratings", "ratings_table", "load_battles",
    "plot_leaderboard", "plot_training_curves", "plot_sim_vs_human", "render_report_html",
]
