"""Generation stages shared among processes: 2 CPU processes (gloo) write what 1 process writes.

Record counts are odd on purpose: the last round of batches leaves one process idle, so a gather
that drops an uneven shard or restores the wrong order changes the result.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import launch_two_cpu_processes, run_process
from prefgym.io import read_records, write_json, write_jsonl
from prefgym.models.generation import SamplingConfig, generate_outputs, map_sharded
from test_methods_other import make_policy_and_reward_model

RECORDS = [{"instruction": f"Add {i} and {i + 2}.", "input": "" if i % 2 else f"{i} {i + 2}"} for i in range(7)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_policy_and_reward_model(tmp_path_factory.mktemp("sharding"))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "ACCELERATE_USE_CPU": "1"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_args(folder, fields: dict) -> list[str]:
    """`--config FILE` with the fields in a YAML file (where None can be said: `--set k=null` is ignored)."""
    import yaml

    path = folder / "two.yaml"
    path.write_text(yaml.safe_dump(fields), encoding="utf-8")
    return ["--config", str(path)]


def _two_processes(*args: str) -> None:
    """Run `prefgym ARGS` under `accelerate launch` with 2 CPU processes; the test fails on an error."""
    run_process(launch_two_cpu_processes("-m", "prefgym.cli", *args), env=_env(), timeout=300, check=True)


def test_one_process_map_is_a_plain_map_in_block_order():
    rounds = []
    assert map_sharded(lambda b: b * 10, [3, 1, 2], on_round=rounds.append) == [30, 10, 20]
    assert rounds == [[(3, 30)], [(1, 10)], [(2, 20)]]  # one block per round, handed to on_round


def test_sharded_generation_equals_generating_the_whole_list(models):
    """Batch by batch through map_sharded, each seeded by its position: the same samples as one call."""
    from prefgym.data.prompts import format_record
    from prefgym.models import load_model_and_tokenizer
    from prefgym.models.generation import generate_sharded, generate_with_eos

    model, tokenizer = load_model_and_tokenizer(models[0], padding_side="left")
    prompts = [format_record(r) for r in RECORDS[:5]]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=5, num_samples=2, batch_size=2, seed=7)
    whole = generate_with_eos(model, tokenizer, prompts, cfg, first_index=4)
    assert generate_sharded(model, tokenizer, prompts, cfg, first_index=4) == whole
    assert generate_with_eos(model, tokenizer, prompts, cfg, first_index=0) != whole  # the position counts


MAP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from prefgym.models.generation import map_sharded

    rank = int(os.environ["RANK"])
    rounds = []
    got = map_sharded(lambda b: [b, rank], list(range(5)), on_round=rounds.append)
    try:  # block 3 fails (on process 1): both processes must raise, neither may hang
        map_sharded(lambda b: 1 // (b - 3), range(5), description="scoring")
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"got": got, "rounds": rounds, "error": error}, f)
""")


def test_two_processes_share_blocks_gather_in_order_and_fail_together(tmp_path):
    script = tmp_path / "map.py"
    script.write_text(MAP_SCRIPT)
    run_process(launch_two_cpu_processes(script, str(tmp_path)), env=_env(), timeout=300, check=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # block b ran on process b % 2; both processes hold all 5 results, in block order
    assert ranks[0]["got"] == ranks[1]["got"] == [[b, b % 2] for b in range(5)]
    # the main process saw each round once (the last round uneven); the other none
    assert ranks[0]["rounds"] == [[[0, [0, 0]], [1, [1, 1]]], [[2, [2, 0]], [3, [3, 1]]], [[4, [4, 0]]]]
    assert ranks[1]["rounds"] == []
    assert ranks[1]["error"] == "ZeroDivisionError: integer division or modulo by zero"
    assert ranks[0]["error"] == ("PrefgymError: scoring: another process failed "
                                 "(ZeroDivisionError: integer division or modulo by zero)")


@pytest.mark.slow
def test_generate_two_processes_resume_and_write_the_one_process_outputs(models, tmp_path):
    """`prefgym generate` on 2 processes, resuming from a partial file of an interrupted run."""
    policy = str(models[0])
    write_json(tmp_path / "prompts.json", RECORDS)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=6, num_samples=2, batch_size=2, seed=3)
    out = tmp_path / "outputs.json"
    partial = tmp_path / "outputs.json.partial.jsonl"
    want = generate_outputs(policy, RECORDS, cfg, partial_file=partial)
    # An interrupted run: the first batch done (record 0 marked, to see that it is kept), a line cut short.
    lines = partial.read_text().splitlines()
    kept = [json.loads(lines[0]), json.loads(lines[1])]
    kept[0]["outputs"] = ["KEPT", "KEPT"]
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept) + lines[2][:10])

    _two_processes("generate", "--model", policy, "--data", str(tmp_path / "prompts.json"), "--out", str(out),
                   "--temperature", "1.0", "--max-new-tokens", "6", "--num-samples", "2", "--batch-size", "2",
                   "--seed", "3", "--no-progress")
    got = json.loads(out.read_text())
    assert got[0]["outputs"] == ["KEPT", "KEPT"]
    assert got[1:] == want[1:]
    assert not partial.exists()


@pytest.mark.slow
def test_best_of_n_two_processes_write_the_one_process_outputs(models, tmp_path):
    from prefgym.methods import best_of_n

    policy, rm = models
    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    # chunks of 4 and 3 records, generation batches of 2: the last round of each chunk is uneven;
    # ranked by the reward model alone (the random policy rarely ends with EOS within 6 tokens)
    fields = dict(policy_model=str(policy), reward_model=str(rm), data=str(tmp_path / "prompts.jsonl"), n=3,
                  max_new_tokens=6, generation_batch_size=2, chunk_size=4, progress=False, missing_eos_penalty=None)
    one = best_of_n.run(best_of_n.BestOfNConfig(**fields, output_file=str(tmp_path / "one.json")))
    _two_processes("best-of-n", *_config_args(tmp_path, fields),
                   "--out", str(tmp_path / "two.json"))
    rows = json.loads(one.read_text())
    assert json.loads((tmp_path / "two.json").read_text()) == rows
    assert len({r["best_index"] for r in rows}) > 1 and len({x for r in rows for x in r["rewards"]}) == 3 * len(RECORDS)
    assert len(read_records(tmp_path / "two.metrics.jsonl")) == 2  # one row per chunk, written once


@pytest.mark.slow
def test_expert_iteration_two_processes_pick_the_one_process_outputs(models, tmp_path):
    import torch
    from safetensors.torch import load_file

    from prefgym.methods import expert_iteration

    policy, rm = models
    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    fields = dict(model_name_or_path=str(policy), reward_model=str(rm), prompts_file=str(tmp_path / "prompts.jsonl"),
                  n=3, max_new_tokens=6, generation_batch_size=2, missing_eos_penalty=None, epochs=1, lr=1e-2,
                  warmup_ratio=0.0, save_steps=0, progress=False, max_length=128, seed=0)
    one = expert_iteration.train(expert_iteration.ExpertIterationConfig(
        **fields, per_device_batch_size=2, output_dir=str(tmp_path / "one")))
    # same global batch: 2 processes x 1
    _two_processes("expert-iteration", *_config_args(tmp_path, fields),
                   "--set", "per_device_batch_size=1", "--out", str(tmp_path / "two"))
    chosen = expert_iteration.BEST_OF_N_FILE
    rows = read_records(one / chosen)
    assert read_records(tmp_path / "two" / chosen) == rows and len({r["best_index"] for r in rows}) > 1
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_preference_data_two_processes_write_the_one_process_samples_and_labels(tiny_world, tmp_path):
    from prefgym.methods import preference_data

    fields = dict(policy_model=str(tiny_world / "base_model"),
                  prompt_file=str(tiny_world / "data" / "preference.json"), max_instructions=9, num_samples=2,
                  max_new_tokens=12, chunk_size=5, batch_size=2)
    preference_data.run(preference_data.PreferenceDataConfig(**fields, output_dir=str(tmp_path / "one")))
    _two_processes("preference-data", *_config_args(tmp_path, fields),
                   "--out", str(tmp_path / "two"))
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    assert (two / "preferences.json").read_text() == (one / "preferences.json").read_text()
    assert len(read_records(one / "preferences.json")) >= 5


@pytest.mark.slow
def test_evaluate_two_processes_generate_and_judge_as_one(tiny_world, tmp_path):
    from prefgym.cli import main

    write_json(tmp_path / "eval.json", read_records(tiny_world / "data" / "eval.json")[:9])
    args = ["evaluate", "--reference", str(tmp_path / "eval.json"), "--model", str(tiny_world / "base_model"),
            "--max-new-tokens", "16"]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    _two_processes(*args, "--output-dir", str(tmp_path / "two"))
    for name in ("model_outputs.json", "annotations.json", "leaderboard.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name


RLOO_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from prefgym.methods import rloo
    from test_prefdata_toy import toy_prompts
    cfg = rloo.RLOOConfig(policy_model={policy!r}, reward_model={rm!r}, output_dir=sys.argv[1], steps=2, k=2,
                          per_device_prompts=int(sys.argv[2]), max_new_tokens=5, max_prompt_length=64, lr=1e-2,
                          ppo_epochs=2, num_mini_batches=1, resume=False)
    rloo.train(cfg, prompts=toy_prompts(8, seed=3))
""")


@pytest.mark.slow
def test_rloo_two_processes_train_the_one_process_model(models, tmp_path):
    """DDP for RLOO (and GRPO, its loop): 2 processes x 2 prompts train what 1 process x 4 trains."""
    import torch

    from test_dpo import train_with_one_and_two_processes

    script = tmp_path / "run_rloo.py"
    script.write_text(RLOO_SCRIPT.format(tests=os.path.dirname(__file__), policy=str(models[0]), rm=str(models[1])))
    one, two = train_with_one_and_two_processes(script, tmp_path, 4, 2)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-3)
    m1, m2 = read_records(tmp_path / "one" / "metrics.jsonl"), read_records(tmp_path / "two" / "metrics.jsonl")
    assert [m["episodes"] for m in m2] == [m["episodes"] for m in m1] == [8, 16]  # really 2 processes x 2 prompts x k
    for a, b in zip(m1, m2):
        for key in ("score", "kl", "loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key


FSDP_SCRIPT = textwrap.dedent("""
    import json, sys
    from accelerate.state import AcceleratorState
    from prefgym.methods.sft import SFTConfig, train_sft

    out = train_sft(SFTConfig(**json.loads(sys.argv[1])))
    if AcceleratorState().is_main_process:
        (out / "distributed_type.txt").write_text(str(AcceleratorState().distributed_type))
""")


@pytest.mark.slow
def test_sft_under_the_fsdp_config_on_two_cpu_processes_trains_the_one_process_model(models, tmp_path):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` on 2 CPU processes.

    Accelerate 1.15 runs it as plain data parallelism on CPU (DistributedType.MULTI_CPU: it makes
    FSDP only of GPU-like types), so FSDP itself is skipped; the weights must match 1 process either way.
    """
    import torch
    from safetensors.torch import load_file

    from prefgym.methods.sft import SFTConfig, train_sft
    from test_sft import RECORDS as DEMOS

    write_json(tmp_path / "demos.json", DEMOS)
    fields = dict(model_name_or_path=str(models[0]), train_file=str(tmp_path / "demos.json"), epochs=1, lr=1e-2,
                  warmup_ratio=0.0, save_steps=0, progress=False, seed=0)
    one = train_sft(SFTConfig(**fields, per_device_batch_size=4, output_dir=str(tmp_path / "one")))
    script = tmp_path / "fsdp_sft.py"
    script.write_text(FSDP_SCRIPT)
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(script),
           json.dumps({**fields, "per_device_batch_size": 2, "output_dir": str(tmp_path / "two")})]
    run_process(cmd, env=_env(), timeout=300, check=True)
    two = tmp_path / "two"
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
    ran = (two / "distributed_type.txt").read_text()
    assert ran in ("DistributedType.MULTI_CPU", "DistributedType.FSDP")
    if ran != "DistributedType.FSDP":
        pytest.skip(f"weights match 1 process, but Accelerate ran the FSDP config as {ran} on CPU")
