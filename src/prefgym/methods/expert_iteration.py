"""Expert iteration: fine-tune the SFT model on its own best-of-n outputs.

AlpacaFarm's expert iteration (one round, as in the paper): (1) best-of-n with the SFT policy
and the reward model on the instructions of the `unlabeled` split, (2) supervised fine-tuning of
the SFT model on the chosen outputs. Both steps are the ordinary ones (`best_of_n.run`,
`train_sft`), so both resume when the command is run again.
"""

from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from prefgym.errors import ConfigError
from prefgym.methods.best_of_n import BestOfNConfig, run as run_best_of_n
from prefgym.methods.fields import GenerationFields, RewardEnsembleFields, make_accelerator
from prefgym.methods.reward_conditioning import sft_config
from prefgym.methods.sft import SFTConfig, train_sft

BEST_OF_N_FILE = "best_of_n_outputs.json"


@dataclass
class ExpertIterationConfig(RewardEnsembleFields, GenerationFields, SFTConfig):
    """Expert iteration: every SFTConfig field (how to fine-tune), plus how to pick the outputs.

    `model_name_or_path` is the SFT model: it both samples the outputs and is fine-tuned on them.
    `train_file`/`split` are not used.
    """

    output_dir: str = "runs/expert_iteration"
    """Where the model (save_pretrained), best_of_n_outputs.json, metrics.jsonl and checkpoints go."""
    reward_model: str = ""
    """Reward model folder that ranks the samples."""
    prompts_file: str = ""
    """Instructions to sample on (AlpacaFarm: the unlabeled split): file, folder or Hub name."""
    prompts_split: Optional[str] = "unlabeled"
    """Split of `prompts_file` when it is a folder or Hub dataset."""
    n: int = 16
    """Samples per instruction; the best is kept."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 300
    """Most tokens per sample."""
    missing_eos_penalty: Optional[float] = -1.0
    """Reward of a sample with no EOS within max_new_tokens (None: the reward model's score), as in PPO."""
    generation_batch_size: int = 8
    """Prompts per `generate` call (each yields n sequences)."""
    max_examples: int = -1
    """Use only the first this many instructions; -1: all."""


def best_of_n_config(cfg: ExpertIterationConfig, output_file: Path) -> BestOfNConfig:
    """The best-of-n step's config: every field the two configs share (sampling, reward ensemble,
    engine, model loading, seed, ...) as set here; the SFT model samples the prompts."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(BestOfNConfig) if hasattr(cfg, f.name)}
    return BestOfNConfig(**{**shared, "policy_model": cfg.model_name_or_path, "data": cfg.prompts_file,
                            "split": cfg.prompts_split, "output_file": str(output_file)})


def train(cfg: ExpertIterationConfig) -> Path:
    """Best-of-n on `prompts_file`, then SFT of `model_name_or_path` on the chosen outputs; returns the output dir."""
    from prefgym.io import read_records

    for key in ("model_name_or_path", "reward_model", "prompts_file"):
        if not getattr(cfg, key):
            raise ConfigError(f"expert iteration: '{key}' is required")
    out = Path(cfg.output_dir)
    chosen_file = out / BEST_OF_N_FILE

    # 1. Best-of-n outputs of the SFT policy. Several processes share the sampling and scoring
    #    (`best_of_n.run` writes on the main process; all return once the file is there).
    accelerator = make_accelerator(cfg, out)  # the process state `train_sft` uses next
    with accelerator.autocast():  # sampled and scored as the training computes (mixed_precision)
        run_best_of_n(best_of_n_config(cfg, chosen_file))

    # 2. SFT of the SFT model on them.
    records = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
               for r in read_records(chosen_file)]
    return train_sft(sft_config(cfg, train_file=None, split=None), records=records)


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym expert-iteration` to the `prefgym` app."""

    @app.command("expert-iteration")
    def expert_iteration_command(
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file of ExpertIterationConfig fields (flags override it)."),
        model: Optional[str] = typer.Option(None, "--model", help="SFT model folder: samples, and is fine-tuned."),
        reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Reward model folder that ranks the samples."),
        prompts: Optional[str] = typer.Option(None, "--prompts", help="Instructions to sample on (e.g. the world's data folder)."),
        prompts_split: Optional[str] = typer.Option(None, "--prompts-split", help="Split of --prompts (default: unlabeled)."),
        out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: runs/expert_iteration)."),
        n: Optional[int] = typer.Option(None, "--n", help="Samples per instruction (default: 16)."),
        epochs: Optional[int] = typer.Option(None, help="Passes over the chosen outputs (default: 3)."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: 2e-5)."),
        seed: Optional[int] = typer.Option(None, help="Seed (default: 0)."),
        resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue an interrupted run (default: resume)."),
        set_: list[str] = typer.Option([], "--set", help="Any ExpertIterationConfig field, key=value (repeatable)."),
    ) -> None:
        """Expert iteration: best-of-n on unlabeled instructions, then SFT of the SFT model on the winners.

        Reads: --model (SFT model folder), --reward-model, --prompts (instructions; split
        --prompts-split, default unlabeled).

        Writes to --out: best_of_n_outputs.json (the chosen outputs, with all samples and
        rewards), the fine-tuned model (save_pretrained), metrics.jsonl, checkpoints/ while
        training. Rerun the same command to resume either step.
        """
        from prefgym.methods import common

        overrides = common.set_then_flags(set_, {"model_name_or_path": model, "reward_model": reward_model,
                     "prompts_file": prompts, "prompts_split": prompts_split, "output_dir": out, "n": n,
                     "epochs": epochs, "lr": lr, "seed": seed, "resume": resume})
        cfg = common.load_config(ExpertIterationConfig, config, overrides)
        path = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"lr": 2e-4, "epochs": 2, "per_device_batch_size": 16, "max_length": 256, "n": 4, "temperature": 0.7, "max_new_tokens": 64, "generation_batch_size": 64,
          "max_examples": 400}
PIPELINE = MethodSpec(
    config=ExpertIterationConfig, train=train, weight=2,
    inputs=lambda run: dict(model_name_or_path=run.sft, reward_model=run.reward_model,
                            prompts_file=run.splits["unlabeled"], output_dir=run.out),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "max_examples": 64, "max_new_tokens": 32, "epochs": 1}})
