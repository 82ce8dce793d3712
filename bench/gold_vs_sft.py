"""Paired gold win-rate differences from SFT, over the same eval instructions, for a finished run.

    python bench/gold_vs_sft.py prefgym-runs/default

Each method's and SFT's outputs are scored by the world's gold quality against the reference
(win 1, draw 0.5, loss 0); prints the mean difference (points) and a 95% bootstrap interval.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from prefgym.world.gold import gold_quality


def gold_wins(outputs: list[dict], reference: dict) -> dict:
    out = {}
    for o in outputs:
        key = (o["instruction"], o.get("input") or "")
        mine, theirs = gold_quality(*key, o["output"]), gold_quality(*key, reference[key])
        out[key] = 1.0 if mine > theirs + 1e-9 else 0.0 if mine < theirs - 1e-9 else 0.5
    return out


def main(run: Path) -> None:
    reference = {(r["instruction"], r.get("input") or ""): r["output"]
                 for r in json.loads((run / "world" / "data" / "eval.json").read_text())}
    evals = run / "sim" / "eval"
    sft = gold_wins(json.loads((evals / "sft" / "model_outputs.json").read_text()), reference)
    rng = np.random.default_rng(0)
    for folder in sorted(p for p in evals.iterdir() if (p / "model_outputs.json").exists() and p.name != "sft"):
        wins = gold_wins(json.loads((folder / "model_outputs.json").read_text()), reference)
        diff = 100 * np.array([wins[k] - sft[k] for k in sorted(set(wins) & set(sft))])
        boot = [rng.choice(diff, len(diff)).mean() for _ in range(2000)]
        print(f"{folder.name:20s} {diff.mean():+5.1f}  [{np.percentile(boot, 2.5):+.1f}, "
              f"{np.percentile(boot, 97.5):+.1f}]  n={len(diff)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "prefgym-runs/default"))
