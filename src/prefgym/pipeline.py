"""The whole AlpacaFarm loop as one resumable pipeline: `prefgym run`.

world → SFT → preference pairs (noisy pool) → reward model → every method → evaluation
(evaluation pool and simulated humans) → leaderboard.csv / leaderboard.md / report.html.

Each stage writes into its own folder under the run folder and marks completion with a
`.done` file written last, so a killed run restarts at the first stage not done. The same
stages run on real data, models and judges from a config file (`prefgym run --config`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from prefgym.errors import ConfigError
from prefgym.io import write_json

ALL_METHODS = ("ppo", "best_of_n", "expert_iteration", "quark", "feedme", "reward_conditioning", "dpo")


@dataclass
class RunConfig:
    """Everything `prefgym run` needs. Defaults run the built-in world."""

    out_dir: str = "prefgym-runs/default"
    """Run folder: every stage writes into a sub-folder of it."""
    scale: str = "default"
    """Size of the run on the built-in world: 'quick' (CI) or 'default' (≈10 minutes on 2 cores)."""
    seed: int = 0
    """Seed of the world and of every stage."""
    world_dir: str | None = None
    """Use an already built world folder instead of building one into the run folder."""
    base_model: str | None = None
    """Model to start SFT from (any HF causal LM); default: the world's base model."""
    data: dict[str, str] = field(default_factory=dict)
    """Split name → file or dataset (sft, preference, unlabeled, val, eval); default: the world's splits."""
    train_annotators: str = "world_pool_noisy"
    """Annotators that label the preference pairs used for training (name or YAML path)."""
    eval_annotators: str = "world_pool"
    """Annotators that judge outputs against the reference at evaluation."""
    human_annotators: str | None = "world_humans"
    """Stand-in for humans: evaluation by them, and training on them with --validate (None to skip)."""
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    """Methods to run, from: ppo, best_of_n, expert_iteration, quark, feedme, reward_conditioning, dpo."""
    validate: bool = False
    """Also train every method on the humans' preferences and correlate the two rankings."""
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage overrides of config fields, e.g. {ppo: {total_episodes: 512}}."""


def load_run_config(path: str | Path | None, **overrides) -> RunConfig:
    """Read a run config YAML (unknown keys are errors) and apply command-line overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read run config: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a run config is a mapping of keys to values")
        known = {f.name for f in dataclasses.fields(RunConfig)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(sorted(known))})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig(**values)
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    if cfg.scale not in ("tiny", "quick", "default"):
        raise ConfigError(f"unknown scale '{cfg.scale}'; choose quick or default")
    return cfg


@dataclass
class Stage:
    name: str
    run: Callable[[], None]
    weight: float
    """Expected share of the run's time, used for the time-left estimate."""


def run_stages(stages: list[Stage], out_dir: Path, console=None) -> dict[str, float]:
    """Run stages in order, skipping those already done; show which runs and how long is left."""
    from rich.console import Console

    console = console or Console(stderr=True)
    timings_path = out_dir / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    remaining = sum(s.weight for s in stages)
    ran_weight, ran_seconds = 0.0, 0.0  # stages run in this invocation, for the time-left estimate
    for i, stage in enumerate(stages):
        marker = out_dir / ".done" / stage.name
        if marker.exists():
            console.print(f"[dim]stage {i + 1}/{len(stages)} {stage.name}: done already, skipped[/dim]")
            remaining -= stage.weight
            continue
        eta = f", about {_fmt(ran_seconds / ran_weight * remaining)} left" if ran_weight > 0 else ""
        console.rule(f"[bold]stage {i + 1}/{len(stages)}: {stage.name}[/bold]{eta}")
        t0 = time.time()
        stage.run()
        timings[stage.name] = round(time.time() - t0, 2)
        write_json(timings_path, timings)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{timings[stage.name]}\n")
        ran_weight += stage.weight
        ran_seconds += timings[stage.name]
        remaining -= stage.weight
    return timings


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
