"""Building the built-in world: splits, manifest, determinism, tokenizer and base model, CLI."""

import hashlib
import json
from pathlib import Path

import pytest

from prefgym.errors import PrefgymError
from prefgym.io import read_records
from prefgym.world import SPLITS, build_world, default_world_dir, read_manifest
from prefgym.world.build import SCALES
from prefgym.world.gold import gold_quality, task_family


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_splits_have_alpaca_fields_and_scale_sizes(tiny_world):
    manifest = read_manifest(tiny_world)
    assert manifest["scale"] == "tiny" and manifest["seed"] == 0
    for split in SPLITS:
        rows = read_records(tiny_world / "data" / f"{split}.json")
        assert len(rows) == getattr(SCALES["tiny"], split) == manifest["sizes"][split]
        for r in rows:
            assert isinstance(r["instruction"], str) and isinstance(r["input"], str) and r["output"]
            assert task_family(r["instruction"], r["input"]) != "unknown"
    ev = read_records(tiny_world / "data" / "eval.json")
    assert {r["generator"] for r in ev} == {"world_reference"}
    assert all(r["dataset"].startswith("world_") for r in ev)


def test_eval_and_val_instructions_are_held_out(tiny_world):
    rows = {s: read_records(tiny_world / "data" / f"{s}.json") for s in SPLITS}
    train = {(r["instruction"], r["input"]) for s in ("sft", "preference", "unlabeled") for r in rows[s]}
    for s in ("eval", "val"):
        keys = [(r["instruction"], r["input"]) for r in rows[s]]
        assert len(set(keys)) == len(keys)
        assert not set(keys) & train


def test_demonstrations_and_reference_are_of_mixed_quality():
    from prefgym.world.build import make_splits

    splits = make_splits(SCALES["quick"], 0)
    gold = {s: [gold_quality(r["instruction"], r["input"], r["output"]) for r in splits[s]] for s in ("sft", "eval")}
    perfect = {s: sum(q == 1.0 for q in v) / len(v) for s, v in gold.items()}
    mean = {s: sum(v) / len(v) for s, v in gold.items()}
    assert 0.15 < perfect["sft"] < 0.7  # detail tasks are perfect only with every step stated
    assert min(gold["sft"]) < 0.5 and min(gold["eval"]) < 0.5
    # the reference is decent but beatable: right about half the time, worse than the demonstrations
    assert 0.05 < perfect["eval"] < perfect["sft"]
    assert 0.5 < mean["eval"] < mean["sft"]


def test_manifest_hashes_match_files(tiny_world):
    manifest = read_manifest(tiny_world)
    assert set(manifest["families"]) >= {"arithmetic", "list_items", "word_transform", "sorting", "counting", "describe"}
    for rel, sha in manifest["files"].items():
        assert _sha(tiny_world / rel) == sha, rel
    assert "data/sft.json" in manifest["files"] and "base_model/model.safetensors" in manifest["files"]
    assert 0.55 < manifest["human_agreement"] < 0.75


def test_same_seed_same_bytes_and_idempotent(tiny_world, tmp_path):
    again = build_world(tmp_path / "w", scale="tiny", seed=0)
    ref = read_manifest(tiny_world)["files"]
    new = read_manifest(again)["files"]
    assert new == ref  # data, tokenizer and model weights are byte-identical
    assert (again / "world.json").read_bytes() == (tiny_world / "world.json").read_bytes()
    # complete world: left as it is (no rebuild, same file times)
    mtime = (again / "data" / "sft.json").stat().st_mtime_ns
    build_world(again, scale="tiny", seed=0)
    assert (again / "data" / "sft.json").stat().st_mtime_ns == mtime
    with pytest.raises(PrefgymError, match="scale"):
        build_world(again, scale="tiny", seed=1)
    # a world of another format (an older prefgym's world) is not silently reused
    manifest = json.loads((again / "world.json").read_text())
    (again / "world.json").write_text(json.dumps(dict(manifest, format=1)))
    with pytest.raises(PrefgymError, match="format 1"):
        build_world(again, scale="tiny", seed=0)


# The tiny world's splits (seed 0) as this FORMAT_VERSION builds them. A change to the world's code
# that changes them must bump FORMAT_VERSION, so that a world folder an older prefgym built is
# refused instead of silently reused; then record the new digests here.
TINY_SEED0_SPLITS = {2: {
    "data/eval.json": "ce0d290362a0094682b4d1bd1fb69cc6a4eedaa80ba1ddaf009d39651a686711",
    "data/preference.json": "9a4e56b16522911046f09816ef36c1bcd9b462a14e9c3068e6e9efe5d3345bdc",
    "data/sft.json": "460ce5682afb4f9d7823b0b19f8f986dd61daece892e6dce9a82bcf9af9e63f4",
    "data/unlabeled.json": "d26c024ee9bfca32fb9d5ed3a9da9105211c9adcc6a6b16d616062deef68d2fa",
    "data/val.json": "45f0978d92c7d95923c304c0e48d1d9965872fd5199de8bc967f61f4ea585284",
}}


def test_changed_splits_come_with_a_new_format_version(tiny_world):
    from prefgym.world.build import FORMAT_VERSION

    files = read_manifest(tiny_world)["files"]
    got = {rel: sha for rel, sha in files.items() if rel.startswith("data/")}
    assert FORMAT_VERSION in TINY_SEED0_SPLITS, f"record the splits of world format {FORMAT_VERSION}: {got}"
    assert got == TINY_SEED0_SPLITS[FORMAT_VERSION], (
        f"the world's splits changed but FORMAT_VERSION is still {FORMAT_VERSION}: bump it in "
        f"prefgym/world/build.py and record the new digests here: {got}")


def test_other_seed_other_data(tiny_world):
    from prefgym.world.build import make_splits

    a, b = make_splits(SCALES["tiny"], 0), make_splits(SCALES["tiny"], 1)
    assert a["sft"] != b["sft"]
    assert a == make_splits(SCALES["tiny"], 0)
    assert a["sft"] == read_records(tiny_world / "data" / "sft.json")


def test_refuses_a_non_world_folder_and_leaves_no_temp(tmp_path):
    target = tmp_path / "stuff"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(PrefgymError, match="not a complete prefgym world"):
        build_world(target, scale="tiny")
    with pytest.raises(PrefgymError, match="unknown world scale"):
        build_world(tmp_path / "x", scale="huge")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stuff"]


def test_default_world_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFGYM_HOME", str(tmp_path))
    assert default_world_dir("quick", 3) == tmp_path / "worlds" / "quick-seed3"
    monkeypatch.delenv("PREFGYM_HOME")
    assert default_world_dir() == Path.home() / ".cache" / "prefgym" / "worlds" / "default-seed0"


def test_base_model_loads_with_auto_classes_and_generates(tiny_world):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefgym.data.prompts import format_prompt

    path = tiny_world / "base_model"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    assert model.config.eos_token_id == tok.eos_token_id and model.config.max_position_embeddings >= 512
    assert len(tok) <= SCALES["tiny"].model.vocab_size
    prompt = format_prompt("List 3 fruits.")
    ids = tok(prompt, return_tensors="pt")
    assert tok.decode(ids["input_ids"][0]) == prompt  # byte-level BPE round-trips
    assert ids["input_ids"].shape[1] < 80  # the prompt template compresses to few tokens
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # pretraining taught the world's language: loss far below uniform (ln 1024 = 6.9)
    manifest = read_manifest(tiny_world)
    assert manifest["pretraining"]["final_loss"] < 3.0
    # the separately saved tokenizer is the same
    tok2 = AutoTokenizer.from_pretrained(tiny_world / "tokenizer")
    assert tok2(prompt)["input_ids"] == tok(prompt)["input_ids"]


def test_cli_build_and_info(tiny_world, tmp_path):
    from prefgym.cli import main

    assert main(["world", "info", str(tiny_world)]) == 0
    assert main(["world", "info", str(tmp_path)]) == 2
    # build into a folder that already holds this world: skipped
    assert main(["world", "build", "--out", str(tiny_world), "--scale", "tiny", "--seed", "0"]) == 0
    assert json.loads((tiny_world / "world.json").read_text())["complete"] is True
