"""Built-in world benchmarks: build time per scale (total and pretraining), pretraining tokens/s,
the agreement numbers of the simulated humans and judges, and how much room the world leaves:
gold quality and pool win-rate against the reference of the base model, of SFT, and of an
oracle best-of-4 of the SFT samples.

    python bench/bench_world.py                       # tiny and quick
    python bench/bench_world.py --scales tiny quick default --pairs 3000 --headroom quick
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from prefgym.world import SCALES, build_world, load_split, read_manifest
from prefgym.world.agreement import agreement_report
from prefgym.world.gold import gold_components
from prefgym.world.judges import POOL, WORLD_JUDGES, world_judge_prob


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


def headroom(scale: str, seed: int, sft_epochs: int, sft_lr: float) -> list[dict]:
    """Base model, SFT, oracle best-of-4 (by gold) of SFT samples, and the reference, on val+eval."""
    import torch

    from prefgym.methods.sft import SFTConfig, train_sft
    from prefgym.models.generation import SamplingConfig, generate_outputs

    torch.set_num_threads(1)  # tiny models: one thread is fastest, most of all on a busy machine
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp) / "world", scale=scale, seed=seed)
        rows = load_split(world, "val") + load_split(world, "eval")
        t0 = time.perf_counter()
        sft = train_sft(SFTConfig(model_name_or_path=str(world / "base_model"), train_file=str(world / "data"),
                                  split="sft", output_dir=str(Path(tmp) / "sft"), epochs=sft_epochs, lr=sft_lr,
                                  per_device_batch_size=16, max_length=256, progress=False, seed=seed))
        sft_s = time.perf_counter() - t0
        sample = SamplingConfig(temperature=0.7, max_new_tokens=40, num_samples=4, batch_size=32, seed=seed)
        base = [o["output"] for o in generate_outputs(world / "base_model", rows, sample)]
        outs = generate_outputs(sft, rows, sample)
        reference = [r["output"] for r in load_split(world, "eval")]
    gold = lambda r, o: gold_components(r["instruction"], r["input"], o)  # noqa: E731
    best = [max(o["outputs"], key=lambda x: gold(r, x)["quality"]) for r, o in zip(rows, outs)]
    n_val = len(rows) - len(reference)
    results = []
    for name, texts in (("base", base), ("sft", [o["output"] for o in outs]), ("sft best-of-4 (gold)", best)):
        q = [gold(r, o) for r, o in zip(rows, texts)]
        # pool win-rate against the reference on eval: mean probability over the 13 judges
        win = [np.mean([world_judge_prob(WORLD_JUDGES[j], r["instruction"], r["input"], ref, o) for j in POOL])
               for r, o, ref in zip(rows[n_val:], texts[n_val:], reference)]
        results.append({"policy": name, "gold": np.mean([c["quality"] for c in q]),
                        "correct": np.mean([c["correctness"] for c in q]), "win_rate": float(np.mean(win))})
    q = [gold(r, o) for r, o in zip(rows[n_val:], reference)]
    results.append({"policy": "reference", "gold": np.mean([c["quality"] for c in q]),
                    "correct": np.mean([c["correctness"] for c in q]), "win_rate": 0.5})
    print(f"(SFT: {sft_epochs} epochs, lr {sft_lr}, {sft_s:.0f} s)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", default=["tiny", "quick"], choices=list(SCALES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=2000, help="policy-like pairs for the agreement numbers")
    parser.add_argument("--headroom", choices=list(SCALES), default=None,
                        help="also SFT the base model of this scale and compare with the reference")
    parser.add_argument("--sft-epochs", type=int, default=5)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
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
    print(f"{'annotator':>22}  {'agreement w/ human':>18}  {'variance':>8}  {'prefers longer':>14}")
    print(f"{'human (held-out)':>22}  {rep['human_human']:>18.3f}  {rep['human_variance']:>8.3f}  "
          f"{rep['pool']['human_prefers_longer']:>14.3f}")
    for name, r in [(n, rep[n]) for n in ("pool", "pool_noisy", "greedy")] + list(rep["per_judge"].items()):
        print(f"{name:>22}  {r['agreement']:>18.3f}  {r['variance']:>8.3f}  {r['prefers_longer']:>14.3f}")
    print(f"({time.perf_counter() - t0:.1f} s; standard error of each agreement ~{rep['pool']['agreement_se']:.3f})")

    if args.headroom:
        print(f"\n3. Room for preference learning at scale {args.headroom} (val+eval; win-rate on eval vs the reference)")
        rows = headroom(args.headroom, args.seed, args.sft_epochs, args.sft_lr)
        print(f"{'policy':>22}  {'gold quality':>12}  {'correctness':>11}  {'pool win-rate':>13}")
        for r in rows:
            print(f"{r['policy']:>22}  {r['gold']:>12.3f}  {r['correct']:>11.3f}  {r['win_rate']:>13.3f}")


if __name__ == "__main__":
    main()
