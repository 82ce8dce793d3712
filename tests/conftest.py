"""Shared fixtures. The built-in world is built once per test session (tiny scale) and reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models are overhead-bound: one thread is as fast, and much faster on a loaded machine.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA_EVAL = SHARED_DATA / "alpaca_eval"


@pytest.fixture(scope="session")
def alpaca_eval_dir() -> Path:
    if not ALPACA_EVAL.exists():
        pytest.skip(f"shared AlpacaEval data not found at {ALPACA_EVAL}")
    return ALPACA_EVAL


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """The built-in world at scale 'tiny' (splits, tokenizer, base model), built once per session."""
    from prefgym.world import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, scale="tiny", seed=0)
    return out
