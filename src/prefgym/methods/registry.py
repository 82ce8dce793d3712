"""The built-in methods of `prefgym run`, and what the pipeline needs to know of each (`MethodSpec`).

Registering a method takes one line in `METHODS` below (its name, which is also its module
`prefgym.methods.<name>`, and its group) plus a `PIPELINE = MethodSpec(...)` at the end of that
module: the pipeline reads everything else (config class, how its config is built from the run,
how its outputs are evaluated, how its preference labels are counted, its world-tuned settings)
from the spec. The same line registers the method's command-line sub-command
(`prefgym.methods.commands`).

This module imports nothing heavy: `prefgym --help` reads the names without importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

METHODS: dict[str, str] = {
    # name (= module prefgym.methods.<name>) -> group
    "ppo": "classic",
    "best_of_n": "classic",
    "expert_iteration": "classic",
    "quark": "classic",
    "feedme": "classic",
    "reward_conditioning": "classic",
    "dpo": "classic",
    "rloo": "new",
    "grpo": "new",
    "kto": "new",
    "simpo": "new",
    "online_dpo": "new",
}
"""Every built-in method of `prefgym run`, in leaderboard order, with its group."""

DEFAULT_GROUP = "classic"
"""The methods `prefgym run` trains when `--methods` is not given (AlpacaFarm's six and DPO)."""


def groups() -> dict[str, list[str]]:
    """Group name -> its methods: each group of `METHODS`, plus 'all'."""
    out: dict[str, list[str]] = {}
    for name, group in METHODS.items():
        out.setdefault(group, []).append(name)
    out["all"] = list(METHODS)
    return out


@dataclass(frozen=True)
class RunInputs:
    """What a method's config is built from: the run's folders and files for one feedback source (tag)."""

    sft: str
    """The SFT policy folder."""
    reward_model: str
    """The reward model folder (trained on `pairs`)."""
    pairs: str
    """The annotated preference pairs (AlpacaFarm format) of this feedback source."""
    splits: dict[str, str]
    """Data split name -> file or dataset (sft, preference, unlabeled, val, eval)."""
    annotators: str
    """The annotators of this feedback source (for methods that ask for labels themselves)."""
    out: str
    """The method's own output folder."""


@dataclass(frozen=True)
class MethodSpec:
    """What `prefgym run` needs to train and evaluate one method."""

    config: type
    """The method's config dataclass (a run config's `stages.<name>` is checked against it)."""
    train: Callable[[Any], Any]
    """`train(config)`: trains (or runs) the method; its result lands in the folder the config names."""
    inputs: Callable[[RunInputs], dict[str, Any]]
    """The config fields that come from the run (model, reward model, data, output folder)."""
    produces: str = "policy"
    """'policy': the evaluation generates from the output folder (save_pretrained); 'outputs': the
    method wrote its eval-set outputs itself, `model_outputs.json` in its folder (inference-time methods)."""
    labels: str | Callable[[Any], str] = "pairs"
    """Preference labels it consumes: 'pairs' (the run's pairs file, directly or through the reward
    model), 'own' (it asked for labels itself and wrote `labels_used.json`), 'none'; or a function
    of its config returning one of those."""
    weight: float = 1.0
    """Expected share of the run's time (for the time-left estimate)."""
    world_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Scale ('quick', 'default') -> config fields tuned for the built-in world's tiny models."""

    def label_source(self, config) -> str:
        return self.labels(config) if callable(self.labels) else self.labels


def spec(name: str) -> MethodSpec:
    """The `PIPELINE` spec of the built-in method `name` (imports its module)."""
    module = importlib.import_module(f"prefgym.methods.{name}")
    found = getattr(module, "PIPELINE", None)
    if not isinstance(found, MethodSpec):
        raise TypeError(f"prefgym.methods.{name} has no PIPELINE = MethodSpec(...)")
    return found
