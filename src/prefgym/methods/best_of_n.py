"""Best-of-n: sample n outputs per instruction from a policy, keep the one the reward model ranks first.

AlpacaFarm's inference-time method (also called rejection sampling or reranking): it produces
outputs, not weights. For each instruction the policy draws n samples in one `generate` call
(num_return_sequences), the reward model scores all of them in batches, and the output with the
highest reward is kept (the first one on ties). Expert iteration fine-tunes on these outputs.

Work goes in chunks of `chunk_size` instructions; each finished chunk is appended to
`<output_file>.partial.jsonl`, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import typer

from prefgym.errors import ConfigError
from prefgym.methods.fields import GenerationFields, ModelFields, RewardEnsembleFields


@dataclass
class BestOfNConfig(RewardEnsembleFields, GenerationFields, ModelFields):
    """Best-of-n sampling settings (AlpacaFarm: temperature 1.0; n from 1 to 1024, 16 a good default)."""

    policy_model: str = ""
    """Policy to sample from (save_pretrained folder or Hub name), e.g. the SFT model."""
    reward_model: str = ""
    """Reward model folder (as written by `prefgym reward-model`) that ranks the samples."""
    data: str = ""
    """Instructions (records with instruction, input): .json/.jsonl, datasets folder or Hub name."""
    split: Optional[str] = None
    """Split of `data` when it is a folder or Hub dataset (e.g. unlabeled, eval)."""
    output_file: str = "runs/best_of_n/outputs.json"
    """Where the AlpacaEval-format outputs go (instruction, input, output, generator, ...)."""
    n: int = 16
    """Samples per instruction; the best of them is kept."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 300
    """Most tokens per sample."""
    missing_eos_penalty: Optional[float] = -1.0
    """Reward given to a sample that never emits EOS within max_new_tokens (None: the reward model's
    score); the rule PPO, expert iteration and Quark share."""
    generation_batch_size: int = 8
    """Prompts per `generate` call (each yields n sequences)."""
    scoring_batch_size: int = 32
    """(instruction, sample) pairs per reward-model forward pass."""
    chunk_size: int = 64
    """Instructions per resumable chunk (one line group in the .partial.jsonl file)."""
    max_examples: int = -1
    """Use only the first this many instructions; -1: all."""
    generator: Optional[str] = None
    """Name written in the `generator` field (default: best_of_<n>_<policy folder name>)."""
    seed: int = 0
    """Seed of the sampling."""
    keep_samples: bool = True
    """Also write every sample (`outputs`) and its reward (`rewards`) per instruction."""
    resume: bool = True
    """Continue from `<output_file>.partial.jsonl` when it exists (False: start over)."""
    progress: bool = True
    """Show a progress bar."""


def best_of_n(model, tokenizer, records: list[dict], reward_fn: Callable[[list[dict]], np.ndarray],
              n: int, sampling=None, generator: str = "best_of_n",
              missing_eos_penalty: Optional[float] = -1.0, fmt: Optional[Callable[[dict], str]] = None,
              first_index: int = 0) -> list[dict]:
    """The best of `n` samples per record under `reward_fn` (records -> rewards array).

    `fmt` makes a record's prompt (`prefgym.data.prompts.make_prompt_formatter`; default Alpaca).
    `sampling` is a `SamplingConfig` (its num_samples is set to `n`). A sample cut off at
    max_new_tokens (no EOS) is rewarded `missing_eos_penalty` (`common.missing_eos_scores`).
    Returns one AlpacaEval-format record per input record: `output` (the best sample), `reward`
    (its reward), `outputs` (all n samples), `rewards` (theirs), `truncated` (which had no EOS)
    and `best_index`. `first_index`: the position of `records[0]` in a longer list sampled piece by
    piece (`generate_with_eos` seeds each batch by its position).
    """
    from prefgym.data.prompts import format_record
    from prefgym.methods.common import missing_eos_scores
    from prefgym.models.generation import SamplingConfig, generate_with_eos

    sampling = dataclasses.replace(sampling or SamplingConfig(), num_samples=n)
    samples, finished = generate_with_eos(model, tokenizer, [(fmt or format_record)(r) for r in records], sampling,
                                          first_index=first_index)
    candidates = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": s}
                  for r, group in zip(records, samples) for s in group]
    rewards = np.asarray(reward_fn(candidates), dtype=float).reshape(len(records), n)
    rewards = missing_eos_scores(rewards, finished, missing_eos_penalty)
    best = rewards.argmax(axis=1)  # first maximum on ties
    return [{**r, "input": r.get("input") or "", "output": group[b], "generator": generator,
             "reward": float(rew[b]), "outputs": list(group), "rewards": rew.tolist(),
             "truncated": [not f for f in ended], "best_index": int(b)}
            for r, group, rew, ended, b in zip(records, samples, rewards, finished, best)]


def run(cfg: BestOfNConfig) -> Path:
    """Best-of-n outputs for every instruction of `cfg.data`; returns the path of `cfg.output_file`.

    Writes `output_file` (JSON list, AlpacaEval format) and `<output_file stem>.metrics.jsonl`
    (per chunk: mean best reward, mean reward of all samples, seconds). With `resume`, a
    finished run (output_file there) is not redone and an interrupted one continues.
    """
    from prefgym.data import load_records
    from prefgym.data.prompts import make_prompt_formatter
    from prefgym.io import append_jsonl, read_records, write_json
    from prefgym.methods.reward_model import load_reward_scorer
    from prefgym.models.generation import (SamplingConfig, is_main_process, map_sharded, process_device,
                                           wait_for_everyone)
    from prefgym.models.loading import load_generator
    from prefgym.models.vllm_engine import engine_settings, releasing_engine
    from prefgym.seeding import stable_hash

    for key in ("policy_model", "reward_model", "data"):
        if not getattr(cfg, key):
            raise ConfigError(f"best-of-n: '{key}' is required")
    if cfg.n < 1:
        raise ConfigError(f"best-of-n: n must be at least 1, got {cfg.n}")
    out = Path(cfg.output_file)
    partial = out.with_name(out.name + ".partial.jsonl")
    metrics_file = out.with_name(out.stem + ".metrics.jsonl")
    generator = cfg.generator or f"best_of_{cfg.n}_{Path(cfg.policy_model).name}"

    if cfg.resume and out.exists() and not partial.exists():
        return out  # finished earlier
    records = load_records(cfg.data, split=cfg.split, required=("instruction",))
    if cfg.max_examples >= 0:
        records = records[:cfg.max_examples]
    done = read_records(partial) if cfg.resume and partial.exists() else []
    if not done and is_main_process():
        partial.unlink(missing_ok=True)
        metrics_file.unlink(missing_ok=True)

    # On the vLLM engine only the tokenizer loads here (the engine holds the weights; released after the chunks).
    model, tokenizer = load_generator(cfg.policy_model, cfg.engine, device=process_device(), cfg=cfg)
    fmt = make_prompt_formatter(tokenizer, cfg.prompt_format)
    scorer = load_reward_scorer(cfg.reward_model, cfg.reward_ensemble, cfg.uwo_coef, device=model.device,
                                batch_size=cfg.scoring_batch_size, model_cfg=cfg)
    chunks = range(len(done), len(records), cfg.chunk_size)
    with _progress(cfg.progress and is_main_process(), len(records), len(done)) as advance, releasing_engine():
        for start in chunks:
            t0 = time.perf_counter()
            chunk = records[start:start + cfg.chunk_size]
            # Seeded per chunk, so a resumed run draws what an uninterrupted one would have; the
            # first chunk uses the seed itself (one chunk with n=1 is plain sampling, `generate_outputs`).
            seed = cfg.seed if start == 0 else stable_hash(cfg.seed, "best-of-n-chunk", start)
            sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.generation_batch_size, seed=seed, **engine_settings(cfg))
            # Several processes share the chunk's generation batches (sampled and scored as one process would).
            b = cfg.generation_batch_size
            parts = map_sharded(lambda i: best_of_n(model, tokenizer, chunk[i:i + b], scorer.score, cfg.n, sampling,
                                                    generator, cfg.missing_eos_penalty, fmt, first_index=i),
                                range(0, len(chunk), b))
            rows = [row for part in parts for row in part]
            if is_main_process():
                for row in rows:
                    append_jsonl(partial, row)
                append_jsonl(metrics_file, {"examples_done": start + len(chunk),
                                            "best_reward": float(np.mean([r["reward"] for r in rows])),
                                            "mean_reward": float(np.mean([r["rewards"] for r in rows])),
                                            "seconds": round(time.perf_counter() - t0, 2)})
            advance(len(chunk))

    if is_main_process():
        rows = read_records(partial)
        if not cfg.keep_samples:
            rows = [{k: v for k, v in r.items() if k not in ("outputs", "rewards", "truncated")} for r in rows]
        write_json(out, rows)
        partial.unlink(missing_ok=True)
    wait_for_everyone()  # the others return once the file is there
    return out


def _progress(enabled: bool, total: int, completed: int):
    """A context giving `advance(k)`: a rich progress bar over instructions, or nothing."""
    from contextlib import contextmanager

    @contextmanager
    def bar():
        if not enabled:
            yield lambda k: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from prefgym.progress import stderr_console

        with Progress(TextColumn("best-of-n"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=stderr_console()) as p:
            task = p.add_task("best-of-n", total=total, completed=completed)
            yield lambda k: p.update(task, advance=k)

    return bar()


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym best-of-n` to the `prefgym` app."""

    @app.command("best-of-n")
    def best_of_n_command(
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file of BestOfNConfig fields (flags override it)."),
        policy: Optional[str] = typer.Option(None, "--policy", help="Policy model folder to sample from (e.g. the SFT model)."),
        reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Reward model folder that ranks the samples."),
        data: Optional[str] = typer.Option(None, "--data", help="Instructions: .json/.jsonl, datasets folder or Hub name."),
        split: Optional[str] = typer.Option(None, "--split", help="Split of --data when it is a folder (e.g. eval, unlabeled)."),
        out: Optional[str] = typer.Option(None, "--out", help="Output file (default: runs/best_of_n/outputs.json)."),
        n: Optional[int] = typer.Option(None, "--n", help="Samples per instruction (default: 16)."),
        temperature: Optional[float] = typer.Option(None, help="Sampling temperature (default: 1.0)."),
        max_new_tokens: Optional[int] = typer.Option(None, help="Most tokens per sample (default: 300)."),
        max_examples: Optional[int] = typer.Option(None, help="Only the first N instructions."),
        seed: Optional[int] = typer.Option(None, help="Sampling seed (default: 0)."),
        resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue an interrupted run (default: resume)."),
        set_: list[str] = typer.Option([], "--set", help="Any BestOfNConfig field, key=value (repeatable)."),
    ) -> None:
        """Best-of-n sampling: n samples per instruction from --policy, keep the one --reward-model likes best.

        Reads: --policy (causal LM folder), --reward-model (reward model folder), --data
        (records with instruction, input).

        Writes --out: AlpacaEval-format outputs (instruction, input, output, generator, plus
        reward, outputs, rewards, best_index), and <out stem>.metrics.jsonl. Produces outputs,
        not weights: evaluate the file directly. Rerun the same command to resume.
        """
        from prefgym.methods import common

        overrides = common.set_then_flags(set_, {"policy_model": policy, "reward_model": reward_model,
                     "data": data, "split": split, "output_file": out, "n": n, "temperature": temperature,
                     "max_new_tokens": max_new_tokens, "max_examples": max_examples, "seed": seed,
                     "resume": resume})
        cfg = common.load_config(BestOfNConfig, config, overrides)
        path = run(cfg)
        rows = json.loads(path.read_text(encoding="utf-8"))
        mean = np.mean([r["reward"] for r in rows]) if rows else float("nan")
        typer.echo(f"wrote {path} ({len(rows)} outputs, mean best reward {mean:.3f})")


# ---------------------------------------------------------------------------------------------
# As a method of `prefgym run` (see prefgym.methods.registry)

from prefgym.methods.registry import MethodSpec  # noqa: E402

_WORLD = {"n": 4, "temperature": 0.7, "max_new_tokens": 64, "generation_batch_size": 64}
PIPELINE = MethodSpec(
    config=BestOfNConfig, train=run, weight=1, produces="outputs",  # its result: its outputs on the eval set
    inputs=lambda run: dict(policy_model=run.sft, reward_model=run.reward_model, data=run.splits["eval"],
                            output_file=f"{run.out}/model_outputs.json", generator="best_of_n"),
    world_settings={"default": _WORLD, "quick": {**_WORLD, "max_new_tokens": 32}})
