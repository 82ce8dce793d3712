"""Binary reward conditioning: SFT on both outputs of each pair, told apart by a control token.

AlpacaFarm's "binary reward conditioning" (after Keskar et al.'s CTRL and Quark): every annotated
pair gives two demonstrations, the preferred output with the control token `<good>` and the other
with `<bad>`; ties are dropped. At inference the model is asked for `<good>` outputs.

The control token goes in front of the instruction ("<good>Sort the numbers ..."), so the
Alpaca prompt is otherwise unchanged and the ordinary SFT code path trains the model. The tokens
are added to the tokenizer as special tokens and the embeddings resized (new rows start at the
mean of the old ones, nearly equal); with `use_lora` the two rows train beside the adapters
(`common.apply_lora`'s trainable tokens), without which they would stay nearly equal and the model
could not tell `<good>` from `<bad>`. The token to use at inference is recorded in
`conditioning.json` and README.md next to the model; `generate_conditioned_outputs` applies it (a
drop-in for `generate_outputs` that works for any model folder, conditioned or not).

The small helpers for control tokens below are shared with Quark.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from prefgym.data.preferences import annotated_pairs
from prefgym.errors import ConfigError, DataError
from prefgym.methods.sft import SFTConfig, train_sft

CONDITIONING_FILE = "conditioning.json"


# ---------------------------------------------------------------------------------------------
# Control tokens (shared with Quark)


def add_control_tokens(model, tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` to the tokenizer as special tokens and grow the model's embeddings to match.

    New embedding rows start at the mean of the existing ones (transformers' mean resizing).
    Returns the tokens' ids.
    """
    tokenizer.add_tokens(list(tokens), special_tokens=True)  # never split; dropped by skip_special_tokens
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(list(tokens))


def with_control_token(records: list[dict], token: str) -> list[dict]:
    """Copies of `records` with `token` in front of the instruction (how the model is conditioned)."""
    return [{**r, "instruction": token + r["instruction"]} for r in records]


def write_conditioning(out_dir: str | os.PathLike, token: str, method: str, extra: dict | None = None) -> None:
    """Record the control token to use at inference: conditioning.json and a README.md note."""
    from prefgym.io import write_json, write_text_atomic

    out_dir = Path(out_dir)
    write_json(out_dir / CONDITIONING_FILE, {"instruction_prefix": token, "method": method, **(extra or {})})
    if not token:
        write_text_atomic(out_dir / "README.md", f"# {method} policy\n\nGenerate with the plain Alpaca prompt.\n")
        return
    write_text_atomic(out_dir / "README.md", (
        f"# {method} policy\n\n"
        f"This model was trained with control tokens. To get its best outputs, put `{token}` in front of\n"
        f"the instruction, inside the prompt format it was trained with (Alpaca or the chat template's user turn).\n"
        "`prefgym.methods.reward_conditioning.generate_conditioned_outputs` does this from\n"
        f"`{CONDITIONING_FILE}`.\n"))


def read_conditioning(model_path: str | os.PathLike) -> str:
    """The instruction prefix recorded next to a model ("" for an ordinary model)."""
    path = Path(model_path) / CONDITIONING_FILE
    if not path.exists():
        return ""
    return json.loads(path.read_text(encoding="utf-8"))["instruction_prefix"]


def generate_conditioned_outputs(model_path: str | os.PathLike, records: list[dict], cfg,
                                 generator: str | None = None, progress: bool = False) -> list[dict]:
    """`generate_outputs` with the model's recorded control token in front of each instruction.

    The returned records carry the original instructions (not the token), so they can be
    evaluated like any other outputs. For a model without `conditioning.json` this is exactly
    `generate_outputs`.
    """
    from prefgym.models.generation import generate_outputs

    prefix = read_conditioning(model_path)
    rows = generate_outputs(model_path, with_control_token(records, prefix), cfg, generator=generator,
                            progress=progress)
    return [{**row, "instruction": r["instruction"]} for row, r in zip(rows, records)]


def prepare_conditioned_model(model_name_or_path: str, tokens: list[str], out_dir: str | os.PathLike,
                              cfg=None) -> Path:
    """Save `model_name_or_path` with `tokens` added (embeddings resized) to `out_dir`; returns it.

    Loaded (and so saved) as `cfg` says (ModelFields: dtype, attn_implementation), float32 without.
    """
    from prefgym.models import load_model_and_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir  # made by an earlier, interrupted run
    model, tokenizer = load_model_and_tokenizer(model_name_or_path, cfg=cfg)
    add_control_tokens(model, tokenizer, tokens)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Binary reward conditioning


@dataclass
class RewardConditioningConfig(SFTConfig):
    """Binary reward conditioning: every SFTConfig field (how to fine-tune), plus the pairs and tokens.

    `model_name_or_path` is the SFT model to start from; `train_file`/`split` are not used.
    """

    output_dir: str = "runs/reward_conditioning"
    """Where the model (save_pretrained), metrics.jsonl and checkpoints go."""
    preference_file: str = ""
    """Annotated pairs (instruction, input, output_1, output_2, preference): file, folder or Hub name."""
    preference_split: Optional[str] = None
    """Split of `preference_file` when it is a folder or Hub dataset."""
    good_token: str = "<good>"
    """Control token in front of the instruction for preferred outputs (and at inference)."""
    bad_token: str = "<bad>"
    """Control token in front of the instruction for dispreferred outputs."""


def reward_conditioning_records(pairs: list[dict], good_token: str = "<good>", bad_token: str = "<bad>",
                                path=None) -> list[dict]:
    """Two SFT records per decided pair: the preferred output under `good_token`, the other under `bad_token`.

    The preferred output is the one the label favours by the shared rounding rule
    (`prefgym.data.preferences`: a soft 1.2 favours output_1); ties (1.5, AlpacaEval's 0) and
    unannotated pairs (null) are dropped.
    """
    out = []
    for _, p, pref in annotated_pairs(pairs, path=path):
        if pref.winner is None:
            continue
        base = {"instruction": p["instruction"], "input": p.get("input") or ""}
        out.append({**with_control_token([base], good_token)[0], "output": p[f"output_{pref.winner}"]})
        out.append({**with_control_token([base], bad_token)[0], "output": p[f"output_{3 - pref.winner}"]})
    return out


def load_pairs(source: str, split: str | None = None) -> list[dict]:
    """Annotated pairs with instruction, output_1, output_2, preference (validated)."""
    from prefgym.data import load_records

    return load_records(source, split=split, required=("instruction", "output_1", "output_2", "preference"))


def sft_config(cfg: SFTConfig, **changes) -> SFTConfig:
    """The plain SFTConfig part of a method config that extends it (plus `changes`)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SFTConfig)}
    return SFTConfig(**{**values, **changes})


def train(cfg: RewardConditioningConfig, pairs: list[dict] | None = None) -> Path:
    """Fine-tune `cfg.model_name_or_path` on both outputs of each pair with good/bad tokens; returns the output dir.

    The output dir holds the model (save_pretrained; tokenizer with the two control tokens),
    conditioning.json and README.md (the token to use: `good_token`), plus what `train_sft`
    writes (metrics.jsonl, checkpoints while training).
    """
    if not cfg.model_name_or_path:
        raise ConfigError("reward conditioning: model_name_or_path (the SFT model) is required")
    if pairs is None:
        if not cfg.preference_file:
            raise ConfigError("reward conditioning: preference_file is required")
        pairs = load_pairs(cfg.preference_file, cfg.preference_split)
    records = reward_conditioning_records(pairs, cfg.good_token, cfg.bad_token, path=cfg.preference_file or None)
    if not records:
        raise DataError("no decided (non-tie) pairs to train on", path=cfg.preference_file or "pairs")

    out = Path(cfg.output_dir)
    if cfg.resume and (out / CONDITIONING_FILE).exists():
        return out  # finished earlier
    # 1. The SFT model with the two control tokens added (by the main process, once; reused when resuming).
    from prefgym.models.generation import is_main_process, processes

    with processes().main_process_first():
        init = prepare_conditioned_model(cfg.model_name_or_path, [cfg.good_token, cfg.bad_token],
                                         out / "init_model", cfg=cfg)
    # 2. Supervised fine-tuning on the conditioned demonstrations (under LoRA the tokens' rows train too).
    train_sft(sft_config(cfg, model_name_or_path=str(init), train_file=None, split=None), records=records,
              trainable_tokens=(cfg.good_token, cfg.bad_token))
    # 3. Record how to condition at inference.
    if is_main_process():
        write_conditioning(out, cfg.good_token, "binary reward conditioning",
                           {"bad_token": cfg.bad_token, "pairs_used": len(records) // 2})
        shutil.rmtree(init, ignore_errors=True)
    return out


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym reward-conditioning` to the `prefgym` app."""

    @app.command("reward-conditioning")
    def reward_conditioning_command(
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file of RewardConditioningConfig fields (flags override it)."),
        model: Optional[str] = typer.Option(None, "--model", help="SFT model folder to start from."),
        preferences: Optional[str] = typer.Option(None, "--preferences", help="Annotated pairs (instruction, input, output_1, output_2, preference)."),
        out: Optional[str] = typer.Option(None, "--out", help="Output folder."),
        epochs: Optional[int] = typer.Option(None, help="Passes over the conditioned demonstrations (default: 3)."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: 2e-5)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per forward pass per process."),
        seed: Optional[int] = typer.Option(None, help="Seed (default: 0)."),
        resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the last checkpoint (default: resume)."),
        set_: list[str] = typer.Option([], "--set", help="Any RewardConditioningConfig field, key=value (repeatable)."),
    ) -> None:
        """Binary reward conditioning: SFT on both outputs of each pair behind <good>/<bad> control tokens.

        Reads: --model (SFT model folder), --preferences (annotated pairs; ties dropped).

        Writes to --out: the model (save_pretrained; tokenizer with <good> and <bad>),
        conditioning.json and README.md (generate with <good> in front of the instruction:
        generate_conditioned_outputs does it), metrics.jsonl, checkpoints/ while training.
        Rerun the same command to resume.
        """
        from prefgym.methods import common

        overrides = common.set_then_flags(set_, {"model_name_or_path": model, "preference_file": preferences,
                     "output_dir": out, "epochs": epochs, "lr": lr, "per_device_batch_size": batch_size,
                     "seed": seed, "resume": resume})
        cfg = common.load_config(RewardConditioningConfig, config, overrides)
        path = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"wrote {path} (generate with {cfg.good_token!r} in front of the instruction)")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"lr": 2e-4, "epochs": 2, "per_device_batch_size": 16, "max_length": 256}
PIPELINE = MethodSpec(
    config=RewardConditioningConfig, train=train, weight=1,
    inputs=lambda run: dict(model_name_or_path=run.sft, preference_file=run.pairs, output_dir=run.out),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "epochs": 1}})
