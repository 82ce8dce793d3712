"""`mixed_precision` on every training loop: with bf16 (Accelerate's autocast over float32 weights)
each method trains a few steps on the toy model, keeps and saves float32 weights, and follows the
float32 run closely but not bit for bit; the models a loop runs unprepared (reference, reward
model, sampling) autocast too, so that at step 1 the policy is its reference exactly (DPO's
log-ratios, PPO's, RLOO's and Quark's KL are 0). The setting is process-wide in Accelerate: each
training gets its own, and none is left on afterwards."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from prefgym.errors import ConfigError
from prefgym.io import write_jsonl
from prefgym.methods import (common, dpo, expert_iteration, fields, grpo, kto, online_dpo, ppo, quark, reward_model,
                             rloo, simpo)
from prefgym.methods.sft import SFTConfig, train_sft
from test_prefdata_toy import make_toy_model, toy_pairs, toy_prompts, toy_quality, one_torch_thread  # noqa: F401

PAIRS = toy_pairs(16, seed=2)
PROMPTS = toy_prompts(8, seed=3)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny Llama (the SFT model), a reward model trained from it in float32, and a prompts file."""
    root = tmp_path_factory.mktemp("mixed")
    sft = make_toy_model(root / "sft")
    rm = reward_model.train(reward_model.RewardModelConfig(
        model_name_or_path=str(sft), output_dir=str(root / "rm"), lr=3e-3, epochs=1, per_device_batch_size=8,
        max_length=64), records=toy_pairs(32, seed=1, ties=True))
    write_jsonl(root / "prompts.jsonl", PROMPTS)
    return root, sft, rm


def _label_by_quality(pairs, cfg, cache_dir):
    """Online DPO's labels from the toy's quality (more 'good' words wins), instead of an annotator pool."""
    labelled = [{**p, "preference": 1 if toy_quality(p["output_1"]) >= toy_quality(p["output_2"]) else 2}
                for p in pairs if p["output_1"] != p["output_2"]]
    return labelled, {"prompts": len(pairs), "identical": len(pairs) - len(labelled), "labels": len(labelled),
                      "failed": 0, "price": 0.0, "seconds": 0.0}


@pytest.fixture(autouse=True)
def _labels_by_quality(monkeypatch):
    monkeypatch.setattr(online_dpo, "label_pairs", _label_by_quality)


def _train(method: str, toy, out, mixed_precision: str):
    """A few steps of `method` with `mixed_precision`; returns the output folder."""
    root, sft, rm = toy
    mp = {"mixed_precision": mixed_precision}
    pref = dict(model_name_or_path=str(sft), output_dir=str(out), lr=1e-2, epochs=1, per_device_batch_size=8,
                max_length=64, **mp)
    rl = dict(policy_model=str(sft), output_dir=str(out), max_new_tokens=4, max_prompt_length=64, lr=1e-2, **mp)
    if method == "sft":
        records = [{"instruction": p["instruction"], "input": "", "output": p["output_1"]} for p in PAIRS]
        return train_sft(SFTConfig(**pref, progress=False), records)
    if method == "reward_model":
        cfg = reward_model.RewardModelConfig(**pref, eval_fraction=0.0)
        return reward_model.train(cfg, records=toy_pairs(16, seed=1, ties=True))
    if method == "dpo":
        return dpo.train(dpo.DPOConfig(**pref, beta=0.5), records=PAIRS)
    if method == "kto":
        return kto.train(kto.KTOConfig(**pref, beta=0.5), records=PAIRS)
    if method == "simpo":
        return simpo.train(simpo.SimPOConfig(**pref), records=PAIRS)
    if method == "online_dpo":
        cfg = online_dpo.OnlineDPOConfig(**rl, rounds=1, pairs_per_round=8, steps_per_round=2,
                                         per_device_batch_size=8, max_length=64, beta=0.5)
        return online_dpo.train(cfg, PROMPTS)
    if method == "ppo":
        cfg = ppo.PPOConfig(**rl, reward_model=str(rm), steps=2, per_device_rollout_batch_size=4, num_mini_batches=1,
                            ppo_epochs=1, kl_coef=0.05)
        return ppo.train(cfg, prompts=PROMPTS)
    if method == "rloo":
        cfg = rloo.RLOOConfig(**rl, reward_model=str(rm), steps=2, per_device_prompts=2, k=2, ppo_epochs=1,
                              num_mini_batches=1)
        return rloo.train(cfg, prompts=PROMPTS)
    if method == "grpo":
        cfg = grpo.GRPOConfig(**rl, reward="gold", steps=2, per_device_prompts=2, k=2, beta=0.05,
                              missing_eos_penalty=None)
        return grpo.train(cfg, prompts=PROMPTS, gold_fn=lambda i, x, o: float(toy_quality(o)))
    if method in ("quark", "quark_best_quantile"):  # the latter: one step on unconditioned prompts
        best = method == "quark_best_quantile"
        cfg = quark.QuarkConfig(policy_model=str(sft), reward_model=str(rm), prompts_file=str(root / "prompts.jsonl"),
                                output_dir=str(out), num_quantiles=2, iterations=1, rollout_batch_size=4,
                                steps_per_iteration=1 if best else 2, train_on_best_quantile=best,
                                per_device_batch_size=2, lr=1e-2, max_new_tokens=4, max_length=64, progress=False, **mp)
        return quark.train(cfg)
    if method == "expert_iteration":  # best-of-n, then SFT through train_sft
        cfg = expert_iteration.ExpertIterationConfig(
            model_name_or_path=str(sft), reward_model=str(rm), prompts_file=str(root / "prompts.jsonl"),
            prompts_split=None, output_dir=str(out), n=2, max_new_tokens=4, epochs=1, per_device_batch_size=4,
            lr=1e-2, max_length=64, progress=False, **mp)
        return expert_iteration.train(cfg)
    raise AssertionError(method)


# The metrics compared between the float32 and the bf16 run, per method: their first rows (after
# step 1, a bf16 logit may change a sampled token, and the runs part).
METRICS = {"sft": ["loss"], "reward_model": ["loss", "accuracy"], "dpo": ["loss", "logps/chosen"],
           "kto": ["loss", "kl"], "simpo": ["loss", "rewards/margins"], "online_dpo": ["loss"],
           "ppo": ["pg_loss", "vf_loss", "score"], "rloo": ["loss", "score"], "grpo": ["loss", "score"],
           "quark": ["nll", "kl"], "expert_iteration": ["loss"]}


def _rows(out):
    """The training rows of metrics.jsonl (not the reward model's held-out row)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_pairs" not in r]


def _weights(out):
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def runs(toy):
    """(float32 run, bf16 run) of a method, each trained once per module."""
    done = {}

    def get(method):
        if method not in done:
            root = toy[0]
            done[method] = tuple(_train(method, toy, root / f"{method}-{mp}", mp) for mp in ("no", "bf16"))
        return done[method]

    return get


@pytest.mark.parametrize("method", sorted(METRICS))
def test_bf16_mixed_precision_keeps_float32_weights_and_follows_the_float32_run(runs, method):
    from accelerate import Accelerator

    fp32, bf16 = runs(method)
    a, b = _weights(fp32), _weights(bf16)
    assert {w.dtype for w in b.values()} == {torch.float32}  # master weights, saved as trained
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # autocast did run
    rows_a, rows_b = _rows(fp32), _rows(bf16)
    assert len(rows_a) == len(rows_b) >= 1
    for key in METRICS[method]:
        first_a, first_b = rows_a[0][key], rows_b[0][key]
        assert math.isfinite(first_b) and all(math.isfinite(r[key]) for r in rows_b), key
        assert first_b == pytest.approx(first_a, rel=2e-2, abs=1e-3), key  # bf16 rounding of the same step
    assert [r[k] for r in rows_a for k in METRICS[method]] != [r[k] for r in rows_b for k in METRICS[method]]
    assert Accelerator().mixed_precision == "no"  # nothing left on for what runs next


# Step 1: the policy is its reference, both autocast: the log-ratios (implicit rewards, KL) are exactly 0.
# (Quark's best-quantile variant: its first step's policy prompts are the reference's.)
STEP_ONE_ZEROS = {"dpo": ["rewards/chosen", "rewards/rejected"], "online_dpo": ["rewards/chosen", "rewards/rejected"],
                  "kto": ["kl", "rewards/desirable", "rewards/undesirable"], "ppo": ["kl"], "rloo": ["kl"],
                  "quark_best_quantile": ["kl"]}


@pytest.mark.parametrize("method", sorted(STEP_ONE_ZEROS))
def test_step_one_log_ratios_are_exactly_zero_under_bf16(runs, method):
    first = _rows(runs(method)[1])[0]
    assert {k: first[k] for k in STEP_ONE_ZEROS[method]} == {k: 0.0 for k in STEP_ONE_ZEROS[method]}


@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_expert_iteration_samples_and_scores_as_it_trains(toy, tmp_path, monkeypatch, mixed):
    """Its best-of-n step loads the SFT model in `dtype` (float32): under bf16 it samples and scores
    autocast, as the loops' rollouts do, not in float32 at half the speed."""
    seen = []
    best_of_n = expert_iteration.run_best_of_n
    monkeypatch.setattr(expert_iteration, "run_best_of_n",
                        lambda cfg: (seen.append(torch.is_autocast_enabled("cpu")), best_of_n(cfg))[1])
    _train("expert_iteration", toy, tmp_path / "ei", mixed)
    assert seen == [mixed == "bf16"]


def test_a_reward_model_ensemble_leaves_no_setting_on(toy, tmp_path):
    """An ensemble's members train in one process group kept up between them (`process_group_kept`),
    where `end_training` returns early: the setting is still turned off after each member."""
    from accelerate import Accelerator

    root, sft, _ = toy
    out = reward_model.train(reward_model.RewardModelConfig(
        model_name_or_path=str(sft), output_dir=str(tmp_path / "ens"), lr=3e-3, epochs=1, per_device_batch_size=8,
        max_length=64, ensemble_size=2, mixed_precision="bf16"), records=toy_pairs(16, seed=1, ties=True))
    assert {w.dtype for w in _weights(out / "member-1").values()} == {torch.float32}
    assert Accelerator().mixed_precision == "no"


def test_each_training_of_a_process_gets_its_own_mixed_precision(runs, toy):
    """fp32, then bf16, then fp32 again in one process: the last run is the first one bit for bit."""
    fp32, bf16 = runs("dpo")
    again = _train("dpo", toy, toy[0] / "dpo-no-again", "no")
    assert _rows(again)[-1]["loss"] == _rows(fp32)[-1]["loss"] != _rows(bf16)[-1]["loss"]
    a, b = _weights(fp32), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_make_accelerator_takes_the_config_and_for_no_the_launchers_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    seen = []
    for mp, env in (("bf16", None), ("no", None), ("no", "bf16"), ("bf16", "no")):
        if env is not None:
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
        accelerator = fields.make_accelerator(dpo.DPOConfig(mixed_precision=mp), tmp_path)
        with accelerator.autocast():
            product = torch.ones(2, 2) @ torch.ones(2, 2)
        seen.append((accelerator.mixed_precision, product.dtype))
        fields.end_mixed_precision()
    assert seen == [("bf16", torch.bfloat16), ("no", torch.float32), ("bf16", torch.bfloat16), ("bf16", torch.bfloat16)]


@pytest.mark.parametrize("values, message", [
    ({"mixed_precision": "bf32"}, "key 'mixed_precision' should be one of no, bf16, fp16, got 'bf32'"),
    ({"mixed_precision": "fp16", "dtype": "bfloat16"}, "fp16 with dtype bfloat16 weights does not train"),
    ({"mixed_precision": "fp16", "dtype": "float16"}, "fp16 with dtype float16"),
    ({"mixed_precision": "bf16", "dtype": "float16"}, "bf16 with dtype float16"),
])
def test_bad_mixed_precision_is_refused_when_the_config_is_built(values, message):
    for cls in (SFTConfig, dpo.DPOConfig, ppo.PPOConfig, quark.QuarkConfig):
        with pytest.raises(ConfigError, match=message):
            common.load_config(cls, None, values, where="run.yaml: stages.x")
    assert dpo.DPOConfig(mixed_precision="bf16", dtype="bfloat16").mixed_precision == "bf16"  # allowed, as in TRL


def test_fp16_over_auto_weights_is_refused_where_auto_means_bf16(monkeypatch):
    """dtype auto is bfloat16 on an Ampere GPU or a CPU with AMX: fp16 over it does not train either."""
    from prefgym.models import loading

    monkeypatch.setattr(loading, "auto_dtype", lambda device=None: torch.bfloat16)
    with pytest.raises(ConfigError, match=r"fp16 with dtype auto \(bfloat16 here\) weights does not train"):
        dpo.DPOConfig(mixed_precision="fp16", dtype="auto")
    dpo.DPOConfig(mixed_precision="bf16", dtype="auto")  # bf16 over bf16 weights runs
    monkeypatch.setattr(loading, "auto_dtype", lambda device=None: torch.float32)
    assert dpo.DPOConfig(mixed_precision="fp16", dtype="auto").dtype == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")
def test_fp16_on_cpu_is_refused_rather_than_ignored(tmp_path):
    from accelerate import Accelerator

    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        fields.make_accelerator(dpo.DPOConfig(mixed_precision="fp16"), tmp_path)
    assert Accelerator().mixed_precision == "no"


def test_commands_take_the_field_and_name_it_when_wrong(toy, tmp_path, capsys):
    from prefgym.cli import main

    root, sft, _ = toy
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    base = ["dpo", "--model", str(sft), "--preferences", str(tmp_path / "pairs.jsonl"), "-o", str(tmp_path / "dpo")]
    assert main(base + ["--set", "mixed_precision=bf17"]) == 2
    assert "key 'mixed_precision' should be one of no, bf16, fp16, got 'bf17'" in capsys.readouterr().err
    write_jsonl(tmp_path / "demos.jsonl", [{"instruction": p["instruction"], "output": p["output_1"]} for p in PAIRS])
    sft_args = ["sft", "--model", str(sft), "--data", str(tmp_path / "demos.jsonl"), "--out", str(tmp_path / "sft"),
                "--max-steps", "1", "--no-progress", "--mixed-precision"]
    assert main(sft_args + ["fp8"]) == 2
    assert "key 'mixed_precision' should be one of no, bf16, fp16, got 'fp8'" in capsys.readouterr().err
    assert main(sft_args + ["bf16"]) == 0
    assert json.loads((tmp_path / "sft" / "sft_config.json").read_text())["mixed_precision"] == "bf16"


_DEEPSPEED_LAUNCH = """
import os, sys
sys.path.insert(0, {tests!r})
from test_distributed_configs import CONFIGS, _launch_env
os.environ.update(_launch_env(CONFIGS / "deepspeed_zero2.yaml"))
os.environ.update({{"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}"}})
from prefgym.methods import dpo, fields
first = fields.make_accelerator(dpo.DPOConfig(), {out!r})
os.environ["WORLD_SIZE"] = "2"  # a later training of a launch on two processes (no reset allowed there)
second = fields.make_accelerator(dpo.DPOConfig(mixed_precision="bf16"), {out!r})
print("mixed:", first.mixed_precision, second.mixed_precision, first.state._mixed_precision)
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_trainings_of_a_deepspeed_bf16_launch_see_its_setting(tmp_path):
    """Under DeepSpeed Accelerate's state keeps "no" and the setting lives in the DeepSpeed config:
    the second training of a bf16 launch (an ensemble's member, expert iteration's SFT, a pipeline's
    next stage) must see bf16 there, not a conflict with "no"."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = _DEEPSPEED_LAUNCH.format(tests=str(Path(__file__).parent), port=port, out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed: bf16 bf16 no" in proc.stdout  # the state's own field says no; the launch is bf16
