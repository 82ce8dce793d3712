"""Quark: reward quantiles as control tokens (Lu et al. 2022), as in AlpacaFarm.

K special tokens `<quark_0>` ... `<quark_{K-1}>` are added to the SFT model's vocabulary;
`<quark_0>` stands for the best rewards. Each iteration:

1. Rollout: sample responses to a batch of prompts from the current policy, conditioned on
   `<quark_0>` (the first iteration samples without a token: it means nothing yet), and score
   them with the reward model.
2. Pool: add the scored samples to one data pool that grows over the iterations. Every process
   gathers every process's samples, so all processes hold the same pool.
3. Quantise: sort the whole pool by reward and cut it into K equal parts (as `np.array_split`,
   Quark's reference code); part k gets the token `<quark_k>`.
4. Train: minimise, on batches of pool samples conditioned on their own quantile token,
       NLL(response | <quark_k> + prompt)
     + kl_coef * KL(policy(. | <quark_k> + prompt) || reference(. | prompt))
     - entropy_coef * entropy(policy(. | <quark_k> + prompt))
   per response token. The reference is the frozen SFT model, which has never seen the tokens,
   so (as in AlpacaFarm) it reads the prompt without them; KL and entropy are over the
   original vocabulary.

The control token goes in front of the instruction (see `reward_conditioning`); the token to use
at inference, `<quark_0>`, is recorded in `conditioning.json` and README.md next to the saved
model, and `generate_conditioned_outputs` applies it. A checkpoint (model, optimizer, RNG, pool)
is written after every iteration; running the same command again resumes.

`train_on_best_quantile=True` is AlpacaFarm's default variant: no control token anywhere, and
the training batches come from the best quantile only (filtered self-training with a KL penalty).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from prefgym.errors import ConfigError
from prefgym.methods import fields, zero3

POOL_FILE = "pool.jsonl"


@dataclass
class QuarkConfig(fields.GenerationFields, fields.TrainFields, fields.LoraFields):
    """Quark settings (AlpacaFarm: K=5 reward tokens, kl_coef 0.05, temperature 1.0, lr 3e-6 for 7B models)."""

    policy_model: str = ""
    """SFT model folder (or Hub name): the starting policy and the KL reference."""
    reward_model: str = ""
    """Reward model folder that scores the rollouts."""
    prompts_file: str = ""
    """Instructions to roll out on (AlpacaFarm: the unlabeled split): file, folder or Hub name."""
    prompts_split: Optional[str] = "unlabeled"
    """Split of `prompts_file` when it is a folder or Hub dataset."""
    output_dir: str = "runs/quark"
    """Where the model (save_pretrained), pool.jsonl, metrics.jsonl and the checkpoint go."""
    num_quantiles: int = 5
    """K: reward quantiles, one control token each."""
    iterations: int = 10
    """Rounds of rollout + training."""
    rollout_batch_size: int = 64
    """Prompts sampled per iteration, all processes together (a multiple of the number of processes)."""
    steps_per_iteration: int = 8
    """Optimizer steps on the pool after each rollout."""
    per_device_batch_size: int = 4
    """Pool samples per forward pass on each process."""
    grad_accum: int = 1
    """Forward passes per optimizer step; global batch = per_device_batch_size x processes x grad_accum."""
    lr: float = 1e-5
    """AdamW learning rate (constant after warm-up)."""
    warmup_steps: int = 5
    """Optimizer steps of linear learning-rate warm-up."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    kl_coef: float = 0.05
    """Weight of the per-token KL(policy || reference)."""
    entropy_coef: float = 0.06
    """Weight of the entropy bonus (Quark's value)."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    top_p: float = 1.0
    """Rollout nucleus sampling threshold."""
    max_new_tokens: int = 300
    """Most tokens per rollout response."""
    missing_eos_penalty: Optional[float] = -1.0
    """Reward of a rollout with no EOS within max_new_tokens (None: the reward model's score), as in PPO."""
    generation_batch_size: int = 16
    """Prompts per `generate` call during rollouts."""
    max_length: int = 512
    """Tokens of prompt + response in training (prompt cut from the left)."""
    clear_pool_each_iteration: bool = False
    """Keep only the latest rollout in the pool (AlpacaFarm's clear_data_pool_on_each_rollout)."""
    train_on_best_quantile: bool = False
    """AlpacaFarm's variant: train on the best quantile only, with no control token anywhere."""
    seed: int = 0
    """Seed of the prompt order, rollouts and training batches."""
    resume: bool = True
    """Continue from the checkpoint in output_dir if there is one (False: start over)."""
    # use_lora (LoraFields): LoRA adapters plus the control-token embeddings, merged into the saved model.
    disable_dropout: bool = True
    """Turn dropout off in the policy and the reference (TRL's default): the KL term compares the
    two models as they sample."""
    progress: bool = True
    """Show a progress bar."""


def quark_tokens(num_quantiles: int) -> list[str]:
    """The control tokens, best quantile first: `<quark_0>` ... `<quark_{K-1}>`."""
    return [f"<quark_{k}>" for k in range(num_quantiles)]


def assign_quantiles(rewards, num_quantiles: int) -> np.ndarray:
    """Quantile index per sample: 0 for the highest rewards, K-1 for the lowest.

    The samples sorted by decreasing reward (ties keep pool order) are cut into K consecutive
    parts of equal size, the first parts one larger when K does not divide the pool
    (`np.array_split`).
    """
    rewards = np.asarray(rewards, dtype=float)
    order = np.argsort(-rewards, kind="stable")
    quantiles = np.empty(len(rewards), dtype=int)
    for k, part in enumerate(np.array_split(order, num_quantiles)):
        quantiles[part] = k
    return quantiles


class _QuarkTokenTerms(torch.autograd.Function):
    """Per-token NLL, KL(policy || reference) and policy entropy, a chunk of rows at a time.

    Forward and backward convert only about `common.LOGSOFTMAX_CHUNK_ELEMENTS` logits to fp32 at
    once; backward recomputes each chunk's softmaxes instead of keeping them, and writes the
    gradient w.r.t. the policy logits z straight into one tensor of their shape and dtype. With
    p = softmax(z) over the original vocabulary (control columns masked) and q the reference's:
        d NLL / dz = softmax(z over all columns) - onehot(target)
        d KL / dz_j = p_j (log p_j - log q_j - KL)
        d H / dz_j = -p_j (log p_j + H)
    (masked columns have p_j = 0, so only the NLL reaches them). The reference gets no gradient.
    """

    @staticmethod
    def forward(ctx, pol, ref, targets, control_ids):  # (N, V+K), (N, V), (N,), (C,) -> 3 x (N,) fp32
        nll, kl, entropy = (torch.empty(len(pol), dtype=torch.float32, device=pol.device) for _ in range(3))
        for s in _row_chunks(pol):
            logp_all, logp, logq = _log_softmaxes(pol[s], ref[s], control_ids)
            p = logp.exp()
            nll[s] = -logp_all.gather(1, targets[s, None]).squeeze(1)
            kl[s] = (p * (logp - logq)).sum(-1)
            entropy[s] = -(p * logp).sum(-1)
        ctx.save_for_backward(pol, ref, targets, control_ids, kl, entropy)
        return nll, kl, entropy

    @staticmethod
    def backward(ctx, g_nll, g_kl, g_entropy):  # 3 x (N,) -> (N, V+K) in the policy logits' dtype
        pol, ref, targets, control_ids, kl, entropy = ctx.saved_tensors
        grad = torch.empty_like(pol, memory_format=torch.contiguous_format)
        vocab = ref.shape[-1]
        for s in _row_chunks(pol):
            logp_all, logp, logq = _log_softmaxes(pol[s], ref[s], control_ids)
            gn, gk, ge = g_nll[s, None].float(), g_kl[s, None].float(), g_entropy[s, None].float()
            g = logp_all.exp_().mul_(gn).scatter_add_(1, targets[s, None], -gn)
            g[:, :vocab] += logp.exp() * (gk * (logp - logq - kl[s, None]) - ge * (logp + entropy[s, None]))
            grad[s] = g
        return grad, None, None, None


def _row_chunks(rows: torch.Tensor) -> list[slice]:
    """Slices of rows holding about `common.LOGSOFTMAX_CHUNK_ELEMENTS` logits each (at least one row)."""
    from prefgym.methods import common

    return common.chunk_slices(len(rows), rows.shape[-1])


def _log_softmaxes(pol: torch.Tensor, ref: torch.Tensor, control_ids: torch.Tensor):
    """fp32 log-softmaxes of a chunk: the policy over all its columns, then the policy and the
    reference over the reference's vocabulary with the control columns set to -1e9 (probability 0)."""
    vocab = ref.shape[-1]
    z = pol.float()
    return (torch.log_softmax(z, -1), torch.log_softmax(z[:, :vocab].index_fill(1, control_ids, -1e9), -1),
            torch.log_softmax(ref.float().index_fill(1, control_ids, -1e9), -1))


def _quark_token_terms(pol, ref, targets, control_ids):
    """(NLL, KL(policy || reference), policy entropy) per response token, each (N,) fp32.

    `pol`: (N, V+K) policy logits, `ref`: (N, V) reference logits (no gradient), `targets`: (N,)
    response token ids, `control_ids`: (C,) control-token columns below V, left out of KL and entropy.
    Equals the fp32 log-softmax expressions (cross-entropy; sums of p (log p - log q) and -p log p),
    values and gradients, without fp32 (N, V) tensors (`_QuarkTokenTerms`).
    """
    return _QuarkTokenTerms.apply(pol, ref.detach(), targets, control_ids)


def quark_loss(policy, reference, tokenizer, samples: list[dict], quantiles, tokens: list[str],
               kl_coef: float, entropy_coef: float, max_length: int, fmt=None) -> tuple[torch.Tensor, dict]:
    """Quark's objective on pool samples (instruction, input, output) with their quantile indices;
    `fmt` makes a record's prompt (default: the Alpaca prompt).

    Returns (loss, stats): loss = NLL + kl_coef * KL - entropy_coef * entropy, each a mean over
    the batch's response tokens.
    """
    from prefgym.data.prompts import format_record
    from prefgym.methods import common
    from prefgym.methods.reward_conditioning import with_control_token

    fmt = fmt or format_record
    device = next(policy.parameters()).device
    responses = [s["output"] for s in samples]
    conditioned = [fmt(with_control_token([s], tokens[q])[0]) for s, q in zip(samples, quantiles)]
    plain = [fmt(s) for s in samples]
    pb = common.tokenize_prompt_response(tokenizer, conditioned, responses, max_length)
    rb = common.tokenize_prompt_response(tokenizer, plain, responses, max_length)
    pb, rb = ({k: v.to(device) for k, v in b.items()} for b in (pb, rb))

    logits = policy(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"]).logits  # (B, T, V+K)
    with torch.no_grad():
        ref_logits = reference(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits  # (B, T', V)
    # Logits at position t predict token t+1. The responses are the same tokens in both batches,
    # so selecting the positions that predict response tokens gives (N, V) rows in the same order.
    pol_mask, ref_mask = pb["response_mask"][:, 1:].bool(), rb["response_mask"][:, 1:].bool()
    pol = logits[:, :-1][pol_mask]  # (N, V+K), the logits' dtype
    ref = ref_logits[:, :-1][ref_mask]  # (N, V)
    targets = pb["input_ids"][:, 1:][pol_mask]  # (N,)

    # KL and entropy over the original vocabulary (without the control tokens): tokens that took
    # unused rows of a padded vocabulary are left out; fp32 a chunk of rows at a time.
    added = tokenizer.get_added_vocab()
    control_ids = [added[t] for t in tokens if t in added and added[t] < ref.shape[-1]]
    control_ids = torch.tensor(control_ids, dtype=torch.long, device=device)
    nll, kl, entropy = (term.mean() for term in _quark_token_terms(pol, ref, targets, control_ids))
    loss = nll + kl_coef * kl - entropy_coef * entropy
    return loss, {"loss": loss.item(), "nll": nll.item(), "kl": kl.item(), "entropy": entropy.item()}


def train(cfg: QuarkConfig) -> Path:
    """Train a Quark policy; returns the output dir (save_pretrained + conditioning.json)."""
    from prefgym.data import load_records
    from prefgym.data.prompts import make_prompt_formatter
    from prefgym.io import append_jsonl, read_records, write_json, write_jsonl
    from prefgym.methods import common
    from prefgym.methods.reward_conditioning import add_control_tokens, with_control_token, write_conditioning
    from prefgym.methods.reward_model import load_reward_scorer
    from prefgym.models import load_model_and_tokenizer
    from prefgym.models.generation import SamplingConfig, generate_with_eos, map_sharded
    from prefgym.models.vllm_engine import full_weights
    from prefgym.seeding import rng_for, seed_everything, stable_hash

    for key in ("policy_model", "reward_model", "prompts_file"):
        if not getattr(cfg, key):
            raise ConfigError(f"quark: '{key}' is required")
    if cfg.num_quantiles < 2:
        raise ConfigError(f"quark: num_quantiles must be at least 2, got {cfg.num_quantiles}")
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "quark_config.json")
    if cfg.resume and (out / "conditioning.json").exists():
        return out  # finished earlier

    accelerator = fields.make_accelerator(cfg, out)  # several processes without a GPU: data parallel on CPU (gloo)
    fields.start_tracking(accelerator, cfg, "quark")
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    if cfg.rollout_batch_size % n_proc:
        raise ConfigError(f"quark: rollout_batch_size {cfg.rollout_batch_size} is not a multiple of the "
                          f"{n_proc} processes")
    seed_everything(cfg.seed)
    prompts = load_records(cfg.prompts_file, split=cfg.prompts_split, required=("instruction",))
    tokens = quark_tokens(cfg.num_quantiles)

    # Policy: the SFT model with K reward tokens; reference: the SFT model itself, frozen.
    policy, tokenizer = load_model_and_tokenizer(cfg.policy_model, device=accelerator.device, cfg=cfg,
                                                 trainable=True)
    fmt = make_prompt_formatter(tokenizer, cfg.prompt_format)
    control_ids = add_control_tokens(policy, tokenizer, tokens)
    engine = _rollout_engine(cfg, policy, tokenizer, out / ENGINE_START)  # None: the HF sampler
    policy = common.apply_lora(policy, cfg, "CAUSAL_LM", trainable_token_indices=control_ids)
    reference, _ = load_model_and_tokenizer(cfg.policy_model, device=accelerator.device,
                                            cfg=dataclasses.replace(cfg, gradient_checkpointing=False))
    reference.requires_grad_(False)
    reference.eval()
    if cfg.disable_dropout:
        common.disable_dropout(policy)
        common.disable_dropout(reference)
    scorer = load_reward_scorer(cfg.reward_model, device=accelerator.device, model_cfg=cfg)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, eps=1e-5)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    scheduler = common.warmup_schedule(accelerator, optimizer, cfg.warmup_steps)

    ckpt_dir, metrics_file, pool_file = out / "checkpoint", out / "metrics.jsonl", out / POOL_FILE
    start, pool = 0, []
    if cfg.resume and (state := common.load_checkpoint(accelerator, ckpt_dir)):
        start, pool = state["iteration"], read_records(pool_file)[:state["pool_size"]]
    elif accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        metrics_file.unlink(missing_ok=True)
        common.save_config(cfg, out / "quark_config.json")
    accelerator.wait_for_everyone()

    per_rank = cfg.per_device_batch_size * cfg.grad_accum
    global_batch = per_rank * n_proc
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.generation_batch_size)
    with common.make_progress(accelerator) as progress:
        task = progress.add_task("quark", total=cfg.iterations, completed=start, info="")
        for it in range(start, cfg.iterations):
            t0 = time.perf_counter()
            # 1. Rollout on this iteration's prompts (a seeded pass over the prompt set, wrapping),
            #    a generation batch per process and round, each seeded by its position (the seed
            #    one process has always used), so N processes draw what one process draws.
            ids = _iteration_prompts(len(prompts), cfg.rollout_batch_size, it, cfg.seed)
            batch = [{"instruction": prompts[i]["instruction"], "input": prompts[i].get("input") or ""} for i in ids]
            # The untrained token means nothing on the first rollout.
            token = tokens[0] if it > 0 and not cfg.train_on_best_quantile else ""
            rollout_prompts = [fmt(r) for r in with_control_token(batch, token)]
            rollout_sampling = dataclasses.replace(sampling, seed=stable_hash(cfg.seed, "quark-rollout", it, 0))

            def rollout(first: int) -> list[dict]:
                """The scored samples of the generation batch that starts at rollout prompt `first`."""
                part = rollout_prompts[first:first + sampling.batch_size]
                with accelerator.autocast():  # the unprepared models as `prepare` runs the policy (mixed precision)
                    if engine is None:
                        texts, finished = generate_with_eos(accelerator.unwrap_model(policy), tokenizer, part,
                                                            rollout_sampling, first_index=first)
                    else:
                        texts, finished = engine.generate_with_eos(part, rollout_sampling, first)
                    samples = [{**r, "output": t[0]} for r, t in zip(batch[first:first + len(part)], texts)]
                    scores = scorer.score(samples)
                rewards = common.missing_eos_scores(scores, [f[0] for f in finished], cfg.missing_eos_penalty)
                return [{**s, "reward": float(x), "truncated": not f[0], "iteration": it}
                        for s, x, f in zip(samples, rewards, finished)]

            # 2. One pool for all processes: every process gets every batch's samples, in batch order.
            #    ZeRO-3: on the whole policy, gathered once by every process (a last round may leave some idle).
            with zero3.gathered(policy):
                if engine is not None:  # the vLLM engine, once it holds the policy's weights as the last iteration left them
                    engine.update_weights(full_weights(accelerator.unwrap_model(policy)))
                new = [row for rows in map_sharded(rollout, range(0, len(batch), sampling.batch_size)) for row in rows]
            if cfg.clear_pool_each_iteration:
                pool = []
            pool.extend(new)

            # 3. Re-quantise the whole pool. (Best-quantile variant: keep only quantile 0, without tokens.)
            quantiles = assign_quantiles([p["reward"] for p in pool], cfg.num_quantiles)
            train_ids = np.flatnonzero(quantiles == 0) if cfg.train_on_best_quantile else np.arange(len(pool))
            train_tokens = [""] * cfg.num_quantiles if cfg.train_on_best_quantile else tokens

            # 4. Train on seeded batches of the pool; each process takes its slice of the global batch.
            policy.train()
            stats, lr = [], scheduler.get_last_lr()[0]
            for step in range(cfg.steps_per_iteration):
                rng = rng_for(cfg.seed, "quark-batch", it, step)
                idx = train_ids[rng.choice(len(train_ids), size=global_batch, replace=len(train_ids) < global_batch)]
                idx = idx[rank * per_rank:(rank + 1) * per_rank]
                for m in range(cfg.grad_accum):
                    micro = idx[m * cfg.per_device_batch_size:(m + 1) * cfg.per_device_batch_size]
                    with common.no_sync_unless(accelerator, policy, m == cfg.grad_accum - 1):
                        with accelerator.autocast():  # the reference too, as `prepare` runs the policy
                            loss, s = quark_loss(policy, reference, tokenizer, [pool[i] for i in micro],
                                                 quantiles[micro], train_tokens, cfg.kl_coef, cfg.entropy_coef,
                                                 cfg.max_length, fmt)
                        accelerator.backward(loss / cfg.grad_accum)
                    stats.append(s)
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr = common.step_scheduler(accelerator, scheduler)
                optimizer.zero_grad(set_to_none=True)

            # 5. Metrics, then the checkpoint (pool file first: the checkpoint says how much of it counts).
            row = {"iteration": it + 1, "pool_size": len(pool),
                   "rollout_reward": float(np.mean([p["reward"] for p in new])),
                   "best_quantile_reward": float(np.mean([p["reward"] for p, q in zip(pool, quantiles) if q == 0])),
                   **{k: accelerator.reduce(torch.tensor(float(np.mean([s[k] for s in stats]))), "mean").item()
                      for k in ("loss", "nll", "kl", "entropy")},
                   "lr": lr, "seconds": round(time.perf_counter() - t0, 2)}
            fields.track(accelerator, row, step=it + 1)
            if accelerator.is_main_process:
                append_jsonl(metrics_file, row)
                write_jsonl(pool_file, pool)
            common.save_checkpoint(accelerator, ckpt_dir, {"iteration": it + 1, "pool_size": len(pool)})
            progress.update(task, advance=1, info=f"reward {row['rollout_reward']:.3f} kl {row['kl']:.3f}")

    # Save the policy (LoRA merged) and how to condition it.
    accelerator.wait_for_everyone()
    common.save_trained(accelerator, policy, tokenizer, out)
    if accelerator.is_main_process:
        best = "" if cfg.train_on_best_quantile else tokens[0]
        write_json(out / "quantile_tokens.json", {"tokens": tokens, "best": best})
        write_conditioning(out, best, "Quark", {"num_quantiles": cfg.num_quantiles})
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(out / ENGINE_START, ignore_errors=True)
    accelerator.wait_for_everyone()
    common.end_training(accelerator)
    return out


ENGINE_START = "vllm_start"
"""Folder (in output_dir, while training) of the policy with its reward tokens, that the vLLM engine starts from."""


def _rollout_engine(cfg: QuarkConfig, policy, tokenizer, folder: Path):
    """The vLLM engine that samples the rollouts (`cfg.engine` vllm, or auto on a machine with vLLM
    and a GPU), started from `policy` (the SFT model with the reward tokens, saved to `folder`:
    its vocabulary is larger than the SFT folder's) and sent the policy's weights before each
    rollout; None: the HF sampler."""
    from prefgym.models import vllm_engine

    if vllm_engine.resolve_engine(cfg.engine) != "vllm":
        return None
    with zero3.gathered(policy):  # ZeRO-3: the folder gets the whole weights, not the partitions
        policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vllm_engine.release_engine()  # the folder was just rewritten: no engine kept from an earlier run of it
    return vllm_engine.kept_rollout_engine(folder, policy.dtype, cfg.seed, cfg.vllm_gpu_memory_utilization,
                                           cfg.vllm_max_model_len, tokenizer)


def _iteration_prompts(n_prompts: int, batch_size: int, iteration: int, seed: int) -> list[int]:
    """Prompt indices of one rollout: the next `batch_size` of seeded per-epoch permutations."""
    from prefgym.seeding import rng_for

    out = []
    for pos in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, k = divmod(pos, n_prompts)
        out.append(int(rng_for(seed, "quark-prompts", epoch).permutation(n_prompts)[k]))
    return out


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym quark` to the `prefgym` app."""

    @app.command("quark")
    def quark_command(
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file of QuarkConfig fields (flags override it)."),
        model: Optional[str] = typer.Option(None, "--model", help="SFT model folder: starting policy and KL reference."),
        reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Reward model folder that scores rollouts."),
        prompts: Optional[str] = typer.Option(None, "--prompts", help="Instructions to roll out on (e.g. the world's data folder)."),
        prompts_split: Optional[str] = typer.Option(None, "--prompts-split", help="Split of --prompts (default: unlabeled)."),
        out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: runs/quark)."),
        iterations: Optional[int] = typer.Option(None, help="Rounds of rollout + training (default: 10)."),
        num_quantiles: Optional[int] = typer.Option(None, help="Reward quantiles / control tokens (default: 5)."),
        kl_coef: Optional[float] = typer.Option(None, help="KL weight (default: 0.05)."),
        entropy_coef: Optional[float] = typer.Option(None, help="Entropy bonus weight (default: 0.06)."),
        lr: Optional[float] = typer.Option(None, help="Learning rate (default: 1e-5)."),
        seed: Optional[int] = typer.Option(None, help="Seed (default: 0)."),
        resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the checkpoint (default: resume)."),
        set_: list[str] = typer.Option([], "--set", help="Any QuarkConfig field, key=value (repeatable)."),
    ) -> None:
        """Quark: reward quantiles as control tokens; rollouts grow a pool, NLL + KL + entropy on it.

        Reads: --model (SFT model folder), --reward-model, --prompts (instructions; split
        --prompts-split, default unlabeled).

        Writes to --out: the policy (save_pretrained; tokenizer with <quark_0>..<quark_K-1>),
        conditioning.json and README.md (generate with <quark_0> in front of the instruction:
        generate_conditioned_outputs does it), pool.jsonl (every scored rollout), metrics.jsonl,
        quark_config.json, and checkpoint/ while training. Rerun the same command to resume.

        Several processes: accelerate launch --multi_gpu --num_processes 2 -m prefgym.cli quark ...
        (on CPUs: ACCELERATE_USE_CPU=1 in front).
        """
        from prefgym.methods import common

        overrides = common.set_then_flags(set_, {"policy_model": model, "reward_model": reward_model,
                     "prompts_file": prompts, "prompts_split": prompts_split, "output_dir": out,
                     "iterations": iterations, "num_quantiles": num_quantiles, "kl_coef": kl_coef,
                     "entropy_coef": entropy_coef, "lr": lr, "seed": seed, "resume": resume})
        cfg = common.load_config(QuarkConfig, config, overrides)
        path = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(f"wrote {path} (generate with '<quark_0>' in front of the instruction)")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"iterations": 4, "rollout_batch_size": 64, "steps_per_iteration": 8, "lr": 1e-4, "entropy_coef": 0.0,
          "max_new_tokens": 64, "generation_batch_size": 64, "max_length": 256}
PIPELINE = MethodSpec(
    config=QuarkConfig, train=train, weight=3,
    inputs=lambda run: dict(policy_model=run.sft, reward_model=run.reward_model, prompts_file=run.splits["unlabeled"],
                            output_dir=run.out),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "iterations": 2, "rollout_batch_size": 32,
                                                 "steps_per_iteration": 2, "max_new_tokens": 32}})
