"""Preference data: sample outputs from the SFT policy and have annotators compare them.

AlpacaFarm's step 2: for each instruction of the `preference` split, sample `num_samples`
responses from the SFT model, pair distinct samples (`make_pairs`) and label each pair with an
annotator pool (`annotate_pairs`, by default the noisy simulated API pool). The result is a file
of AlpacaFarm-format pairs: instruction, input, output_1, output_2, preference, annotator, ...

Resumable: samples are appended to `samples.jsonl` chunk by chunk (a rerun skips the chunks that
are there) and annotations go through the annotators' durable cache.

Several processes (`accelerate launch`) share each chunk's generation batches and write the same
samples as one process; the main process writes the files and annotates the pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from prefgym.errors import ConfigError
from prefgym.data.prompts import make_prompt_formatter
from prefgym.io import append_jsonl, write_json, write_jsonl
from prefgym.methods import common, fields
from prefgym.seeding import stable_hash


@dataclass
class PreferenceDataConfig(fields.GenerationFields, fields.ModelFields):
    policy_model: str = ""
    """SFT model folder (or hub name) whose samples are compared."""
    prompt_file: str = ""
    """Instructions: the `preference` split (a file, a datasets folder or a hub dataset)."""
    split: str | None = None
    """Split of prompt_file when it is a folder or hub dataset."""
    output_dir: str = ""
    """Where samples.jsonl, preferences.json and the annotation cache go."""
    num_samples: int = 2
    """Responses sampled per instruction (pairs are formed from distinct ones)."""
    pairs_per_instruction: int = 1
    """Disjoint pairs kept per instruction (AlpacaFarm: 1)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 300
    """Longest response sampled."""
    batch_size: int = 16
    """Prompts per call to generate."""
    chunk_size: int = 256
    """Instructions sampled between two writes of samples.jsonl (the resume granularity)."""
    max_instructions: int | None = None
    """Use only the first N instructions (None: all)."""
    annotators: str = "world_pool_noisy"
    """Annotator pool: a built-in name (world_pool_noisy, world_pool, world_humans, ...) or a YAML path."""
    seed: int = 0
    """Seed of the sampling, the pairing and the annotators."""
    resume: bool = True
    """Reuse the samples already in output_dir."""


def run(cfg: PreferenceDataConfig, records: list[dict] | None = None) -> Path:
    """Sample, pair and annotate; returns the path of preferences.json."""
    from prefgym.annotators import annotate_pairs, make_pairs
    from prefgym.models.generation import (SamplingConfig, generate_sharded, is_main_process, main_process_only,
                                           process_device, processes)
    from prefgym.models.loading import load_generator
    from prefgym.models.vllm_engine import engine_settings, releasing_engine

    if not cfg.policy_model or not cfg.output_dir:
        raise ConfigError("preference data: policy_model and output_dir are required")
    if records is None and not cfg.prompt_file:
        raise ConfigError("preference data: prompt_file is required (the preference split)")
    if cfg.num_samples < 2:
        raise ConfigError("preference data: num_samples must be at least 2 to form pairs")
    out = Path(cfg.output_dir)
    common.check_output_dir(cfg, out / "preference_data_config.json")  # samples made with other settings
    out.mkdir(parents=True, exist_ok=True)
    samples_file = out / "samples.jsonl"
    if records is None:
        from prefgym.data import load_records

        records = load_records(cfg.prompt_file, split=cfg.split, required=("instruction",))
    records = records[: cfg.max_instructions] if cfg.max_instructions else records

    # 1. Sample num_samples responses per instruction, chunk by chunk (each chunk seeded on its own).
    done = _samples_done(samples_file, len(records), cfg) if cfg.resume else []
    if is_main_process():
        common.save_config(cfg, out / "preference_data_config.json")
        write_jsonl(samples_file, done)  # without a chunk cut short (redone whole)
    # On the vLLM engine only the tokenizer loads here: the engine holds the weights, released before annotating.
    model = tokenizer = None
    with common.make_progress(processes()) as progress, releasing_engine():  # a bar on the main process only
        task = progress.add_task("sampling", total=len(records), completed=len(done), info="")
        for start in range(len(done), len(records), cfg.chunk_size):
            if model is None:
                model, tokenizer = load_generator(cfg.policy_model, cfg.engine, device=process_device(), cfg=cfg)
                fmt = make_prompt_formatter(tokenizer, cfg.prompt_format)
            chunk = records[start:start + cfg.chunk_size]
            sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                      num_samples=cfg.num_samples, batch_size=cfg.batch_size,
                                      seed=stable_hash(cfg.seed, "preference-data", start) % 2**31,
                                      **engine_settings(cfg))
            outputs = generate_sharded(model, tokenizer, [fmt(r) for r in chunk], sampling)[0]
            rows = [{"instruction": rec["instruction"], "input": rec.get("input") or "", "outputs": outs,
                     "generator": Path(cfg.policy_model).name} for rec, outs in zip(chunk, outputs)]
            if is_main_process():
                for row in rows:
                    append_jsonl(samples_file, row)
            done.extend(rows)
            progress.update(task, advance=len(chunk))

    # 2. Pair distinct samples; 3. annotate (cached, so a rerun pays nothing twice), on the main process.
    path = out / "preferences.json"

    def annotate() -> None:
        pairs = make_pairs(done, seed=cfg.seed, pairs_per_instruction=cfg.pairs_per_instruction)
        labelled = annotate_pairs(pairs, cfg.annotators, seed=cfg.seed, cache_dir=out / "annotation_cache")
        write_json(path, [r for r in labelled if r.get("preference") is not None])

    main_process_only("annotating the pairs", annotate)
    return path


def _samples_done(samples_file: Path, n_records: int, cfg: PreferenceDataConfig) -> list[dict]:
    """The rows of samples.jsonl a rerun keeps: whole chunks only (a chunk cut short is redone)."""
    if not samples_file.exists():
        return []
    done = [json.loads(l) for l in samples_file.read_text().splitlines() if l.strip()]
    if len(done) < n_records and len(done) % cfg.chunk_size:
        done = done[: len(done) - len(done) % cfg.chunk_size]
    return done


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""

    @app.command("preference-data")
    def preference_data_command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of PreferenceDataConfig fields."),
        policy: str = typer.Option(None, "--policy", "--model", help="SFT model folder."),
        prompts: str = typer.Option(None, "--prompts", "--data", help="Instructions: the preference split."),
        split: str = typer.Option(None, "--split", help="Split of --prompts when it is a folder or hub dataset."),
        output_dir: str = typer.Option(None, "--output-dir", "--out", "-o", help="Output folder."),
        annotators: str = typer.Option(None, "--annotators", help="Annotator pool (default world_pool_noisy)."),
        num_samples: int = typer.Option(None, "--num-samples", help="Samples per instruction (default 2)."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        resume: bool = typer.Option(None, "--resume/--no-resume", help="Reuse samples already written (default: yes)."),
    ):
        """Sample pairs of outputs from the SFT policy and annotate them (AlpacaFarm format).

        Reads: --policy (SFT model folder), --prompts (the preference split), --annotators.
        Writes to --out: samples.jsonl (the samples, appended as they come: rerun to resume) and
        preferences.json (pairs with preference, annotator, price and time), and the annotation
        cache of the judges' answers.
        """
        overrides = common.set_then_flags(set_, {"policy_model": policy, "prompt_file": prompts, "split": split,
                     "output_dir": output_dir, "annotators": annotators, "num_samples": num_samples,
                     "resume": resume})
        cfg = common.load_config(PreferenceDataConfig, config, overrides)
        path = run(cfg)
        typer.echo(f"preferences: {path}")
