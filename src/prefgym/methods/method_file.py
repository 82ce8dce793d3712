"""Your own method in `prefgym run`: `prefgym run --method-file my_method.py`.

The file defines `train(ctx) -> policy folder | outputs` (and, optionally, `NAME = "..."`, the
method's name in the leaderboard; default: the file's name). `ctx` is a `MethodContext`: the SFT
policy, the data splits, the run's annotators (every label counted), the reward model, the output
folder, the seed. `train` returns either the folder of a trained policy (save_pretrained; the
evaluation generates from it, as for every method) or its outputs on the evaluation
instructions (`ctx.eval_instructions()`), one record with `output` per instruction.

The labels it used are written to `labels_used.json` in its folder and shown in the leaderboard:
every label `ctx.annotate` paid for, plus the run's preference pairs when it read them
(`ctx.preference_pairs()`) or used the reward model trained on them (`ctx.reward`,
`ctx.reward_model`). See examples/my_method.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefgym.errors import ConfigError, DataError

RESERVED = ("reference", "sft")


def load_method_file(path: str | Path) -> tuple[str, Callable]:
    """(name, train function) of a method file; ConfigError naming the file when it has no `train`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: method file not found")
    module_name = f"prefgym_method_file_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: say where it broke
        sys.modules.pop(module_name, None)
        raise ConfigError(f"{path}: could not be loaded: {type(e).__name__}: {e}") from e
    train = getattr(module, "train", None)
    if not callable(train):
        raise ConfigError(f"{path}: defines no function train(ctx) (see README, 'Your own method')")
    name = getattr(module, "NAME", path.stem)
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{path}: NAME should be a name made of letters, digits and _, got {name!r}")
    return name, train


def file_digest(path: str | Path) -> str:
    """Hash of the method file's content: a stage fingerprint changes when the code does."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class LabelAccount:
    """Labels a method used: asked of the annotators, and the run's pairs (once) if it used them."""

    labels: int = 0
    price: float = 0.0
    seconds: float = 0.0
    run_pairs: int = 0
    run_pairs_price: float = 0.0
    run_pairs_seconds: float = 0.0
    seen: set = field(default_factory=set, repr=False)
    """Keys of the pairs asked so far (`annotators.example_key`)."""

    def as_dict(self) -> dict:
        return {"labels": self.labels + self.run_pairs, "price": self.price + self.run_pairs_price,
                "seconds": self.seconds + self.run_pairs_seconds, "annotated": self.labels,
                "run_pairs": self.run_pairs}


def pairs_account(path: str | Path) -> dict:
    """Labels, simulated price and annotator seconds of an annotated pairs file (rows with a label)."""
    from prefgym.io import read_records

    rows = [r for r in read_records(path) if r.get("preference") is not None]
    return {"labels": len(rows), "price": float(sum(r.get("price_per_example") or 0.0 for r in rows)),
            "seconds": float(sum(r.get("time_per_example") or 0.0 for r in rows))}


@dataclass
class MethodContext:
    """What a method file's `train(ctx)` gets from the run."""

    sft_model: str
    """The SFT policy folder (save_pretrained): where a method starts."""
    reward_model_dir: str
    """The reward model folder, trained on the run's preference pairs (using it counts those labels)."""
    pairs_file: str
    """The run's annotated preference pairs (read them with `preference_pairs()`, which counts them)."""
    splits: dict[str, str]
    """Data split name -> file or dataset (sft, preference, unlabeled, val, eval)."""
    annotators: str
    """The annotators of this run's training feedback (`annotate` asks them)."""
    output_dir: Path
    """The method's own folder: write the policy (or anything else) here."""
    seed: int
    """The run's seed."""
    scale: str = "default"
    """The run's scale on the built-in world ('quick', 'default'); settings can follow it."""
    stage_settings: Callable[[str], dict[str, Any]] = field(default=lambda stage: {}, repr=False)
    eval_sampling: Any = None
    """The decoding of the evaluation (a SamplingConfig)."""
    account: LabelAccount = field(default_factory=LabelAccount)
    """The labels used so far."""

    def settings(self, stage: str) -> dict[str, Any]:
        """The run's settings of a stage ('sft', 'dpo', ...): world-tuned defaults and the run config's overrides."""
        return dict(self.stage_settings(stage))

    def records(self, split: str) -> list[dict]:
        """The records of a training split: 'sft', 'preference', 'unlabeled' or 'val'."""
        from prefgym.data import load_records

        if split == "eval":
            raise DataError("the eval split's reference outputs are not for training; use ctx.eval_instructions()")
        if split not in self.splits:
            raise DataError(f"no split '{split}' (splits: {', '.join(s for s in self.splits if s != 'eval')})")
        return load_records(self.splits[split])

    def eval_instructions(self) -> list[dict]:
        """The evaluation instructions (instruction, input), without their reference outputs."""
        from prefgym.data import load_records

        return [{"instruction": r["instruction"], "input": r.get("input") or ""}
                for r in load_records(self.splits["eval"])]

    def annotate(self, pairs: list[dict]) -> list[dict]:
        """Label pairs (instruction, input, output_1, output_2) with the run's annotators. Each distinct
        pair labelled counts once (a pair asked again is answered from the durable cache, for free);
        a pair of identical outputs is a tie that is not asked and costs nothing."""
        from prefgym.annotators import annotate_pairs, example_key

        labelled = annotate_pairs(pairs, self.annotators, seed=self.seed,
                                  cache_dir=self.output_dir / "annotation_cache", progress=False)
        for r in labelled:
            key = example_key(r["instruction"], r.get("input") or "", r["output_1"], r["output_2"])
            if r["output_1"] == r["output_2"] or key in self.account.seen:
                continue
            self.account.seen.add(key)
            self.account.price += float(r.get("price_per_example") or 0.0)
            self.account.seconds += float(r.get("time_per_example") or 0.0)
            self.account.labels += int(r.get("preference") is not None)
        return labelled

    def _use_run_pairs(self) -> None:
        if not self.account.run_pairs:
            used = pairs_account(self.pairs_file)
            self.account.run_pairs = used["labels"]
            self.account.run_pairs_price, self.account.run_pairs_seconds = used["price"], used["seconds"]

    def preference_pairs(self) -> list[dict]:
        """The run's annotated preference pairs (their labels count as used)."""
        from prefgym.io import read_records

        self._use_run_pairs()
        return read_records(self.pairs_file)

    @property
    def reward_model(self) -> str:
        """The reward model folder (its training pairs' labels count as used)."""
        self._use_run_pairs()
        return self.reward_model_dir

    def reward(self, records: list[dict]):
        """Reward-model scores (numpy array) of records (instruction, input, output)."""
        from prefgym.methods.reward_model import score

        return score(self.reward_model, records)

    def generate(self, records: list[dict], model: str | Path | None = None, num_samples: int = 1,
                 temperature: float = 1.0, max_new_tokens: int | None = None, seed: int | None = None
                 ) -> list[list[str]]:
        """`num_samples` responses of `model` (default: the SFT policy) to each record."""
        from prefgym.methods.fields import EngineFields, ModelFields
        from prefgym.models.generation import SamplingConfig, generate_outputs

        base = self.eval_sampling or SamplingConfig()
        # the evaluation's batch size, engine and how it loads and prompts the model (dtype, ...)
        shared = {f.name: getattr(base, f.name) for f in dataclasses.fields(ModelFields) + dataclasses.fields(EngineFields)}
        cfg = SamplingConfig(temperature=temperature, num_samples=num_samples, batch_size=base.batch_size,
                             max_new_tokens=max_new_tokens or base.max_new_tokens,
                             seed=self.seed if seed is None else seed, **shared)
        rows = generate_outputs(model or self.sft_model, records, cfg)
        return [r.get("outputs", [r["output"]]) for r in rows]


def run_method_file(path: str | Path, ctx: MethodContext) -> dict:
    """Train the method of `path` with `ctx`; write `labels_used.json` and `method_result.json` in
    ctx.output_dir (`{"policy": folder}` or `{"outputs": "model_outputs.json"}`); returns the latter."""
    from prefgym.io import write_json

    _, train = load_method_file(path)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    result = train(ctx)
    if isinstance(result, (str, Path)):
        folder = Path(result)
        if not (folder / "config.json").is_file():
            raise DataError(f"train(ctx) returned {folder}, which holds no model (config.json); return a "
                            "save_pretrained folder or a list of outputs", path=path)
        outcome = {"policy": str(folder.resolve())}
    elif isinstance(result, list):
        outcome = {"outputs": "model_outputs.json"}
        write_json(ctx.output_dir / "model_outputs.json", _check_outputs(result, ctx, path))
    else:
        raise DataError(f"train(ctx) returned {type(result).__name__}; return a policy folder or a list of "
                        "outputs", path=path)
    write_json(ctx.output_dir / "labels_used.json", ctx.account.as_dict())
    write_json(ctx.output_dir / "method_result.json", outcome)
    return outcome


def _check_outputs(rows: list, ctx: MethodContext, path) -> list[dict]:
    wanted = ctx.eval_instructions()
    if len(rows) != len(wanted):
        raise DataError(f"train(ctx) returned {len(rows)} outputs for {len(wanted)} eval instructions", path=path)
    out = []
    for i, (row, want) in enumerate(zip(rows, wanted)):
        if not isinstance(row, dict) or not isinstance(row.get("output"), str):
            raise DataError("each returned output should be a record with a string 'output'", path=path, row=i,
                            field="output")
        out.append({**want, "output": row["output"], "generator": row.get("generator", "")})
    return out
