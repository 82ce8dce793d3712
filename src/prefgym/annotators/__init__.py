"""Simulated and real pairwise annotators: judges from YAML, pools with label-flip noise, a
durable cache, cost accounting, and annotator-quality analysis against human labels."""

from prefgym.lazy_exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {  # loaded on first use: `prefgym --help` stays fast
    "annotate": ["annotate_pairs", "example_key", "summarize"],
    "config": ["JudgeConfig", "PoolConfig", "available_configs", "load_pool"],
    "pairs": ["make_pairs"],
})
