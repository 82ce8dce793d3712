"""Simulated and real pairwise annotators: judges from YAML, pools with label-flip noise, a
durable cache, cost accounting, and annotator-quality analysis against human labels."""

from prefgym.annotators.annotate import annotate_pairs, example_key, summarize
from prefgym.annotators.config import JudgeConfig, PoolConfig, available_configs, load_pool
from prefgym.annotators.pairs import make_pairs

__all__ = ["annotate_pairs", "make_pairs", "summarize", "example_key", "load_pool", "available_configs",
           "JudgeConfig", "PoolConfig"]
