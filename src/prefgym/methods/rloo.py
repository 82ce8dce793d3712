"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024; TRL's RLOOTrainer).

Each step samples k responses to each prompt of a batch from the `unlabeled` split, scores them
with the reward model and turns each into one sequence-level reward

    R_i = score_i - β Σ_t (log π(y_i,t) - log π_ref(y_i,t))

(the KL penalty summed over the response's tokens). Each sample's baseline is the mean reward of
the k - 1 other samples of its prompt, b_i = (Σ_j R_j - R_i) / (k - 1), and its advantage is
A_i = R_i - b_i. The policy takes a few epochs of updates on the REINFORCE loss with the ratio of
whole-sequence probabilities r_i = π(y_i) / π_old(y_i), clipped as in PPO:

    loss = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - ε, 1 + ε))

which is -A_i log π(y_i) in gradient on the first update (r_i = 1): plain REINFORCE. There is no
value model. This is TRL's RLOOTrainer (trl/trainer/rloo_trainer.py, versions 0.11 to 0.19).

The rollout and update loop (`train_group_policy`) is shared with GRPO (`prefgym.methods.grpo`):
k samples per prompt laid out prompt-major (row i·k + j is sample j of prompt i), log-probs at the
sampling temperature with dropout off, responses cut after their first EOS and the shared
missing-EOS rule (`common.missing_eos_scores`).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import typer

from prefgym.data.prompts import make_prompt_formatter
from prefgym.errors import ConfigError
from prefgym.io import append_jsonl
from prefgym.methods import common, fields, zero3
from prefgym.methods.sft import CRASH_AFTER_STEP_ENV
from prefgym.seeding import rng_for, seed_everything, stable_hash


@dataclass
class RLOOConfig(fields.RewardEnsembleFields, fields.GenerationFields, fields.TrainFields, fields.LoraFields):
    policy_model: str = ""
    """SFT model folder (or hub name): the starting policy and the frozen reference."""
    reward_model: str = ""
    """Reward model folder (from `prefgym reward-model`) that scores the samples."""
    prompt_file: str = ""
    """Prompts (instruction, input): the `unlabeled` split."""
    output_dir: str = ""
    """Where the policy (save_pretrained), metrics.jsonl and checkpoints go."""
    steps: int = 100
    """Optimisation steps; each samples k responses to a batch of prompts."""
    per_device_prompts: int = 4
    """Prompts per process per step (sequences per step = this × k × processes)."""
    k: int = 4
    """Samples per prompt (TRL's rloo_k); the baseline of each is the mean reward of the other k - 1."""
    num_mini_batches: int = 1
    """Minibatches each step's sequences are split into for the updates."""
    ppo_epochs: int = 1
    """Passes of updates over each step's samples (1: on-policy REINFORCE, the ratio stays 1)."""
    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm; 0: none)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    max_new_tokens: int = 128
    """Longest response sampled."""
    max_prompt_length: int = 384
    """Prompt tokens kept (from the left)."""
    kl_coef: float = 0.05
    """β: weight of the sequence-level KL penalty Σ_t (log π - log π_ref) subtracted from the score."""
    cliprange: float = 0.2
    """ε: clipping of the sequence probability ratio π(y) / π_old(y) (matters when ppo_epochs > 1)."""
    normalize_advantage: bool = False
    """Whiten the advantages over the step's samples (TRL's normalize_advantage)."""
    missing_eos_penalty: float | None = -1.0
    """Score given to responses that never emit EOS (None: keep the reward model's score)."""
    disable_dropout: bool = True
    """Turn dropout off in policy, reference and reward model, so the updates score what was sampled."""
    seed: int = 0
    """Seed of prompt order, sampling and minibatches."""
    save_steps: int = 20
    """Checkpoint (policy, optimizer, RNG, step) every this many steps."""
    resume: bool = True
    """Continue from the checkpoint in output_dir if there is one."""
    # engine (GenerationFields): vllm samples the rollouts on a vLLM engine that gets the policy's weights
    # before each rollout; the log-probs are still the policy's forward pass, so the algorithm is unchanged.


# ---------------------------------------------------------------------------------------------
# The maths


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(N·k,) prompt-major rewards -> advantages R_i - mean of the k - 1 other rewards of its prompt.

    With k = 1 there are no others: the baseline is 0 (plain REINFORCE), as in TRL.
    """
    if k == 1:
        return rewards.clone()
    groups = rewards.reshape(-1, k)  # (N, k): row i holds the k rewards of prompt i
    baseline = (groups.sum(-1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def rloo_loss(new_logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              cliprange: float) -> dict[str, torch.Tensor]:
    """Clipped REINFORCE on whole sequences: per-token log-probs (B, R) summed over `mask`, (B,) advantages."""
    ratio = torch.exp(common.masked_sum(new_logps - old_logps, mask, dim=-1))  # π(y) / π_old(y)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return {"loss": torch.max(losses1, losses2).mean(), "clipfrac": (losses2 > losses1).float().mean(),
            "ratio": ratio.mean()}


# ---------------------------------------------------------------------------------------------
# Rollouts shared with GRPO


@dataclass
class GroupRollout:
    """k samples for each of a step's prompts, prompt-major; all tensors (N·k, ...)."""

    ids: torch.Tensor  # (N·k, P + R): [left-padded prompt | response padded after its EOS]
    mask: torch.Tensor  # (N·k, P + R) attention mask
    response_mask: torch.Tensor  # (N·k, R): response tokens up to and including the first EOS
    has_eos: torch.Tensor  # (N·k,)
    logps: torch.Tensor  # (N·k, R) log π_old of the response tokens, at the sampling temperature
    ref_logps: torch.Tensor | None  # (N·k, R) log π_ref, or None when no KL term is needed
    rows: list[int]  # (N·k,) index of each sequence's prompt in the prompt list

    @property
    def P(self) -> int:
        return self.ids.shape[1] - self.response_mask.shape[1]


def response_token_logps(model, ids, mask, P: int, temperature: float) -> torch.Tensor:
    """Log-probs (B, R) of the response tokens ids[:, P:] (the logits of position P + j - 1 score token j)."""
    response_mask = torch.zeros_like(mask)
    response_mask[:, P:] = 1
    return common.response_logprobs(model, ids, mask, temperature, response_mask)[:, P:]


@torch.no_grad()
def sample_groups(policy, reference, tokenizer, prompt_texts: list[str], rows: list[int], k: int, *,
                  seed_parts: tuple, temperature: float, max_new_tokens: int, max_prompt_length: int,
                  with_reference: bool, engine=None) -> GroupRollout:
    """Sample k responses to each prompt `rows` (seeded per prompt and sample), with old and reference log-probs.

    `reference` None with `with_reference`: the policy with its LoRA adapters disabled. `engine`: the
    vLLM engine to sample on, which gets the policy's weights first (`common.rollout_engine`; None: HF).
    """
    seq_rows = [r for r in rows for _ in range(k)]
    seeds = [stable_hash(*seed_parts, r, j) for r in rows for j in range(k)]
    query_ids, query_mask, response_ids = common.sample_rollout(
        engine, policy, tokenizer, [prompt_texts[r] for r in seq_rows], seeds=seeds, temperature=temperature,
        max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length)
    response_ids, response_mask, has_eos = common.truncate_after_eos(response_ids, tokenizer.eos_token_id,
                                                                      tokenizer.pad_token_id)
    P = query_ids.shape[1]
    ids, mask = torch.cat([query_ids, response_ids], 1), torch.cat([query_mask, response_mask], 1)
    was_training = policy.training
    policy.eval()
    logps = response_token_logps(policy, ids, mask, P, temperature)
    ref_logps = None
    if with_reference and reference is not None:
        ref_logps = response_token_logps(reference, ids, mask, P, temperature)
    elif with_reference:
        with policy.disable_adapter():
            ref_logps = response_token_logps(policy, ids, mask, P, temperature)
    policy.train(was_training)
    return GroupRollout(ids, mask, response_mask, has_eos, logps, ref_logps, seq_rows)


def load_policy_and_reference(cfg, with_reference: bool):
    """Tokenizer, policy (LoRA-wrapped when cfg.use_lora) and frozen reference (None with LoRA or when not needed)."""
    from prefgym.models.loading import load_policy

    tokenizer = common.load_tokenizer(cfg.policy_model)
    policy = load_policy(cfg.policy_model, cfg)
    reference = None
    if with_reference and not cfg.use_lora:
        reference = load_policy(cfg.policy_model, cfg, trainable=False)
        reference.requires_grad_(False)
        reference.eval()
    policy = common.apply_lora(policy, cfg, "CAUSAL_LM")
    for m in (policy, reference):
        if m is not None and cfg.disable_dropout:
            common.disable_dropout(m)
    return tokenizer, policy, reference


def reward_model_scorer(cfg, tokenizer) -> Callable[[GroupRollout, list[dict]], torch.Tensor]:
    """Scores (N·k,) of a rollout by the reward model (or ensemble, combined by cfg.reward_ensemble)
    at cfg.reward_model (same tokenizer as the policy)."""
    from prefgym.methods.reward_model import load_reward_scorer

    scorer = load_reward_scorer(cfg.reward_model, cfg.reward_ensemble, cfg.uwo_coef, model_cfg=cfg)
    if scorer.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"the reward model {cfg.reward_model} and the policy {cfg.policy_model} use different "
                          "tokenizers; train the reward model from the same SFT model")
    scorer.check_prompt_format(tokenizer, cfg.prompt_format, "the policy")
    if cfg.disable_dropout:
        common.disable_dropout(scorer.model)

    def score(rollout: GroupRollout, prompts: list[dict]) -> torch.Tensor:
        scorer.to(rollout.ids.device)
        return scorer.score_tokens(rollout.ids, rollout.mask)

    return score


def _check_common(cfg, name: str) -> None:
    for key in ("policy_model", "output_dir"):
        if not getattr(cfg, key):
            raise ConfigError(f"{name}: '{key}' is required")
    if cfg.k < 2:
        raise ConfigError(f"{name}: k must be at least 2 (samples per prompt), got {cfg.k}")
    if (cfg.per_device_prompts * cfg.k) % cfg.num_mini_batches:
        raise ConfigError(f"{name}: per_device_prompts × k ({cfg.per_device_prompts * cfg.k}) must be divisible "
                          f"by num_mini_batches ({cfg.num_mini_batches})")


# ---------------------------------------------------------------------------------------------
# Training (shared with GRPO)


def train_group_policy(cfg, prompts: list[dict] | None, name: str, score_fn_factory, advantages_fn, loss_fn,
                       with_reference: bool) -> Path:
    """The k-samples-per-prompt policy-gradient loop of RLOO and GRPO.

    `score_fn_factory(tokenizer) -> score(rollout, prompt records) -> (N·k,)`;
    `advantages_fn(rollout, score, reduce_sum) -> ((N·k,) advantages, dict of (N·k,) per-sequence stats)`;
    `loss_fn(new_logps, rollout, advantages, i, token_count) -> dict with "loss"` for minibatch rows `i`.
    """
    if prompts is None and not cfg.prompt_file:
        raise ConfigError(f"{name}: 'prompt_file' is required (the unlabeled split)")
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "train_config.json")
    if cfg.resume and (out / "model.safetensors").exists() and not (out / "checkpoint").exists():
        return out  # already complete
    accelerator = fields.make_accelerator(cfg, out)
    fields.start_tracking(accelerator, cfg, name)
    seed_everything(cfg.seed)
    if prompts is None:
        prompts = common.load_split(cfg.prompt_file, ("instruction",))
    tokenizer, policy, reference = load_policy_and_reference(cfg, with_reference)
    engine = common.rollout_engine(cfg, policy, tokenizer)  # None: the HF sampler
    prompt_texts = [make_prompt_formatter(tokenizer, cfg.prompt_format)(p) for p in prompts]
    score_fn = score_fn_factory(tokenizer)
    if reference is not None:
        reference.to(accelerator.device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, eps=1e-5)
    model, optimizer = accelerator.prepare(policy, optimizer)
    n_proc, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    N = cfg.per_device_prompts
    global_prompts = N * n_proc
    if len(prompt_texts) < global_prompts:
        raise ConfigError(f"{name}: {len(prompt_texts)} prompts is fewer than one step's batch ({global_prompts})")
    steps_per_epoch = len(prompt_texts) // global_prompts

    def reduce_sum(t):
        return accelerator.reduce(t, "sum")

    ckpt_dir = out / "checkpoint"
    state = common.resume_or_start(accelerator, cfg, out)
    step = state["step"] if state else 0

    crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "0"))  # tests: simulated kill
    t0 = time.time()
    with common.make_progress(accelerator) as progress:
        task = progress.add_task(name, total=cfg.steps, completed=step, info="")
        checkpoints = common.CheckpointSchedule(cfg.save_steps, cfg.save_every_seconds, accelerator)
        while step < cfg.steps:
            # 1. Prompts: the step's slice of a per-epoch permutation; this process's part of it.
            epoch, b = divmod(step, steps_per_epoch)
            perm = rng_for(cfg.seed, f"{name}-prompts", epoch).permutation(len(prompt_texts))
            rows = [int(r) for r in perm[b * global_prompts + rank * N:b * global_prompts + (rank + 1) * N]]

            # 2. k samples per prompt (seeded per prompt and sample), cut after EOS; old and reference log-probs.
            #    On the vLLM engine, once it holds the policy's weights as the last update left them.
            #    The models run unprepared (sampling, reference, reward model) autocast as `prepare` runs
            #    the policy (mixed precision): at step 1 the old log-probs are the reference's.
            with accelerator.autocast(), zero3.gathered(model):  # ZeRO-3: sampled on the whole policy
                rollout = sample_groups(accelerator.unwrap_model(model), reference, tokenizer, prompt_texts, rows,
                                        cfg.k, seed_parts=(cfg.seed, f"{name}-sample", step),
                                        temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                        max_prompt_length=cfg.max_prompt_length, with_reference=with_reference,
                                        engine=engine)

                # 3. Scores; responses that never emit EOS get the missing-EOS score.
                raw_score = score_fn(rollout, [prompts[r] for r in rollout.rows]).to(device).float()
            score = common.missing_eos_scores(raw_score, rollout.has_eos, cfg.missing_eos_penalty)

            # 4. Advantages (per sequence), from the scores of each prompt's group.
            advantages, seq_stats = advantages_fn(rollout, score, reduce_sum)

            # 5. Updates: ppo_epochs passes over minibatches of the step's sequences.
            n_seq = len(rollout.rows)
            mb = n_seq // cfg.num_mini_batches
            update_stats = []
            for inner in range(cfg.ppo_epochs):
                order = torch.from_numpy(rng_for(cfg.seed, f"{name}-minibatch", step, inner).permutation(n_seq))
                for m in range(cfg.num_mini_batches):
                    i = order[m * mb:(m + 1) * mb].to(device)
                    token_count = reduce_sum(rollout.response_mask[i].sum().float()) / n_proc
                    new_logps = response_token_logps(model, rollout.ids[i], rollout.mask[i], rollout.P, cfg.temperature)
                    losses = loss_fn(new_logps, rollout, advantages, i, token_count)
                    accelerator.backward(losses["loss"])
                    if cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                    update_stats.append(torch.stack([v.detach().float() for v in losses.values()]))
            step += 1

            # 6. Metrics of the global batch.
            u = (reduce_sum(torch.stack(update_stats).mean(0)) / n_proc).tolist()
            per_seq = {"score": score, "raw_score": raw_score,
                       "response_length": rollout.response_mask.sum(-1).float(),
                       "no_eos_fraction": (~rollout.has_eos).float(), **seq_stats}
            totals = (reduce_sum(torch.stack([v.float().sum() for v in per_seq.values()])) / (n_seq * n_proc)).tolist()
            metrics = {"step": step, "episodes": step * n_seq * n_proc, **dict(zip(per_seq, totals)),
                       **dict(zip(losses, u)), "elapsed_s": round(time.time() - t0, 2)}
            if accelerator.is_main_process:
                append_jsonl(out / "metrics.jsonl", metrics)
            fields.track(accelerator, metrics)
            progress.update(task, advance=1, info=f"score {metrics['score']:.3f} len {metrics['response_length']:.1f}")

            # 7. Checkpoint (policy, optimizer, RNG; step).
            if checkpoints.due(step, cfg.steps):
                common.save_checkpoint(accelerator, ckpt_dir, {"step": step})
            if step == crash_after:
                os._exit(137)  # tests: a hard kill after this step, as SIGKILL would leave it

    accelerator.wait_for_everyone()
    common.save_trained(accelerator, model, tokenizer, out)
    if accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    fields.finish_tracking(accelerator)
    accelerator.wait_for_everyone()
    common.end_training(accelerator)
    return out


def sequence_kl(rollout: GroupRollout) -> torch.Tensor:
    """(N·k,) Σ_t (log π_old - log π_ref) over each response's tokens."""
    return common.masked_sum(rollout.logps - rollout.ref_logps, rollout.response_mask, dim=-1)


def train(cfg: RLOOConfig, prompts: list[dict] | None = None) -> Path:
    """Run RLOO against a reward model; returns the folder of the trained policy (save_pretrained)."""
    _check_common(cfg, "rloo")
    if not cfg.reward_model:
        raise ConfigError("rloo: 'reward_model' is required")

    def advantages_fn(rollout, score, reduce_sum):
        kl = sequence_kl(rollout)
        rlhf_reward = score - cfg.kl_coef * kl  # R_i = score_i - β Σ_t (log π - log π_ref)
        advantages = leave_one_out_advantages(rlhf_reward, cfg.k)
        if cfg.normalize_advantage:
            advantages = common.masked_whiten(advantages, torch.ones_like(advantages), reduce=reduce_sum)
        return advantages, {"kl": kl, "non_score_reward": -cfg.kl_coef * kl, "rlhf_reward": rlhf_reward}

    def loss_fn(new_logps, rollout, advantages, i, token_count):
        return rloo_loss(new_logps, rollout.logps[i], advantages[i], rollout.response_mask[i], cfg.cliprange)

    return train_group_policy(cfg, prompts, "rloo", lambda tok: reward_model_scorer(cfg, tok), advantages_fn,
                              loss_fn, with_reference=True)


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""

    @app.command("rloo")
    def rloo_command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of RLOOConfig fields."),
        policy: str = typer.Option(None, "--policy", help="SFT model folder (start and reference)."),
        reward_model: str = typer.Option(None, "--reward-model", help="Reward model folder."),
        prompts: str = typer.Option(None, "--prompts", help="Prompts: the unlabeled split (JSON/JSONL)."),
        output_dir: str = typer.Option(None, "--output-dir", "--out", "-o", help="Where the policy goes."),
        steps: int = typer.Option(None, "--steps", help="Optimisation steps."),
        k: int = typer.Option(None, "--k", help="Samples per prompt (default 4)."),
        kl_coef: float = typer.Option(None, "--kl-coef", help="β of the sequence-level KL penalty."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from a checkpoint (default: yes)."),
    ):
        """Optimise the policy against the reward model with RLOO (k samples, leave-one-out baseline).

        Reads: --policy (SFT model folder: start and KL reference), --reward-model, --prompts.
        Writes to --out: the policy (save_pretrained), metrics.jsonl (score, kl, loss per step),
        train_config.json, and checkpoint/ while training (rerun the same command to resume).
        """
        overrides = common.set_then_flags(set_, {"policy_model": policy, "reward_model": reward_model,
                     "prompt_file": prompts, "output_dir": output_dir, "steps": steps, "k": k, "kl_coef": kl_coef,
                     "resume": resume})
        cfg = common.load_config(RLOOConfig, config, overrides)
        typer.echo(f"rloo policy: {train(cfg)}")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"steps": 100, "per_device_prompts": 4, "k": 4, "lr": 5e-5, "kl_coef": 0.1, "max_new_tokens": 64,
          "max_prompt_length": 256, "temperature": 1.0, "save_steps": 25}
PIPELINE = MethodSpec(
    config=RLOOConfig, train=train, weight=3,
    inputs=lambda run: dict(policy_model=run.sft, reward_model=run.reward_model, prompt_file=run.splits["unlabeled"],
                            output_dir=run.out),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "steps": 10, "max_new_tokens": 32}})
