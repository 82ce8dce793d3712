"""The whole AlpacaFarm loop as one resumable pipeline: `prefgym run`.

world → SFT → preference pairs (noisy pool) → reward model → every method → evaluation
(evaluation pool and simulated humans) → leaderboard.csv / leaderboard.md / report.html.

Each stage writes into its own folder under the run folder and marks completion with a
`.done` file written last, so a killed run restarts at the first stage not done. The same
stages run on real data, models and judges from a config file (`prefgym run --config`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from prefgym.errors import ConfigError
from prefgym.io import write_json

ALL_METHODS = ("ppo", "best_of_n", "expert_iteration", "quark", "feedme", "reward_conditioning", "dpo")


@dataclass
class RunConfig:
    """Everything `prefgym run` needs. Defaults run the built-in world."""

    out_dir: str | None = None
    """Run folder: every stage writes into a sub-folder of it (default prefgym-runs/<scale>)."""
    scale: str = "default"
    """Size of the run on the built-in world: 'quick' (CI) or 'default' (≈10 minutes on 2 cores)."""
    seed: int = 0
    """Seed of the world and of every stage."""
    world_dir: str | None = None
    """Use an already built world folder instead of building one into the run folder."""
    base_model: str | None = None
    """Model to start SFT from (any HF causal LM); default: the world's base model."""
    data: dict[str, str] = field(default_factory=dict)
    """Split name → file or dataset (sft, preference, unlabeled, val, eval); default: the world's splits."""
    train_annotators: str = "world_pool_noisy"
    """Annotators that label the preference pairs used for training (name or YAML path)."""
    eval_annotators: str = "world_pool"
    """Annotators that judge outputs against the reference at evaluation."""
    human_annotators: str | None = "world_humans"
    """Stand-in for humans: evaluation by them, and training on them with --validate (None to skip)."""
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    """Methods to run, from: ppo, best_of_n, expert_iteration, quark, feedme, reward_conditioning, dpo."""
    validate: bool = False
    """Also train every method on the humans' preferences and correlate the two rankings."""
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage overrides of config fields, e.g. {ppo: {total_episodes: 512}}."""


def load_run_config(path: str | Path | None, **overrides) -> RunConfig:
    """Read a run config YAML (unknown keys are errors) and apply command-line overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read run config: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a run config is a mapping of keys to values")
        known = {f.name for f in dataclasses.fields(RunConfig)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(sorted(known))})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig(**values)
    cfg.out_dir = cfg.out_dir or f"prefgym-runs/{cfg.scale}"
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    if cfg.scale not in ("tiny", "quick", "default"):
        raise ConfigError(f"unknown scale '{cfg.scale}'; choose quick or default")
    return cfg


@dataclass
class Stage:
    name: str
    run: Callable[[], None]
    weight: float
    """Expected share of the run's time, used for the time-left estimate."""
    always: bool = False
    """Run even when done before (cheap stages that depend on which stages ran, e.g. the report)."""


def run_stages(stages: list[Stage], out_dir: Path, console=None) -> dict[str, float]:
    """Run stages in order, skipping those already done; show which runs and how long is left."""
    from rich.console import Console

    console = console or Console(stderr=True)
    timings_path = out_dir / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    remaining = sum(s.weight for s in stages)
    ran_weight, ran_seconds = 0.0, 0.0  # stages run in this invocation, for the time-left estimate
    for i, stage in enumerate(stages):
        marker = out_dir / ".done" / stage.name
        if marker.exists() and not stage.always:
            console.print(f"[dim]stage {i + 1}/{len(stages)} {stage.name}: done already, skipped[/dim]")
            remaining -= stage.weight
            continue
        eta = f", about {_fmt(ran_seconds / ran_weight * remaining)} left" if ran_weight > 0 else ""
        console.rule(f"[bold]stage {i + 1}/{len(stages)}: {stage.name}[/bold]{eta}")
        t0 = time.time()
        stage.run()
        timings[stage.name] = round(time.time() - t0, 2)
        write_json(timings_path, timings)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{timings[stage.name]}\n")
        ran_weight += stage.weight
        ran_seconds += timings[stage.name]
        remaining -= stage.weight
    return timings


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# Per-scale settings of each stage on the built-in world. A run config's `stages` overrides them;
# on real models and data, set them there (see configs/run_example.yaml).
_FINETUNE = {"lr": 2e-4, "epochs": 2, "per_device_batch_size": 16, "max_length": 256}
SCALE_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    # default: the whole loop in about 10 minutes on 2 CPU cores (settings tuned on the world)
    "default": {
        "sft": {"epochs": 10, "lr": 2e-3, "per_device_batch_size": 16, "max_length": 256, "save_steps": 400},
        "preference_data": {"num_samples": 4, "pairs_per_instruction": 2, "temperature": 1.0,
                            "max_new_tokens": 64, "batch_size": 64},
        "reward_model": {"epochs": 2, "lr": 3e-4, "per_device_batch_size": 16, "max_length": 256},
        "ppo": {"steps": 100, "lr": 5e-5, "kl_coef": 0.1, "snapshot_steps": 25, "per_device_rollout_batch_size": 16,
                "num_mini_batches": 2, "ppo_epochs": 2, "max_new_tokens": 64, "max_prompt_length": 256,
                "temperature": 1.0, "save_steps": 10},
        "dpo": {"epochs": 2, "lr": 3e-5, "beta": 0.1, "per_device_batch_size": 16, "max_length": 256},
        "best_of_n": {"n": 4, "temperature": 0.7, "max_new_tokens": 64, "generation_batch_size": 64},
        "expert_iteration": {**_FINETUNE, "n": 4, "temperature": 0.7, "max_new_tokens": 64,
                             "generation_batch_size": 64, "max_examples": 400},
        "quark": {"iterations": 4, "rollout_batch_size": 64, "steps_per_iteration": 8, "lr": 1e-4,
                  "entropy_coef": 0.0, "max_new_tokens": 64, "generation_batch_size": 64, "max_length": 256},
        "feedme": dict(_FINETUNE),
        "reward_conditioning": dict(_FINETUNE),
        "evaluate": {"temperature": 0.7, "max_new_tokens": 64, "batch_size": 64},
    },
}
# quick: the same loop, smaller, as a smoke test (CI runs it end to end)
SCALE_SETTINGS["quick"] = {
    **SCALE_SETTINGS["default"],
    "sft": {**SCALE_SETTINGS["default"]["sft"], "epochs": 6},
    "preference_data": {**SCALE_SETTINGS["default"]["preference_data"], "num_samples": 2,
                        "pairs_per_instruction": 1, "max_instructions": 400, "max_new_tokens": 32},
    "ppo": {**SCALE_SETTINGS["default"]["ppo"], "steps": 6, "max_new_tokens": 32, "save_steps": 3, "snapshot_steps": 3},
    "best_of_n": {**SCALE_SETTINGS["default"]["best_of_n"], "n": 4, "max_new_tokens": 32},
    "expert_iteration": {**SCALE_SETTINGS["default"]["expert_iteration"], "n": 4, "max_examples": 64,
                         "max_new_tokens": 32, "epochs": 1},
    "quark": {**SCALE_SETTINGS["default"]["quark"], "iterations": 2, "rollout_batch_size": 32,
              "steps_per_iteration": 2, "max_new_tokens": 32},
    "dpo": {**SCALE_SETTINGS["default"]["dpo"], "epochs": 1},
    "feedme": {**_FINETUNE, "epochs": 1},
    "reward_conditioning": {**_FINETUNE, "epochs": 1},
    "evaluate": {"temperature": 0.7, "max_new_tokens": 32, "batch_size": 64},
}
SCALE_SETTINGS["tiny"] = SCALE_SETTINGS["quick"]


class Pipeline:
    """The stages of one run, as methods that read and write files under `cfg.out_dir`."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.world = Path(cfg.world_dir) if cfg.world_dir else self.out / "world"

    # --- helpers -----------------------------------------------------------------------------
    @property
    def on_world(self) -> bool:
        """True when the run uses the built-in world's model and data (not a real model or data)."""
        return self.cfg.base_model is None and not self.cfg.data

    def settings(self, stage: str, **fixed) -> dict[str, Any]:
        """Scale defaults (built-in world only), then the run config's overrides, then paths."""
        values: dict[str, Any] = {}
        if self.on_world:  # the scale settings are tuned for the world's tiny models only
            values.update(SCALE_SETTINGS[self.cfg.scale].get(stage, {}))
        values.update(self.cfg.stages.get(stage, {}))
        values.update(fixed)
        return values

    def make_config(self, cls, stage: str, **fixed):
        values = self.settings(stage, **fixed)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"stages.{stage}: unknown key(s) {unknown} for {cls.__name__} "
                              f"(known: {', '.join(sorted(known))})")
        return cls(**values)

    def split(self, name: str) -> str:
        """Path (or dataset name) of a data split."""
        if name in self.cfg.data:
            return self.cfg.data[name]
        return str(self.world / "data" / f"{name}.json")

    def records(self, name: str) -> list[dict]:
        from prefgym.data import load_records

        return load_records(self.split(name))

    @property
    def base_model(self) -> str:
        return self.cfg.base_model or str(self.world / "base_model")

    @property
    def has_gold(self) -> bool:
        """The built-in world's eval split: its gold quality function applies."""
        return self.cfg.data.get("eval") is None

    def sampling(self):
        """Decoding for evaluation (stage `evaluate`, validated like every stage)."""
        from prefgym.models.generation import SamplingConfig

        return self.make_config(SamplingConfig, "evaluate", seed=self.cfg.seed)

    # --- stages ------------------------------------------------------------------------------
    def build_world(self) -> None:
        if self.cfg.world_dir is None and not (self.cfg.data and self.cfg.base_model):
            from prefgym.world import build_world

            build_world(self.world, scale=self.cfg.scale, seed=self.cfg.seed)

    def sft(self) -> None:
        from prefgym.methods.sft import SFTConfig, train_sft

        train_sft(self.make_config(SFTConfig, "sft", model_name_or_path=self.base_model,
                                   train_file=self.split("sft"), output_dir=str(self.out / "sft"),
                                   seed=self.cfg.seed))

    def preference_data(self, annotators: str, tag: str) -> None:
        from prefgym.methods.preference_data import PreferenceDataConfig, run

        run(self.make_config(PreferenceDataConfig, "preference_data", policy_model=str(self.out / "sft"),
                             prompt_file=self.split("preference"), annotators=annotators,
                             output_dir=str(self.out / tag / "preference"), seed=self.cfg.seed))

    def pairs_file(self, tag: str) -> str:
        return str(self.out / tag / "preference" / "preferences.json")

    def reward_model(self, tag: str) -> None:
        from prefgym.methods.reward_model import RewardModelConfig, train

        train(self.make_config(RewardModelConfig, "reward_model", model_name_or_path=str(self.out / "sft"),
                               preference_file=self.pairs_file(tag),
                               output_dir=str(self.out / tag / "reward_model"), seed=self.cfg.seed))

    def method(self, name: str, tag: str) -> None:
        """Train (or run) one method; its result lands in `<tag>/methods/<name>`."""
        from prefgym.methods import (best_of_n, dpo, expert_iteration, feedme, ppo, quark,
                                     reward_conditioning)

        sft, rm, out = str(self.out / "sft"), str(self.out / tag / "reward_model"), self.out / tag / "methods" / name
        pairs, seed = self.pairs_file(tag), self.cfg.seed
        if name == "ppo":
            ppo.train(self.make_config(ppo.PPOConfig, name, policy_model=sft, reward_model=rm,
                                       prompt_file=self.split("unlabeled"), output_dir=str(out), seed=seed))
        elif name == "dpo":
            dpo.train(self.make_config(dpo.DPOConfig, name, model_name_or_path=sft, preference_file=pairs,
                                       output_dir=str(out), seed=seed))
        elif name == "best_of_n":
            # an inference-time method: its "result" is its outputs on the evaluation set
            best_of_n.run(self.make_config(best_of_n.BestOfNConfig, name, policy_model=sft, reward_model=rm,
                                           data=self.split("eval"), output_file=str(out / "model_outputs.json"),
                                           generator="best_of_n", seed=seed))
        elif name == "expert_iteration":
            expert_iteration.train(self.make_config(
                expert_iteration.ExpertIterationConfig, name, model_name_or_path=sft, reward_model=rm,
                prompts_file=self.split("unlabeled"), output_dir=str(out), seed=seed))
        elif name == "quark":
            quark.train(self.make_config(quark.QuarkConfig, name, policy_model=sft, reward_model=rm,
                                         prompts_file=self.split("unlabeled"), output_dir=str(out), seed=seed))
        elif name == "feedme":
            feedme.train(self.make_config(feedme.FeedMEConfig, name, model_name_or_path=sft,
                                          preference_file=pairs, output_dir=str(out), seed=seed))
        elif name == "reward_conditioning":
            reward_conditioning.train(self.make_config(
                reward_conditioning.RewardConditioningConfig, name, model_name_or_path=sft,
                preference_file=pairs, output_dir=str(out), seed=seed))

    def outputs(self, generator: str, model_dir: Path | None, tag: str, eval_records: list[dict]) -> list[dict]:
        """Eval-set outputs of one generator (generated once, cached in the run folder)."""
        from prefgym.io import read_records, write_json
        from prefgym.methods.reward_conditioning import generate_conditioned_outputs

        if generator == "reference":
            return [{**r, "generator": "reference"} for r in eval_records]
        path = self.out / tag / "eval" / generator / "model_outputs.json"
        if generator == "best_of_n":
            path = self.out / tag / "methods" / "best_of_n" / "model_outputs.json"
        if not path.exists():
            rows = generate_conditioned_outputs(model_dir, eval_records, self.sampling(), generator=generator,
                                                progress=True)
            write_json(path, rows)
        return read_records(path)

    def evaluate(self, tag: str, annotators: dict[str, str]) -> None:
        """Judge every generator against the reference with each annotator set; write rows."""
        from prefgym.evaluation import evaluate_outputs, gold_win_rate

        eval_records = self.records("eval")
        generators: dict[str, Path | None] = {"reference": None, "sft": self.out / "sft"}
        for name in self.cfg.methods:
            generators[name] = self.out / tag / "methods" / name
        rows = []
        for generator, model_dir in generators.items():
            outputs = self.outputs(generator, model_dir, tag, eval_records)
            row: dict[str, Any] = {"generator": generator, "trained_on": tag}
            for label, pool in annotators.items():
                result, annotations = evaluate_outputs(outputs, eval_records, annotators=pool, seed=self.cfg.seed,
                                                       cache_dir=str(self.out / "annotator_cache"))
                write_json(self.out / tag / "eval" / generator / f"annotations_{label}.json", annotations)
                for key, value in result.items():
                    row[key if label == "pool" else f"{label}_{key}"] = value
            if self.has_gold:
                g = gold_win_rate(outputs, eval_records)
                row.update(gold_win_rate=g["win_rate"], gold_standard_error=g["standard_error"],
                           mean_gold=g.get("mean_gold"))
            rows.append(row)
        write_json(self.out / tag / "eval" / "results.json", rows)
        if tag == "sim":
            self.evaluate_ppo_snapshots(annotators["pool"], eval_records)

    def evaluate_ppo_snapshots(self, pool: str, eval_records: list[dict]) -> None:
        """Win-rate of the PPO policy saved every `snapshot_steps` (over-optimization shows here)."""
        from prefgym.evaluation import evaluate_outputs, gold_win_rate
        from prefgym.io import write_json
        from prefgym.methods.reward_conditioning import generate_conditioned_outputs

        snapshots = sorted((self.out / "sim" / "methods" / "ppo" / "snapshots").glob("step-*"),
                           key=lambda p: int(p.name.split("-")[1]))
        if not snapshots:
            return
        curve = [{"step": 0, "model": str(self.out / "sft")}] + [
            {"step": int(p.name.split("-")[1]), "model": str(p)} for p in snapshots]
        for point in curve:
            if point["step"] == 0:  # the policy before PPO is the SFT model, already generated
                outputs = self.outputs("sft", self.out / "sft", "sim", eval_records)
            else:
                outputs = generate_conditioned_outputs(point["model"], eval_records, self.sampling(),
                                                       generator=f"ppo-step-{point['step']}")
            result, _ = evaluate_outputs(outputs, eval_records, annotators=pool, seed=self.cfg.seed,
                                         cache_dir=str(self.out / "annotator_cache"))
            point.update(win_rate=result["win_rate"], standard_error=result["standard_error"])
            if self.has_gold:
                g = gold_win_rate(outputs, eval_records)
                point.update(gold_win_rate=g["win_rate"], gold_standard_error=g["standard_error"])
        write_json(self.out / "sim" / "eval" / "ppo_curve.json", curve)

    # --- report ------------------------------------------------------------------------------
    def report(self) -> None:
        """leaderboard.csv / leaderboard.md / report.html from the evaluation results."""
        import pandas as pd

        from prefgym.evaluation import (plot_leaderboard, plot_sim_vs_human, plot_training_curves,
                                        rank_correlation, render_report_html)
        from prefgym.io import read_records, write_json, write_text_atomic

        rows = read_records(self.out / "sim" / "eval" / "results.json")
        rows.sort(key=lambda r: -r["win_rate"])
        table = pd.DataFrame(rows).set_index("generator")
        front = ["win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "avg_length",
                 "discrete_win_rate", "length_controlled_winrate"]
        table = table[[c for c in front if c in table] + [c for c in table if c not in front]]
        with_csv = self.out / "leaderboard.csv"
        write_text_atomic(with_csv, table.to_csv())
        write_text_atomic(self.out / "leaderboard.md", self._markdown(rows))
        figures = {"Leaderboard: win-rate against the reference (evaluation annotators, ± 1.96 SE)":
                   plot_leaderboard(rows, self.out / "figures" / "leaderboard.png")}
        if "human_win_rate" in table:
            figures["Win-rate judged by the simulated humans (± 1.96 SE)"] = plot_leaderboard(
                rows, self.out / "figures" / "leaderboard_human.png", metric="human_win_rate",
                error="human_standard_error")
        ppo_metrics = self.out / "sim" / "methods" / "ppo" / "metrics.jsonl"
        if ppo_metrics.exists():
            figures["PPO: reward, KL and win-rate over training steps"] = plot_training_curves(
                self._ppo_curve_records(ppo_metrics), self.out / "figures" / "ppo_training.png")
        if self.cfg.validate and (self.out / "human" / "eval" / "results.json").exists():
            human_rows = read_records(self.out / "human" / "eval" / "results.json")
            sim = {r["generator"]: r["win_rate"] for r in rows if r["generator"] != "reference"}
            hum = {r["generator"]: r["human_win_rate"] for r in human_rows if r["generator"] != "reference"}
            corr = rank_correlation(sim, hum)
            write_json(self.out / "validation.json", {"simulated": sim, "human": hum, **corr})
            figures[f"Simulated vs human ranking of methods (Spearman {corr['spearman']:.2f}, "
                    f"Pearson {corr['pearson']:.2f})"] = plot_sim_vs_human(
                sim, hum, self.out / "figures" / "sim_vs_human.png")
        render_report_html(rows, figures, self.out / "report.html", title="prefgym run report")

    def _ppo_curve_records(self, metrics_path: Path) -> list[dict]:
        from prefgym.io import read_records

        records = [{**r, "reward": r.get("score")} for r in read_records(metrics_path) if "step" in r]
        curve = self.out / "sim" / "eval" / "ppo_curve.json"
        if curve.exists():
            by_step = {r["step"]: r for r in read_records(curve)}
            if 0 in by_step:  # the SFT policy, before the first step
                records.insert(0, {"step": 0, "reward": None, "kl": 0.0})
            for r in records:
                if r.get("step") in by_step:
                    r.update(win_rate=by_step[r["step"]]["win_rate"], win_rate_se=by_step[r["step"]]["standard_error"])
        return records

    @staticmethod
    def _markdown(rows: list[dict]) -> str:
        has_h = any("human_win_rate" in r for r in rows)
        has_g = any("gold_win_rate" in r for r in rows)
        head = "| generator | win-rate (pool) |" + (" win-rate (humans) |" if has_h else "") + \
               (" gold win-rate |" if has_g else "") + " avg length |\n"
        head += "|---|---:|" + ("---:|" if has_h else "") + ("---:|" if has_g else "") + "---:|\n"
        lines = []
        for r in rows:
            line = f"| {r['generator']} | {r['win_rate']:.1f} ± {r['standard_error']:.1f} |"
            if has_h:
                line += f" {r.get('human_win_rate', float('nan')):.1f} ± {r.get('human_standard_error', float('nan')):.1f} |"
            if has_g:
                line += f" {r.get('gold_win_rate', float('nan')):.1f} ± {r.get('gold_standard_error', float('nan')):.1f} |"
            lines.append(line + f" {r.get('avg_length', 0)} |")
        return head + "\n".join(lines) + "\n"

    # --- the plan ----------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        cfg = self.cfg
        eval_pools = {"pool": cfg.eval_annotators}
        if cfg.human_annotators:
            eval_pools["human"] = cfg.human_annotators
        plan = [Stage("world", self.build_world, 1), Stage("sft", self.sft, 2)]
        tags = [("sim", cfg.train_annotators)]
        if cfg.validate and cfg.human_annotators:
            tags.append(("human", cfg.human_annotators))
        weights = {"ppo": 4, "best_of_n": 1, "expert_iteration": 2, "quark": 3, "feedme": 1,
                   "reward_conditioning": 1, "dpo": 1}
        for tag, pool in tags:
            plan.append(Stage(f"{tag}/preference_data", lambda t=tag, p=pool: self.preference_data(p, t), 1))
            plan.append(Stage(f"{tag}/reward_model", lambda t=tag: self.reward_model(t), 1))
            for name in cfg.methods:
                plan.append(Stage(f"{tag}/{name}", lambda n=name, t=tag: self.method(n, t), weights[name]))
            pools = eval_pools if tag == "sim" else {"human": cfg.human_annotators}
            plan.append(Stage(f"{tag}/evaluate", lambda t=tag, p=pools: self.evaluate(t, p), 3))
        plan.append(Stage("report", self.report, 0.5, always=True))
        return plan


def run(cfg: RunConfig) -> Path:
    """Run (or resume) the whole pipeline; returns the run folder."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run_config.json", dataclasses.asdict(cfg))
    pipeline = Pipeline(cfg)
    run_stages(pipeline.stages(), out)
    return out
