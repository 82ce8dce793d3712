"""Built-in world benchmarks: build time per scale (total and pretraining), pretraining tokens/s,
and the agreement numbers of the simulated humans and judges.

    python bench/bench_world.py                       # tiny and quick
    python bench/bench_world.py --scales tiny quick default --pairs 3000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from prefgym.world import SCALES, build_world, read_manifest
from prefgym.world.agreement import agreement_report


def bench_build(scale: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = build_world(Path(tmp) / "world", scale=scale, seed=seed)
        total = time.perf_counter() - t0
        stats = json.loads((out / "build_stats.json").read_text())
        manifest = read_manifest(out)
    pre = manifest["pretraining"]
    return {"scale": scale, "rows": sum(manifest["sizes"].values()), "eval": manifest["sizes"]["eval"],
            "params": pre["parameters"], "pretrain_tokens": pre["tokens"], "final_loss": pre["final_loss"],
            "pretrain_s": stats["pretraining_seconds"], "tokens_per_s": stats["pretraining_tokens_per_second"],
            "build_s": round(total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", default=["tiny", "quick"], choices=list(SCALES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=2000, help="policy-like pairs for the agreement numbers")
    args = parser.parse_args()

    print("1. World build time per scale (pretraining on 1 CPU thread)")
    rows = [bench_build(s, args.seed) for s in args.scales]
    cols = list(rows[0])
    print("  ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>15,}" if isinstance(r[c], int) else f"{r[c]:>15}" for c in cols))
    if len(rows) > 1:
        base = rows[0]
        print("ratio to", base["scale"], ": build", "  ".join(f"{r['scale']} x{r['build_s'] / base['build_s']:.1f}"
                                                             for r in rows[1:]))

    print(f"\n2. Agreement on {args.pairs} policy-like pairs (seed {args.seed})")
    t0 = time.perf_counter()
    rep = agreement_report(args.pairs, args.seed)
    print(f"{'annotator':>22}  {'agreement w/ human':>18}  {'variance':>8}")
    print(f"{'human (held-out)':>22}  {rep['human_human']:>18.3f}  {rep['human_variance']:>8.3f}")
    for name in ("pool", "pool_noisy", "greedy"):
        print(f"{name:>22}  {rep[name]['agreement']:>18.3f}  {rep[name]['variance']:>8.3f}")
    for name, r in rep["per_judge"].items():
        print(f"{name:>22}  {r['agreement']:>18.3f}  {r['variance']:>8.3f}")
    print(f"({time.perf_counter() - t0:.1f} s; standard error of each agreement ~{rep['pool']['agreement_se']:.3f})")


if __name__ == "__main__":
    main()
