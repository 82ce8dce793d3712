"""Evaluation against published AlpacaEval numbers: leaderboard rows, length-controlled win-rates,
and the time each takes.

    python bench/bench_eval.py [--data ../shared/data/alpaca_eval]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from prefgym.evaluation import leaderboard_from_annotations, leaderboard_row, length_controlled_win_rate, load_annotations

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval"
COLUMNS = ["win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "avg_length", "discrete_win_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n-bootstrap", type=int, default=200)
    args = parser.parse_args()

    print("1. AlpacaEval (GPT-4 judge) leaderboard rows from the annotations")
    published = pd.read_csv(args.data / "leaderboard_alpaca_eval_gpt4.csv", index_col=0)
    files = sorted(args.data.glob("*/annotations_alpaca_eval_gpt4.json"))
    start = time.perf_counter()
    ours = leaderboard_from_annotations(files, length_controlled=False)
    seconds = time.perf_counter() - start
    for name in ours.index:
        worst = max(abs(float(ours.loc[name, c]) - float(published.loc[name, c])) for c in COLUMNS)
        print(f"  {name:24s} win-rate {ours.loc[name, 'win_rate']:8.4f} (published {published.loc[name, 'win_rate']:8.4f})"
              f"  SE {ours.loc[name, 'standard_error']:.4f} ({published.loc[name, 'standard_error']:.4f})"
              f"  max |diff| over {len(COLUMNS)} columns {worst:.1e}")
    print(f"  {len(files)} files in {seconds:.2f} s")

    print("\n2. Length-controlled win-rate (GLM without AlpacaEval's instruction difficulties)")
    print(f"  {'annotations':58s} {'ours':>14s} {'published':>10s} {'raw':>7s}")
    cases = [(f, "leaderboard_alpaca_eval_gpt4.csv") for f in files]
    cases += [(f, "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv")
              for f in sorted(args.data.glob("*/annotations_weighted_alpaca_eval_gpt4_turbo.json"))]
    for path, board in cases:
        annotations = load_annotations(path)
        name = path.parent.name
        start = time.perf_counter()
        lc = length_controlled_win_rate(annotations, n_bootstrap=args.n_bootstrap)
        seconds = time.perf_counter() - start
        pub = pd.read_csv(args.data / board, index_col=0).loc[name, "length_controlled_winrate"]
        raw = leaderboard_row(annotations, length_controlled=False)["win_rate"]
        label = f"{name}/{path.name}"
        print(f"  {label:58s} {lc['length_controlled_winrate']:6.2f} ± {lc['lc_standard_error']:4.2f}"
              f" {pub:10.2f} {raw:7.2f}   (w_length {lc['weight_length']:+.2f}, {seconds:.2f} s)")


if __name__ == "__main__":
    main()
