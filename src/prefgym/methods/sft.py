"""Supervised fine-tuning (SFT): step 1 of the loop, next-token loss on demonstrations.

The loss is cross-entropy on the response tokens only (the prompt is masked), averaged over
all response tokens of the global batch, so that 1 process x batch 8 and 2 processes x batch 4
(or 1 x 4 with 2 accumulation steps) take the same optimizer steps. Runs through Accelerate
(`accelerate launch` for several processes), checkpoints every `save_steps` steps or
`save_every_seconds` and resumes from the last checkpoint when the same command is run again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from prefgym.errors import ConfigError, DataError
from prefgym.methods.fields import LoraFields, TrainFields

if TYPE_CHECKING:
    import torch

CRASH_AFTER_STEP_ENV = "PREFGYM_CRASH_AFTER_STEP"  # tests: hard-exit after this step (simulated kill)


@dataclass
class SFTConfig(TrainFields, LoraFields):
    """Supervised fine-tuning settings (defaults: AlpacaFarm's SFT recipe, scaled to one device)."""

    model_name_or_path: Optional[str] = None
    """Base model: a save_pretrained folder or Hub name (default: the built-in world's base model)."""
    train_file: Optional[str] = None
    """Demonstrations with instruction/input/output: .json/.jsonl, a datasets folder or a Hub name (default: the built-in world's sft split)."""
    split: Optional[str] = None
    """Split of `train_file` when it is a folder or a Hub dataset (e.g. sft)."""
    output_dir: str = "runs/sft"
    """Where the fine-tuned model (save_pretrained), metrics.jsonl and checkpoints go."""
    epochs: int = 3
    """Passes over the demonstrations."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 lets `epochs` decide."""
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warm-up (any transformers `get_scheduler` name)."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    per_device_batch_size: int = 4
    """Examples per forward pass on each process."""
    grad_accum: int = 1
    """Forward passes per optimizer step; global batch = per_device_batch_size x processes x grad_accum."""
    max_length: int = 512
    """Tokens per example (prompt + response + EOS), cut from the right."""
    seed: int = 0
    """Seed of the data order and of dropout."""
    save_steps: int = 100
    """Save a checkpoint (model, optimizer, scheduler, RNG) every this many steps; 0: never."""
    logging_steps: int = 1
    """Write a metrics.jsonl row every this many steps."""
    resume: bool = True
    """Continue from the last checkpoint in output_dir if there is one (False: start over)."""
    progress: bool = True
    """Show a progress bar."""
    disable_dropout: bool = True
    """Turn dropout off in the model (as TRL's preference trainers do); expert iteration inherits it."""


def train_sft(cfg: SFTConfig, records: list[dict] | None = None, trainable_tokens: tuple[str, ...] = ()) -> Path:
    """Fine-tune `cfg.model_name_or_path` on `records` (or `cfg.train_file`); return the output dir.

    The output dir holds the model and tokenizer in save_pretrained format (safetensors),
    `metrics.jsonl` (step, epoch, loss, lr, tokens, tokens_per_s), `sft_config.json` and
    `checkpoints/`. A finished run is not redone when called again with resume=True.
    `trainable_tokens` (tokens of the model's tokenizer, e.g. control tokens added to it): with
    `use_lora`, their embedding rows train beside the adapters (`common.apply_lora`).
    """
    import torch
    from transformers import get_scheduler

    from prefgym.data import load_records, validate_records
    from prefgym.data.prompts import make_prompt_formatter
    from prefgym.io import append_jsonl, write_json
    from prefgym.methods import fields, zero3
    from prefgym.models import collate, load_model_and_tokenizer, tokenize_example
    from prefgym.seeding import seed_everything, stable_hash

    from prefgym.methods.common import (CheckpointSchedule, check_output_dir, end_training, no_sync_unless,
                                        step_scheduler)

    out = Path(cfg.output_dir)
    state_file = out / "training_state.json"
    model_path = cfg.model_name_or_path or _world_path("base_model", "--model")
    check_output_dir(dataclasses.replace(cfg, model_name_or_path=str(model_path)), out / "sft_config.json")
    if cfg.resume and state_file.exists() and json.loads(state_file.read_text()).get("done"):
        return out
    if records is None:
        train_file, split = cfg.train_file, cfg.split
        if train_file is None:
            train_file, split = _world_path("data", "--data"), "sft"
        records = load_records(train_file, split=split, required=("instruction", "output"))
    else:
        records = validate_records(records, required=("instruction", "output"), path="records")
    if not records:
        raise DataError("no demonstrations to train on", path=cfg.train_file or "records")

    accelerator = fields.make_accelerator(cfg, out)
    fields.start_tracking(accelerator, cfg, "sft")
    seed_everything(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(model_path, cfg=cfg, trainable=True)
    from prefgym.methods.common import apply_lora

    model = apply_lora(model, cfg, task_type="CAUSAL_LM",
                       trainable_token_indices=_token_ids(tokenizer, trainable_tokens, model_path))
    if cfg.disable_dropout:
        from prefgym.methods.common import disable_dropout

        disable_dropout(model)
    fmt = make_prompt_formatter(tokenizer, cfg.prompt_format)
    examples = [tokenize_example(tokenizer, fmt(r), r["output"], cfg.max_length) for r in records]
    n_targets = [sum(label != -100 for label in e["labels"][1:]) for e in examples]

    # The global batch is built the same way for any number of processes; each process takes its slice.
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    per_rank = cfg.per_device_batch_size * cfg.grad_accum
    global_batch = per_rank * n_proc
    steps_per_epoch = math.ceil(len(examples) / global_batch)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps) if cfg.epochs > 0 else cfg.max_steps

    @lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(stable_hash(cfg.seed, "sft-order", epoch) % 2**63)
        order = torch.randperm(len(examples), generator=g).tolist()
        return order * math.ceil(global_batch * steps_per_epoch / len(order))  # wrap: last batch stays full

    def batch_indices(step: int) -> list[int]:
        epoch, k = divmod(step, steps_per_epoch)
        return epoch_order(epoch)[k * global_batch:(k + 1) * global_batch]

    decay = [p for n, p in model.named_parameters() if zero3.full_ndim(p) >= 2]  # ZeRO-3: a shard is 1-d
    no_decay = [p for n, p in model.named_parameters() if zero3.full_ndim(p) < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    # The scheduler is stepped by hand once per optimizer step (`step_scheduler`; not prepared:
    # Accelerate would step it once per process).
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    metrics_file = out / "metrics.jsonl"
    start_step = _restore(accelerator, out, metrics_file) if cfg.resume else 0
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            for stale in (metrics_file, state_file):
                stale.unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        write_json(out / "sft_config.json", {**dataclasses.asdict(cfg), "model_name_or_path": str(model_path),
                                             "num_processes": n_proc, "global_batch_size": global_batch,
                                             "total_steps": total_steps})
    accelerator.wait_for_everyone()

    model.train()
    total_tokens = sum(len(examples[i]["input_ids"]) for s in range(start_step) for i in batch_indices(s))
    crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "0"))
    checkpoints = CheckpointSchedule(cfg.save_steps, cfg.save_every_seconds, accelerator)
    with _progress_bar(cfg.progress and accelerator.is_main_process, total_steps, start_step) as advance:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            indices = batch_indices(step)
            step_targets = sum(n_targets[i] for i in indices)
            step_tokens = sum(len(examples[i]["input_ids"]) for i in indices)
            mine = indices[rank * per_rank:(rank + 1) * per_rank]
            loss_sum = torch.zeros((), device=accelerator.device)
            for m in range(cfg.grad_accum):
                micro = mine[m * cfg.per_device_batch_size:(m + 1) * cfg.per_device_batch_size]
                batch = collate([examples[i] for i in micro], tokenizer.pad_token_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = m == cfg.grad_accum - 1
                with no_sync_unless(accelerator, model, sync):
                    ce_sum = _response_loss_sum(model, batch)
                    # x n_proc: DDP averages gradients over processes; we want the global sum / tokens.
                    accelerator.backward(ce_sum * n_proc / max(step_targets, 1))
                loss_sum += ce_sum.detach()
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr = step_scheduler(accelerator, scheduler)
            optimizer.zero_grad(set_to_none=True)
            loss = accelerator.reduce(loss_sum, "sum").item() / max(step_targets, 1)
            total_tokens += step_tokens
            done = step + 1
            if accelerator.is_main_process and (done % cfg.logging_steps == 0 or done == total_steps):
                row = {"step": done, "epoch": step // steps_per_epoch, "loss": loss, "lr": lr, "tokens": total_tokens,
                       "tokens_per_s": step_tokens / (time.perf_counter() - t0)}
                append_jsonl(metrics_file, row)
                fields.track(accelerator, row)
            advance(loss)
            if checkpoints.due(done, total_steps):
                _checkpoint(accelerator, out, done)
            if done == crash_after:
                os._exit(137)

    accelerator.wait_for_everyone()
    _save_final(accelerator, model, tokenizer, out)
    if accelerator.is_main_process:
        write_json(state_file, {"step": total_steps, "done": True})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    end_training(accelerator)
    return out


def _response_loss_sum(model, batch) -> "torch.Tensor":
    """Sum of next-token cross-entropy over the response tokens of the batch (labels != -100).

    Equals `cross_entropy(logits[:, :-1].float(), labels[:, 1:], ignore_index=-100, reduction="sum")`,
    values and gradients, without an fp32 (B, T, V) copy of the logits (`common.token_logprobs`);
    the LM head runs only from the first position that predicts a label on (`logits_to_keep`).
    The positions the model sees are unchanged (right-padded batch, default position ids).
    """
    import torch

    from prefgym.methods.common import token_logprobs
    from prefgym.models import IGNORE_INDEX

    labels = batch["labels"]
    targets = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1): position t predicts label t + 1
    start = _first_true_column(targets)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=labels.shape[1] - start).logits  # (B, T - start, V): positions start .. T-1
    if logits.shape[1] != labels.shape[1] - start:  # a model whose forward ignores logits_to_keep
        if logits.shape[1] != labels.shape[1]:
            raise ConfigError(f"{type(model).__name__} returned logits for {logits.shape[1]} of {labels.shape[1]} "
                              "positions; SFT needs a causal LM that returns all of them or honours logits_to_keep")
        logits = logits[:, start:]
    logps = token_logprobs(logits, labels[:, start:].clamp(min=0))  # (B, T - start); column k: label start + k
    return -torch.where(targets[:, start:], logps[:, 1:], 0.0).sum()  # where, not *: a -inf off the labels stays out


def _first_true_column(mask: "torch.Tensor") -> int:
    """The first column of a (B, N) bool mask that is True in some row (0 when none is)."""
    columns = mask.any(0).nonzero()
    return int(columns[0]) if len(columns) else 0


def _checkpoint(accelerator, out: Path, step: int) -> None:
    """Save the full training state to checkpoints/step_N; the last complete one is kept."""
    from prefgym.io import write_json

    ckpt = out / "checkpoints" / f"step_{step}"
    accelerator.save_state(str(ckpt))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(ckpt / "progress.json", {"step": step})  # written last: marks the checkpoint complete
        for old in (out / "checkpoints").glob("step_*"):
            if old != ckpt:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _restore(accelerator, out: Path, metrics_file: Path) -> int:
    """Load the last complete checkpoint, if any; return the step to continue from."""
    done = sorted((json.loads((c / "progress.json").read_text())["step"], c)
                  for c in (out / "checkpoints").glob("step_*") if (c / "progress.json").exists())
    if not done:
        return 0
    step, ckpt = done[-1]
    from prefgym.methods.common import load_state

    load_state(accelerator, ckpt)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and metrics_file.exists():
        from prefgym.io import write_jsonl

        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        write_jsonl(metrics_file, [r for r in rows if r["step"] <= step])
    accelerator.wait_for_everyone()
    return step


def _token_ids(tokenizer, tokens, model_path) -> list[int]:
    """The ids of `tokens`, each a single token of the tokenizer (ConfigError naming one that is not)."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for token, i in zip(tokens, ids):
        if i is None or tokenizer.convert_ids_to_tokens(i) != token:  # unknown: the unk id
            raise ConfigError(f"{model_path}: {token!r} is not a token of the tokenizer; add it first")
    return ids


def _save_final(accelerator, model, tokenizer, out: Path) -> None:
    """save_pretrained into a temporary folder (LoRA merged), then move the files in (nothing
    half-written). Every process calls it (`save_trained`); the main process writes."""
    from prefgym.methods.common import save_trained

    tmp = out / ".final.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    save_trained(accelerator, model, tokenizer, tmp)
    if not accelerator.is_main_process:
        return
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def _world_path(name: str, flag: str) -> Path:
    """A path inside the built-in world (default scale, seed 0), or a ConfigError saying what to pass."""
    try:
        from prefgym.world import default_world_dir

        path = default_world_dir("default", 0) / name
    except ImportError:
        path = None
    if path is None or not path.exists():
        raise ConfigError(f"no {flag} given and the built-in world is not built: pass {flag}, "
                          "or build the world first: prefgym world build")
    return path


@contextmanager
def _progress_bar(enabled: bool, total: int, completed: int):
    """Yield `advance(loss)`: moves a rich progress bar, or does nothing when disabled."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from prefgym.progress import stderr_console

    with Progress(TextColumn("sft"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeRemainingColumn(), console=stderr_console()) as progress:
        task = progress.add_task("sft", total=total, completed=completed, loss="-")
        yield lambda loss: progress.update(task, advance=1, loss=f"{loss:.4f}")


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym sft` to the `prefgym` app."""

    @app.command("sft")
    def sft_command(
        config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON file of SFTConfig fields (flags override it)."),
        model: Optional[str] = typer.Option(None, "--model", help="Base model folder or Hub name (default: the built-in world's base model)."),
        data: Optional[str] = typer.Option(None, "--data", help="Demonstrations: .json/.jsonl, datasets folder or Hub name (default: the world's sft split)."),
        split: Optional[str] = typer.Option(None, "--split", help="Split of --data when it is a folder or Hub dataset."),
        out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: runs/sft)."),
        epochs: Optional[int] = typer.Option(None, help="Passes over the data (default: 3)."),
        max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: 2e-5)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per forward pass per process (default: 4)."),
        grad_accum: Optional[int] = typer.Option(None, help="Forward passes per optimizer step (default: 1)."),
        max_length: Optional[int] = typer.Option(None, help="Tokens per example (default: 512)."),
        seed: Optional[int] = typer.Option(None, help="Seed (default: 0)."),
        save_steps: Optional[int] = typer.Option(None, help="Checkpoint every N steps (default: 100)."),
        save_every_seconds: Optional[float] = typer.Option(
            None, help="Also checkpoint whenever this many seconds have passed since the last one (default: 300)."),
        resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the last checkpoint (default: resume)."),
        dtype: Optional[str] = typer.Option(None, help="Weights dtype: float32, bfloat16 (default: float32)."),
        mixed_precision: Optional[str] = typer.Option(None, help="no, bf16 or fp16 (default: no)."),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show a progress bar."),
        set_: list[str] = typer.Option([], "--set", help="Any SFTConfig field, key=value (repeatable), e.g. dtype=bfloat16."),
    ) -> None:
        """Supervised fine-tuning on demonstrations (loss on response tokens only).

        Reads: --model (save_pretrained folder or Hub name) and --data (records with
        instruction, input, output).

        Writes to --out: the fine-tuned model and tokenizer (save_pretrained, safetensors),
        metrics.jsonl (step, loss, lr, tokens, tokens_per_s), sft_config.json, and
        checkpoints/ while training (every --save-steps steps or --save-every-seconds). Rerun the
        same command to resume; a folder trained with other settings is an error (--no-resume
        starts over there).

        Several processes: accelerate launch --multi_gpu --num_processes 2 -m prefgym.cli sft ...
        """
        from prefgym.methods.common import load_config, set_then_flags

        flags = dict(
            model_name_or_path=model, train_file=data, split=split, output_dir=out, epochs=epochs,
            max_steps=max_steps, lr=lr, per_device_batch_size=batch_size, grad_accum=grad_accum,
            max_length=max_length, seed=seed, save_steps=save_steps, save_every_seconds=save_every_seconds,
            resume=resume, dtype=dtype,
            mixed_precision=mixed_precision, progress=progress)
        cfg = load_config(SFTConfig, config, set_then_flags(set_, flags))
        path = train_sft(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"wrote {path}")
