"""Online (iterative) DPO with the judge in the loop (Guo et al. 2024; Tang et al. 2024; TRL's OnlineDPOTrainer).

Offline DPO learns from pairs sampled once, from the SFT policy. Online DPO labels fresh pairs of
the policy being trained: each of `rounds` rounds

  1. takes the round's `pairs_per_round` prompts (a seeded permutation of the prompts, epoch by
     epoch),
  2. samples two responses to each from the CURRENT policy (the policy after the previous round),
     with the same on-policy sampler as RLOO, GRPO and PPO (`common.sample_rollout`: exactly
     softmax(logits / temperature), seeded per round, prompt and sample; responses cut after EOS;
     on the vLLM engine with `engine: vllm`, which gets the policy's weights first),
  3. has the annotators label the pairs of distinct responses (`annotate_pairs`: the pool, its
     durable cache and its price and time per label, as `prefgym preference-data`; a pair of two
     identical responses is a tie that costs nothing and is not asked),
  4. takes `steps_per_round` DPO steps on the round's labelled pairs: DPO's loss exactly
     (`dpo.batch_losses`: sigmoid or IPO, soft labels, label smoothing), the reference being the
     initial SFT policy, frozen (with LoRA: the policy with its adapters off).

The labels are the method's budget: each round's count, simulated price and annotator time go to
`rounds.jsonl`, running totals to `metrics.jsonl`, the totals to `labels_used.json`. Every pair
asked about, with its label, is kept in `pairs.jsonl` (its `round` field says when). A
checkpoint is written after each round; a rerun resumes at the first round not done (its
samples are drawn again from the same policy with the same seeds, and its labels come from the
cache, so nothing is paid twice). One process (sampling and labelling are not sharded).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import typer

from prefgym.data.prompts import make_prompt_formatter
from prefgym.errors import ConfigError, DataError
from prefgym.io import append_jsonl, write_json, write_jsonl
from prefgym.methods import common, dpo, fields, zero3
from prefgym.seeding import rng_for, seed_everything, stable_hash


@dataclass
class OnlineDPOConfig(fields.GenerationFields, fields.TrainFields, fields.LoraFields):
    policy_model: str = ""
    """SFT model folder (or hub name): the starting policy and the frozen reference."""
    prompt_file: str = ""
    """Instructions to sample pairs for: the `preference` split (the instructions meant for labels)."""
    output_dir: str = ""
    """Where the policy (save_pretrained), pairs.jsonl, rounds.jsonl, labels_used.json, metrics.jsonl go."""
    annotators: str = "world_pool_noisy"
    """Annotator pool that labels each round's pairs: a built-in name or a YAML path."""
    rounds: int = 4
    """Rounds of sample → label → train."""
    pairs_per_round: int = 64
    """Prompts per round; two responses are sampled for each (so at most this many labels a round)."""
    steps_per_round: int = 4
    """DPO optimizer steps on each round's labelled pairs."""
    per_device_batch_size: int = 16
    """Pairs per optimizer step (a round with fewer labelled pairs uses them all each step)."""
    loss_type: str = "sigmoid"
    """'sigmoid' (DPO) or 'ipo', as `prefgym dpo`."""
    beta: float = 0.1
    """Strength of the implicit KL constraint to the SFT policy (DPO's β)."""
    soft_labels: str = "weight"
    """Soft preferences: 'weight' (flip probability 1 - P(winner) in the loss) or 'round'."""
    label_smoothing: float = 0.0
    """Global probability that any label is flipped, in [0, 0.5) (cDPO's ε)."""
    ipo_average: bool = True
    """IPO: average the log-probs over the response's tokens."""
    lr: float = 1e-6
    """AdamW learning rate (one optimizer across rounds; constant after warmup)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    temperature: float = 1.0
    """Sampling temperature of the pairs."""
    max_new_tokens: int = 128
    """Longest response sampled."""
    max_prompt_length: int = 384
    """Prompt tokens kept when sampling (from the left)."""
    max_length: int = 512
    """Tokens of prompt + response kept in the DPO loss."""
    disable_dropout: bool = True
    """Turn dropout off, so the policy samples and scores with the same function and starts equal to the reference."""
    seed: int = 0
    """Seed of prompt order, sampling, annotators and batches."""
    resume: bool = True
    """Continue from the checkpoint (written after each round) in output_dir if there is one."""
    # engine (GenerationFields): vllm samples each round's pairs on a vLLM engine that gets the policy's
    # weights before each round's sampling; the DPO steps are unchanged.


def _check(cfg: OnlineDPOConfig) -> None:
    for key in ("policy_model", "output_dir", "annotators"):
        if not getattr(cfg, key):
            raise ConfigError(f"online_dpo: '{key}' is required")
    for key in ("rounds", "pairs_per_round", "steps_per_round", "per_device_batch_size", "max_new_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"online_dpo: {key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.loss_type not in ("sigmoid", "ipo"):
        raise ConfigError(f"online_dpo: loss_type must be 'sigmoid' or 'ipo', got '{cfg.loss_type}'")
    if cfg.soft_labels not in ("weight", "round"):
        raise ConfigError(f"online_dpo: soft_labels must be 'weight' or 'round', got '{cfg.soft_labels}'")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"online_dpo: label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.temperature <= 0:
        raise ConfigError(f"online_dpo: temperature must be > 0 (two samples must be able to differ), "
                          f"got {cfg.temperature}")


# ---------------------------------------------------------------------------------------------
# One round: which prompts, the pairs sampled from the current policy, their labels


def round_rows(seed: int, round_index: int, pairs_per_round: int, n_prompts: int) -> list[int]:
    """Indices of round `round_index`'s prompts: its slice of a per-epoch seeded permutation."""
    per_epoch = max(1, n_prompts // pairs_per_round)
    epoch, k = divmod(round_index, per_epoch)
    perm = rng_for(seed, "online-dpo-prompts", epoch).permutation(n_prompts)
    return [int(i) for i in perm[k * pairs_per_round:(k + 1) * pairs_per_round]]


@torch.no_grad()
def sample_pairs(policy, tokenizer, prompts: list[dict], prompt_texts: list[str], rows: list[int],
                 cfg: OnlineDPOConfig, round_index: int, engine=None) -> list[dict]:
    """Two responses from `policy` to each prompt `rows`, as pair records (instruction, input, output_1,
    output_2, round); sample j of prompt i is seeded by (seed, round, i, j). `engine`: the vLLM engine
    to sample on, which gets the policy's weights first (`common.rollout_engine`; None: HF)."""
    texts = [prompt_texts[i] for i in rows for _ in range(2)]
    seeds = [stable_hash(cfg.seed, "online-dpo-sample", round_index, i, j) for i in rows for j in range(2)]
    _, _, response_ids = common.sample_rollout(engine, policy, tokenizer, texts, seeds=seeds,
                                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                               max_prompt_length=cfg.max_prompt_length)
    response_ids, _, _ = common.truncate_after_eos(response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    outs = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return [{"instruction": prompts[i]["instruction"], "input": prompts[i].get("input") or "",
             "output_1": outs[2 * n], "output_2": outs[2 * n + 1], "round": round_index}
            for n, i in enumerate(rows)]


def label_pairs(pairs: list[dict], cfg: OnlineDPOConfig, cache_dir: Path) -> tuple[list[dict], dict]:
    """The distinct pairs labelled by the annotators, and the round's label account: `labels` (pairs
    that got a label), `identical` (not asked), `failed` (asked, no label), `price`, `seconds`."""
    from prefgym.annotators import annotate_pairs

    distinct = [p for p in pairs if p["output_1"] != p["output_2"]]
    labelled = annotate_pairs(distinct, cfg.annotators, seed=cfg.seed, cache_dir=cache_dir,
                              progress=False) if distinct else []
    got = [r for r in labelled if r.get("preference") is not None]
    account = {"prompts": len(pairs), "identical": len(pairs) - len(distinct), "labels": len(got),
               "failed": len(labelled) - len(got),
               "price": float(sum(r.get("price_per_example") or 0.0 for r in labelled)),
               "seconds": float(sum(r.get("time_per_example") or 0.0 for r in labelled))}
    return labelled, account


# ---------------------------------------------------------------------------------------------
# Training


class _AdaptersOff(torch.nn.Module):
    """The reference when training LoRA adapters: the policy's PairLogps with its adapters disabled."""

    def __init__(self, pair_model: dpo.PairLogps):
        super().__init__()
        self.pair_model = pair_model

    def forward(self, *batch):
        with self.pair_model.model.disable_adapter():
            return self.pair_model(*batch)


def _keep_rounds_before(path: Path, start_round: int) -> list[dict]:
    """Rows of a round-keyed JSONL file from rounds before `start_round` (a resumed run redoes the rest)."""
    from prefgym.io import read_records

    rows = [r for r in read_records(path) if r["round"] < start_round] if path.exists() else []
    write_jsonl(path, rows)
    return rows


def label_totals(rounds: list[dict]) -> dict:
    """`labels_used.json`: the labels, simulated price and annotator seconds of all rounds."""
    return {"labels": sum(r["labels"] for r in rounds), "price": sum(r["price"] for r in rounds),
            "seconds": sum(r["seconds"] for r in rounds), "rounds": len(rounds),
            "labels_per_round": [r["labels"] for r in rounds]}


def train(cfg: OnlineDPOConfig, prompts: list[dict] | None = None) -> Path:
    """Run online DPO; returns the folder of the trained policy (save_pretrained)."""
    from prefgym.methods.rloo import load_policy_and_reference

    _check(cfg)
    if prompts is None and not cfg.prompt_file:
        raise ConfigError("online_dpo: 'prompt_file' is required (the preference split)")
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "train_config.json")
    if cfg.resume and (out / "model.safetensors").exists() and not (out / "checkpoint").exists():
        return out  # already complete
    accelerator = fields.make_accelerator(cfg, out)
    if accelerator.num_processes > 1:
        raise ConfigError("online_dpo runs on one process (its sampling and labelling are not sharded)")
    fields.start_tracking(accelerator, cfg, "online_dpo")
    seed_everything(cfg.seed)
    if prompts is None:
        prompts = common.load_split(cfg.prompt_file, ("instruction",))
    if not prompts:
        raise DataError("no prompts to sample pairs for", path=cfg.prompt_file or None)
    tokenizer, policy, reference = load_policy_and_reference(cfg, with_reference=True)
    engine = common.rollout_engine(cfg, policy, tokenizer)  # None: the HF sampler
    fmt = make_prompt_formatter(tokenizer, cfg.prompt_format)
    prompt_texts = [fmt(p) for p in prompts]
    model = dpo.PairLogps(policy)
    ref_model = dpo.PairLogps(reference) if reference is not None else _AdaptersOff(model)
    device = accelerator.device
    if reference is not None:
        reference.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = common.warmup_schedule(accelerator, optimizer, cfg.warmup_steps)

    ckpt_dir, start_round, step = out / "checkpoint", 0, 0
    if cfg.resume and (state := common.load_checkpoint(accelerator, ckpt_dir)):
        start_round, step = state["round"], state["step"]
        common.drop_metrics_after(out / "metrics.jsonl", step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "rounds.jsonl", "pairs.jsonl", "labels_used.json"):
            (out / name).unlink(missing_ok=True)
        common.save_config(cfg, out / "train_config.json")
    _keep_rounds_before(out / "pairs.jsonl", start_round)
    rounds = _keep_rounds_before(out / "rounds.jsonl", start_round)

    model.train()
    t0 = time.time()
    with common.make_progress(accelerator) as progress:
        task = progress.add_task("online dpo", total=cfg.rounds, completed=start_round, info="")
        for r in range(start_round, cfg.rounds):
            # 1-3. The round's pairs, sampled from the current policy, and their labels.
            rows = round_rows(cfg.seed, r, cfg.pairs_per_round, len(prompts))
            # the sampling policy unprepared, as `prepare` runs it (mixed precision); ZeRO-3: on its whole weights
            with accelerator.autocast(), zero3.gathered(model):
                pairs = sample_pairs(accelerator.unwrap_model(model).model, tokenizer, prompts, prompt_texts, rows, cfg,
                                     r, engine=engine)
            labelled, account = label_pairs(pairs, cfg, out / "annotation_cache")
            for row in labelled:
                append_jsonl(out / "pairs.jsonl", {**row, "round": r})
            # 4. DPO steps on the decisive pairs (ties carry no preference), against the frozen SFT policy.
            examples = _decisive(labelled, fmt)
            account.update(round=r, trained_pairs=len(examples))
            rounds.append(account)
            totals = label_totals(rounds)
            if examples:
                ref_logps = dpo._reference_logps(accelerator, ref_model, tokenizer, examples, cfg)
                for s in range(cfg.steps_per_round):
                    idx = _batch(cfg.seed, r, s, len(examples), cfg.per_device_batch_size)
                    losses, chosen_r, rejected_r, pc, pr = dpo.batch_losses(
                        model, tokenizer, [examples[i] for i in idx], ref_logps[idx].to(device, torch.float32),
                        cfg, device)
                    accelerator.backward(losses.mean())
                    optimizer.step()
                    lr = common.step_scheduler(accelerator, scheduler)
                    optimizer.zero_grad()
                    step += 1
                    metrics = {"step": step, "round": r, "loss": losses.mean().item(),
                               "rewards/chosen": chosen_r.mean().item(), "rewards/rejected": rejected_r.mean().item(),
                               "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
                               "rewards/margins": (chosen_r - rejected_r).mean().item(),
                               "labels": totals["labels"], "label_price": totals["price"],
                               "label_seconds": totals["seconds"], "lr": lr,
                               "elapsed_s": round(time.time() - t0, 2)}
                    append_jsonl(out / "metrics.jsonl", metrics)
                    fields.track(accelerator, metrics)
            append_jsonl(out / "rounds.jsonl", account)
            progress.update(task, advance=1, info=f"labels {totals['labels']}")
            if r + 1 < cfg.rounds:
                common.save_checkpoint(accelerator, ckpt_dir, {"round": r + 1, "step": step})

    common.save_trained(accelerator, model, tokenizer, out, "model")
    write_json(out / "labels_used.json", {**label_totals(rounds), "annotators": cfg.annotators})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    fields.finish_tracking(accelerator)
    fields.end_mixed_precision()
    return out


def _decisive(labelled: list[dict], fmt) -> list[tuple[str, str, str, float]]:
    """DPO's (prompt, chosen, rejected, P(chosen better)) of the pairs with a preference (ties carry none)."""
    try:
        return dpo._chosen_rejected([p for p in labelled if p.get("preference") is not None], fmt=fmt)
    except DataError:  # every pair a tie (or none labelled): nothing to learn this round
        return []


def _batch(seed: int, round_index: int, step: int, n: int, batch_size: int) -> list[int]:
    """Pairs of step `step` of a round: consecutive slices of seeded permutations of the round's n pairs."""
    if n <= batch_size:
        return list(range(n))
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = rng_for(seed, "online-dpo-batch", round_index, epoch).permutation(n)
    return [int(i) for i in perm[k * batch_size:(k + 1) * batch_size]]


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""

    @app.command("online-dpo")
    def online_dpo_command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of OnlineDPOConfig fields."),
        policy: str = typer.Option(None, "--policy", "--model", help="SFT model folder (start and reference)."),
        prompts: str = typer.Option(None, "--prompts", help="Instructions: the preference split (JSON/JSONL)."),
        annotators: str = typer.Option(None, "--annotators", help="Annotator pool (default world_pool_noisy)."),
        output_dir: str = typer.Option(None, "--output-dir", "--out", "-o", help="Where the policy goes."),
        rounds: int = typer.Option(None, "--rounds", help="Rounds of sample, label, train (default 4)."),
        pairs_per_round: int = typer.Option(None, "--pairs-per-round", help="Prompts (pairs) per round (default 64)."),
        steps_per_round: int = typer.Option(None, "--steps-per-round", help="DPO steps per round (default 4)."),
        beta: float = typer.Option(None, "--beta", help="β (default 0.1)."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from a checkpoint (default: yes)."),
    ):
        """Online DPO: each round, sample pairs from the current policy, have the annotators label them, take DPO steps.

        Reads: --policy (SFT model folder: start and frozen reference), --prompts, --annotators.
        Writes to --out: the policy (save_pretrained), pairs.jsonl (every labelled pair, by round),
        rounds.jsonl and labels_used.json (labels, simulated price and time), metrics.jsonl,
        train_config.json, the annotation cache, and checkpoint/ between rounds (rerun to resume).
        """
        named = {"policy_model": policy, "prompt_file": prompts, "annotators": annotators, "output_dir": output_dir,
                 "rounds": rounds, "pairs_per_round": pairs_per_round, "steps_per_round": steps_per_round,
                 "beta": beta, "resume": resume}
        overrides = common.set_then_flags(set_, named)
        cfg = common.load_config(OnlineDPOConfig, config, overrides)
        path = train(cfg)
        typer.echo(f"online dpo policy: {path} ({(path / 'labels_used.json').read_text().strip()})")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"rounds": 8, "pairs_per_round": 256, "steps_per_round": 16, "per_device_batch_size": 32, "lr": 1e-4,
          "beta": 0.1, "temperature": 1.0, "max_new_tokens": 64, "max_prompt_length": 256, "max_length": 256}
PIPELINE = MethodSpec(
    config=OnlineDPOConfig, train=train, weight=2, labels="own",  # it asks the annotators itself
    inputs=lambda run: dict(policy_model=run.sft, prompt_file=run.splits["preference"], annotators=run.annotators,
                            output_dir=run.out),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "rounds": 2, "pairs_per_round": 128,
                                                 "steps_per_round": 8, "max_new_tokens": 32}})
