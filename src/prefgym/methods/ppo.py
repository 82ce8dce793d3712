"""PPO against a learned reward model (Ziegler et al. 2019; Stiennon et al. 2020; AlpacaFarm).

Each step samples responses to a batch of prompts from the `unlabeled` split and turns them into
per-token rewards: a KL penalty -kl_coef·(log π - log π_ref) on every response token, plus the
reward model's score on the last one. GAE gives advantages, and a few epochs of clipped policy
and value updates follow. The value model starts from the reward model (member-0 of a
reward-model ensemble, whose members' rewards `reward_ensemble` combines). Log-probs are always
computed at the sampling temperature (logits / T), with dropout off, so that the ratio π/π_old is
exactly 1 on the first minibatch.

Sequences are laid out as [left-padded prompt | response padded after its EOS]; for response
token j (at position P + j) the policy's logits and the value are read at position P + j - 1.
"""

from __future__ import annotations

import os
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import typer

from prefgym.data.prompts import make_prompt_formatter
from prefgym.errors import ConfigError
from prefgym.io import append_jsonl
from prefgym.methods import common, fields, zero3
from prefgym.methods.sft import CRASH_AFTER_STEP_ENV
from prefgym.seeding import rng_for, seed_everything, stable_hash


@dataclass
class PPOConfig(fields.RewardEnsembleFields, fields.GenerationFields, fields.TrainFields, fields.LoraFields):
    policy_model: str = ""
    """SFT model folder (or hub name): the starting policy and the frozen reference."""
    reward_model: str = ""
    """Reward model folder (from `prefgym reward-model`); also initialises the value model (an
    ensemble's member-0; the ensemble's rewards are combined by reward_ensemble)."""
    prompt_file: str = ""
    """Prompts (instruction, input): the `unlabeled` split."""
    output_dir: str = ""
    """Where the policy (save_pretrained), metrics.jsonl and checkpoints go."""
    steps: int = 100
    """PPO steps; each samples one rollout batch."""
    per_device_rollout_batch_size: int = 16
    """Prompts sampled per process per step (global batch = this × processes)."""
    num_mini_batches: int = 1
    """Minibatches each rollout batch is split into for the updates."""
    ppo_epochs: int = 2
    """Passes of updates over each rollout batch."""
    lr: float = 1e-5
    """AdamW learning rate of the policy and the value model."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    max_new_tokens: int = 128
    """Longest response sampled."""
    max_prompt_length: int = 384
    """Prompt tokens kept (from the left)."""
    kl_coef: float = 0.02
    """Initial coefficient of the per-token KL penalty."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al.'s proportional controller)."""
    kl_target: float = 6.0
    """Target KL(π‖π_ref) per response, in nats (adaptive_kl only)."""
    kl_horizon: int = 10000
    """Episodes over which the controller closes the KL error (adaptive_kl only)."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE λ."""
    cliprange: float = 0.2
    """Policy ratio clipping ε."""
    cliprange_value: float = 0.2
    """Value clipping around the rollout values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_rewards: bool = True
    """Whiten per-token rewards over the batch (scale only) before GAE."""
    missing_eos_penalty: float | None = -1.0
    """Score given to responses that never emit EOS (None: keep the reward model's score); the rule
    every sampling method shares (`common.missing_eos_scores`)."""
    value_init: str = "normalized_reward"
    """How the value model starts: `normalized_reward` (the reward model with its head rescaled to
    the normalised rewards PPO optimises, as OpenRLHF's critic), `reward` (the reward model's raw
    head, AlpacaFarm's and TRL's choice) or `zero` (the reward model's trunk, a zero head)."""
    disable_dropout: bool = True
    """Turn dropout off in policy, reference, value and reward models (TRL's default), so that the
    log-probs of the updates are those of the rollouts."""
    seed: int = 0
    """Seed of prompt order, sampling and minibatches."""
    save_steps: int = 20
    """Checkpoint (policy, value model, optimizer, RNG, step, kl_coef) every this many steps."""
    sample_log_steps: int = 10
    """Write the first rollouts of every this many steps to samples.jsonl (0: never)."""
    snapshot_steps: int = 0
    """Also save the policy to output_dir/snapshots/step-N every this many steps (0: never), to
    evaluate it over training (win-rate vs steps shows reward over-optimization); not with LoRA."""
    resume: bool = True
    """Continue from the checkpoint in output_dir if there is one."""
    # use_lora (LoraFields): LoRA adapters on policy and value model; the reference is the policy without them,
    # and the value model is the reward model's trunk with them (one frozen trunk each for policy and reward).
    # engine (GenerationFields): vllm samples the rollouts on a vLLM engine that gets the policy's weights
    # before each rollout; the log-probs are still the policy's forward pass, so the algorithm is unchanged.


# ---------------------------------------------------------------------------------------------
# The maths


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation on (B, R) response tokens; returns (advantages, returns).

    δ_t = r_t + γ V_{t+1} - V_t (V = 0 after the last token), A_t = Σ_k (γλ)^k δ_{t+k}, computed
    as one matrix product with the (R, R) upper-triangular discount matrix instead of a loop.
    """
    values = torch.where(mask.bool(), values, torch.zeros_like(values))
    rewards = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    t = torch.arange(deltas.shape[1], device=deltas.device)
    k = t[None, :] - t[:, None]  # (R, R): k[t, j] = j - t
    discount = torch.where(k >= 0, (gamma * lam) ** k.clamp(min=0).to(deltas.dtype), torch.zeros((), dtype=deltas.dtype))
    advantages = deltas @ discount.T
    return advantages, advantages + values


def per_token_rewards(score: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (B, R): -kl_coef·(log π - log π_ref) per token, plus `score` at each row's last token.

    Returns (rewards, kl) with kl the per-token log-ratio (0 outside the response).
    """
    kl = torch.where(mask.bool(), logps - ref_logps, torch.zeros_like(logps))
    rewards = -kl_coef * kl
    last = common.last_token_index(mask)
    rewards[torch.arange(len(score), device=score.device), last] += score
    return rewards, kl


def response_logps_and_values(model, ids: torch.Tensor, mask: torch.Tensor, P: int, temperature: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs and values of the response tokens `ids[:, P:]` of [left-padded prompt | response] rows.

    Response token j sits at position P + j. Its log-prob log π(token | tokens before it) comes
    from the logits at position P + j - 1, and its value V(s_j) is the value of the state before
    it, read at the same position. Returns (logps (B, R), values (B, R), logits (B, R + 1, V)).
    """
    R = ids.shape[1] - P
    logits, values = model(ids, mask, logits_to_keep=R + 1)  # logits of positions P-1 .. P+R-1
    logps = common.token_logprobs(logits, ids[:, P - 1:], temperature)[:, 1:]
    return logps, values[:, P - 1:-1], logits


def rollout_row_groups(first: torch.Tensor, B: int) -> list[torch.Tensor]:
    """The rows of a rollout batch of B as its forward passes take them: the first update's
    minibatch `first`, then the other rows in order (none when `first` is all of them). The
    reference runs on the same groups: in bf16 a row's log-probs depend on the batch it is
    computed in, and at step 1 the policy's and the reference's must be equal."""
    rest = torch.ones(B, dtype=torch.bool, device=first.device)
    rest[first] = False
    return [first] + ([rest.nonzero().squeeze(1)] if rest.any() else [])


def rollout_logps_and_values(model, ids: torch.Tensor, mask: torch.Tensor, P: int, temperature: float,
                             first: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`response_logps_and_values` of a whole rollout batch, plus per-token entropies, with the
    forward pass of the rows `first` (the first update's minibatch) kept for that update.

    The first update runs on the weights that made the rollout, so its forward pass would repeat
    the rollout's for its rows: it is run once, with gradients, and serves both. The other rows
    run without gradients. Returns logps, values, entropy (B, R, detached) and the kept (logps,
    values) of rows `first`, attached to the graph.
    """
    B, R = ids.shape[0], ids.shape[1] - P
    first, *rest = rollout_row_groups(first, B)
    kept_logps, kept_values, logits = response_logps_and_values(model, ids[first], mask[first], P, temperature)
    with torch.no_grad():
        out = [torch.zeros(B, R, device=ids.device) for _ in range(3)]
        parts = [(first, (kept_logps, kept_values, logits))]
        parts += [(rows, response_logps_and_values(model, ids[rows], mask[rows], P, temperature)) for rows in rest]
        for rows, (logps, values, logits) in parts:
            for o, x in zip(out, (logps, values, common.token_entropy(logits.detach(), temperature)[:, 1:])):
                o[rows] = x.detach().to(o.dtype)
    return *out, kept_logps, kept_values


def advantages_and_returns(score: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                           values: torch.Tensor, mask: torch.Tensor, kl_coef: float, gamma: float, lam: float,
                           whiten_rewards: bool, reduce=None) -> dict[str, torch.Tensor]:
    """From a scored rollout to what the updates need, as in Ziegler et al. / AlpacaFarm / TRL.

    Per-token rewards (KL penalty on each token, `score` on the last), optionally whitened in
    scale only (their mean is kept), GAE, then advantages whitened to mean 0 and std 1 over the
    response tokens. `reduce` sums statistics across processes. Returns rewards (before
    whitening), kl, non_score_reward (B,), advantages and returns.
    """
    rewards, kl = per_token_rewards(score, logps, ref_logps, mask, kl_coef)
    non_score_reward = common.masked_sum(rewards, mask, dim=-1) - score  # what the KL term added
    shaped = common.masked_whiten(rewards, mask, shift_mean=False, reduce=reduce) if whiten_rewards else rewards
    advantages, returns = gae(shaped, values, mask, gamma, lam)
    advantages = common.masked_whiten(advantages, mask, reduce=reduce)
    return {"rewards": rewards, "kl": kl, "non_score_reward": non_score_reward, "advantages": advantages,
            "returns": returns}


def ppo_losses(new_logps, old_logps, advantages, vpred, old_values, returns, mask, cliprange: float,
               cliprange_value: float, token_count: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
    """Clipped policy loss and clipped value loss over the response tokens (all (B, R) tensors).

    Means are sums over masked tokens divided by `token_count` (default: the mask's sum); data
    parallel training passes the global count / number of processes so that the averaged
    gradient is the gradient of the global mean.
    """
    n = mask.sum() if token_count is None else token_count

    def mean(x):
        return common.masked_sum(x, mask) / n

    vpred_clipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (vpred - returns) ** 2
    vf_losses2 = (vpred_clipped - returns) ** 2
    logratio = new_logps - old_logps
    ratio = torch.exp(logratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return {
        "pg_loss": mean(torch.max(pg_losses1, pg_losses2)),
        "vf_loss": 0.5 * mean(torch.max(vf_losses1, vf_losses2)),
        "pg_clipfrac": mean((pg_losses2 > pg_losses1).float()),
        "vf_clipfrac": mean((vf_losses2 > vf_losses1).float()),
        "approx_kl": 0.5 * mean(logratio ** 2),
        "value_error": mean(vf_losses1),
        "ratio": mean(ratio),
    }


def update_kl_coef(kl_coef: float, current_kl: float, target: float, horizon: int, n_episodes: int) -> float:
    """Ziegler et al.'s adaptive controller: move kl_coef by a clipped proportional error."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_episodes / horizon)


# ---------------------------------------------------------------------------------------------
# Models


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module: one optimizer, one data-parallel wrapper."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    @property
    def _no_split_modules(self) -> list[str]:
        return common.no_split_modules(self.policy, self.value_model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, logits_to_keep or T, V) of the last positions, and (B, T) values."""
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                             position_ids=common.position_ids_from(attention_mask)).logits
        return logits, common.token_scores(self.value_model, input_ids, attention_mask)


VALUE_INITS = ("normalized_reward", "reward", "zero")


@torch.no_grad()
def init_value_head(value_model, how: str, normalization: dict) -> None:
    """Start the value model's score head on the scale of the rewards PPO optimises (`PPOConfig.value_init`).

    `normalized_reward`: the head becomes (w·h + b - mean) / std, the reward model's normalised
    score, with a bias added when the head has none (OpenRLHF's critic normalises its values
    with the reward model's mean and std in the same way). `reward`: the head as trained.
    `zero`: a zero head, so every value starts at 0.
    """
    if how not in VALUE_INITS:
        raise ConfigError(f"ppo: value_init must be one of {', '.join(VALUE_INITS)}, got {how!r}")
    head = value_model.score
    if how == "reward":
        return
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype,
                          device=head.weight.device)
    bias = head.bias if head.bias is not None else torch.zeros_like(new.bias)
    if how == "zero":
        new.weight.zero_()
        new.bias.zero_()
    else:
        mean, std = float(normalization["mean"]), float(normalization["std"])
        new.weight.copy_(head.weight / std)
        new.bias.copy_((bias - mean) / std)
    value_model.score = new


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(params, cfg: PPOConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `params`, fused where torch has the kernel for `device`.

    The fused kernel does each step in one pass over all parameters (transformers' default optimizer,
    `adamw_torch_fused`, as TRL runs it); torch's default on a CPU loops over the parameters
    tensor by tensor, almost 3× slower. Same update, to float rounding.
    """
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-5,
                             fused=torch.device(device).type in FUSED_ADAMW_DEVICES)


def _load_models(cfg: PPOConfig):
    from prefgym.methods.reward_model import load_reward_scorer
    from prefgym.models.loading import load_policy, load_score_model

    tokenizer = common.load_tokenizer(cfg.policy_model)
    policy = load_policy(cfg.policy_model, cfg)
    scorer = load_reward_scorer(cfg.reward_model, cfg.reward_ensemble, cfg.uwo_coef, model_cfg=cfg)
    if scorer.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"ppo: the reward model {cfg.reward_model} and the policy {cfg.policy_model} use "
                          "different tokenizers; train the reward model from the same SFT model")
    scorer.check_prompt_format(tokenizer, cfg.prompt_format, "ppo")
    reference = None
    if cfg.use_lora:  # the reference is the policy with its adapters disabled
        value_model = _lora_value_model(scorer.members[0], cfg)
    else:
        value_model = load_score_model(scorer.members[0].path, cfg, num_labels=None)
        value_model.config.pad_token_id = tokenizer.pad_token_id
        with zero3.gathered(value_model.score):  # ZeRO-3: the head as loaded is partitioned; the new one is whole
            init_value_head(value_model, cfg.value_init, scorer.members[0].normalization)
        reference = load_policy(cfg.policy_model, cfg, trainable=False)
        reference.requires_grad_(False)
        reference.eval()
    policy = common.apply_lora(policy, cfg, "CAUSAL_LM")
    for m in (policy, value_model, reference, scorer.model):
        if m is not None and cfg.disable_dropout:
            common.disable_dropout(m)
    # DeepSpeed bf16/fp16: LoRA's adapters (fp32 on a bf16 base) and the value head's copy in the engine's
    # dtype, as ZeRO-2 casts them at `prepare`; ZeRO-3 casts nothing there and needs one dtype for all
    return tokenizer, zero3.to_engine_dtype(PolicyAndValue(policy, value_model)), reference, scorer


def _lora_value_model(member, cfg: PPOConfig):
    """With LoRA, the value model is the reward model's own frozen trunk (`member`, the ensemble's
    member-0) with adapters and a trainable copy of its score head (peft keeps the head as trained
    beside it); `_reward_scores` turns both off to score. One trunk serves reward and value model,
    as one serves policy and reference."""
    from prefgym.models.loading import enable_gradient_checkpointing

    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(member.model, lora=True)
    value_model = common.apply_lora(member.model, cfg, "SEQ_CLS")
    heads = common.unwrap_peft(value_model).score.modules_to_save  # {adapter name: trainable head}
    name = value_model.active_adapter
    value_head = types.SimpleNamespace(score=heads[name])
    init_value_head(value_head, cfg.value_init, member.normalization)
    heads[name] = value_head.score
    return value_model


@torch.no_grad()
def _reward_scores(scorer, lora_value_model, ids, mask) -> torch.Tensor:
    """The reward model's scores of the rollouts; with a LoRA value model on the reward model's
    trunk, with its adapters and trained head off, and in eval mode, as the reward model was loaded."""
    if lora_value_model is None:
        return scorer.score_tokens(ids, mask)
    was_training = lora_value_model.training
    lora_value_model.eval()
    try:
        with lora_value_model.disable_adapter():
            return scorer.score_tokens(ids, mask)
    finally:
        lora_value_model.train(was_training)


def _minibatch_order(seed: int, step: int, ppo_epoch: int, B: int) -> torch.Tensor:
    """The order in which epoch `ppo_epoch` of step `step` splits the rollout batch into minibatches."""
    return torch.from_numpy(rng_for(seed, "ppo-minibatch", step, ppo_epoch).permutation(B))


@torch.no_grad()
def _reference_logps(reference, policy, ids, mask, response_mask, temperature):
    if reference is not None:
        return common.response_logprobs(reference, ids, mask, temperature, response_mask)
    with policy.disable_adapter():
        return common.response_logprobs(policy, ids, mask, temperature, response_mask)


# ---------------------------------------------------------------------------------------------
# Training


def train(cfg: PPOConfig, prompts: list[dict] | None = None) -> Path:
    """Run PPO; returns the folder of the trained policy (save_pretrained)."""
    for key in ("policy_model", "reward_model", "output_dir"):
        if not getattr(cfg, key):
            raise ConfigError(f"ppo: '{key}' is required")
    if prompts is None and not cfg.prompt_file:
        raise ConfigError("ppo: 'prompt_file' is required (the unlabeled split)")
    if cfg.value_init not in VALUE_INITS:
        raise ConfigError(f"ppo: value_init must be one of {', '.join(VALUE_INITS)}, got {cfg.value_init!r}")
    if cfg.per_device_rollout_batch_size % cfg.num_mini_batches:
        raise ConfigError("ppo: per_device_rollout_batch_size must be divisible by num_mini_batches")
    for key in ("ppo_epochs", "num_mini_batches", "per_device_rollout_batch_size", "steps"):
        if getattr(cfg, key) < 1:  # 0 PPO epochs: rollouts that nothing learns from (and a forward pass
            raise ConfigError(f"ppo: {key} must be at least 1, got {getattr(cfg, key)}")  # kept for no backward)
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "train_config.json")
    if cfg.resume and (out / "model.safetensors").exists() and not (out / "checkpoint").exists():
        return out  # already complete
    accelerator = fields.make_accelerator(cfg, out)
    fields.start_tracking(accelerator, cfg, "ppo")
    seed_everything(cfg.seed)
    if prompts is None:
        prompts = common.load_split(cfg.prompt_file, ("instruction",))
    tokenizer, model, reference, scorer = _load_models(cfg)
    engine = common.rollout_engine(cfg, model.policy, tokenizer)  # None: the HF sampler
    prompt_texts = [make_prompt_formatter(tokenizer, cfg.prompt_format)(p) for p in prompts]
    scorer.to(accelerator.device)
    if reference is not None:
        reference.to(accelerator.device)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    n_proc, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    B = cfg.per_device_rollout_batch_size
    global_batch = B * n_proc
    if len(prompt_texts) < global_batch:
        raise ConfigError(f"ppo: {len(prompt_texts)} prompts is fewer than one global rollout batch ({global_batch})")
    steps_per_epoch = len(prompt_texts) // global_batch

    def reduce_sum(t):
        return accelerator.reduce(t, "sum")

    ckpt_dir = out / "checkpoint"
    state = common.resume_or_start(accelerator, cfg, out, fresh=("metrics.jsonl", "samples.jsonl"))
    step, kl_coef = (state["step"], state["kl_coef"]) if state else (0, cfg.kl_coef)

    crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "0"))  # tests: simulated kill
    t0 = time.time()
    with common.make_progress(accelerator) as progress:
        task = progress.add_task("ppo", total=cfg.steps, completed=step, info="")
        checkpoints = common.CheckpointSchedule(cfg.save_steps, cfg.save_every_seconds, accelerator)
        while step < cfg.steps:
            unwrapped = accelerator.unwrap_model(model)

            # 1. Prompts: the step's global batch of a per-epoch permutation; this process's slice.
            epoch, k = divmod(step, steps_per_epoch)
            perm = rng_for(cfg.seed, "ppo-prompts", epoch).permutation(len(prompt_texts))
            rows = perm[k * global_batch + rank * B:k * global_batch + (rank + 1) * B]

            # 2. Sample one response per prompt (seeded per global row: same on 1 or N processes); on the
            #    vLLM engine, once it holds the policy's weights as the last update left them.
            #    The models run unprepared (sampling, reference, reward model) autocast as `prepare` runs the
            #    trained ones (mixed precision): at step 1 the KL is 0.
            seeds = [stable_hash(cfg.seed, "ppo-sample", step, k * global_batch + rank * B + i) for i in range(B)]
            with accelerator.autocast(), zero3.gathered(model, "policy"):  # ZeRO-3: on the whole policy
                query_ids, query_mask, response_ids = common.sample_rollout(
                    engine, unwrapped.policy, tokenizer, [prompt_texts[i] for i in rows], seeds=seeds,
                    temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, max_prompt_length=cfg.max_prompt_length)

            # 3. Truncate after the first EOS.
            response_ids, response_mask, has_eos = common.truncate_after_eos(
                response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
            P = query_ids.shape[1]
            ids = torch.cat([query_ids, response_ids], 1)
            mask = torch.cat([query_mask, response_mask], 1)

            # 4. Log-probs (at T) of policy and reference, values, and the reward model's score; the
            # first update's forward pass (its minibatch of epoch 0) is the rollout's for its rows.
            mb = B // cfg.num_mini_batches
            first = _minibatch_order(cfg.seed, step, 0, B)[:mb].to(device)
            logps, values, token_entropy, kept_logps, kept_values = rollout_logps_and_values(
                model, ids, mask, P, cfg.temperature, first)
            with torch.no_grad():
                with accelerator.autocast():
                    ref_logps = torch.zeros_like(logps)
                    for group in rollout_row_groups(first, B):  # as the policy's passes took them
                        ref_logps[group] = _reference_logps(reference, unwrapped.policy, ids[group], mask[group],
                                                            F.pad(response_mask[group], (P, 0)), cfg.temperature)[:, P:]
                    raw_score = _reward_scores(scorer, unwrapped.value_model if cfg.use_lora else None, ids, mask)
                entropy = common.masked_mean(token_entropy, response_mask)

                # 5. Responses that never emit EOS get a fixed, low score.
                score = common.missing_eos_scores(raw_score, has_eos, cfg.missing_eos_penalty)

                # 6-8. Per-token rewards (KL penalty on every token, score on the last one), rewards
                # whitened in scale, GAE, advantages whitened; statistics of the global batch.
                rollout = advantages_and_returns(score, logps, ref_logps, values, response_mask, kl_coef, cfg.gamma,
                                                 cfg.lam, cfg.whiten_rewards, reduce=reduce_sum)
                kl, non_score_reward = rollout["kl"], rollout["non_score_reward"]
                advantages, returns = rollout["advantages"], rollout["returns"]

            # 9. PPO epochs over minibatches.
            update_stats = []
            for ppo_epoch in range(cfg.ppo_epochs):
                order = _minibatch_order(cfg.seed, step, ppo_epoch, B)
                for m in range(cfg.num_mini_batches):
                    i = order[m * mb:(m + 1) * mb].to(device)
                    global_tokens = reduce_sum(response_mask[i].sum().float())
                    if ppo_epoch == m == 0:  # the rollout's forward pass of these rows (step 4)
                        new_logps, vpred = kept_logps, kept_values
                    else:
                        new_logps, vpred, _ = response_logps_and_values(model, ids[i], mask[i], P, cfg.temperature)
                    losses = ppo_losses(new_logps, logps[i], advantages[i], vpred, values[i], returns[i],
                                        response_mask[i], cfg.cliprange, cfg.cliprange_value,
                                        token_count=global_tokens / n_proc)
                    loss = losses["pg_loss"] + cfg.vf_coef * losses["vf_loss"]
                    accelerator.backward(loss)
                    if cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                    # losses are divided by the global count / n_proc: summing over processes and
                    # dividing by n_proc gives the global mean
                    update_stats.append(torch.stack([v.detach() for v in losses.values()]))
            step += 1

            # 10. Metrics of the global batch, then the KL controller.
            u = (reduce_sum(torch.stack(update_stats).mean(0)) / n_proc).tolist()
            seq = reduce_sum(torch.stack([score.sum(), raw_score.sum(), kl.sum(), non_score_reward.sum(),
                                          response_mask.sum().float(), (~has_eos).sum().float(),
                                          entropy * B,
                                          # k3 = e^{-r} - 1 + r per token (r = log π/π_ref): ≥ 0, unbiased
                                          (torch.expm1(-kl) + kl).sum()]))
            s = (seq / global_batch).tolist()
            metrics = {"step": step, "episodes": step * global_batch, "score": s[0], "raw_score": s[1], "kl": s[2],
                       "kl_k3": s[7], "non_score_reward": s[3], "rlhf_reward": s[0] + s[3], "response_length": s[4],
                       "no_eos_fraction": s[5], "entropy": s[6], "kl_coef": kl_coef,
                       **dict(zip(["pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl", "value_error",
                                   "ratio"], u)),
                       "elapsed_s": round(time.time() - t0, 2)}
            if cfg.adaptive_kl:
                kl_coef = update_kl_coef(kl_coef, s[2], cfg.kl_target, cfg.kl_horizon, global_batch)
            fields.track(accelerator, metrics)
            if accelerator.is_main_process:
                append_jsonl(out / "metrics.jsonl", metrics)
                if cfg.sample_log_steps and (step - 1) % cfg.sample_log_steps == 0:
                    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
                    for j in range(min(4, B)):
                        append_jsonl(out / "samples.jsonl", {"step": step, "prompt": prompt_texts[rows[j]],
                                                             "response": texts[j], "score": float(score[j])})
            progress.update(task, advance=1, info=f"score {s[0]:.3f} kl {s[2]:.3f} len {s[4]:.1f}")

            # 11. Checkpoint (policy, value, optimizer, RNG; step and kl_coef).
            if checkpoints.due(step, cfg.steps):
                common.save_checkpoint(accelerator, ckpt_dir, {"step": step, "kl_coef": kl_coef})
            if cfg.snapshot_steps and step % cfg.snapshot_steps == 0 and not cfg.use_lora:
                common.save_trained(accelerator, model, tokenizer, out / "snapshots" / f"step-{step}", "policy")
            if step == crash_after:
                os._exit(137)  # tests: a hard kill after this step, as SIGKILL would leave it

    accelerator.wait_for_everyone()
    common.save_trained(accelerator, model, tokenizer, out, "policy")
    if accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    fields.finish_tracking(accelerator)
    accelerator.wait_for_everyone()
    common.end_training(accelerator)
    return out


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""

    @app.command("ppo")
    def ppo_command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of PPOConfig fields."),
        policy: str = typer.Option(None, "--policy", help="SFT model folder (start and reference)."),
        reward_model: str = typer.Option(None, "--reward-model", help="Reward model folder."),
        prompts: str = typer.Option(None, "--prompts", help="Prompts: the unlabeled split (JSON/JSONL)."),
        output_dir: str = typer.Option(None, "--output-dir", "--out", "-o", help="Where the policy goes."),
        steps: int = typer.Option(None, "--steps", help="PPO steps."),
        kl_coef: float = typer.Option(None, "--kl-coef", help="(Initial) KL coefficient."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from a checkpoint (default: yes)."),
    ):
        """Optimise the policy against the reward model with PPO (KL-penalised).

        Reads: --policy (SFT model folder: start and KL reference), --reward-model, --prompts.
        Writes to --out: the policy (save_pretrained), metrics.jsonl (score, kl, losses per step),
        samples.jsonl, train_config.json, snapshots/step-N (every snapshot_steps) and
        checkpoint/ while training (rerun the same command to resume).
        """
        overrides = common.set_then_flags(set_, {"policy_model": policy, "reward_model": reward_model,
                     "prompt_file": prompts, "output_dir": output_dir, "steps": steps, "kl_coef": kl_coef,
                     "resume": resume})
        cfg = common.load_config(PPOConfig, config, overrides)
        typer.echo(f"ppo policy: {train(cfg)}")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"steps": 100, "lr": 5e-5, "kl_coef": 0.1, "snapshot_steps": 25, "per_device_rollout_batch_size": 16,
          "num_mini_batches": 2, "ppo_epochs": 2, "max_new_tokens": 64, "max_prompt_length": 256,
          "temperature": 1.0, "save_steps": 10}
PIPELINE = MethodSpec(
    config=PPOConfig, train=train, weight=4,
    inputs=lambda run: dict(policy_model=run.sft, reward_model=run.reward_model, prompt_file=run.splits["unlabeled"],
                            output_dir=run.out),
    world_settings={"default": _WORLD,
                    "quick": {**_WORLD, "steps": 6, "max_new_tokens": 32, "save_steps": 3, "snapshot_steps": 3}})
