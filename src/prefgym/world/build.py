"""Build the built-in world into a folder: splits, tokenizer, base model and a manifest.

    out_dir/world.json          manifest: scale, seed, sizes, families, versions, sha256 of every file
    out_dir/build_stats.json    timings of this build (not part of the manifest: it varies by machine)
    out_dir/data/{sft,preference,unlabeled,val,eval}.json
    out_dir/tokenizer/          the world tokenizer (PreTrainedTokenizerFast)
    out_dir/base_model/         the pretrained tiny causal LM + tokenizer (save_pretrained, safetensors)

The build is atomic (written next to the target, then renamed into place) and idempotent (a
complete world with the same scale and seed is left as it is). Same scale and seed, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from prefgym.errors import ConfigError, PrefgymError
from prefgym.io import write_json
from prefgym.seeding import rng_for
from prefgym.world.base_model import BaseModelConfig, pretrain, pretraining_corpus, save_base_model, train_tokenizer
from prefgym.world.demonstrations import DEMONSTRATION_MIX, REFERENCE_MIX, sample_output
from prefgym.world.families import FAMILIES, FAMILY_DRAWS, sample_task

MANIFEST = "world.json"
FORMAT_VERSION = 2  # 2: detail families (explain, give steps, compare with reasons), people who value content
REFERENCE_GENERATOR = "world_reference"
SPLITS = ("sft", "preference", "unlabeled", "val", "eval")


@dataclass(frozen=True)
class WorldScale:
    """Sizes of one world scale: rows per split and the base model."""

    sft: int
    """Demonstrations for supervised fine-tuning."""
    preference: int
    """Instructions for collecting preference pairs (each with one demonstration as `output`)."""
    unlabeled: int
    """Instructions for PPO / best-of-n / expert iteration (each with a demonstration as `output`)."""
    val: int
    """Held-out instructions for validation."""
    eval: int
    """Evaluation instructions with the reference `output` (AlpacaEval-style)."""
    model: BaseModelConfig
    """Tokenizer and base model sizes, pretraining length."""


SCALES: dict[str, WorldScale] = {
    # tiny pretrains briefly at a gentler rate: its base model writes world text but has not yet
    # picked up the answer format, so that tests see what SFT adds.
    "tiny": WorldScale(sft=200, preference=200, unlabeled=100, val=40, eval=40,
                       model=BaseModelConfig(vocab_size=1024, hidden_size=64, num_layers=2, pretrain_docs=2000,
                                             pretrain_steps=120, lr=3e-3)),
    "quick": WorldScale(sft=800, preference=800, unlabeled=400, val=100, eval=100,
                        model=BaseModelConfig(vocab_size=1024, hidden_size=64, num_layers=2, pretrain_docs=6000,
                                              pretrain_steps=400)),
    "default": WorldScale(sft=2000, preference=2000, unlabeled=1000, val=200, eval=500,
                          model=BaseModelConfig(vocab_size=1024, hidden_size=96, num_layers=3, pretrain_docs=8000,
                                                pretrain_steps=300)),
}


def default_world_dir(scale: str = "default", seed: int = 0) -> Path:
    """Where a world is built by default: $PREFGYM_HOME/worlds/<scale>-seed<seed>, or ~/.cache/prefgym/worlds/..."""
    home = os.environ.get("PREFGYM_HOME")
    root = Path(home) / "worlds" if home else Path.home() / ".cache" / "prefgym" / "worlds"
    return root / f"{scale}-seed{seed}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_splits(scale: WorldScale, seed: int) -> dict[str, list[dict]]:
    """The five splits, families in turn (each as often as its weight in FAMILY_DRAWS). Training
    splits may repeat an instruction; val and eval instructions are unique and never appear in the
    training splits."""
    rng = rng_for("world-splits", seed)
    families = sorted(FAMILY_DRAWS)
    held_out: set[tuple[str, str]] = set()
    splits: dict[str, list[dict]] = {}
    for name in ("eval", "val"):
        rows = []
        while len(rows) < getattr(scale, name):
            task = sample_task(rng, families[len(rows) % len(families)])
            key = (task.instruction, task.input)
            if key in held_out:
                continue
            held_out.add(key)
            if name == "eval":
                rows.append({"instruction": task.instruction, "input": task.input,
                             "output": sample_output(task, rng, REFERENCE_MIX), "generator": REFERENCE_GENERATOR,
                             "dataset": f"world_{task.family}"})
            else:
                rows.append({"instruction": task.instruction, "input": task.input,
                             "output": sample_output(task, rng, DEMONSTRATION_MIX)})
        splits[name] = rows
    for name in ("sft", "preference", "unlabeled"):
        rows = []
        while len(rows) < getattr(scale, name):
            task = sample_task(rng, families[len(rows) % len(families)])
            if (task.instruction, task.input) in held_out:
                continue
            rows.append({"instruction": task.instruction, "input": task.input,
                         "output": sample_output(task, rng, DEMONSTRATION_MIX)})
        splits[name] = rows
    return {name: splits[name] for name in SPLITS}


def read_manifest(world_dir: str | os.PathLike) -> dict | None:
    """The manifest of a complete world, or None."""
    path = Path(world_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("complete") else None


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers

    from prefgym import __version__ as prefgym_version

    return {"prefgym": prefgym_version, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


def _build_into(tmp: Path, scale_name: str, scale: WorldScale, seed: int, report) -> None:
    import time

    from prefgym.world.agreement import human_agreement, policy_like_pairs

    t0 = time.perf_counter()
    report("splits", 0, 1)
    splits = make_splits(scale, seed)
    for name, rows in splits.items():
        write_json(tmp / "data" / f"{name}.json", rows)
    report("splits", 1, 1)

    report("tokenizer", 0, 1)
    held_out = {(r["instruction"], r["input"]) for split in ("val", "eval") for r in splits[split]}
    docs = pretraining_corpus(scale.model.pretrain_docs, seed, exclude=held_out)
    tokenizer = train_tokenizer(docs, scale.model.vocab_size)
    tokenizer.save_pretrained(tmp / "tokenizer")
    report("tokenizer", 1, 1)

    model, stats = pretrain(scale.model, tokenizer, docs, seed, progress=lambda i, n, loss: report("pretraining", i, n))
    save_base_model(model, tokenizer, tmp / "base_model")

    report("humans", 0, 1)
    agreement = human_agreement(policy_like_pairs(1000, seed), seed=seed)
    report("humans", 1, 1)

    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT_VERSION, "complete": True, "scale": scale_name, "seed": seed,
        "sizes": {name: len(rows) for name, rows in splits.items()},
        "families": sorted(FAMILIES),
        "family_counts": {name: _family_counts(rows) for name, rows in splits.items()},
        "reference_generator": REFERENCE_GENERATOR,
        "scale_config": asdict(scale),
        "pretraining": {k: v for k, v in stats.items() if k not in ("seconds", "tokens_per_second")},
        "human_agreement": round(agreement, 4),
        "versions": _versions(),
        "files": {p.relative_to(tmp).as_posix(): _sha256(p) for p in files},
    }
    write_json(tmp / "build_stats.json", {"pretraining_seconds": stats["seconds"],
                                          "pretraining_tokens_per_second": stats["tokens_per_second"],
                                          "total_seconds": round(time.perf_counter() - t0, 2)})
    write_json(tmp / MANIFEST, manifest)


def _family_counts(rows: list[dict]) -> dict:
    from prefgym.world.gold import task_family

    counts: dict[str, int] = {}
    for r in rows:
        fam = task_family(r["instruction"], r["input"])
        counts[fam] = counts.get(fam, 0) + 1
    return dict(sorted(counts.items()))


def build_world(out_dir: str | os.PathLike, scale: str = "default", seed: int = 0, progress: bool = False,
                report=None) -> Path:
    """Build the world at `out_dir` (or leave a complete one there as it is); returns `out_dir`.

    progress: show a progress display on the terminal. report: optional callback
    `report(stage, done, total)` for callers that draw their own.
    """
    if scale not in SCALES:
        raise ConfigError(f"unknown world scale {scale!r}; choose one of {', '.join(SCALES)}")
    out_dir = Path(out_dir)
    existing = read_manifest(out_dir)
    if existing is not None:
        if existing.get("format") != FORMAT_VERSION:
            raise ConfigError(f"{out_dir} holds a world of format {existing.get('format')}, built by another prefgym "
                              f"version (this one builds format {FORMAT_VERSION}); remove the folder to rebuild it "
                              "there, or pass another --out")
        if existing.get("scale") != scale or existing.get("seed") != seed:
            raise ConfigError(f"{out_dir} holds a world with scale={existing.get('scale')!r} seed={existing.get('seed')}, "
                              f"not scale={scale!r} seed={seed}; pass another --out folder or remove it")
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PrefgymError(f"{out_dir} exists and is not a complete prefgym world; remove it or pass another folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        if progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            from prefgym.progress import stderr_console

            with Progress(TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), console=stderr_console()) as bar:
                tasks: dict[str, int] = {}

                def draw(stage, done, total):
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done, total=total)
                    if report:
                        report(stage, done, total)

                _build_into(tmp, scale, SCALES[scale], seed, draw)
        else:
            _build_into(tmp, scale, SCALES[scale], seed, report or (lambda *a: None))
        tmp.chmod(0o755)
        try:
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above)
            os.replace(tmp, out_dir)
        except OSError:
            if read_manifest(out_dir) is None:
                raise
            shutil.rmtree(tmp)  # another process built the same world first: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_split(world_dir: str | os.PathLike, split: str) -> list[dict]:
    """Rows of one split of a built world."""
    from prefgym.io import read_records

    if split not in SPLITS:
        raise ConfigError(f"unknown world split {split!r}; choose one of {', '.join(SPLITS)}")
    return read_records(Path(world_dir) / "data" / f"{split}.json")

