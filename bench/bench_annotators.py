"""Annotator benchmarks: prompt tokens per label (batch 1 vs 5), labels/s against a local
OpenAI-compatible server with 200 ms latency (concurrency 1, 8, 32), and a re-run of 50k cached rows.

    python bench/bench_annotators.py            # all
    python bench/bench_annotators.py --quick    # smaller sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prefgym.annotators import annotate_pairs, load_pool, summarize  # noqa: E402
from prefgym.annotators.config import PoolConfig  # noqa: E402
from prefgym.world.agreement import policy_like_pairs  # noqa: E402


def tokens_per_label(pairs: list[dict]) -> dict:
    """The GPT-4 b1 and b5 prompts, answered by a world judge (same rendering and token count)."""
    out = {}
    for name in ("gpt4_b1", "gpt4_b5"):
        judge = dataclasses.replace(load_pool(name).judges[0], fn_completions="world_judges",
                                    completions_kwargs={"model_name": "world-judge-greedy", "temperature": 0})
        with tempfile.TemporaryDirectory() as d:
            rows = annotate_pairs(pairs, PoolConfig([judge], name=name), cache_dir=d, progress=False)
        out[name] = summarize(rows)["prompt_tokens_per_label"]
    return out


def labels_per_second(n_by_concurrency: dict[int, int], latency: float = 0.2) -> dict:
    from test_annotators_fakeapi import FakeOpenAI, judge_config, make_fake_pairs

    os.environ["FAKE_API_KEY"] = "bench"
    out = {}
    with FakeOpenAI(latency=latency) as api, tempfile.TemporaryDirectory() as d:
        for conc, n in n_by_concurrency.items():
            cfg = Path(d) / f"c{conc}.yaml"
            cfg.write_text(yaml.safe_dump({"judges": {"fake": judge_config(api.base_url, concurrency=conc)}}))
            pairs = make_fake_pairs(n, prefix=f"c{conc}-")
            start = time.perf_counter()
            rows = annotate_pairs(pairs, cfg, cache_dir=Path(d) / "cache", progress=False)
            elapsed = time.perf_counter() - start
            assert all(r["preference"] is not None for r in rows)
            out[conc] = n / elapsed
    return out


def cached_rerun(pairs: list[dict]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        annotate_pairs(pairs, "world_pool_noisy", cache_dir=d, progress=False)
        first = time.perf_counter() - start
        stats = {}
        start = time.perf_counter()
        annotate_pairs(pairs, "world_pool_noisy", cache_dir=d, progress=False, stats=stats)
        again = time.perf_counter() - start
        assert stats["n_calls"] == 0 and stats["n_cached"] == stats["n_examples"]
    return {"rows": len(pairs), "first_run_s": first, "cached_rerun_s": again}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_cached = 5000 if args.quick else 50000
    pairs = policy_like_pairs(n_cached, seed=0)

    t = tokens_per_label(pairs[:1000])
    print("prompt tokens per label (gpt4 prompts, world pairs, 1000 labels)")
    print(f"  batch 1: {t['gpt4_b1']:.1f}   batch 5: {t['gpt4_b5']:.1f}   ratio: {t['gpt4_b1'] / t['gpt4_b5']:.2f}x")

    sizes = {1: 20, 8: 80, 32: 240} if args.quick else {1: 40, 8: 240, 32: 800}
    lps = labels_per_second(sizes)
    print("labels/s against a local server with 200 ms latency (batch 1)")
    print("  " + "   ".join(f"concurrency {c}: {v:.1f}" for c, v in lps.items())
          + f"   (32 vs 1: {lps[32] / lps[1]:.1f}x)")

    c = cached_rerun(pairs)
    print(f"world_pool_noisy on {c['rows']} rows: first run {c['first_run_s']:.1f} s, "
          f"cached re-run {c['cached_rerun_s']:.1f} s ({c['first_run_s'] / c['cached_rerun_s']:.1f}x)")


if __name__ == "__main__":
    main()
