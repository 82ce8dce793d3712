"""SimPO: simple preference optimisation with a reference-free reward (Meng et al. 2024).

The implicit reward of a response is its length-normalised log-probability, β/|y| log π(y|x), so no
reference model is needed. With h = log π(y_w|x)/|y_w| - log π(y_l|x)/|y_l| (the average log-prob
per token, EOS included) and the target reward margin γ:

    ℓ(h) = -log σ(β h - γ)
    loss = (1 - ε) ℓ(h) + ε ℓ(-h)     (ε: probability that the label is wrong, as in prefgym's DPO)

Pairs are oriented and soft labels handled exactly as in DPO (`prefgym.methods.dpo`): the shared
rounding rule picks y_w, ties are skipped, ε = 1 - P(y_w better) with soft_labels = "weight"
(0 with "round"), combined with a global `label_smoothing`. For hard labels and ε = 0 this is
TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (trl/experimental/cpo/cpo_trainer.py,
`cpo_loss`: logits = h - γ/β, loss = -log σ(β logits)). With label smoothing TRL's flipped term is
-log σ(-(βh - γ)); here it is the loss of the flipped pair, -log σ(-βh - γ): the expected loss
under label noise, as prefgym's DPO.

`train_on_examples`, the offline training loop (seeded epochs of micro-batches, checkpoints,
metrics), is shared with KTO and online DPO.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import typer

from prefgym.errors import ConfigError
from prefgym.data.prompts import make_prompt_formatter
from prefgym.io import append_jsonl
from prefgym.methods import common, fields
from prefgym.methods.dpo import PairLogps, _chosen_rejected, _pair_batch, flip_probability
from prefgym.methods.sft import CRASH_AFTER_STEP_ENV
from prefgym.seeding import rng_for, seed_everything


@dataclass
class SimPOConfig(fields.TrainFields, fields.LoraFields):
    model_name_or_path: str = ""
    """SFT model folder (or hub name): the starting policy (no reference model is used)."""
    preference_file: str = ""
    """Pairs with instruction, input, output_1, output_2, preference (AlpacaFarm format)."""
    output_dir: str = ""
    """Where the policy (save_pretrained), metrics.jsonl and checkpoints go."""
    beta: float = 2.0
    """β: scale of the length-normalised reward (SimPO paper: 2.0 to 2.5)."""
    gamma: float = 1.0
    """γ: target reward margin subtracted inside the sigmoid (SimPO paper: 0.3 to 1.6; 0: none)."""
    soft_labels: str = "weight"
    """Soft preferences: 'weight' (flip probability 1 - P(winner) in the loss) or 'round' (as hard labels)."""
    label_smoothing: float = 0.0
    """Global probability that any label is flipped, in [0, 0.5) (0: none)."""
    disable_dropout: bool = True
    """Turn dropout off in the policy, as TRL does by default."""
    epochs: int = 2
    """Passes over the pairs."""
    lr: float = 1e-6
    """AdamW learning rate (constant after warmup)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    per_device_batch_size: int = 8
    """Pairs per process per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = per_device_batch_size × processes × grad_accum)."""
    max_length: int = 512
    """Tokens of prompt + response kept (prompt cut from the left, response from the right)."""
    seed: int = 0
    """Seed of the shuffling."""
    save_steps: int = 200
    """Checkpoint (model, optimizer, RNG, step) every this many optimizer steps."""
    resume: bool = True
    """Continue from the checkpoint in output_dir if there is one."""


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float,
               flip: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and rewards β·avg log-prob of chosen and rejected, from per-token average log-probs."""
    h = avg_chosen - avg_rejected

    def ell(x):
        return -F.logsigmoid(beta * x - gamma)

    losses = (1 - flip) * ell(h) + flip * ell(-h)
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def average_pair_logps(model, tokenizer, examples, max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token average log-probs (B,), (B,) of the chosen and rejected responses (EOS included)."""
    batch = _pair_batch(tokenizer, examples, max_length, device)
    chosen, rejected = model(*batch)  # sums over the response tokens
    lengths = batch[3].sum(-1).float()  # (2B,): chosen and rejected interleaved
    return chosen / lengths[0::2], rejected / lengths[1::2]


def _check(cfg: SimPOConfig) -> None:
    if not cfg.model_name_or_path or not cfg.output_dir:
        raise ConfigError("simpo: model_name_or_path and output_dir are required")
    if cfg.soft_labels not in ("weight", "round"):
        raise ConfigError(f"simpo: soft_labels must be 'weight' or 'round', got '{cfg.soft_labels}'")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"simpo: label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")


# ---------------------------------------------------------------------------------------------
# The offline loop (shared with KTO and online DPO)


def load_pair_model(cfg) -> tuple[PairLogps, object]:
    """The policy as a `PairLogps` module (dropout off if cfg.disable_dropout) and its tokenizer."""
    from prefgym.models.loading import load_policy

    tokenizer = common.load_tokenizer(cfg.model_name_or_path)
    model = PairLogps(load_policy(cfg.model_name_or_path, cfg))
    if cfg.disable_dropout:
        common.disable_dropout(model)
    return model, tokenizer


def train_on_examples(cfg, name: str, accelerator, model: PairLogps, tokenizer, n_examples: int,
                      batch_losses: Callable[[torch.nn.Module, list[int]], tuple[torch.Tensor, dict]],
                      out: Path, save: bool = True) -> Path:
    """Train `model` (a PairLogps) for cfg.epochs over `n_examples` examples; save it to `out`.

    `batch_losses(model, indices) -> (losses (B,), {metric: scalar tensor})` for one micro-batch.
    Optimizer step k of an epoch takes the k-th global batch of a seeded permutation; process `rank`
    takes its slice of each micro-batch (the same global batches on 1 or N processes). Resumes
    from out/checkpoint; with `save` False the trained model is left in memory, not written.
    """
    model.model = common.apply_lora(model.model, cfg, "CAUSAL_LM")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = common.warmup_schedule(accelerator, optimizer, cfg.warmup_steps)
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.per_device_batch_size * n_proc * cfg.grad_accum
    steps_per_epoch = n_examples // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"{name}: {n_examples} examples is fewer than one global batch ({global_batch}); "
                          "lower per_device_batch_size or grad_accum")
    total_steps = steps_per_epoch * cfg.epochs
    ckpt_dir = out / "checkpoint"
    state = common.resume_or_start(accelerator, cfg, out)
    step = state["step"] if state else 0

    crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "0"))  # tests: simulated kill
    model.train()
    t0 = time.time()
    with common.make_progress(accelerator) as progress:
        task = progress.add_task(name, total=total_steps, completed=step, info="")
        checkpoints = common.CheckpointSchedule(cfg.save_steps, cfg.save_every_seconds, accelerator)
        while step < total_steps:
            epoch, k = divmod(step, steps_per_epoch)
            perm = rng_for(cfg.seed, f"{name}-epoch", epoch).permutation(n_examples)
            batch_idx = perm[k * global_batch:(k + 1) * global_batch]
            stats = []
            for micro in range(cfg.grad_accum):
                start = (micro * n_proc + rank) * cfg.per_device_batch_size
                idx = [int(i) for i in batch_idx[start:start + cfg.per_device_batch_size]]
                with common.no_sync_unless(accelerator, model, micro == cfg.grad_accum - 1):
                    losses, micro_stats = batch_losses(model, idx)
                    accelerator.backward(losses.mean() / cfg.grad_accum)
                stats.append(torch.stack([losses.mean().detach(), *[v.detach().float() for v in micro_stats.values()]]))
            optimizer.step()
            lr = common.step_scheduler(accelerator, scheduler)
            optimizer.zero_grad()
            step += 1
            s = accelerator.reduce(torch.stack(stats).mean(0), "mean").tolist()
            metrics = {"step": step, "epoch": epoch, **dict(zip(["loss", *micro_stats], s)),
                       "lr": lr, "elapsed_s": round(time.time() - t0, 2)}
            if accelerator.is_main_process:
                append_jsonl(out / "metrics.jsonl", metrics)
            fields.track(accelerator, metrics)
            progress.update(task, advance=1, info=f"loss {s[0]:.3f}")
            if checkpoints.due(step, total_steps):
                common.save_checkpoint(accelerator, ckpt_dir, {"step": step})
            if step == crash_after:
                os._exit(137)  # tests: a hard kill after this step, as SIGKILL would leave it

    accelerator.wait_for_everyone()
    if save:
        common.save_trained(accelerator, model, tokenizer, out, "model")
    if save and accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    fields.finish_tracking(accelerator)
    accelerator.wait_for_everyone()
    common.end_training(accelerator)
    return out


def train(cfg: SimPOConfig, records: list[dict] | None = None) -> Path:
    """Train a policy with SimPO on annotated pairs; returns its folder (save_pretrained)."""
    _check(cfg)
    if records is None and not cfg.preference_file:
        raise ConfigError("simpo: preference_file is required")
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "train_config.json")
    if cfg.resume and (out / "model.safetensors").exists() and not (out / "checkpoint").exists():
        return out  # already complete
    accelerator = fields.make_accelerator(cfg, out)
    fields.start_tracking(accelerator, cfg, "simpo")
    seed_everything(cfg.seed)
    if records is None:
        records = common.load_split(cfg.preference_file, ("instruction", "output_1", "output_2", "preference"))
    model, tokenizer = load_pair_model(cfg)
    examples = _chosen_rejected(records, cfg.preference_file or None, make_prompt_formatter(tokenizer, cfg.prompt_format))
    model.to(accelerator.device)

    def batch_losses(model, idx):
        batch = [examples[i] for i in idx]
        avg_c, avg_r = average_pair_logps(model, tokenizer, batch, cfg.max_length, accelerator.device)
        p_chosen = torch.tensor([e[3] for e in batch], device=avg_c.device, dtype=avg_c.dtype)
        flip = flip_probability(p_chosen, cfg.label_smoothing, cfg.soft_labels)
        losses, chosen_r, rejected_r = simpo_loss(avg_c, avg_r, cfg.beta, cfg.gamma, flip)
        return losses, {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                        "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
                        "rewards/margins": (chosen_r - rejected_r).mean()}

    return train_on_examples(cfg, "simpo", accelerator, model, tokenizer, len(examples), batch_losses, out)


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""

    @app.command("simpo")
    def simpo_command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of SimPOConfig fields."),
        model: str = typer.Option(None, "--model", help="SFT model folder (the starting policy)."),
        preferences: str = typer.Option(None, "--preferences", help="Annotated pairs (JSON/JSONL)."),
        output_dir: str = typer.Option(None, "--output-dir", "--out", "-o", help="Where the policy goes."),
        beta: float = typer.Option(None, "--beta", help="β (default 2.0)."),
        gamma: float = typer.Option(None, "--gamma", help="Target reward margin γ (default 1.0)."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from a checkpoint (default: yes)."),
    ):
        """Train a policy directly on annotated pairs with SimPO (reference-free, length-normalised).

        Reads: --model (SFT model folder), --preferences (annotated pairs).
        Writes to --out: the policy (save_pretrained), metrics.jsonl, train_config.json, and
        checkpoint/ while training (rerun the same command to resume).
        """
        overrides = common.set_then_flags(set_, {"model_name_or_path": model, "preference_file": preferences,
                     "output_dir": output_dir, "beta": beta, "gamma": gamma, "resume": resume})
        cfg = common.load_config(SimPOConfig, config, overrides)
        typer.echo(f"simpo policy: {train(cfg)}")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"epochs": 2, "lr": 3e-5, "beta": 2.0, "gamma": 1.0, "per_device_batch_size": 16, "max_length": 256}
PIPELINE = MethodSpec(
    config=SimPOConfig, train=train, weight=1,
    inputs=lambda run: dict(model_name_or_path=run.sft, preference_file=run.pairs, output_dir=run.out),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "epochs": 1}})
