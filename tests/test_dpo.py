"""DPO / IPO: losses against hand computations, cached reference log-probs, tiny end-to-end runs,
and 2 processes (accelerate launch --cpu) against 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prefgym.data.prompts import format_prompt
from prefgym.errors import ConfigError
from prefgym.methods import dpo
from test_prefdata_toy import make_toy_model, toy_pairs, one_torch_thread  # noqa: F401 (autouse fixture)


def test_sigmoid_and_ipo_losses_by_hand():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.5
    # h = (pc - rc) - (pr - rr): row 0: 0.5 - (-1) = 1.5 ; row 1: -1 - 1 = -2
    losses, cr, rj = dpo.preference_loss(pc, pr, rc, rr, beta, "sigmoid")
    expect = [math.log1p(math.exp(-beta * 1.5)), math.log1p(math.exp(-beta * -2.0))]
    np.testing.assert_allclose(losses.numpy(), expect, rtol=1e-6)
    np.testing.assert_allclose(cr.numpy(), [0.25, -0.5])
    np.testing.assert_allclose(rj.numpy(), [-0.5, 0.5])
    losses, _, _ = dpo.preference_loss(pc, pr, rc, rr, beta, "ipo")
    np.testing.assert_allclose(losses.numpy(), [(1.5 - 1.0) ** 2, (-2.0 - 1.0) ** 2], rtol=1e-6)
    with pytest.raises(ConfigError, match="loss_type"):
        dpo.preference_loss(pc, pr, rc, rr, beta, "hinge")


def test_chosen_rejected_skips_ties_and_orders_pairs():
    recs = [{"instruction": "a", "output_1": "x", "output_2": "y", "preference": 2},
            {"instruction": "b", "output_1": "x", "output_2": "y", "preference": 1.5},
            {"instruction": "c", "input": "z", "output_1": "u", "output_2": "v", "preference": 1}]
    triples = dpo._chosen_rejected(recs)
    assert triples == [(format_prompt("a"), "y", "x"), (format_prompt("c", "z"), "u", "v")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return root, make_toy_model(root / "sft"), toy_pairs(64, seed=2)


def test_dpo_end_to_end_learns_and_caches_reference(toy):
    from transformers import AutoModelForCausalLM

    root, sft, pairs = toy
    cfg = dpo.DPOConfig(model_name_or_path=str(sft), output_dir=str(root / "dpo"), beta=0.5, lr=3e-3,
                        epochs=3, per_device_batch_size=16, max_length=64, save_steps=4)
    out = dpo.train(cfg, records=pairs)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 12
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.05
    assert np.mean([m["rewards/accuracies"] for m in metrics[-3:]]) > 0.7
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # policy == reference at step 1
    before, after = load_file(sft / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # cached reference log-probs equal an independent computation on the SFT model
    ref = torch.load(out / "reference_logps.pt")
    model = AutoModelForCausalLM.from_pretrained(sft)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft)
    p = pairs[0]
    chosen = p["output_1"] if p["preference"] == 1 else p["output_2"]
    prompt_ids = tok(format_prompt(p["instruction"]))["input_ids"]
    resp_ids = tok(chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + resp_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    by_hand = sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(resp_ids))
    assert ref[0, 0].item() == pytest.approx(by_hand, abs=1e-4)
    assert not (out / "checkpoint").exists()


def test_ipo_and_lora_run(toy):
    root, sft, pairs = toy
    cfg = dpo.DPOConfig(model_name_or_path=str(sft), output_dir=str(root / "ipo"), loss_type="ipo", beta=0.5,
                        lr=1e-2, epochs=2, per_device_batch_size=16, max_length=64, use_lora=True, lora_r=4)
    out = dpo.train(cfg, records=pairs)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(1.0, abs=1e-3)  # (0 - 1/(2·0.5))² at the start
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()


def launch_two_cpu_processes(script, *args) -> list[str]:
    """`accelerate launch` of 2 CPU processes (gloo). `--cpu --num_processes 2` alone starts one
    process in Accelerate 1.x (multi-CPU needs mpirun); ACCELERATE_USE_CPU=1 + the torchrun
    launcher gives real data parallelism on CPU."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(script), *args]


def train_with_one_and_two_processes(script, out_dir, batch_one: int, batch_two: int):
    """Run `script OUT BATCH` in 1 process and in 2 (with half the per-process batch); return both
    saved state dicts (`OUT/model.safetensors`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(out_dir / "one"), str(batch_one)], check=True, env=env)
    subprocess.run(launch_two_cpu_processes(script, str(out_dir / "two"), str(batch_two)), check=True,
                   env={**env, "ACCELERATE_USE_CPU": "1"})
    return load_file(out_dir / "one" / "model.safetensors"), load_file(out_dir / "two" / "model.safetensors")


DPO_SCRIPT = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, {tests!r})
    from prefgym.methods import dpo
    from test_prefdata_toy import toy_pairs
    cfg = dpo.DPOConfig(model_name_or_path={sft!r}, output_dir=sys.argv[1], beta=0.5, lr=3e-3, epochs=1,
                        per_device_batch_size=int(sys.argv[2]), max_length=64, resume=False)
    dpo.train(cfg, records=toy_pairs(32, seed=3))
""")


@pytest.mark.slow
def test_dpo_two_processes_match_one(toy, tmp_path):
    root, sft, _ = toy
    script = tmp_path / "run_dpo.py"
    script.write_text(DPO_SCRIPT.format(tests=os.path.dirname(__file__), sft=str(sft)))
    one, two = train_with_one_and_two_processes(script, tmp_path, 8, 4)
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=2e-5, rtol=1e-4)
    m1 = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [round(m["loss"], 4) for m in m1] == [round(m["loss"], 4) for m in m2]


def test_dpo_cli_trains_and_rejects_unknown_keys(toy, tmp_path, capsys):
    from prefgym.cli import main
    from prefgym.io import write_json

    root, sft, pairs = toy
    write_json(tmp_path / "pairs.json", pairs)
    base = ["dpo", "--model", str(sft), "--preferences", str(tmp_path / "pairs.json"), "-o", str(tmp_path / "cli")]
    assert main(base + ["--set", "learning_rate=1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(base + ["--loss-type", "ipo", "--beta", "0.5", "--set", "epochs=1", "--set", "per_device_batch_size=32",
                        "--set", "max_length=64"]) == 0
    assert json.loads((tmp_path / "cli" / "train_config.json").read_text())["loss_type"] == "ipo"
    assert (tmp_path / "cli" / "model.safetensors").exists()


def test_dpo_resume_after_crash_equals_uninterrupted(toy, tmp_path, monkeypatch):
    root, sft, pairs = toy

    def cfg(name):
        return dpo.DPOConfig(model_name_or_path=str(sft), output_dir=str(tmp_path / name), beta=0.5, lr=3e-3,
                             epochs=2, per_device_batch_size=16, max_length=64, save_steps=3)

    full = dpo.train(cfg("full"), records=pairs)
    real_append = dpo.append_jsonl

    def crash_at_step_5(path, row):
        real_append(path, row)
        if row.get("step") == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(dpo, "append_jsonl", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        dpo.train(cfg("crashed"), records=pairs)
    monkeypatch.setattr(dpo, "append_jsonl", real_append)
    resumed = dpo.train(cfg("crashed"), records=pairs)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    steps = [json.loads(l)["step"] for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
