"""GRPO (Shao et al. 2024, DeepSeekMath) and its length-bias fixes: Dr. GRPO and DAPO's token-level loss.

Each step samples a group of k responses to each prompt and scores them: with the reward model
(`reward: model`) or with the world's gold quality as a verifiable reward (`reward: gold`), to
contrast a learned reward with a programmatic one. Advantages are group-normalised and shared by
every token of a response:

    grpo, dapo: A_i = (r_i - mean(r_group)) / (std(r_group) + eps)   (std unbiased, as torch.std)
    dr_grpo:    A_i = r_i - mean(r_group)                               (no std scaling: Liu et al. 2025)

Per token, with ratio ρ_t = π(y_t) / π_old(y_t) and the clipped surrogate
ℓ_t = max(-A ρ_t, -A clip(ρ_t, 1 - ε, 1 + ε_high)), plus β times DeepSeekMath's k3 estimate of
KL(π‖π_ref), exp(log π_ref - log π) - (log π_ref - log π) - 1, when β > 0. The loss normalises the
token terms in one of three ways (`loss_type`), which is where the length biases live:

    grpo:    mean over sequences of (Σ_t ℓ_t / |y_i|)          per-sequence mean (DeepSeekMath)
    dr_grpo: Σ_i Σ_t ℓ_t / (B · max_new_tokens)                a constant normaliser (Dr. GRPO)
    dapo:    Σ_i Σ_t ℓ_t / Σ_i |y_i|                           token-level mean (DAPO)

as TRL's GRPOTrainer (trl/trainer/grpo_trainer.py, `_compute_loss`, loss_type "grpo", "dr_grpo",
"dapo"; eps = 1e-4 as its advantage scaling). The loop (sampling, scoring, minibatch updates,
checkpoints) is RLOO's (`prefgym.methods.rloo.train_group_policy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import typer

from prefgym.errors import ConfigError
from prefgym.methods import common, fields
from prefgym.methods.rloo import _check_common, reward_model_scorer, sequence_kl, train_group_policy

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
REWARDS = ("model", "gold")
ADVANTAGE_EPS = 1e-4


@dataclass
class GRPOConfig(fields.RewardEnsembleFields, fields.GenerationFields, fields.TrainFields, fields.LoraFields):
    policy_model: str = ""
    """SFT model folder (or hub name): the starting policy and the frozen reference."""
    reward_model: str = ""
    """Reward model folder (from `prefgym reward-model`); not needed with reward: gold."""
    reward: str = "model"
    """What scores the samples: 'model' (the reward model) or 'gold' (the world's gold quality, a verifiable reward)."""
    prompt_file: str = ""
    """Prompts (instruction, input): the `unlabeled` split."""
    output_dir: str = ""
    """Where the policy (save_pretrained), metrics.jsonl and checkpoints go."""
    loss_type: str = "dapo"
    """Normalisation of the token losses: 'grpo' (per-sequence mean), 'dr_grpo' (sum / (B · max_new_tokens),
    no std scaling of advantages) or 'dapo' (sum / tokens in the batch)."""
    steps: int = 100
    """Optimisation steps; each samples a group of k responses to each of a batch of prompts."""
    per_device_prompts: int = 4
    """Prompts per process per step (sequences per step = this × k × processes)."""
    k: int = 4
    """Group size: samples per prompt (TRL's num_generations)."""
    num_mini_batches: int = 1
    """Minibatches each step's sequences are split into for the updates."""
    ppo_epochs: int = 1
    """Updates per group of samples (GRPO's μ, TRL's num_iterations; 1: on-policy, the ratio stays 1)."""
    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm; 0: none)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    max_new_tokens: int = 128
    """Longest response sampled (also the constant normaliser of dr_grpo)."""
    max_prompt_length: int = 384
    """Prompt tokens kept (from the left)."""
    beta: float = 0.04
    """Weight of the k3 KL(π‖π_ref) term in the loss (DeepSeekMath: 0.04; 0: no reference model is loaded)."""
    cliprange: float = 0.2
    """ε: lower clipping of the token ratio (and upper, unless cliprange_high is set)."""
    cliprange_high: float | None = None
    """Upper clipping ε_high (DAPO's clip-higher, e.g. 0.28); None: same as cliprange."""
    missing_eos_penalty: float | None = -1.0
    """Score given to responses that never emit EOS (None: keep the score)."""
    disable_dropout: bool = True
    """Turn dropout off in policy, reference and reward model, so the updates score what was sampled."""
    seed: int = 0
    """Seed of prompt order, sampling and minibatches."""
    save_steps: int = 20
    """Checkpoint (policy, optimizer, RNG, step) every this many steps."""
    resume: bool = True
    """Continue from the checkpoint in output_dir if there is one."""
    # engine (GenerationFields): vllm samples the groups on a vLLM engine that gets the policy's weights
    # before each rollout (RLOO's loop); the log-probs are still the policy's forward pass.


# ---------------------------------------------------------------------------------------------
# The maths


def group_advantages(rewards: torch.Tensor, k: int, scale: bool = True, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """(N·k,) prompt-major rewards -> r - group mean, divided by (group std + eps) when `scale`."""
    groups = rewards.reshape(-1, k)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def advantages_for(rewards: torch.Tensor, k: int, loss_type: str) -> torch.Tensor:
    """GRPO's advantages for `loss_type`: std-scaled for grpo and dapo, centred only for dr_grpo."""
    return group_advantages(rewards, k, scale=loss_type != "dr_grpo")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref) (Schulman; DeepSeekMath eq. 4): e^(ref - logp) - (ref - logp) - 1."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def normalise_token_losses(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int,
                           token_count: torch.Tensor | float | None = None) -> torch.Tensor:
    """One loss from (B, R) token terms by `loss_type` (see the module docstring).

    `token_count` (dapo only): the normaliser, default the mask's sum; data-parallel training passes
    the global count / processes so that the averaged gradient is that of the global token mean.
    """
    if loss_type == "grpo":
        return common.masked_mean(per_token, mask, dim=-1).mean()
    if loss_type == "dr_grpo":
        return common.masked_sum(per_token, mask) / (per_token.shape[0] * max_new_tokens)
    if loss_type == "dapo":
        return common.masked_sum(per_token, mask) / (mask.sum() if token_count is None else token_count)
    raise ConfigError(f"grpo: loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def grpo_loss(new_logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str, beta: float, cliprange: float,
              cliprange_high: float | None, max_new_tokens: int, token_count=None) -> dict[str, torch.Tensor]:
    """Clipped token-level surrogate (+ β·k3 KL) over (B, R) response tokens, normalised by `loss_type`."""
    ratio = torch.exp(new_logps - old_logps)
    adv = advantages[:, None]
    high = cliprange if cliprange_high is None else cliprange_high
    losses1 = -adv * ratio
    losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    per_token = torch.max(losses1, losses2)
    kl = k3_kl(new_logps, ref_logps) if ref_logps is not None else torch.zeros_like(per_token)
    if beta:
        per_token = per_token + beta * kl
    return {"loss": normalise_token_losses(per_token, mask, loss_type, max_new_tokens, token_count),
            "clipfrac": common.masked_mean((losses2 > losses1).float(), mask),
            "k3_kl": common.masked_mean(kl, mask), "ratio": common.masked_mean(ratio, mask)}


# ---------------------------------------------------------------------------------------------
# Training


def gold_scorer(tokenizer, gold_fn=None):
    """Scores of a rollout by `gold_fn(instruction, input, output)` (default: the built-in world's gold quality)."""
    if gold_fn is None:
        from prefgym.world.gold import gold_quality as gold_fn

    def score(rollout, prompts: list[dict]) -> torch.Tensor:
        texts = tokenizer.batch_decode(rollout.ids[:, rollout.P:], skip_special_tokens=True)
        return torch.tensor([gold_fn(p["instruction"], p.get("input", "") or "", t.strip())
                             for p, t in zip(prompts, texts)], dtype=torch.float32)

    return score


def _check(cfg: GRPOConfig) -> None:
    _check_common(cfg, "grpo")
    if cfg.loss_type not in LOSS_TYPES:
        raise ConfigError(f"grpo: loss_type must be one of {', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}")
    if cfg.reward not in REWARDS:
        raise ConfigError(f"grpo: reward must be 'model' or 'gold', got {cfg.reward!r}")
    if cfg.reward == "model" and not cfg.reward_model:
        raise ConfigError("grpo: 'reward_model' is required with reward: model (or set reward: gold)")


def train(cfg: GRPOConfig, prompts: list[dict] | None = None, gold_fn=None) -> Path:
    """Run GRPO; returns the folder of the trained policy (save_pretrained).

    `gold_fn(instruction, input, output) -> float` replaces the world's gold quality with reward: gold.
    """
    _check(cfg)
    with_reference = cfg.beta > 0

    def score_fn_factory(tokenizer):
        return reward_model_scorer(cfg, tokenizer) if cfg.reward == "model" else gold_scorer(tokenizer, gold_fn)

    def advantages_fn(rollout, score, reduce_sum):
        advantages = advantages_for(score, cfg.k, cfg.loss_type)
        groups = score.reshape(-1, cfg.k)
        flat = (groups.std(-1) == 0).float().repeat_interleave(cfg.k)  # groups with nothing to learn from
        stats = {"zero_std_fraction": flat}
        if rollout.ref_logps is not None:
            stats["kl"] = sequence_kl(rollout)
        return advantages, stats

    def loss_fn(new_logps, rollout, advantages, i, token_count):
        ref = rollout.ref_logps[i] if rollout.ref_logps is not None else None
        return grpo_loss(new_logps, rollout.logps[i], ref, advantages[i], rollout.response_mask[i],
                         loss_type=cfg.loss_type, beta=cfg.beta, cliprange=cfg.cliprange,
                         cliprange_high=cfg.cliprange_high, max_new_tokens=cfg.max_new_tokens,
                         token_count=token_count)

    return train_group_policy(cfg, prompts, "grpo", score_fn_factory, advantages_fn, loss_fn, with_reference)


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""

    @app.command("grpo")
    def grpo_command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of GRPOConfig fields."),
        policy: str = typer.Option(None, "--policy", help="SFT model folder (start and reference)."),
        reward_model: str = typer.Option(None, "--reward-model", help="Reward model folder (reward: model)."),
        reward: str = typer.Option(None, "--reward", help="model (reward model) or gold (world's gold quality)."),
        prompts: str = typer.Option(None, "--prompts", help="Prompts: the unlabeled split (JSON/JSONL)."),
        output_dir: str = typer.Option(None, "--output-dir", "--out", "-o", help="Where the policy goes."),
        loss_type: str = typer.Option(None, "--loss-type", help="grpo, dr_grpo or dapo (default)."),
        steps: int = typer.Option(None, "--steps", help="Optimisation steps."),
        k: int = typer.Option(None, "--k", help="Group size (default 4)."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from a checkpoint (default: yes)."),
    ):
        """Optimise the policy with GRPO (group-normalised advantages; grpo / dr_grpo / dapo losses).

        Reads: --policy (SFT model folder: start and KL reference), --reward-model (or --reward gold),
        --prompts. Writes to --out: the policy (save_pretrained), metrics.jsonl, train_config.json,
        and checkpoint/ while training (rerun the same command to resume).
        """
        overrides = common.set_then_flags(set_, {"policy_model": policy, "reward_model": reward_model,
                     "reward": reward, "prompt_file": prompts, "output_dir": output_dir, "loss_type": loss_type,
                     "steps": steps, "k": k, "resume": resume})
        cfg = common.load_config(GRPOConfig, config, overrides)
        typer.echo(f"grpo policy: {train(cfg)}")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"steps": 100, "per_device_prompts": 4, "k": 4, "lr": 5e-5, "beta": 0.04, "loss_type": "dapo",
          "max_new_tokens": 64, "max_prompt_length": 256, "temperature": 1.0, "save_steps": 25}
PIPELINE = MethodSpec(
    config=GRPOConfig, train=train, weight=3,
    inputs=lambda run: dict(policy_model=run.sft, reward_model=run.reward_model, prompt_file=run.splits["unlabeled"],
                            output_dir=run.out),
    labels=lambda cfg: "pairs" if cfg.reward == "model" else "none",  # the gold reward needs no labels
    world_settings={"default": _WORLD, "quick": {**_WORLD, "steps": 10, "max_new_tokens": 32}})
