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
from prefgym.methods import registry

ALL_METHODS = tuple(registry.METHODS)
"""Every built-in method (`prefgym.methods.registry.METHODS`: one line and a `PIPELINE` spec each)."""
METHOD_GROUPS = registry.groups()
"""'classic' (AlpacaFarm's six and DPO: the default), 'new' (RLOO, GRPO, KTO, SimPO, online DPO), 'all'."""
DEFAULT_METHODS = tuple(METHOD_GROUPS[registry.DEFAULT_GROUP])


@dataclass
class RunConfig:
    """Everything `prefgym run` needs. Defaults run the built-in world."""

    out_dir: str | None = None
    """Run folder: every stage writes into a sub-folder of it (default prefgym-runs/<scale>)."""
    scale: str = "default"
    """Size of the run on the built-in world: 'quick' (CI) or 'default' (≈10 minutes on 2 cores)."""
    seed: int = 0
    """Seed of the world and of every stage."""
    seeds: list[int] | None = None
    """Several seeds instead of `seed`: one complete run folder each (OUT/seed-<s>/); with `validate`, the
    rank correlations of every seed and their mean with a bootstrap interval (OUT/validation_seeds.*)."""
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
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Methods to run: names and groups, e.g. [classic, online_dpo] ('classic', the default: ppo, best_of_n,
    expert_iteration, quark, feedme, reward_conditioning, dpo; 'new': rloo, grpo, kto, simpo, online_dpo; 'all')."""
    method_file: str | None = None
    """A Python file defining train(ctx) (your own method): trained and evaluated beside the methods."""
    validate: bool = False
    """Also train every method on the humans' preferences and correlate the two rankings."""
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage overrides of config fields, e.g. {ppo: {total_episodes: 512}}."""


DATA_SPLITS = ("sft", "preference", "unlabeled", "val", "eval")
STAGE_NAMES = ("sft", "preference_data", "reward_model", *ALL_METHODS, "evaluate")
"""The keys of a run config's `stages:`, one per stage config (see `Pipeline.stages`)."""


def load_run_config(path: str | Path | None, **overrides) -> RunConfig:
    """Read a run config YAML and apply command-line overrides (None: not given).

    Checked whole here, before anything runs: unknown keys, wrong types (`seed: abc`), unknown
    methods, scales, data splits and stage names. The keys and types under each stage are checked
    against that stage's config when the plan is made (`Pipeline.stages`), also before any stage.
    """
    from prefgym.methods.common import load_config

    cfg = load_config(RunConfig, path, overrides, where="run config")
    where = str(path) if path is not None else "run config"
    if cfg.seeds is not None:
        check_seeds(cfg.seeds, f"{where}: seeds")
        in_file = path is not None and "seed" in (yaml.safe_load(Path(path).read_text()) or {})
        if overrides.get("seed") is not None or in_file:
            raise ConfigError(f"{where}: give either seed or seeds, not both")
    cfg.out_dir = cfg.out_dir or f"prefgym-runs/{cfg.scale}{'-seeds' if cfg.seeds else ''}"
    cfg.methods = expand_methods(cfg.methods, where)
    if cfg.scale not in ("tiny", "quick", "default"):
        raise ConfigError(f"{where}: unknown scale '{cfg.scale}'; choose quick or default")
    for split, source in cfg.data.items():
        if split not in DATA_SPLITS:
            raise ConfigError(f"{where}: data: unknown split '{split}' (splits: {', '.join(DATA_SPLITS)})")
        if not isinstance(source, str):
            raise ConfigError(f"{where}: data.{split} should be a file or dataset name, got {source!r}")
    for stage, values in cfg.stages.items():
        if stage not in STAGE_NAMES:
            raise ConfigError(f"{where}: stages: unknown stage '{stage}' (stages: {', '.join(STAGE_NAMES)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: stages.{stage} should be a mapping of config keys to values, got {values!r}")
    return cfg


def parse_seeds(text: str, where: str = "--seeds") -> list[int]:
    """'0,1,2' -> [0, 1, 2]; ConfigError naming the bad entry (not a whole number, negative, repeated)."""
    seeds = []
    for item in text.split(","):
        if not item.strip().isdecimal():
            raise ConfigError(f"{where}: '{item.strip()}' in '{text}' is not a seed (a whole number >= 0); "
                              "write them comma-separated, e.g. 0,1,2")
        seeds.append(int(item))
    return check_seeds(seeds, where)


def parse_numbers(text: str, option: str, kind: type = float) -> list:
    """'0,0.05' -> [0.0, 0.05] (`kind` int or float); ConfigError naming the option otherwise."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise ConfigError(f"{option}: expected comma-separated {what}, got {text!r}") from None


def check_seeds(seeds: list, where: str) -> list[int]:
    """Seeds as given: at least one, each a whole number >= 0, none repeated (its folder would be shared)."""
    if not seeds:
        raise ConfigError(f"{where}: no seeds given")
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"{where}: {s!r} is not a seed (a whole number >= 0)")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"{where}: seed {', '.join(map(str, repeated))} given more than once")
    return seeds


def expand_methods(names: list[str], where: str = "run config") -> list[str]:
    """Method names with each group name ('classic', 'new', 'all') replaced by its methods; no repeats."""
    out: list[str] = []
    for name in names:
        if name not in ALL_METHODS and name not in METHOD_GROUPS:
            raise ConfigError(f"{where}: unknown method '{name}'; choose from {', '.join(ALL_METHODS)} "
                              f"or a group: {', '.join(METHOD_GROUPS)}")
        out += [m for m in METHOD_GROUPS.get(name, [name]) if m not in out]
    return out


@dataclass
class Stage:
    name: str
    run: Callable[[], None]
    weight: float
    """Expected share of the run's time, used for the time-left estimate."""
    always: bool = False
    """Run even when done before (cheap stages that depend on which stages ran, e.g. the report)."""
    settings: dict[str, Any] | None = None
    """What determines the stage's result besides the stages it depends on (its resolved config)."""
    after: tuple[str, ...] = ()
    """Earlier stages whose results it uses: their fingerprints are part of its own."""
    outputs: tuple[Path, ...] = ()
    """What it writes that must go before it runs again (folders or files)."""


def run_stages(stages: list[Stage], out_dir: Path, console=None, overwrite: bool = False) -> dict[str, float]:
    """Run stages in order, skipping those already done; show which runs and how long is left.

    Every stage is checked before the first runs (`plan_stages`): one done with other settings
    is an error, unless `overwrite`, which runs it again with the stages that depend on it.
    """
    from rich.console import Console

    from prefgym.models.vllm_engine import release_engine

    console = console or Console(stderr=True)
    plan, fingerprints = plan_stages(stages, out_dir, overwrite)
    timings_path = out_dir / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    remaining = sum(s.weight for s in stages)
    ran_weight, ran_seconds = 0.0, 0.0  # stages run in this invocation, for the time-left estimate
    for i, stage in enumerate(stages):
        if plan[stage.name] == "upgrade":  # done: only fields added since, at their defaults, are new
            record = _read_record(out_dir, stage.name) or {}
            previous = [*record.get("previous", []), record.get("fingerprint")]  # what later stages may know it as
            write_json(_record_path(out_dir, stage.name), {**record, "fingerprint": fingerprints[stage.name],
                                                           "settings": _as_json(stage.settings),
                                                           "after": {n: fingerprints[n] for n in stage.after},
                                                           "previous": [fp for fp in previous if fp]})
        if plan[stage.name] in ("skip", "upgrade"):
            console.print(f"[dim]stage {i + 1}/{len(stages)} {stage.name}: done already, skipped[/dim]")
            remaining -= stage.weight
            continue
        if plan[stage.name] == "redo":
            console.print(f"[yellow]stage {stage.name}: its settings or inputs changed; running it again[/yellow]")
            _remove(stage.outputs)
            _record_path(out_dir, stage.name).unlink()
        eta = f", about {_fmt(ran_seconds / ran_weight * remaining)} left" if ran_weight > 0 else ""
        console.rule(f"[bold]stage {i + 1}/{len(stages)}: {stage.name}[/bold]{eta}")
        t0 = time.time()
        try:
            stage.run()
        finally:
            release_engine()  # a vLLM engine the stage kept: the next stage gets its GPU memory
        timings[stage.name] = round(time.time() - t0, 2)
        console.print(f"[dim]stage {stage.name}: {_fmt(timings[stage.name])}[/dim]")
        write_json(timings_path, timings)
        write_json(_record_path(out_dir, stage.name), {
            "seconds": timings[stage.name], "fingerprint": fingerprints[stage.name], "settings": stage.settings,
            "after": {name: fingerprints[name] for name in stage.after}})
        ran_weight += stage.weight
        ran_seconds += timings[stage.name]
        remaining -= stage.weight
    console.print("stage times: " + ", ".join(f"{name} {_fmt(seconds)}" for name, seconds in timings.items()
                                               if name in plan) + f"; this run {_fmt(ran_seconds)}")
    return timings


def plan_stages(stages: list[Stage], out_dir: Path, overwrite: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """What to do with each stage, decided before any runs, and each stage's fingerprint.

    A stage's fingerprint is a hash of its settings and of the fingerprints of the stages it
    depends on; `.done/<stage>` records it when the stage ends. Actions: "run" (never done, or
    `always`), "skip" (done with this fingerprint), "upgrade" (done, and the only differences are
    config fields added to prefgym since, at their defaults: skipped, its record brought up to
    date), "redo" (done, but what it depends on changed:
    a method added to the evaluation, a stage run again; or its own settings changed and
    `overwrite`). A stage done with other settings raises ConfigError naming the stage and
    the differing settings.
    """
    plan: dict[str, str] = {}
    fingerprints: dict[str, str] = {}
    now_known_as: dict[str, str] = {}  # a record's fingerprint -> the stage's fingerprint now ("upgrade")
    for stage in stages:
        settings = _as_json(stage.settings)
        after = {name: fingerprints[name] for name in stage.after}
        fingerprints[stage.name] = stable_fingerprint({"settings": settings, "after": after})
        record = _read_record(out_dir, stage.name)
        if record is None or stage.always:
            plan[stage.name] = "run"
            continue
        if stage.settings is None or record.get("fingerprint") == fingerprints[stage.name]:
            plan[stage.name] = "skip"
            # upgraded by an earlier invocation: stages done before that still know it by its old fingerprints
            now_known_as.update({fp: fingerprints[stage.name] for fp in record.get("previous", [])})
            continue
        old = with_new_fields(record.get("settings"), settings, stage.settings)
        old_after = {name: now_known_as.get(fp, fp) for name, fp in (record.get("after") or {}).items()}
        if old == settings and old_after == after and "fingerprint" in record:
            plan[stage.name] = "upgrade"
            for fp in (record["fingerprint"], *record.get("previous", [])):
                now_known_as[fp] = fingerprints[stage.name]
        elif old == settings or overwrite:
            plan[stage.name] = "redo"
        else:
            raise ConfigError(_changed_settings_message(out_dir, stage.name, old, settings))
    return plan, fingerprints


class StageSettings(dict):
    """A stage's settings (what its fingerprint hashes) that also know the defaults of the config
    they come from: a field added to a config after a stage ran is not a change while it keeps
    its default (`with_new_fields`), so a prefgym update does not stop old run folders."""

    def __init__(self, values: dict[str, Any], defaults: dict[str, Any] | None = None):
        super().__init__(values)
        self.defaults = defaults or {}


def with_new_fields(recorded: Any, settings: Any, source: Any) -> Any:
    """A record's settings plus each key it lacks that the stage's settings now have at its default,
    at any depth: `settings` is the stage's settings as JSON, `source` the same settings as built,
    whose `StageSettings` (a config's fields, e.g. the evaluation's `sampling`) know the defaults."""
    if not isinstance(recorded, dict) or not isinstance(settings, dict):
        return recorded
    defaults = getattr(source, "defaults", {})
    out = dict(recorded)
    for key, value in settings.items():
        if key not in recorded:
            if key in defaults and _as_json(defaults[key]) == value:
                out[key] = value
        elif isinstance(recorded[key], dict) and isinstance(value, dict):
            out[key] = with_new_fields(recorded[key], value, source.get(key) if isinstance(source, dict) else None)
    return out


def config_defaults(config) -> dict[str, Any]:
    """Field name -> default value of a dataclass config (fields without one are left out)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def stable_fingerprint(values: Any) -> str:
    """A short hash of JSON-able values, independent of key order."""
    import hashlib

    text = json.dumps(values, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _as_json(values: Any) -> Any:
    return json.loads(json.dumps(values, default=str))  # as read back from a record: tuples as lists


def _record_path(out_dir: Path, stage: str) -> Path:
    return out_dir / ".done" / stage


def _read_record(out_dir: Path, stage: str) -> dict | None:
    """The record of a done stage; {} for a marker without one (written by an older prefgym)."""
    path = _record_path(out_dir, stage)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _changed_settings_message(out_dir: Path, stage: str, old: dict | None, new: dict) -> str:
    from prefgym.methods.common import config_diff

    if isinstance(old, dict):
        what = f"was made with other settings ({'; '.join(config_diff(old, new, ignore=()))})"
    else:
        what = "was made by an older prefgym that did not record its settings"
    return (f"{out_dir}: stage {stage} {what}. Rerun with --overwrite to redo it and the stages that "
            "depend on it, or choose another --out")


def _remove(paths) -> None:
    import shutil

    for path in paths:
        if Path(path).is_dir():
            shutil.rmtree(path)
        else:
            Path(path).unlink(missing_ok=True)


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# Per-scale settings of the stages around the methods on the built-in world (each method's are in its
# `PIPELINE` spec, `world_settings`). A run config's `stages` overrides them; on real models and
# data, set them there (see configs/run_example.yaml).
SCALE_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    # default: the whole loop in about 10 minutes on 2 CPU cores (settings tuned on the world)
    "default": {
        "sft": {"epochs": 10, "lr": 2e-3, "per_device_batch_size": 16, "max_length": 256, "save_steps": 100},
        "preference_data": {"num_samples": 4, "pairs_per_instruction": 2, "temperature": 1.0,
                            "max_new_tokens": 64, "batch_size": 64},
        "reward_model": {"epochs": 2, "lr": 3e-4, "per_device_batch_size": 16, "max_length": 256},
        "evaluate": {"temperature": 0.7, "max_new_tokens": 64, "batch_size": 64},
    },
}
# quick: the same loop, smaller, as a smoke test (CI runs it end to end)
SCALE_SETTINGS["quick"] = {
    **SCALE_SETTINGS["default"],
    "sft": {**SCALE_SETTINGS["default"]["sft"], "epochs": 6},
    "preference_data": {**SCALE_SETTINGS["default"]["preference_data"], "num_samples": 2,
                        "pairs_per_instruction": 1, "max_instructions": 400, "max_new_tokens": 32},
    "evaluate": {"temperature": 0.7, "max_new_tokens": 32, "batch_size": 64},
}
SCALE_SETTINGS["tiny"] = SCALE_SETTINGS["quick"]


class Pipeline:
    """The stages of one run, as methods that read and write files under `cfg.out_dir`."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.world = Path(cfg.world_dir) if cfg.world_dir else self.out / "world"
        self.custom: str | None = None
        """The name of the method of `cfg.method_file` (your own method), if any."""
        if cfg.method_file:
            from prefgym.methods.method_file import RESERVED, load_method_file

            self.custom, _ = load_method_file(cfg.method_file)
            if self.custom in ALL_METHODS or self.custom in RESERVED:
                raise ConfigError(f"{cfg.method_file}: NAME '{self.custom}' is taken by a built-in method; "
                                  "give your method another NAME")

    @property
    def methods(self) -> list[str]:
        """The methods of this run: the built-in ones chosen, then the method file's."""
        return [*self.cfg.methods, *([self.custom] if self.custom else [])]

    # --- helpers -----------------------------------------------------------------------------
    @property
    def on_world(self) -> bool:
        """True when the run uses the built-in world's model and data (not a real model or data)."""
        return self.cfg.base_model is None and not self.cfg.data

    def settings(self, stage: str, **fixed) -> dict[str, Any]:
        """Scale defaults (built-in world only), then the run config's overrides, then paths."""
        values: dict[str, Any] = {}
        if self.on_world:  # the scale settings are tuned for the world's tiny models only
            if stage in ALL_METHODS:
                scale = "quick" if self.cfg.scale == "tiny" else self.cfg.scale
                values.update(registry.spec(stage).world_settings.get(scale, {}))
            else:
                values.update(SCALE_SETTINGS[self.cfg.scale].get(stage, {}))
        values.update(self.cfg.stages.get(stage, {}))
        values.update(fixed)
        return values

    def make_config(self, cls, stage: str, **fixed):
        """The config of `stage`: its settings checked against `cls` (unknown keys, wrong types)."""
        from prefgym.methods.common import NULL, load_config

        given = self.cfg.stages.get(stage, {})
        values = {k: NULL if k in given and given[k] is None and k not in fixed else v
                  for k, v in self.settings(stage, **fixed).items()}  # `field: null` in stages: sets None
        return load_config(cls, None, values, where=f"stages.{stage}")

    def fingerprint_settings(self, config) -> dict[str, Any]:
        """What of a stage config decides its result: every field but how the run is carried out
        or shown (progress, checkpoint frequency, resume), paths inside the run folder relative to it."""
        from prefgym.methods.common import RESULT_NEUTRAL_KEYS

        values = config if isinstance(config, dict) else dataclasses.asdict(config)
        inside = str(self.out) + "/"
        return StageSettings({k: f"<run>/{v[len(inside):]}" if isinstance(v, str) and v.startswith(inside) else v
                              for k, v in values.items() if k not in RESULT_NEUTRAL_KEYS},
                             {} if isinstance(config, dict) else config_defaults(config))

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
        """Decoding for evaluation, and how the policies load and are prompted there (dtype,
        attn_implementation, prompt_format), from stage `evaluate`, validated like every stage."""
        from prefgym.models.generation import SamplingConfig

        return self.make_config(SamplingConfig, "evaluate", seed=self.cfg.seed)

    # --- stages ------------------------------------------------------------------------------
    def build_world(self) -> None:
        if self.cfg.world_dir is None and not (self.cfg.data and self.cfg.base_model):
            from prefgym.world import build_world

            build_world(self.world, scale=self.cfg.scale, seed=self.cfg.seed)

    def sft_config(self):
        from prefgym.methods.sft import SFTConfig

        return self.make_config(SFTConfig, "sft", model_name_or_path=self.base_model, train_file=self.split("sft"),
                                output_dir=str(self.out / "sft"), seed=self.cfg.seed)

    def preference_data_config(self, annotators: str, tag: str):
        from prefgym.methods.preference_data import PreferenceDataConfig

        return self.make_config(PreferenceDataConfig, "preference_data", policy_model=str(self.out / "sft"),
                                prompt_file=self.split("preference"), annotators=annotators,
                                output_dir=str(self.out / tag / "preference"), seed=self.cfg.seed)

    def pairs_file(self, tag: str) -> str:
        return str(self.out / tag / "preference" / "preferences.json")

    def reward_model_config(self, tag: str):
        from prefgym.methods.reward_model import RewardModelConfig

        return self.make_config(RewardModelConfig, "reward_model", model_name_or_path=str(self.out / "sft"),
                                preference_file=self.pairs_file(tag),
                                output_dir=str(self.out / tag / "reward_model"), seed=self.cfg.seed)

    def feedback(self, tag: str) -> str:
        """The annotators whose preferences a tag's methods learn from ('sim': the pool, 'human': the humans)."""
        return self.cfg.train_annotators if tag == "sim" else self.cfg.human_annotators

    def method_dir(self, name: str, tag: str) -> Path:
        return self.out / tag / "methods" / name

    def run_inputs(self, name: str, tag: str) -> registry.RunInputs:
        """What the run gives a method trained on `tag`'s feedback; its result lands in `<tag>/methods/<name>`."""
        return registry.RunInputs(sft=str(self.out / "sft"), reward_model=str(self.out / tag / "reward_model"),
                                  pairs=self.pairs_file(tag), splits={s: self.split(s) for s in DATA_SPLITS},
                                  annotators=self.feedback(tag), out=str(self.method_dir(name, tag)))

    def method_config(self, name: str, tag: str):
        """The config of a built-in method: its spec's fields from the run, then the stage settings."""
        spec = registry.spec(name)
        return self.make_config(spec.config, name, **spec.inputs(self.run_inputs(name, tag)), seed=self.cfg.seed)

    @staticmethod
    def train_method(name: str, config) -> None:
        registry.spec(name).train(config)

    # --- your own method (--method-file) -------------------------------------------------------
    def method_file_settings(self, tag: str) -> dict[str, Any]:
        from prefgym.methods.method_file import file_digest

        return {"method_file": str(Path(self.cfg.method_file).resolve()), "code": file_digest(self.cfg.method_file),
                "annotators": self.feedback(tag), "scale": self.cfg.scale, "seed": self.cfg.seed}

    def train_method_file(self, tag: str) -> None:
        from prefgym.methods.method_file import MethodContext, run_method_file

        ctx = MethodContext(sft_model=str(self.out / "sft"), reward_model_dir=str(self.out / tag / "reward_model"),
                            pairs_file=self.pairs_file(tag), splits={s: self.split(s) for s in DATA_SPLITS},
                            annotators=self.feedback(tag), output_dir=self.method_dir(self.custom, tag),
                            seed=self.cfg.seed, scale=self.cfg.scale, stage_settings=self.settings,
                            eval_sampling=self.sampling())
        run_method_file(self.cfg.method_file, ctx)

    # --- what each generator produced, and the labels it used -----------------------------------
    def result(self, generator: str, tag: str) -> tuple[str, Path | None]:
        """('reference', None), ('policy', model folder) or ('outputs', outputs file) of a generator."""
        if generator == "reference":
            return "reference", None
        if generator == "sft":
            return "policy", self.out / "sft"
        folder = self.method_dir(generator, tag)
        if generator == self.custom:
            result = json.loads((folder / "method_result.json").read_text())
            return ("policy", Path(result["policy"])) if "policy" in result else ("outputs", folder / result["outputs"])
        if registry.spec(generator).produces == "outputs":
            return "outputs", folder / "model_outputs.json"
        return "policy", folder

    def labels_used(self, generator: str, tag: str) -> dict[str, Any]:
        """Preference labels a generator's training used, with their simulated price and annotator seconds:
        the run's pairs for the methods trained on them or on the reward model; what a method asked
        for itself (`labels_used.json`); 0 for the reference and SFT."""
        from prefgym.methods.method_file import pairs_account

        none = {"labels": 0, "label_price": 0.0, "label_seconds": 0.0}
        if generator in ("reference", "sft"):
            return none
        source = "own" if generator == self.custom else \
            registry.spec(generator).label_source(self.method_config(generator, tag))
        if source == "none":
            return none
        path = self.method_dir(generator, tag) / "labels_used.json" if source == "own" else Path(self.pairs_file(tag))
        if not path.exists():
            return {"labels": None, "label_price": None, "label_seconds": None}
        used = json.loads(path.read_text()) if source == "own" else pairs_account(path)
        return {"labels": used["labels"], "label_price": round(used["price"], 4),
                "label_seconds": round(used["seconds"], 1)}

    def outputs(self, generator: str, model_dir: Path | None, tag: str, eval_records: list[dict]) -> list[dict]:
        """Eval-set outputs of one generator (generated once, cached in the run folder).

        The cache is reused only for the same model (its stage's fingerprint) and decoding.
        """
        from prefgym.io import read_records, write_json
        from prefgym.methods.reward_conditioning import generate_conditioned_outputs

        kind, where = self.result(generator, tag)
        if kind == "reference":
            return [{**r, "generator": "reference"} for r in eval_records]
        if kind == "outputs":  # an inference-time method: its stage wrote its outputs
            return read_records(where)
        path = self.out / tag / "eval" / generator / "model_outputs.json"
        stage = "sft" if generator == "sft" else f"{tag}/{generator}"
        record = _read_record(self.out, stage) or {}
        built = {"model": record.get("fingerprint"), "sampling": self.fingerprint_settings(self.sampling())}
        key = _as_json(built)
        key_file = path.with_name("outputs_key.json")
        old_key = json.loads(key_file.read_text()) if path.exists() and key_file.exists() else None
        if old_key is not None and old_key != key:
            # The same model under a fingerprint its stage had before an upgrade (fields added to
            # prefgym since, at their defaults), and sampling fields added since at their defaults:
            # the same outputs.
            same_model = old_key.get("model") in (key["model"], *record.get("previous", []))
            if same_model and with_new_fields({**old_key, "model": key["model"]}, key, built) == key:
                write_json(key_file, key)
                old_key = key
        if old_key != key:
            rows = generate_conditioned_outputs(model_dir, eval_records, self.sampling(), generator=generator,
                                                progress=True)
            write_json(path, rows)
            write_json(key_file, key)
        return read_records(path)

    def evaluate(self, tag: str, annotators: dict[str, str], generators: tuple[str, ...] | None = None) -> None:
        """Judge every generator (default: the reference, SFT and the run's methods) against the
        reference with each annotator set; write rows to `<tag>/eval/results.json`."""
        from prefgym.evaluation import evaluate_outputs, gold_win_rate

        eval_records = self.records("eval")
        rows = []
        for generator in generators or ("reference", "sft", *self.methods):
            outputs = self.outputs(generator, self.result(generator, tag)[1], tag, eval_records)
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
            if self.cfg.human_annotators:  # the report plots human and gold win-rate against the proxy reward
                h, _ = evaluate_outputs(outputs, eval_records, annotators=self.cfg.human_annotators,
                                        seed=self.cfg.seed, cache_dir=str(self.out / "annotator_cache"))
                point.update(human_win_rate=h["win_rate"], human_standard_error=h["standard_error"])
            if self.has_gold:
                g = gold_win_rate(outputs, eval_records)
                point.update(gold_win_rate=g["win_rate"], gold_standard_error=g["standard_error"])
        write_json(self.out / "sim" / "eval" / "ppo_curve.json", curve)

    # --- report ------------------------------------------------------------------------------
    def report(self) -> None:
        """leaderboard.csv / leaderboard.md / report.html from the evaluation results."""
        import pandas as pd

        from prefgym.evaluation import rank_correlation
        from prefgym.evaluation import report as run_report
        from prefgym.io import read_records, write_json, write_text_atomic

        rows = read_records(self.out / "sim" / "eval" / "results.json")
        rows = [{**r, **self.labels_used(r["generator"], "sim")} for r in rows]
        rows.sort(key=lambda r: -r["win_rate"])
        table = pd.DataFrame(rows).set_index("generator")
        front = ["win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "avg_length",
                 "discrete_win_rate", "length_controlled_winrate"]
        table = table[[c for c in front if c in table] + [c for c in table if c not in front]]
        write_text_atomic(self.out / "leaderboard.csv", table.to_csv())
        timings = self.out / "timings.json"
        facts = run_report.run_facts({**dataclasses.asdict(self.cfg), "methods": self.methods},
                                     n_eval=len(self.records("eval")), on_world=self.on_world, has_gold=self.has_gold,
                                     stage_times=json.loads(timings.read_text()) if timings.exists() else {})

        def pool_annotations(generator: str) -> list[dict] | None:  # for paired comparisons
            path = self.out / "sim" / "eval" / generator / "annotations_pool.json"
            return read_records(path) if path.exists() else None

        notes = run_report.noise_notes(run_report.split_reference(rows)[0], pool_annotations, seed=self.cfg.seed)
        write_text_atomic(self.out / "leaderboard.md", self._markdown(rows, facts, notes))
        ppo_metrics = self.out / "sim" / "methods" / "ppo" / "metrics.jsonl"
        validation = None
        if self.cfg.validate and (self.out / "human" / "eval" / "results.json").exists():
            human_rows = read_records(self.out / "human" / "eval" / "results.json")
            sim = {r["generator"]: r["win_rate"] for r in rows if r["generator"] != "reference"}
            hum = {r["generator"]: r["human_win_rate"] for r in human_rows if r["generator"] != "reference"}
            validation = {"simulated": sim, "human": hum, **rank_correlation(sim, hum)}
            write_json(self.out / "validation.json", validation)
        figures = run_report.write_figures(
            self.out / "figures", rows, facts, self._ppo_curve_records(ppo_metrics) if ppo_metrics.exists() else [],
            validation)
        write_text_atomic(self.out / "report.html", run_report.render_html(rows, facts, notes, figures))

    def _ppo_curve_records(self, metrics_path: Path) -> list[dict]:
        """PPO's metrics per step joined with its evaluated snapshots (`sim/eval/ppo_curve.json`)."""
        from prefgym.evaluation.report import ppo_curve_records
        from prefgym.io import read_records

        curve = self.out / "sim" / "eval" / "ppo_curve.json"
        return ppo_curve_records(read_records(metrics_path), read_records(curve) if curve.exists() else [])

    @staticmethod
    def _markdown(rows: list[dict], facts: dict, notes: list[str]) -> str:
        from prefgym.evaluation.report import markdown_leaderboard

        return markdown_leaderboard(rows, facts, notes)

    # --- the plan ----------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        """The plan: every stage with its config, built (and so checked) before any stage runs."""
        from prefgym.methods.preference_data import run as preference_data
        from prefgym.methods.reward_model import train as reward_model
        from prefgym.methods.sft import train_sft

        cfg, out = self.cfg, self.out
        self.check_stage_sections()
        eval_pools = {"pool": cfg.eval_annotators}
        if cfg.human_annotators:
            eval_pools["human"] = cfg.human_annotators
        tags = [("sim", cfg.train_annotators)]
        if cfg.validate and cfg.human_annotators:
            tags.append(("human", cfg.human_annotators))
        settings = self.fingerprint_settings
        sft = self.sft_config()
        plan = [Stage("world", self.build_world, 1, settings=self.world_settings(), outputs=self.world_outputs()),
                Stage("sft", lambda: train_sft(sft), 2, settings=settings(sft), after=("world",),
                      outputs=(out / "sft",))]
        for tag, pool in tags:
            pairs, rm = self.preference_data_config(pool, tag), self.reward_model_config(tag)
            plan.append(Stage(f"{tag}/preference_data", lambda c=pairs: preference_data(c), 1, settings=settings(pairs),
                              after=("sft",), outputs=(out / tag / "preference",)))
            plan.append(Stage(f"{tag}/reward_model", lambda c=rm: reward_model(c), 1, settings=settings(rm),
                              after=("sft", f"{tag}/preference_data"), outputs=(out / tag / "reward_model",)))
            for name in cfg.methods:
                method = self.method_config(name, tag)
                plan.append(Stage(f"{tag}/{name}", lambda n=name, c=method: self.train_method(n, c),
                                  registry.spec(name).weight, settings=settings(method),
                                  after=("sft", f"{tag}/preference_data", f"{tag}/reward_model"),
                                  outputs=(self.method_dir(name, tag),)))
            if self.custom:
                plan.append(Stage(f"{tag}/{self.custom}", lambda t=tag: self.train_method_file(t), 2,
                                  settings=self.method_file_settings(tag),
                                  after=("sft", f"{tag}/preference_data", f"{tag}/reward_model"),
                                  outputs=(self.method_dir(self.custom, tag),)))
            pools = eval_pools if tag == "sim" else {"human": cfg.human_annotators}
            plan.append(Stage(f"{tag}/evaluate", lambda t=tag, p=pools: self.evaluate(t, p), 3,
                              settings={"annotators": pools, "sampling": settings(self.sampling()),
                                        "eval_data": settings({"split": self.split("eval")})["split"],
                                        "gold": self.has_gold},
                              after=("sft", *[f"{tag}/{name}" for name in self.methods])))
        plan.append(Stage("report", self.report, 0.5, always=True))
        return plan

    def check_stage_sections(self) -> None:
        """Every section of the run config's `stages:` against its config, also those of methods
        this run leaves out (a mistake there is still a mistake)."""
        builders = {"sft": self.sft_config, "evaluate": self.sampling,
                    "reward_model": lambda: self.reward_model_config("sim"),
                    "preference_data": lambda: self.preference_data_config(self.cfg.train_annotators, "sim")}
        for stage in self.cfg.stages:
            if stage in builders:
                builders[stage]()
            else:
                self.method_config(stage, "sim")

    def world_settings(self) -> dict[str, Any]:
        if self.cfg.world_dir is not None:
            return {"world_dir": str(Path(self.cfg.world_dir).resolve())}
        if self.cfg.data and self.cfg.base_model:
            return {}  # no world: real data and model
        return {"scale": self.cfg.scale, "seed": self.cfg.seed}

    def world_outputs(self) -> tuple[Path, ...]:
        """The world folder when this run builds it (never a world given with world_dir)."""
        return (self.world,) if self.world_settings().keys() == {"scale", "seed"} else ()


def run(cfg: RunConfig, overwrite: bool = False) -> Path:
    """Run (or resume) the whole pipeline; returns the run folder.

    Every stage's config is built and checked, and every stage already done in the folder is
    checked against it, before the first stage runs (see `plan_stages`).
    """
    out = Path(cfg.out_dir)
    stages = Pipeline(cfg).stages()
    plan_stages(stages, out, overwrite)  # fail now, not ten minutes in
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run_config.json", dataclasses.asdict(cfg))
    timings = run_stages(stages, out, overwrite=overwrite)
    from prefgym.progress import stderr_console

    stderr_console().print("method times: " + group_times(cfg.methods, timings))
    return out


def seed_configs(cfg: RunConfig) -> dict[int, RunConfig]:
    """One run config per seed of `cfg.seeds`, each with its own folder OUT/seed-<s>."""
    return {s: dataclasses.replace(cfg, seed=s, seeds=None, out_dir=str(Path(cfg.out_dir) / f"seed-{s}"))
            for s in cfg.seeds}


def run_seeds(cfg: RunConfig, overwrite: bool = False) -> Path:
    """`run` once per seed into OUT/seed-<s>/ (each resumable as a single run), then, with `validate`,
    the rank correlations across seeds (`prefgym.evaluation.validation`); returns OUT.

    Every seed's stages are planned (and so checked) before the first seed runs.
    """
    from prefgym.evaluation.validation import write_seed_validation
    from prefgym.progress import stderr_console

    configs = seed_configs(cfg)
    for c in configs.values():
        plan_stages(Pipeline(c).stages(), Path(c.out_dir), overwrite)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run_config.json", dataclasses.asdict(cfg))
    timings = {}
    for s, c in configs.items():
        stderr_console().rule(f"[bold]seed {s} ({len(timings) + 1}/{len(configs)}): {c.out_dir}[/bold]")
        t0 = time.time()
        run(c, overwrite=overwrite)
        timings[f"seed-{s}"] = round(time.time() - t0, 2)
        write_json(out / "timings.json", timings)
    if cfg.validate and cfg.human_annotators:
        write_seed_validation(out, {s: c.out_dir for s, c in configs.items()})
    return out


def group_times(methods: list[str], timings: dict[str, float]) -> str:
    """'classic 2m10s (ppo 30s, ...), new 1m05s (...)': training time of each group's methods in this run."""
    parts = []
    for group, members in METHOD_GROUPS.items():
        if group == "all":
            continue
        times = {m: sum(v for k, v in timings.items() if k.split("/")[-1] == m and "/" in k)
                 for m in members if m in methods}
        if times:
            detail = ", ".join(f"{m} {_fmt(t)}" for m, t in times.items())
            parts.append(f"{group} {_fmt(sum(times.values()))} ({detail})")
    return "; ".join(parts)
