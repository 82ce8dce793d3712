"""KTO: Kahneman–Tversky optimisation from unpaired desirable / undesirable examples (Ethayarajh et al. 2024).

Each example is a (prompt x, completion y) with a binary label. With the implicit reward
r = log π(y|x) - log π_ref(y|x) and the reference point z0 (below):

    desirable:    λ_D (1 - σ(β (r - z0)))
    undesirable:  λ_U (1 - σ(β (z0 - r)))
    loss = mean over the micro-batch's examples

z0 estimates KL(π‖π_ref) from mismatched pairs: each example x_i also carries the completion of
another example, y', and z0 = max(0, mean over the batch of [log π(y'|x_i) - log π_ref(y'|x_i)]),
detached (no gradient) and averaged over processes. The mismatch is fixed once, as TRL's
`KL_completion_ids`: over a seeded shuffle of the examples, example i takes the completion of the
one before it. This is TRL's KTOTrainer loss (trl/trainer/kto_trainer.py, `kto_loss`, loss_type
"kto": eq. 7 of the paper).

The examples come from:
  - annotated pairs (`preference_file`): the output the label favours is desirable, the other
    undesirable, by the shared rounding rule (`prefgym.data.preferences`); ties are skipped;
  - unpaired rows (`unpaired_file`, TRL's unpaired format prompt / completion / label written as
    instruction, input, output, label): label true is desirable, false undesirable.

As in DPO, the reference log-probs (of each completion and of its mismatched one) are computed
once before training, by the policy itself (or `reference_model`), and cached in the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import typer

from prefgym.data.preferences import annotated_pairs
from prefgym.data.prompts import format_record, make_prompt_formatter
from prefgym.errors import ConfigError, DataError
from prefgym.io import atomic_path
from prefgym.methods import common, fields
from prefgym.methods.dpo import _pair_batch, reference_pass
from prefgym.methods.simpo import load_pair_model, train_on_examples
from prefgym.seeding import rng_for, seed_everything


@dataclass
class KTOConfig(fields.TrainFields, fields.LoraFields):
    model_name_or_path: str = ""
    """SFT model folder (or hub name): the starting policy and, by default, the reference."""
    reference_model: str = ""
    """Reference model if not the starting policy (its log-probs are computed once, then it is freed)."""
    preference_file: str = ""
    """Annotated pairs (AlpacaFarm format): the favoured output is desirable, the other undesirable."""
    unpaired_file: str = ""
    """Unpaired rows with instruction, input, output and label (true: desirable, false: undesirable)."""
    output_dir: str = ""
    """Where the policy (save_pretrained), metrics.jsonl, reference log-probs and checkpoints go."""
    beta: float = 0.1
    """β: scale of the implicit reward log π/π_ref inside the sigmoid."""
    desirable_weight: float = 1.0
    """λ_D: weight of the desirable examples' losses."""
    undesirable_weight: float = 1.0
    """λ_U: weight of the undesirable examples' losses (KTO paper: keep λ_D n_D / (λ_U n_U) in [1, 4/3])."""
    disable_dropout: bool = True
    """Turn dropout off in the policy (and reference), as TRL does by default."""
    epochs: int = 2
    """Passes over the examples."""
    lr: float = 1e-6
    """AdamW learning rate (constant after warmup)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    per_device_batch_size: int = 8
    """Examples per process per micro-batch (at least 2: z0 is estimated over the batch)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = per_device_batch_size × processes × grad_accum)."""
    max_length: int = 512
    """Tokens of prompt + completion kept (prompt cut from the left, completion from the right)."""
    seed: int = 0
    """Seed of the shuffling and of the mismatched pairs."""
    save_steps: int = 200
    """Checkpoint (model, optimizer, RNG, step) every this many optimizer steps."""
    resume: bool = True
    """Continue from the checkpoint in output_dir if there is one."""


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, policy_kl_logps: torch.Tensor,
             ref_kl_logps: torch.Tensor, desirable: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, reduce_mean=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses (B,), implicit rewards β·(log π - log π_ref) (B,) and the reference point z0.

    `desirable` (B,) bool; `*_kl_logps` are of the mismatched completions; `reduce_mean` averages
    a tensor over processes (z0 is the mean over the global batch).
    """
    kl = (policy_kl_logps - ref_kl_logps).mean().detach()
    z0 = (reduce_mean(kl) if reduce_mean else kl).clamp(min=0)
    logratios = policy_logps - ref_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach(), z0


# ---------------------------------------------------------------------------------------------
# Data


def examples_from_pairs(records: list[dict], path=None, fmt=format_record) -> list[tuple[str, str, bool]]:
    """(prompt, completion, desirable) twice per pair: the favoured output True, the other False; ties skipped."""
    out = []
    for _, r, pref in annotated_pairs(records, path=path):
        if pref.winner is None:
            continue
        prompt = fmt(r)
        better, worse = (r["output_1"], r["output_2"]) if pref.winner == 1 else (r["output_2"], r["output_1"])
        out += [(prompt, better, True), (prompt, worse, False)]
    return out


def examples_from_unpaired(records: list[dict], path=None, fmt=format_record) -> list[tuple[str, str, bool]]:
    """(prompt, completion, desirable) from rows with instruction, input, output and a boolean label."""
    out = []
    for i, r in enumerate(records):
        for field in ("instruction", "output", "label"):
            if field not in r:
                raise DataError("missing field", path=path, row=i, field=field)
        if not isinstance(r["label"], bool):
            raise DataError(f"expected true (desirable) or false (undesirable), got {r['label']!r}",
                            path=path, row=i, field="label")
        if not isinstance(r["output"], str):
            raise DataError(f"expected a string, got {type(r['output']).__name__}", path=path, row=i, field="output")
        out.append((fmt(r), r["output"], r["label"]))
    return out


def with_mismatched_completions(examples: list[tuple[str, str, bool]], seed: int
                                ) -> list[tuple[str, str, str, bool]]:
    """(prompt, completion, mismatched completion, desirable): over a seeded shuffle, each example takes
    the completion of the one before it (TRL's KL_completion_ids); the original order is kept."""
    order = rng_for(seed, "kto-mismatch").permutation(len(examples))
    previous = {int(order[p]): int(order[p - 1]) for p in range(len(order))}
    return [(prompt, completion, examples[previous[i]][1], label)
            for i, (prompt, completion, label) in enumerate(examples)]


def load_examples(cfg: KTOConfig, records: list[dict] | None, unpaired: list[dict] | None,
                  fmt=format_record) -> list[tuple]:
    """Examples from the pairs and/or the unpaired rows, each with its mismatched completion; `fmt` makes the prompts."""
    if records is None and cfg.preference_file:
        records = common.load_split(cfg.preference_file, ("instruction", "output_1", "output_2", "preference"))
    if unpaired is None and cfg.unpaired_file:
        unpaired = common.load_split(cfg.unpaired_file, ("instruction", "output", "label"))
    if records is None and unpaired is None:
        raise ConfigError("kto: preference_file (pairs) or unpaired_file (rows with a label) is required")
    examples = examples_from_pairs(records, cfg.preference_file or None, fmt) if records is not None else []
    examples += examples_from_unpaired(unpaired, cfg.unpaired_file or None, fmt) if unpaired is not None else []
    if not examples:
        raise DataError("no examples to train on (all pairs ties or unannotated)",
                        path=cfg.preference_file or cfg.unpaired_file or None)
    return with_mismatched_completions(examples, cfg.seed)


# ---------------------------------------------------------------------------------------------
# Training


def _check(cfg: KTOConfig) -> None:
    if not cfg.model_name_or_path or not cfg.output_dir:
        raise ConfigError("kto: model_name_or_path and output_dir are required")
    if cfg.per_device_batch_size < 2:
        raise ConfigError("kto: per_device_batch_size must be at least 2 (z0 is estimated over the batch)")
    if cfg.desirable_weight < 0 or cfg.undesirable_weight < 0:
        raise ConfigError("kto: desirable_weight and undesirable_weight must be non-negative")


def _cached_reference_logps(cfg: KTOConfig, accelerator, model, tokenizer, examples, out: Path) -> torch.Tensor:
    """(N, 2) reference log-probs of (completion, mismatched completion), computed once and cached."""
    ref_file = out / "reference_logps.pt"
    if cfg.resume and ref_file.exists():
        ref_logps = torch.load(ref_file)
    else:
        ref_logps = reference_pass(accelerator, model, tokenizer, examples, cfg)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            with atomic_path(ref_file) as tmp:
                torch.save(ref_logps, tmp)
        accelerator.wait_for_everyone()
    if len(ref_logps) != len(examples):
        raise DataError(f"cached reference log-probs of {len(ref_logps)} examples, but the data has "
                        f"{len(examples)}; delete the file (or use a fresh output_dir)", path=ref_file)
    return ref_logps


def train(cfg: KTOConfig, records: list[dict] | None = None, unpaired: list[dict] | None = None) -> Path:
    """Train a policy with KTO; `records`: annotated pairs, `unpaired`: rows with a label. Returns its folder."""
    _check(cfg)
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "train_config.json")
    if cfg.resume and (out / "model.safetensors").exists() and not (out / "checkpoint").exists():
        return out  # already complete
    accelerator = fields.make_accelerator(cfg, out)
    fields.start_tracking(accelerator, cfg, "kto")
    seed_everything(cfg.seed)
    model, tokenizer = load_pair_model(cfg)
    examples = load_examples(cfg, records, unpaired, make_prompt_formatter(tokenizer, cfg.prompt_format))
    model.to(accelerator.device)
    ref_logps = _cached_reference_logps(cfg, accelerator, model, tokenizer, examples, out)

    def reduce_mean(t):
        return accelerator.reduce(t, "mean")

    def batch_losses(model, idx):
        batch = [examples[i] for i in idx]
        logps, kl_logps = model(*_pair_batch(tokenizer, batch, cfg.max_length, accelerator.device))
        ref = ref_logps[idx].to(accelerator.device, torch.float32)
        desirable = torch.tensor([e[3] for e in batch], device=logps.device)
        losses, rewards, z0 = kto_loss(logps, ref[:, 0], kl_logps, ref[:, 1], desirable, cfg.beta,
                                       cfg.desirable_weight, cfg.undesirable_weight, reduce_mean)
        d = desirable.float()
        return losses, {"kl": z0, "desirable_fraction": d.mean(),
                        "rewards/desirable": (rewards * d).sum() / d.sum().clamp(min=1),
                        "rewards/undesirable": (rewards * (1 - d)).sum() / (1 - d).sum().clamp(min=1)}

    return train_on_examples(cfg, "kto", accelerator, model, tokenizer, len(examples), batch_losses, out)


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""

    @app.command("kto")
    def kto_command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of KTOConfig fields."),
        model: str = typer.Option(None, "--model", help="SFT model folder (starting policy and reference)."),
        preferences: str = typer.Option(None, "--preferences", help="Annotated pairs (JSON/JSONL)."),
        unpaired: str = typer.Option(None, "--unpaired", help="Rows with instruction, input, output, label."),
        output_dir: str = typer.Option(None, "--output-dir", "--out", "-o", help="Where the policy goes."),
        beta: float = typer.Option(None, "--beta", help="β (default 0.1)."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from a checkpoint (default: yes)."),
    ):
        """Train a policy with KTO on desirable / undesirable examples (from pairs or labelled rows).

        Reads: --model (SFT model folder: start and reference), --preferences and/or --unpaired.
        Writes to --out: the policy (save_pretrained), metrics.jsonl, reference_logps.pt,
        train_config.json, and checkpoint/ while training (rerun the same command to resume).
        """
        overrides = common.set_then_flags(set_, {"model_name_or_path": model, "preference_file": preferences,
                     "unpaired_file": unpaired, "output_dir": output_dir, "beta": beta, "resume": resume})
        cfg = common.load_config(KTOConfig, config, overrides)
        typer.echo(f"kto policy: {train(cfg)}")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"epochs": 2, "lr": 3e-5, "beta": 0.1, "per_device_batch_size": 16, "max_length": 256}
PIPELINE = MethodSpec(
    config=KTOConfig, train=train, weight=1,
    inputs=lambda run: dict(model_name_or_path=run.sft, preference_file=run.pairs, output_dir=run.out),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "epochs": 1}})
