"""Reward model: a score head on the SFT model, trained on pairwise preferences (Bradley–Terry).

The model is `AutoModelForSequenceClassification` (num_labels=1) initialised from the SFT policy;
a sequence's reward is the head's output at its last real token (the EOS that ends the response).
The loss is the Bradley–Terry log-loss on r(output_1) - r(output_2) with the soft target
P(output_1 better) = 2 - preference (`prefgym.data.preferences`): 1 for preference 1, 0 for 2,
0.8 for a logprob judge's 1.2, 0.5 for a tie. For hard labels this is TRL's `RewardTrainer` loss,
-log σ(r_chosen - r_rejected). Accuracy is the share of pairs whose higher score goes to the
output the label favours (the rounding rule: P > 0.5), ties excluded; equal scores count as wrong
(as TRL's `rewards_chosen > rewards_rejected`). Dropout is off while training (`disable_dropout`,
TRL's default), so the scores trained on are the ones used later. After training, rewards are
normalised so that the SFT policy's own samples (the outputs in the preference data) have mean 0
and standard deviation 1; the normalisation lives in `reward_normalization.json` next to the
model and `score` / `RewardScorer` apply it.

Ensembles against over-optimization (Coste et al. 2024): with `ensemble_size` k > 1, k reward
models are trained into member-0 ... member-(k-1) (member i with seed + i: its own head
initialisation and data order, the same held-out pairs), then `ensemble.json` is written last.
`load_reward_scorer` loads a plain folder or an ensemble; `combine_ensemble_scores` turns the
members' normalised rewards into one by the mean, the worst case or uncertainty weighting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer

from prefgym.data.preferences import annotated_pairs
from prefgym.data.prompts import format_record, make_prompt_formatter
from prefgym.errors import ConfigError, DataError
from prefgym.io import append_jsonl, write_json
from prefgym.methods import common, fields
from prefgym.seeding import rng_for, seed_everything

NORMALIZATION_FILE = "reward_normalization.json"
ENSEMBLE_FILE = "ensemble.json"


@dataclass
class RewardModelConfig(fields.TrainFields, fields.LoraFields):
    model_name_or_path: str = ""
    """SFT model folder (or hub name) the reward model starts from."""
    preference_file: str = ""
    """Pairs with instruction, input, output_1, output_2, preference (AlpacaFarm format)."""
    output_dir: str = ""
    """Where the reward model (save_pretrained), metrics.jsonl and checkpoints go."""
    eval_fraction: float = 0.1
    """Share of the pairs held out to measure accuracy."""
    epochs: int = 1
    """Passes over the training pairs."""
    lr: float = 1e-5
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
    disable_dropout: bool = True
    """Turn dropout off while training (TRL's default): train on the scores the model will give."""
    normalize: bool = True
    """Shift and scale rewards so the SFT samples in the preference data have mean 0, std 1."""
    seed: int = 0
    """Seed of the held-out split, the shuffling and the head's initialisation."""
    split_seed: Optional[int] = None
    """Seed of the held-out split alone (None: `seed`); an ensemble's members all get the ensemble's seed."""
    ensemble_size: int = 1
    """Reward models trained (k > 1: an ensemble in output_dir/member-0 ... member-(k-1), member i with seed + i)."""
    save_steps: int = 200
    """Checkpoint (model, optimizer, RNG, step) every this many optimizer steps."""
    resume: bool = True
    """Continue from the checkpoint in output_dir if there is one."""


def _pairs_and_targets(records: list[dict], path=None) -> tuple[list[dict], list[float]]:
    """Annotated pairs and their targets P(output_1 better); unannotated pairs are skipped."""
    annotated = annotated_pairs(records, path=path)
    if not annotated:
        raise DataError("no annotated pairs to train on", path=path)
    return [r for _, r, _ in annotated], [pref.p1 for _, _, pref in annotated]


def accuracy_counts(score_1, score_2, target) -> tuple[int, int]:
    """(pairs whose higher score goes to the favoured output, pairs with a favoured output).

    `target` = P(output_1 better); output_1 is favoured when it is > 0.5, output_2 when < 0.5,
    and ties (0.5) are left out. Equal scores count as wrong.
    """
    s1, s2, t = (torch.as_tensor(x, dtype=torch.float64) for x in (score_1, score_2, target))
    correct = torch.where(t > 0.5, s1 > s2, s2 > s1)[t != 0.5]
    return int(correct.sum()), int(correct.numel())


def bradley_terry_loss(score_1: torch.Tensor, score_2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of -[p log σ(r1 - r2) + (1 - p) log σ(r2 - r1)], p = P(output_1 better) (0.5 for ties)."""
    return F.binary_cross_entropy_with_logits(score_1 - score_2, target)


def _pair_scores(model, tokenizer, pairs: list[dict], max_length: int, device, fmt=format_record
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (B,), (B,) of output_1 and output_2, in one forward pass; `fmt` makes the prompts."""
    prompts = [fmt(p) for p in pairs]
    batch = common.tokenize_prompt_response(tokenizer, prompts * 2,
                                            [p["output_1"] for p in pairs] + [p["output_2"] for p in pairs],
                                            max_length)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    scores = model(ids, mask)  # a TokenScorer: (B, T)
    last = scores[torch.arange(len(scores), device=device), common.last_token_index(mask)]
    return last[: len(pairs)], last[len(pairs):]


def _split(cfg: RewardModelConfig, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out indices, training indices) of `n_pairs` pairs, drawn with the split seed."""
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    order = rng_for(seed, "reward-model-split").permutation(n_pairs)
    n_eval = int(round(cfg.eval_fraction * n_pairs)) if n_pairs > 1 else 0
    return order[:n_eval], order[n_eval:]


def train(cfg: RewardModelConfig, records: list[dict] | None = None) -> Path:
    """Train a reward model (or an ensemble, `ensemble_size` > 1); returns its folder
    (save_pretrained + reward_normalization.json, or the members + ensemble.json)."""
    from prefgym.models.loading import load_score_model

    if not cfg.model_name_or_path or not cfg.output_dir:
        raise ConfigError("reward model: model_name_or_path and output_dir are required")
    if records is None and not cfg.preference_file:
        raise ConfigError("reward model: preference_file is required")
    if cfg.ensemble_size < 1:
        raise ConfigError(f"reward model: key 'ensemble_size' should be at least 1, got {cfg.ensemble_size}")
    if cfg.ensemble_size > 1:
        return train_ensemble(cfg, records)
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "train_config.json")
    if (out / NORMALIZATION_FILE).exists() and cfg.resume:
        return out  # already complete
    accelerator = fields.make_accelerator(cfg, out)
    fields.start_tracking(accelerator, cfg, "reward_model")
    seed_everything(cfg.seed)

    # 1. Data: annotated pairs, a seeded held-out split.
    if records is None:
        records = common.load_split(cfg.preference_file, ("instruction", "output_1", "output_2", "preference"))
    pairs, targets = _pairs_and_targets(records, cfg.preference_file or None)
    eval_idx, train_idx = _split(cfg, len(pairs))

    # 2. Model: SFT weights + a fresh scalar head.
    tokenizer = common.load_tokenizer(cfg.model_name_or_path)
    fmt = make_prompt_formatter(tokenizer, cfg.prompt_format)
    model = load_score_model(cfg.model_name_or_path, cfg, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.disable_dropout:
        common.disable_dropout(model)
    model = common.TokenScorer(common.apply_lora(model, cfg, "SEQ_CLS"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = common.warmup_schedule(accelerator, optimizer, cfg.warmup_steps)

    n_proc, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.per_device_batch_size * n_proc * cfg.grad_accum
    steps_per_epoch = len(train_idx) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"reward model: {len(train_idx)} training pairs is fewer than one global batch "
                          f"({global_batch}); lower per_device_batch_size or grad_accum")
    total_steps = steps_per_epoch * cfg.epochs

    ckpt_dir = out / "checkpoint"
    state = common.resume_or_start(accelerator, cfg, out)
    step = state["step"] if state else 0

    # 3. Train: each optimizer step takes the next global batch of a per-epoch permutation;
    #    process `rank` takes its slice, so 1 and N processes see the same global batches.
    model.train()
    t0 = time.time()
    with common.make_progress(accelerator) as progress:
        task = progress.add_task("reward model", total=total_steps, completed=step, info="")
        checkpoints = common.CheckpointSchedule(cfg.save_steps, cfg.save_every_seconds, accelerator)
        while step < total_steps:
            epoch, k = divmod(step, steps_per_epoch)
            perm = train_idx[rng_for(cfg.seed, "reward-model-epoch", epoch).permutation(len(train_idx))]
            batch_idx = perm[k * global_batch:(k + 1) * global_batch]
            losses, hits = [], torch.zeros(2)
            for micro in range(cfg.grad_accum):
                start = (micro * n_proc + rank) * cfg.per_device_batch_size
                idx = batch_idx[start:start + cfg.per_device_batch_size]
                with common.no_sync_unless(accelerator, model, micro == cfg.grad_accum - 1):
                    s1, s2 = _pair_scores(model, tokenizer, [pairs[i] for i in idx], cfg.max_length,
                                          accelerator.device, fmt)
                    target = torch.tensor([targets[i] for i in idx], device=accelerator.device)
                    loss = bradley_terry_loss(s1, s2, target)
                    accelerator.backward(loss / cfg.grad_accum)
                losses.append(loss.detach())
                hits += torch.tensor(accuracy_counts(s1.detach(), s2.detach(), target), dtype=torch.float)
            optimizer.step()
            lr = common.step_scheduler(accelerator, scheduler)
            optimizer.zero_grad()
            step += 1
            correct, decided = accelerator.reduce(hits.to(accelerator.device), "sum").tolist()
            metrics = {"step": step, "epoch": epoch,
                       "loss": accelerator.reduce(torch.stack(losses).mean(), "mean").item(),
                       "accuracy": correct / decided if decided else float("nan"),
                       "lr": lr, "elapsed_s": round(time.time() - t0, 2)}
            if accelerator.is_main_process:
                append_jsonl(out / "metrics.jsonl", metrics)
            fields.track(accelerator, metrics)
            progress.update(task, advance=1, info=f"loss {metrics['loss']:.3f} acc {metrics['accuracy']:.2f}")
            if checkpoints.due(step, total_steps):
                common.save_checkpoint(accelerator, ckpt_dir, {"step": step})

    # 4. Held-out accuracy (ties excluded) and loss (ties included).
    model.eval()
    eval_pairs = [pairs[i] for i in eval_idx]
    eval_targets = np.array([targets[i] for i in eval_idx])
    raw = _raw_scores_sharded(accelerator, model, tokenizer, eval_pairs, cfg, both=True, fmt=fmt)
    eval_metrics = {"eval_pairs": len(eval_pairs)}
    if len(eval_pairs):
        s1, s2 = raw[: len(eval_pairs)], raw[len(eval_pairs):]
        correct, decided = accuracy_counts(s1, s2, eval_targets)
        eval_metrics["eval_accuracy"] = correct / decided if decided else None
        eval_metrics["eval_loss"] = float(bradley_terry_loss(torch.tensor(s1), torch.tensor(s2),
                                                             torch.tensor(eval_targets)))

    # 5. Normalise on the SFT policy's samples: every distinct output in the preference data.
    normalization, n_scored = {"mean": 0.0, "std": 1.0}, 0
    if cfg.normalize:
        samples = {(p["instruction"], p.get("input", "") or "", p[f"output_{j}"]) for p in pairs for j in (1, 2)}
        samples = sorted(samples)
        raw = _raw_scores_sharded(accelerator, model, tokenizer,
                                  [{"instruction": a, "input": b, "output_1": c} for a, b, c in samples],
                                  cfg, both=False, fmt=fmt)
        normalization, n_scored = {"mean": float(raw.mean()), "std": float(raw.std()) or 1.0}, len(samples)

    accelerator.wait_for_everyone()
    common.save_trained(accelerator, model, tokenizer, out, "model")
    if accelerator.is_main_process:
        write_json(out / "eval_results.json", eval_metrics)
        # the statistics' precision: a scorer in another one sees them shifted by its rounding
        write_json(out / NORMALIZATION_FILE, {**normalization, "max_length": cfg.max_length,
                                              "n_samples": n_scored, "prompt_format": cfg.prompt_format,
                                              "dtype": fields.resolved_dtype(cfg.dtype),
                                              "mixed_precision": accelerator.mixed_precision})
        append_jsonl(out / "metrics.jsonl", {"step": step, **eval_metrics})
    fields.track(accelerator, {"step": step, **eval_metrics})
    fields.finish_tracking(accelerator)
    if accelerator.is_main_process:
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    common.end_training(accelerator)
    return out


def member_config(cfg: RewardModelConfig, i: int) -> RewardModelConfig:
    """The config of ensemble member i: seed + i (head initialisation and data order), the
    ensemble's held-out split, its own folder output_dir/member-i."""
    return dataclasses.replace(cfg, ensemble_size=1, seed=cfg.seed + i,
                               split_seed=cfg.seed if cfg.split_seed is None else cfg.split_seed,
                               output_dir=str(Path(cfg.output_dir) / f"member-{i}"))


def train_ensemble(cfg: RewardModelConfig, records: list[dict] | None = None) -> Path:
    """Train `cfg.ensemble_size` members one after another, then write ensemble.json (last: a
    folder with it is complete). A finished member (its normalisation file written) is not
    retrained on a rerun; the held-out accuracy of each member and of the mean ensemble, on the
    pairs they all held out, goes to eval_results.json and ensemble.json. Under a launcher every
    process trains every member (data parallel, as a single reward model), in one process group
    kept up from the first member to the last; the main process writes the ensemble's files."""
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "train_config.json")
    if cfg.resume and (out / ENSEMBLE_FILE).exists():
        return out  # already complete
    # Under a launcher, the process group from the start, made as a member's Accelerator makes it
    # (a bare PartialState would not see ACCELERATE_USE_CPU, and CPU processes would not share
    # gradients): every rank then waits for rank 0's files at the end, also when all members are
    # already trained and no member makes an Accelerator.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fields.make_accelerator(cfg, out)  # also the members' mixed precision: one per launch
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / ENSEMBLE_FILE).unlink(missing_ok=True)
        common.save_config(cfg, out / "train_config.json")
    if records is None:
        records = common.load_split(cfg.preference_file, ("instruction", "output_1", "output_2", "preference"))
    with common.process_group_kept():
        members = [train(member_config(cfg, i), records) for i in range(cfg.ensemble_size)]
        if main:
            eval_metrics = _ensemble_eval(cfg, members, records)
            write_json(out / "eval_results.json", eval_metrics)
            write_json(out / ENSEMBLE_FILE, {"members": [m.name for m in members], "size": len(members),
                                             "seeds": [cfg.seed + i for i in range(len(members))], **eval_metrics})
    return out


def _ensemble_eval(cfg: RewardModelConfig, members: list[Path], records: list[dict]) -> dict:
    """Held-out accuracy of each member and of the mean of their normalised rewards (ties excluded)."""
    pairs, targets = _pairs_and_targets(records, cfg.preference_file or None)
    eval_idx, _ = _split(member_config(cfg, 0), len(pairs))
    n = len(eval_idx)
    if n == 0:
        return {"eval_pairs": 0}
    eval_pairs, eval_targets = [pairs[i] for i in eval_idx], np.array([targets[i] for i in eval_idx])
    device = "cuda" if torch.cuda.is_available() else None
    scorer = EnsembleScorer(cfg.output_dir, [RewardScorer(m, device, cfg.per_device_batch_size, cfg) for m in members])
    scores = scorer.member_scores([{**p, "output": p["output_1"]} for p in eval_pairs]
                                  + [{**p, "output": p["output_2"]} for p in eval_pairs])  # (k, 2n)

    def accuracy(s: np.ndarray):
        correct, decided = accuracy_counts(s[:n], s[n:], eval_targets)
        return correct / decided if decided else None

    return {"eval_pairs": n, "eval_accuracy": accuracy(combine_ensemble_scores(scores, "mean")),
            "member_eval_accuracy": [accuracy(s) for s in scores]}


@torch.no_grad()
def _raw_scores_sharded(accelerator, model, tokenizer, pairs: list[dict], cfg, both: bool, fmt=format_record
                        ) -> np.ndarray:
    """Unnormalised rewards of output_1 (then output_2 if `both`), computed in shards across processes.

    Every process runs as many batches: under FSDP and ZeRO-3 each forward of the prepared model
    gathers its weights from all processes, so one with a batch less would leave the others waiting;
    a process out of pairs scores a stand-in (the first pair) and drops its score."""
    from accelerate.utils import gather_object

    n_proc, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(pairs), n_proc))
    results = []
    for s in range(0, math.ceil(len(pairs) / n_proc), cfg.per_device_batch_size):
        chunk = [pairs[i] for i in mine[s:s + cfg.per_device_batch_size]] or pairs[:1]
        prompts = [fmt(p) for p in chunk]
        outputs = [p["output_1"] for p in chunk] + ([p["output_2"] for p in chunk] if both else [])
        batch = common.tokenize_prompt_response(tokenizer, prompts * (2 if both else 1), outputs, cfg.max_length)
        ids, mask = batch["input_ids"].to(accelerator.device), batch["attention_mask"].to(accelerator.device)
        scores = model(ids, mask)
        last = scores[torch.arange(len(scores)), common.last_token_index(mask)].cpu().numpy()
        for j, i in enumerate(mine[s:s + cfg.per_device_batch_size]):
            results.append((i, float(last[j]), float(last[len(chunk) + j]) if both else None))
    gathered = sorted(gather_object(results))
    s1 = np.array([g[1] for g in gathered])
    return np.concatenate([s1, np.array([g[2] for g in gathered])]) if both else s1


def combine_ensemble_scores(scores, rule: str, uwo_coef: float = 1.0):
    """One reward per sample from the (k, N) normalised rewards of k members (numpy or torch, kept).

    mean: the members' mean. worst: their minimum (worst-case optimisation, WCO). uwo: the mean
    minus `uwo_coef` times the members' variance, the population variance (ddof = 0, divided by
    k) as in Coste et al. 2024's uncertainty-weighted optimisation. With one member every rule
    gives its score. ConfigError for another rule.
    """
    fields.check_reward_ensemble(rule, uwo_coef)
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(f"ensemble scores should be (members, samples), got shape {tuple(scores.shape)}")
    if isinstance(scores, torch.Tensor):
        mean, worst = scores.mean(0), scores.amin(0)
        variance = scores.var(0, correction=0)
    else:
        scores = np.asarray(scores)
        mean, worst, variance = scores.mean(0), scores.min(0), scores.var(0, ddof=0)
    return {"mean": mean, "worst": worst, "uwo": mean - uwo_coef * variance}[rule]


class RewardScorer:
    """A trained reward model held in memory: normalised rewards for texts or token batches.

    Records are prompted as the reward model was trained (the `prompt_format` saved with its
    normalisation; alpaca for folders written before it was saved). `model_cfg` (any config with
    ModelFields: dtype, attn_implementation) says how to load it; default float32.
    """

    def __init__(self, rm_path: str | Path, device: str | torch.device | None = None, batch_size: int = 16,
                 model_cfg=None):
        from prefgym.models.loading import load_score_model

        self.path = Path(rm_path)
        if (self.path / ENSEMBLE_FILE).exists():
            raise ConfigError(f"{self.path} is a reward-model ensemble; load it with load_reward_scorer")
        norm_file = self.path / NORMALIZATION_FILE
        self.normalization = json.loads(norm_file.read_text()) if norm_file.exists() else {"mean": 0.0, "std": 1.0}
        self.max_length = int(self.normalization.get("max_length", 512))
        self.batch_size = batch_size
        self.tokenizer = common.load_tokenizer(self.path)
        self.format = make_prompt_formatter(self.tokenizer, self.normalization.get("prompt_format", "auto"))
        self.model = load_score_model(self.path, model_cfg or fields.ModelFields(), num_labels=None, trainable=False)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False)
        self.model.eval()
        if device is not None:
            self.model.to(device)

    def check_prompt_format(self, tokenizer, prompt_format: str, who: str) -> None:
        """ConfigError when a policy prompted with `prompt_format` would show this reward model
        prompts formatted otherwise than it was trained on."""
        from prefgym.data.prompts import resolve_prompt_format

        mine = resolve_prompt_format(self.tokenizer, self.normalization.get("prompt_format", "auto"))
        theirs = resolve_prompt_format(tokenizer, prompt_format)
        if mine != theirs:
            raise ConfigError(f"{who}: the reward model {self.path} was trained on {mine} prompts but prompt_format "
                              f"{prompt_format!r} gives {theirs} prompts; set prompt_format to {mine}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def members(self) -> list["RewardScorer"]:
        """A single reward model is an ensemble of one (PPO initialises its value model from members[0])."""
        return [self]

    def to(self, device) -> "RewardScorer":
        self.model.to(device)
        return self

    @torch.no_grad()
    def score_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) normalised rewards read at each row's last real token (any padding side)."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        scores = common.token_scores(self.model, input_ids, attention_mask)
        raw = scores[torch.arange(len(scores), device=self.device), common.last_token_index(attention_mask)]
        return (raw - self.normalization["mean"]) / self.normalization["std"]

    def score_texts(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Normalised rewards of (prompt, response) pairs; the response gets its EOS appended."""
        out = []
        for s in range(0, len(prompts), self.batch_size):
            batch = common.tokenize_prompt_response(self.tokenizer, prompts[s:s + self.batch_size],
                                                    responses[s:s + self.batch_size], self.max_length)
            out.append(self.score_tokens(batch["input_ids"], batch["attention_mask"]).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, records: list[dict]) -> np.ndarray:
        """Normalised rewards of records with instruction, input and output."""
        for i, r in enumerate(records):
            for f in ("instruction", "output"):
                if f not in r:
                    raise DataError("missing field", row=i, field=f)
        return self.score_texts([self.format(r) for r in records],
                                [r["output"] or "" for r in records])

    def member_scores(self, records: list[dict]) -> np.ndarray:
        """(1, N): `score` as the rewards of an ensemble of one."""
        return self.score(records)[None]


class EnsembleScorer:
    """Reward-model ensemble members held in memory, scoring like one `RewardScorer`: each
    member's normalised rewards combined by `rule` (`combine_ensemble_scores`). The members share
    tokenizer, prompt format and max_length (checked), so one tokenisation serves them all."""

    def __init__(self, path: str | Path, members: list[RewardScorer], rule: str = "mean", uwo_coef: float = 1.0):
        fields.check_reward_ensemble(rule, uwo_coef)
        self.path, self.members, self.rule, self.uwo_coef = Path(path), members, rule, uwo_coef
        first = members[0]
        self.tokenizer, self.format, self.max_length, self.batch_size = (first.tokenizer, first.format,
                                                                         first.max_length, first.batch_size)
        self.model = torch.nn.ModuleList([m.model for m in members])  # .to / dropout reach every member
        for m in members[1:]:
            first.check_prompt_format(m.tokenizer, m.normalization.get("prompt_format", "auto"),
                                      f"reward-model ensemble member {m.path}")
            if m.tokenizer.get_vocab() != first.tokenizer.get_vocab() or m.max_length != first.max_length:
                raise ConfigError(f"reward-model ensemble {self.path}: member {m.path} has another tokenizer or "
                                  f"max_length than {first.path}; train every member from the same SFT model and settings")

    def check_prompt_format(self, tokenizer, prompt_format: str, who: str) -> None:
        """As `RewardScorer.check_prompt_format` (the members share their prompt format)."""
        self.members[0].check_prompt_format(tokenizer, prompt_format, who)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def to(self, device) -> "EnsembleScorer":
        self.model.to(device)
        return self

    @torch.no_grad()
    def score_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) combined normalised rewards of a token batch."""
        scores = torch.stack([m.score_tokens(input_ids, attention_mask) for m in self.members])  # (k, B)
        return combine_ensemble_scores(scores, self.rule, self.uwo_coef)

    def score_texts(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Combined normalised rewards of (prompt, response) pairs."""
        scores = np.stack([m.score_texts(prompts, responses) for m in self.members])
        return combine_ensemble_scores(scores, self.rule, self.uwo_coef)

    def member_scores(self, records: list[dict]) -> np.ndarray:
        """(k, N): each member's normalised rewards of records with instruction, input and output."""
        return np.stack([m.score(records) for m in self.members])

    def score(self, records: list[dict]) -> np.ndarray:
        """Combined normalised rewards of records with instruction, input and output."""
        return combine_ensemble_scores(self.member_scores(records), self.rule, self.uwo_coef)


def load_reward_scorer(path: str | Path, rule: str = "mean", uwo_coef: float = 1.0,
                       device: str | torch.device | None = None, batch_size: int = 16, model_cfg=None
                       ) -> RewardScorer | EnsembleScorer:
    """The scorer of a reward-model folder: a `RewardScorer`, or for a folder with ensemble.json an
    `EnsembleScorer` of its members combined by `rule` (mean, worst, uwo). ConfigError for an
    unknown rule, an unfinished ensemble or a member folder that is missing."""
    fields.check_reward_ensemble(rule, uwo_coef)
    path = Path(path)
    if not (path / ENSEMBLE_FILE).exists():
        if (path / "member-0").is_dir():
            raise ConfigError(f"{path} holds an unfinished reward-model ensemble (no {ENSEMBLE_FILE}); rerun "
                              "`prefgym reward-model` with the same settings to finish it")
        return RewardScorer(path, device, batch_size, model_cfg)
    names = json.loads((path / ENSEMBLE_FILE).read_text()).get("members")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path / ENSEMBLE_FILE}: field 'members' should be a non-empty list of folder names")
    for name in names:
        if not (path / name / "config.json").exists():
            raise ConfigError(f"{path / ENSEMBLE_FILE} lists member {name!r} but {path / name} holds no reward model; "
                              f"delete {ENSEMBLE_FILE} and rerun `prefgym reward-model` with the same settings "
                              "(finished members are kept)")
    return EnsembleScorer(path, [RewardScorer(path / n, device, batch_size, model_cfg) for n in names], rule, uwo_coef)


def score(rm_path: str | Path, records: list[dict], batch_size: int = 16, rule: str = "mean",
          uwo_coef: float = 1.0) -> np.ndarray:
    """Normalised reward per record (instruction, input, output) under the reward model (or
    ensemble, combined by `rule`) at rm_path."""
    return load_reward_scorer(rm_path, rule, uwo_coef, batch_size=batch_size).score(records)


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""

    @app.command("reward-model")
    def reward_model_command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of RewardModelConfig fields."),
        model: str = typer.Option(None, "--model", help="SFT model folder to start from."),
        preferences: str = typer.Option(None, "--preferences", help="Annotated pairs (JSON/JSONL)."),
        output_dir: str = typer.Option(None, "--output-dir", "--out", "-o", help="Where the reward model goes."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue from a checkpoint (default: yes)."),
    ):
        """Train a reward model (Bradley–Terry, ties as 0.5) on annotated pairs.

        Reads: --model (SFT model folder), --preferences (annotated pairs).
        Writes to --out: the reward model (save_pretrained), eval_results.json (held-out
        accuracy), metrics.jsonl, train_config.json, and checkpoint/ while training (rerun the
        same command to resume). With --set ensemble_size=K: K such folders member-0 ...
        member-(K-1), then ensemble.json (members, their and the mean ensemble's accuracy).
        """
        overrides = common.set_then_flags(set_, {"model_name_or_path": model,
                     "preference_file": preferences, "output_dir": output_dir, "resume": resume})
        cfg = common.load_config(RewardModelConfig, config, overrides)
        path = train(cfg)
        typer.echo(f"reward model: {path} {json.loads((path / 'eval_results.json').read_text())}")
