"""Binary FeedME: supervised fine-tuning on the preferred output of each annotated pair.

AlpacaFarm's "binary FeedME" (after OpenAI's FeedME): the simplest use of pairwise feedback.
Each pair with a decided preference becomes one demonstration, the preferred output (the shared
rounding rule of `prefgym.data.preferences`: a soft 1.2 favours output_1); ties and unannotated
pairs are dropped. Training is exactly SFT (`train_sft`), starting from the SFT model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from prefgym.data.preferences import annotated_pairs
from prefgym.errors import ConfigError, DataError
from prefgym.methods.reward_conditioning import load_pairs, sft_config
from prefgym.methods.sft import SFTConfig, train_sft


@dataclass
class FeedMEConfig(SFTConfig):
    """Binary FeedME: every SFTConfig field (how to fine-tune), plus the annotated pairs.

    `model_name_or_path` is the SFT model to start from; `train_file`/`split` are not used.
    """

    output_dir: str = "runs/feedme"
    """Where the model (save_pretrained), metrics.jsonl and checkpoints go."""
    preference_file: str = ""
    """Annotated pairs (instruction, input, output_1, output_2, preference): file, folder or Hub name."""
    preference_split: Optional[str] = None
    """Split of `preference_file` when it is a folder or Hub dataset."""


def feedme_records(pairs: list[dict], path=None) -> list[dict]:
    """One SFT record (instruction, input, output) per decided pair: its preferred output. Ties are dropped."""
    return [{"instruction": p["instruction"], "input": p.get("input") or "", "output": p[f"output_{pref.winner}"]}
            for _, p, pref in annotated_pairs(pairs, path=path) if pref.winner is not None]


def train(cfg: FeedMEConfig, pairs: list[dict] | None = None) -> Path:
    """Fine-tune `cfg.model_name_or_path` on the preferred outputs; returns the output dir (save_pretrained)."""
    if not cfg.model_name_or_path:
        raise ConfigError("feedme: model_name_or_path (the SFT model) is required")
    if pairs is None:
        if not cfg.preference_file:
            raise ConfigError("feedme: preference_file is required")
        pairs = load_pairs(cfg.preference_file, cfg.preference_split)
    records = feedme_records(pairs, path=cfg.preference_file or None)
    if not records:
        raise DataError("no decided (non-tie) pairs to train on", path=cfg.preference_file or "pairs")
    return train_sft(sft_config(cfg, train_file=None, split=None), records=records)


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym feedme` to the `prefgym` app."""

    @app.command("feedme")
    def feedme_command(
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file of FeedMEConfig fields (flags override it)."),
        model: Optional[str] = typer.Option(None, "--model", help="SFT model folder to start from."),
        preferences: Optional[str] = typer.Option(None, "--preferences", help="Annotated pairs (instruction, input, output_1, output_2, preference)."),
        out: Optional[str] = typer.Option(None, "--out", help="Output folder."),
        epochs: Optional[int] = typer.Option(None, help="Passes over the preferred outputs (default: 3)."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: 2e-5)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per forward pass per process."),
        seed: Optional[int] = typer.Option(None, help="Seed (default: 0)."),
        resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the last checkpoint (default: resume)."),
        set_: list[str] = typer.Option([], "--set", help="Any FeedMEConfig field, key=value (repeatable)."),
    ) -> None:
        """Binary FeedME: supervised fine-tuning on the preferred output of each pair (ties dropped).

        Reads: --model (SFT model folder), --preferences (annotated pairs).

        Writes to --out: the fine-tuned model (save_pretrained, safetensors), metrics.jsonl,
        sft_config.json, checkpoints/ while training. Rerun the same command to resume.
        """
        from prefgym.methods import common

        overrides = common.set_then_flags(set_, {"model_name_or_path": model, "preference_file": preferences,
                     "output_dir": out, "epochs": epochs, "lr": lr, "per_device_batch_size": batch_size,
                     "seed": seed, "resume": resume})
        cfg = common.load_config(FeedMEConfig, config, overrides)
        path = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"lr": 2e-4, "epochs": 2, "per_device_batch_size": 16, "max_length": 256}
PIPELINE = MethodSpec(
    config=FeedMEConfig, train=train, weight=1,
    inputs=lambda run: dict(model_name_or_path=run.sft, preference_file=run.pairs, output_dir=run.out),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "epochs": 1}})
