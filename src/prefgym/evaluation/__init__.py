"""Evaluation: win-rate against a reference (± standard error), length-controlled win-rate,
leaderboards, paired tests, Elo / Bradley–Terry ratings, rank correlation, plots and reports.

Each name loads its module (pandas, scipy, matplotlib) on first use.
"""

from prefgym.lazy_exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "leaderboard": ["leaderboard_from_annotations", "read_leaderboard", "to_markdown", "write_leaderboard"],
    "length_control": ["length_controlled_win_rate"],
    "plots": ["plot_leaderboard", "plot_sim_vs_human", "plot_training_curves", "plot_overoptimization",
              "render_report_html"],
    "ratings": ["battles_from_annotations", "bootstrap_ratings", "bradley_terry_ratings", "elo_ratings",
                "load_battles", "ratings_table"],
    "stats": ["bootstrap_ci", "paired_comparison", "rank_correlation"],
    "winrate": ["evaluate", "evaluate_outputs", "gold_win_rate", "leaderboard_row", "load_annotations",
                "make_reference_pairs", "win_rate"],
})
