"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023).

Each annotated pair is oriented by the shared rounding rule (`prefgym.data.preferences`): y_w is
the output the label favours, y_l the other; ties (P = 0.5) carry no preference and are skipped.
With h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)] and ε the
probability that the label is wrong (below):
  sigmoid (DPO): ℓ(h) = -log σ(β h)
  ipo:           ℓ(h) = (h - 1 / (2β))², the log-probs averaged over each response's tokens
  loss = (1 - ε) ℓ(h) + ε ℓ(-h)      (the expected loss when the label is flipped with probability ε)
For sigmoid this is conservative DPO (cDPO), exactly TRL's `DPOTrainer.dpo_loss` with loss_type
"sigmoid" and `label_smoothing` = ε (TRL 0.12 to 0.28; from 0.29 TRL keeps label smoothing for
"robust" / "exo_pair" only); for IPO it equals (h - (1 - 2ε) / (2β))² up to a constant, the IPO
target for a soft preference. ε combines two independent sources of label noise:
  - the label's own uncertainty, ε_label = 1 - P(y_w better) (0 for a hard 1 / 2; 0.2 for an
    AlpacaEval logprob judge's 1.2) when soft_labels = "weight"; 0 when "round";
  - a global `label_smoothing` ε_s (cDPO / robust DPO's flip probability);
  ε = ε_label (1 - ε_s) + ε_s (1 - ε_label).
IPO averages log-probs over the response's tokens, as the IPO authors and TRL do
(`ipo_average`; TRL `DPOTrainer`, loss_type "ipo", divides by the completion length); DPO sums.

The reference log-probs do not change during training, so they are computed once, before the
first step, by the policy itself (which starts as the reference) and cached in the output folder
(token sums; IPO divides by the lengths at each step): no reference model is held in memory while
training. Dropout is off (`disable_dropout`, TRL's default) so that the policy's log-probs at step 1
equal the reference's. Chosen and rejected outputs share their prompt, which goes through the
model once per pair (`PairLogps`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import typer

from prefgym.data.preferences import annotated_pairs
from prefgym.data.prompts import format_record, make_prompt_formatter
from prefgym.errors import ConfigError, DataError
from prefgym.io import append_jsonl, atomic_path
from prefgym.methods import common, fields, zero3
from prefgym.seeding import rng_for, seed_everything


@dataclass
class DPOConfig(fields.TrainFields, fields.LoraFields):
    model_name_or_path: str = ""
    """SFT model folder (or hub name): the starting policy and, by default, the reference."""
    reference_model: str = ""
    """Reference model if not the starting policy (its log-probs are computed once, then it is freed)."""
    preference_file: str = ""
    """Pairs with instruction, input, output_1, output_2, preference (AlpacaFarm format)."""
    output_dir: str = ""
    """Where the policy (save_pretrained), metrics.jsonl, reference log-probs and checkpoints go."""
    loss_type: str = "sigmoid"
    """'sigmoid' (DPO) or 'ipo'."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (DPO's β; IPO's regulariser τ)."""
    soft_labels: str = "weight"
    """Soft preferences (e.g. 1.2 = 80% output_1): 'weight' (flip probability 1 - P(winner) in the
    loss) or 'round' (train on the rounded winner as if the label were hard)."""
    label_smoothing: float = 0.0
    """Global probability that any label is flipped, in [0, 0.5) (cDPO / robust DPO's ε; 0: none)."""
    ipo_average: bool = True
    """IPO: average the log-probs over the response's tokens (the IPO authors, TRL); False sums them."""
    disable_dropout: bool = True
    """Turn dropout off in the policy, as TRL does by default (the reference is scored in eval mode)."""
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


def flip_probability(p_chosen: torch.Tensor, label_smoothing: float, soft_labels: str = "weight") -> torch.Tensor:
    """ε per pair: P(the label's chosen output is in fact the worse one).

    `p_chosen` = P(chosen better) from the label (1 for a hard label); independent flips with
    probability `label_smoothing` on top: ε = ε_label (1 - ε_s) + ε_s (1 - ε_label).
    """
    eps_label = (1.0 - p_chosen) if soft_labels == "weight" else torch.zeros_like(p_chosen)
    return eps_label * (1.0 - label_smoothing) + label_smoothing * (1.0 - eps_label)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    flip: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and implicit rewards β·log(π/π_ref) of chosen and rejected outputs.

    Inputs are per-pair log-probs (sums, or per-token averages for IPO); `flip` is ε (per pair or
    one number): loss = (1 - ε) ℓ(h) + ε ℓ(-h).
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        def ell(x):
            return -F.logsigmoid(beta * x)
    elif loss_type == "ipo":
        def ell(x):
            return (x - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"dpo: loss_type must be 'sigmoid' or 'ipo', got '{loss_type}'")
    losses = (1 - flip) * ell(h) + flip * ell(-h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _chosen_rejected(records: list[dict], path=None, fmt=format_record) -> list[tuple[str, str, str, float]]:
    """(prompt, chosen, rejected, P(chosen better)) per pair, oriented by the rounding rule; ties skipped.

    `fmt` turns a record into its prompt (`make_prompt_formatter`)."""
    out = []
    for _, r, pref in annotated_pairs(records, path=path):
        if pref.winner is None:
            continue
        chosen, rejected = (r["output_1"], r["output_2"]) if pref.winner == 1 else (r["output_2"], r["output_1"])
        out.append((fmt(r), chosen, rejected, pref.p_winner))
    if not out:
        raise DataError("no pairs with a preference for one output (all ties or unannotated) to train on",
                        path=path)
    return out


class PairLogps(torch.nn.Module):
    """Summed response log-probs (B,), (B,) of the chosen and rejected outputs, the shared prompt run once.

    The prompts (left-padded) go through the model once; their KV cache, repeated for the two
    responses, conditions one pass over the chosen and rejected responses (right-padded). One
    module call per batch, so data-parallel wrappers see a single forward.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str]:
        return common.no_split_modules(self.model)

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
        # prompt_* (B, P); response_* (2B, R): rows 2i and 2i+1 are pair i's chosen and rejected
        if self.training and any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
            logps = self._response_logps_uncached(prompt_ids, prompt_mask, response_ids, response_mask)
        else:
            logps = self._response_logps(prompt_ids, prompt_mask, response_ids, response_mask)
        seq = common.masked_sum(logps, response_mask, dim=-1)
        return seq[0::2], seq[1::2]

    def _response_logps(self, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        """(2B, R) log-probs of the response tokens, the prompt through the model once."""
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, logits_to_keep=1,
                         position_ids=common.position_ids_from(prompt_mask))
        cache = out.cache
        cache.batch_repeat_interleave(2)
        R = response_ids.shape[1]
        positions = prompt_mask.sum(-1).repeat_interleave(2)[:, None] + torch.arange(R, device=prompt_ids.device)
        logits = self.model(input_ids=response_ids, attention_mask=torch.cat([prompt_mask.repeat_interleave(2, 0),
                                                                               response_mask], 1),
                            position_ids=positions, cache=cache).logits
        # the prompt's last logits predict response token 0, response token t-1's predict t (the
        # last response position's logits predict nothing); no slice of the logits is taken, whose
        # backward would allocate one more (2B, R, V) gradient
        return torch.cat([common.target_logprobs(out.logits[:, -1:].repeat_interleave(2, 0), response_ids[:, :1]),
                          common.token_logprobs(logits, response_ids)[:, 1:]], 1)

    def _response_logps_uncached(self, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        """The same log-probs from whole prompt + response rows: gradient checkpointing turns the KV
        cache off in training (a cache filled in the forward would be filled again by the recompute)."""
        R = response_ids.shape[1]
        ids = torch.cat([prompt_ids.repeat_interleave(2, 0), response_ids], 1)
        mask = torch.cat([prompt_mask.repeat_interleave(2, 0), response_mask], 1)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=common.position_ids_from(mask),
                            logits_to_keep=R + 1).logits  # positions P-1 .. P+R-1
        return common.target_logprobs(logits, response_ids)  # the last position's logits predict nothing


def _pair_batch(tokenizer, examples, max_length: int, device) -> list[torch.Tensor]:
    """prompt_ids, prompt_mask (B, P) left-padded; response_ids, response_mask (2B, R) right-padded.

    Responses end with EOS; the prompt keeps its last tokens and each response its first ones when
    prompt + response is longer than max_length.
    """
    prompts, responses = [], []
    for prompt, chosen, rejected, *_ in examples:
        p = tokenizer(prompt)["input_ids"]
        rs = [(tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[: max(1, max_length - 1)]
              for r in (chosen, rejected)]
        prompts.append(p[min(max(0, len(p) + max(len(r) for r in rs) - max_length), len(p) - 1):])
        responses += rs
    P, R = max(len(p) for p in prompts), max(len(r) for r in responses)
    pad = tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    response_ids = torch.tensor([r + [pad] * (R - len(r)) for r in responses])
    response_mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in responses])
    return [t.to(device) for t in (prompt_ids, prompt_mask, response_ids, response_mask)]


@torch.no_grad()
def reference_pass(accelerator, model, tokenizer, examples, cfg) -> torch.Tensor:
    """`_reference_logps` of the reference: `cfg.reference_model` when set (loaded here, dropped
    after), else `model`, the policy before training. Under ZeRO-3 the policy as loaded is
    partitioned and not yet prepared: the pass reads its gathered weights."""
    from prefgym.models.loading import load_policy

    ref_model = model if not cfg.reference_model else PairLogps(load_policy(
        cfg.reference_model, cfg, trainable=False)).to(accelerator.device)
    with zero3.gathered(ref_model):
        return _reference_logps(accelerator, ref_model, tokenizer, examples, cfg)


def _reference_logps(accelerator, model, tokenizer, examples, cfg: DPOConfig) -> torch.Tensor:
    """(N, 2) reference log-probs of (chosen, rejected), computed in shards across processes."""
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    rank, n_proc = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(examples), n_proc))
    rows = []
    with common.make_progress(accelerator) as progress:
        task = progress.add_task("reference log-probs", total=len(mine), info="")
        for s in range(0, len(mine), cfg.per_device_batch_size):
            idx = mine[s:s + cfg.per_device_batch_size]
            with accelerator.autocast():  # mixed precision as `prepare` runs the policy: step 1's log-ratios are 0
                c, r = model(*_pair_batch(tokenizer, [examples[i] for i in idx], cfg.max_length, accelerator.device))
            rows += [(i, float(a), float(b)) for i, a, b in zip(idx, c.tolist(), r.tolist())]
            progress.update(task, advance=len(idx))
    model.train(was_training)
    rows = sorted(gather_object(rows))
    return torch.tensor([[a, b] for _, a, b in rows], dtype=torch.float64)


def batch_losses(model, tokenizer, examples, ref: torch.Tensor, cfg: DPOConfig, device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, implicit rewards (chosen, rejected) and policy log-probs (chosen, rejected) of
    a micro-batch; `ref` (B, 2) holds the reference's summed log-probs of (chosen, rejected)."""
    batch = _pair_batch(tokenizer, examples, cfg.max_length, device)
    pc, pr = model(*batch)  # (B,), (B,): sums over the response tokens
    rc, rr = ref[:, 0], ref[:, 1]
    if cfg.loss_type == "ipo" and cfg.ipo_average:
        lengths = batch[3].sum(-1).float()  # response tokens, chosen and rejected interleaved
        nc, nr = lengths[0::2], lengths[1::2]
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    p_chosen = torch.tensor([t[3] for t in examples], device=device, dtype=pc.dtype)
    flip = flip_probability(p_chosen, cfg.label_smoothing, cfg.soft_labels)
    losses, chosen_r, rejected_r = preference_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, flip)
    return losses, chosen_r, rejected_r, pc, pr


def _check(cfg: DPOConfig) -> None:
    if not cfg.model_name_or_path or not cfg.output_dir:
        raise ConfigError("dpo: model_name_or_path and output_dir are required")
    if cfg.loss_type not in ("sigmoid", "ipo"):
        raise ConfigError(f"dpo: loss_type must be 'sigmoid' or 'ipo', got '{cfg.loss_type}'")
    if cfg.soft_labels not in ("weight", "round"):
        raise ConfigError(f"dpo: soft_labels must be 'weight' or 'round', got '{cfg.soft_labels}'")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"dpo: label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")


def train(cfg: DPOConfig, records: list[dict] | None = None) -> Path:
    """Train a policy with DPO / IPO on annotated pairs; returns its folder (save_pretrained)."""
    from prefgym.models.loading import load_policy

    _check(cfg)
    if records is None and not cfg.preference_file:
        raise ConfigError("dpo: preference_file is required")
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "train_config.json")
    if cfg.resume and (out / "model.safetensors").exists() and not (out / "checkpoint").exists():
        return out  # already complete
    accelerator = fields.make_accelerator(cfg, out)
    fields.start_tracking(accelerator, cfg, "dpo")
    seed_everything(cfg.seed)
    if records is None:
        records = common.load_split(cfg.preference_file, ("instruction", "output_1", "output_2", "preference"))
    tokenizer = common.load_tokenizer(cfg.model_name_or_path)
    examples = _chosen_rejected(records, cfg.preference_file or None, make_prompt_formatter(tokenizer, cfg.prompt_format))
    model = PairLogps(load_policy(cfg.model_name_or_path, cfg))
    model.to(accelerator.device)
    if cfg.disable_dropout:
        common.disable_dropout(model)

    # 1. Reference log-probs, once (cached: a resumed run reads them back).
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
        raise DataError(f"cached reference log-probs of {len(ref_logps)} pairs, but the data has {len(examples)}; "
                        "delete the file (or use a fresh output_dir)", path=ref_file)

    # 2. Policy, optimizer, Accelerate.
    model.model = common.apply_lora(model.model, cfg, "CAUSAL_LM")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = common.warmup_schedule(accelerator, optimizer, cfg.warmup_steps)
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.per_device_batch_size * n_proc * cfg.grad_accum
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"dpo: {len(examples)} pairs is fewer than one global batch ({global_batch}); "
                          "lower per_device_batch_size or grad_accum")
    total_steps = steps_per_epoch * cfg.epochs
    ckpt_dir = out / "checkpoint"
    state = common.resume_or_start(accelerator, cfg, out)
    step = state["step"] if state else 0

    # 3. Train: optimizer step k of an epoch takes the k-th global batch of a seeded permutation;
    #    process `rank` takes its slice of each micro-batch (same global batches on 1 or N processes).
    model.train()
    t0 = time.time()
    with common.make_progress(accelerator) as progress:
        task = progress.add_task(f"dpo ({cfg.loss_type})", total=total_steps, completed=step, info="")
        checkpoints = common.CheckpointSchedule(cfg.save_steps, cfg.save_every_seconds, accelerator)
        while step < total_steps:
            epoch, k = divmod(step, steps_per_epoch)
            perm = rng_for(cfg.seed, "dpo-epoch", epoch).permutation(len(examples))
            batch_idx = perm[k * global_batch:(k + 1) * global_batch]
            stats = []
            for micro in range(cfg.grad_accum):
                start = (micro * n_proc + rank) * cfg.per_device_batch_size
                idx = batch_idx[start:start + cfg.per_device_batch_size]
                ref = ref_logps[idx].to(accelerator.device, torch.float32)
                with common.no_sync_unless(accelerator, model, micro == cfg.grad_accum - 1):
                    losses, chosen_r, rejected_r, pc, pr = batch_losses(model, tokenizer, [examples[i] for i in idx],
                                                                        ref, cfg, accelerator.device)
                    accelerator.backward(losses.mean() / cfg.grad_accum)
                stats.append(torch.stack([losses.mean().detach(), chosen_r.mean(), rejected_r.mean(),
                                          (chosen_r > rejected_r).float().mean(),
                                          (chosen_r - rejected_r).mean(), pc.mean().detach(), pr.mean().detach()]))
            optimizer.step()
            lr = common.step_scheduler(accelerator, scheduler)
            optimizer.zero_grad()
            step += 1
            s = accelerator.reduce(torch.stack(stats).mean(0), "mean").tolist()
            metrics = {"step": step, "epoch": epoch, "loss": s[0], "rewards/chosen": s[1], "rewards/rejected": s[2],
                       "rewards/accuracies": s[3], "rewards/margins": s[4], "logps/chosen": s[5],
                       "logps/rejected": s[6], "lr": lr,
                       "elapsed_s": round(time.time() - t0, 2)}
            if accelerator.is_main_process:
                append_jsonl(out / "metrics.jsonl", metrics)
            fields.track(accelerator, metrics)
            progress.update(task, advance=1, info=f"loss {s[0]:.3f} acc {s[3]:.2f} margin {s[4]:.3f}")
            if checkpoints.due(step, total_steps):
                common.save_checkpoint(accelerator, ckpt_dir, {"step": step})

    accelerator.wait_for_everyone()
    common.save_trained(accelerator, model, tokenizer, out, "model")
    if accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    fields.finish_tracking(accelerator)
    accelerator.wait_for_everyone()
    common.end_training(accelerator)
    return out


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""

    @app.command("dpo")
    def dpo_command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of DPOConfig fields."),
        model: str = typer.Option(None, "--model", help="SFT model folder (starting policy and reference)."),
        preferences: str = typer.Option(None, "--preferences", help="Annotated pairs (JSON/JSONL)."),
        output_dir: str = typer.Option(None, "--output-dir", "--out", "-o", help="Where the policy goes."),
        loss_type: str = typer.Option(None, "--loss-type", help="sigmoid (DPO) or ipo."),
        beta: float = typer.Option(None, "--beta", help="β (default 0.1)."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from a checkpoint (default: yes)."),
    ):
        """Train a policy directly on annotated pairs with DPO (or IPO).

        Reads: --model (SFT model folder: start and reference), --preferences (annotated pairs).
        Writes to --out: the policy (save_pretrained), metrics.jsonl, reference_logps.pt,
        train_config.json, and checkpoint/ while training (rerun the same command to resume).
        """
        overrides = common.set_then_flags(set_, {"model_name_or_path": model, "preference_file": preferences,
                     "output_dir": output_dir, "loss_type": loss_type, "beta": beta, "resume": resume})
        cfg = common.load_config(DPOConfig, config, overrides)
        typer.echo(f"dpo policy: {train(cfg)}")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"epochs": 2, "lr": 3e-5, "beta": 0.1, "per_device_batch_size": 16, "max_length": 256}
PIPELINE = MethodSpec(
    config=DPOConfig, train=train, weight=1,
    inputs=lambda run: dict(model_name_or_path=run.sft, preference_file=run.pairs, output_dir=run.out),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "epochs": 1}})
