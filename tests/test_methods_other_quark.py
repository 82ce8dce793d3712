"""Quark: quantiles by hand, the loss against independent computations, a growing shared pool, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from prefgym.data import format_record
from prefgym.io import read_records, write_jsonl
from prefgym.methods import common, quark
from prefgym.models import load_model_and_tokenizer, tokenize_example

from test_methods_other import RECORDS, make_policy_and_reward_model

SAMPLES = [{"instruction": "Add 1 and 2.", "input": "", "output": "3 is the sum"},
           {"instruction": "Sort these numbers.", "input": "3 1 2", "output": "1 2 3"},
           {"instruction": "List two colors.", "input": "", "output": "red, blue"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_policy_and_reward_model(tmp_path_factory.mktemp("quark"))


def test_quantiles_match_a_hand_computation():
    rewards = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8]
    # Sorted best first: 0.9 (1), 0.8 (6), 0.7 (4) | 0.5 (2), 0.3 (3) | 0.2 (5), 0.1 (0).
    assert quark.assign_quantiles(rewards, 3).tolist() == [2, 0, 1, 1, 0, 2, 0]
    # 4 samples in 2 parts; ties keep pool order.
    assert quark.assign_quantiles([1.0, 1.0, 0.0, 2.0], 2).tolist() == [0, 1, 1, 0]
    assert quark.assign_quantiles([0.3, 0.1], 5).tolist() == [0, 1]
    assert quark.quark_tokens(3) == ["<quark_0>", "<quark_1>", "<quark_2>"]


def test_quark_loss_terms_equal_independent_computations(models):
    from prefgym.methods.reward_conditioning import add_control_tokens, with_control_token

    reference, tokenizer = load_model_and_tokenizer(models[0])
    policy, _ = load_model_and_tokenizer(models[0])
    tokens = quark.quark_tokens(3)
    add_control_tokens(policy, tokenizer, tokens)
    quantiles = np.array([2, 0, 1])

    loss, stats = quark.quark_loss(policy, reference, tokenizer, SAMPLES, quantiles, tokens,
                                   kl_coef=0.3, entropy_coef=0.2, max_length=128)
    # NLL: the SFT loss of each sample with its token in front of the instruction.
    nll_sum, n_tokens = 0.0, 0
    for s, q in zip(SAMPLES, quantiles):
        ex = tokenize_example(tokenizer, format_record(with_control_token([s], tokens[q])[0]), s["output"], 128)
        logits = policy(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(ex["labels"][1:])
        keep = labels != -100
        nll_sum += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        n_tokens += int(keep.sum())
    assert stats["nll"] == pytest.approx(nll_sum / n_tokens, rel=1e-5)
    assert stats["kl"] > 0 and stats["entropy"] > 0
    assert loss.item() == pytest.approx(stats["nll"] + 0.3 * stats["kl"] - 0.2 * stats["entropy"], rel=1e-5)

    # The reference against itself, no token: KL 0 and entropy = common.token_entropy on response tokens.
    _, same = quark.quark_loss(reference, reference, tokenizer, SAMPLES, [0, 0, 0], ["", "", ""],
                               kl_coef=1.0, entropy_coef=1.0, max_length=128)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    batch = common.tokenize_prompt_response(tokenizer, [format_record(s) for s in SAMPLES],
                                            [s["output"] for s in SAMPLES], 128)
    entropy = common.token_entropy(reference(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).logits)
    assert same["entropy"] == pytest.approx(common.masked_mean(entropy, batch["response_mask"]).item(), rel=1e-4)


def _cfg(models, out, prompts_file, **kw) -> quark.QuarkConfig:
    base = dict(policy_model=str(models[0]), reward_model=str(models[1]), prompts_file=str(prompts_file),
                output_dir=str(out), num_quantiles=3, iterations=2, rollout_batch_size=4, steps_per_iteration=2,
                per_device_batch_size=2, lr=1e-2, warmup_steps=1, max_new_tokens=5, max_length=128,
                progress=False)
    return quark.QuarkConfig(**{**base, **kw})


def test_quark_pool_grows_and_model_saves_with_its_token(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    # rewards from the reward model alone (the random policy rarely emits EOS in 5 tokens)
    out = quark.train(_cfg(models, tmp_path / "q", tmp_path / "prompts.jsonl", missing_eos_penalty=None,
                           warmup_steps=4))
    pool = read_records(out / quark.POOL_FILE)
    assert [p["iteration"] for p in pool] == [0] * 4 + [1] * 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["pool_size"] for m in metrics] == [4, 8]
    # an iteration's row logs the rate its last step used (2 steps an iteration, 4-step warmup)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-2 * 2 / 4, 1e-2])
    assert all(m["kl"] >= 0 for m in metrics)
    # Rollouts are scored by the reward model as plain records (no token in the instruction).
    from prefgym.methods.reward_model import score

    np.testing.assert_allclose(score(models[1], pool), [p["reward"] for p in pool], atol=1e-4)
    assert all(not p["instruction"].startswith("<quark") for p in pool)

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in quark.quark_tokens(3))
    assert json.loads((out / "conditioning.json").read_text())["instruction_prefix"] == "<quark_0>"
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    before, _ = load_model_and_tokenizer(models[0])
    w0 = before.get_input_embeddings().weight
    assert not torch.allclose(model.get_input_embeddings().weight[: w0.shape[0]], w0)
    assert not (out / "checkpoint").exists()


def test_quark_resumes_to_the_same_result(models, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    full = quark.train(_cfg(models, tmp_path / "full", tmp_path / "prompts.jsonl"))

    # Crash in the second iteration (when quantising a pool of 8), after the first checkpoint.
    real = quark.assign_quantiles

    def crash_on_second_iteration(rewards, k):
        if len(rewards) > 4:
            raise KeyboardInterrupt
        return real(rewards, k)

    monkeypatch.setattr(quark, "assign_quantiles", crash_on_second_iteration)
    with pytest.raises(KeyboardInterrupt):
        quark.train(_cfg(models, tmp_path / "crash", tmp_path / "prompts.jsonl"))
    assert len(read_records(tmp_path / "crash" / quark.POOL_FILE)) == 4
    monkeypatch.setattr(quark, "assign_quantiles", real)
    resumed = quark.train(_cfg(models, tmp_path / "crash", tmp_path / "prompts.jsonl"))

    assert read_records(resumed / quark.POOL_FILE) == read_records(full / quark.POOL_FILE)
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_quark_with_lora_saves_a_merged_model(models, tmp_path):
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    out = quark.train(_cfg(models, tmp_path / "lora", tmp_path / "prompts.jsonl", iterations=1, use_lora=True,
                           lora_r=4))
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    before, _ = load_model_and_tokenizer(models[0])
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight,
                              before.model.layers[0].self_attn.q_proj.weight)


QUARK_SCRIPT = textwrap.dedent("""
    import sys, json, os
    from prefgym.methods import quark
    real = quark.assign_quantiles
    def spy(rewards, k):  # what each process quantises
        with open(os.path.join(sys.argv[1] + ".rank" + os.environ.get("RANK", "0")), "a") as f:
            f.write(json.dumps([float(r) for r in rewards]) + "\\n")
        return real(rewards, k)
    quark.assign_quantiles = spy
    cfg = quark.QuarkConfig(policy_model={policy!r}, reward_model={rm!r}, prompts_file={prompts!r},
                            output_dir=sys.argv[1], num_quantiles=3, iterations=2, rollout_batch_size=4,
                            steps_per_iteration=1, per_device_batch_size=1, lr=1e-2, max_new_tokens=5,
                            max_length=128, generation_batch_size=1, progress=False)
    quark.train(cfg)
""")


@pytest.mark.slow
def test_quark_pool_is_shared_across_two_processes(models, tmp_path):
    """Under `accelerate launch` with 2 CPU processes each process rolls out half the generation
    batches, both end up with the whole pool (the saved pool and the per-iteration pool sizes say
    so), and the rollouts are the ones one process draws (the batches are seeded by position)."""
    from test_dpo import launch_two_cpu_processes

    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    script = tmp_path / "run_quark.py"
    script.write_text(QUARK_SCRIPT.format(policy=str(models[0]), rm=str(models[1]),
                                          prompts=str(tmp_path / "prompts.jsonl")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    subprocess.run(launch_two_cpu_processes(script, str(tmp_path / "two")), check=True, env=env)
    pool = read_records(tmp_path / "two" / quark.POOL_FILE)
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["pool_size"] for m in metrics] == [4, 8]
    assert len(pool) == 8
    seen = [[json.loads(line) for line in (tmp_path / f"two.rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert seen[0] == seen[1], "both processes must quantise the same pool"
    assert [len(s) for s in seen[0]] == [4, 8]
    np.testing.assert_allclose(seen[0][-1], [p["reward"] for p in pool])
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env)
    alone = read_records(tmp_path / "one" / quark.POOL_FILE)
    assert [(p["instruction"], p["output"], p["iteration"]) for p in pool] == \
        [(p["instruction"], p["output"], p["iteration"]) for p in alone]
    np.testing.assert_allclose([p["reward"] for p in pool], [p["reward"] for p in alone], atol=1e-5)
    # Each iteration's 4 prompts are the seeded ones, split between the two processes.
    for it in range(2):
        ids = quark._iteration_prompts(len(RECORDS), 4, it, 0)
        want = sorted(RECORDS[i]["instruction"] for i in ids)
        assert sorted(p["instruction"] for p in pool if p["iteration"] == it) == want


def test_quark_best_quantile_variant_trains_on_the_top_quantile_without_tokens(models, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    seen = []
    real = quark.quark_loss

    def spy(policy, reference, tokenizer, samples, quantiles, tokens, *args):
        seen.append(([s["reward"] for s in samples], list(quantiles), list(tokens)))
        return real(policy, reference, tokenizer, samples, quantiles, tokens, *args)

    monkeypatch.setattr(quark, "quark_loss", spy)
    out = quark.train(_cfg(models, tmp_path / "best", tmp_path / "prompts.jsonl", train_on_best_quantile=True))
    pool = read_records(out / quark.POOL_FILE)
    assert len(seen) == 4 and all(q == [0, 0] and set(t) == {""} for _, q, t in seen)
    for it, (rewards, _, _) in zip([0, 0, 1, 1], seen):
        # The best of 3 quantiles: the top ceil(n/3) rewards of the pool at that iteration.
        pool_rewards = sorted((p["reward"] for p in pool if p["iteration"] <= it), reverse=True)
        top = pool_rewards[: -(-len(pool_rewards) // 3)]
        assert all(r >= min(top) for r in rewards)
    from prefgym.methods.reward_conditioning import read_conditioning

    assert read_conditioning(out) == ""


# ---------------------------------------------------------------------------------------------
# One rule for responses cut off at max_new_tokens (best-of-n, expert iteration, Quark, PPO)


def test_best_of_n_scores_cut_off_samples_with_the_missing_eos_penalty(models):
    from prefgym.methods import best_of_n
    from prefgym.models.generation import SamplingConfig

    model, tokenizer = load_model_and_tokenizer(models[0])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=1, seed=3)
    rows = best_of_n.best_of_n(model, tokenizer, RECORDS, lambda c: np.full(len(c), 5.0), 4, sampling,
                               missing_eos_penalty=-7.0)
    flags = [t for r in rows for t in r["truncated"]]
    assert any(flags), "one sampled token from a random model rarely is EOS"
    for r in rows:
        assert r["rewards"] == [-7.0 if t else 5.0 for t in r["truncated"]]
        for out, t in zip(r["outputs"], r["truncated"]):
            assert t or out == ""  # finished within one token: that token was EOS
        assert r["truncated"][r["best_index"]] == all(r["truncated"])  # a finished sample wins if there is one
    kept = best_of_n.best_of_n(model, tokenizer, RECORDS, lambda c: np.full(len(c), 5.0), 4, sampling,
                               missing_eos_penalty=None)
    assert all(r["rewards"] == [5.0] * 4 for r in kept)


def test_quark_scores_cut_off_rollouts_with_the_missing_eos_penalty(models, tmp_path):
    from prefgym.methods.reward_model import score

    write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    out = quark.train(_cfg(models, tmp_path / "q", tmp_path / "prompts.jsonl", iterations=1, steps_per_iteration=1,
                           missing_eos_penalty=-9.0))
    pool = read_records(out / quark.POOL_FILE)
    assert any(p["truncated"] for p in pool)
    expected = np.where([p["truncated"] for p in pool], -9.0, score(models[1], pool))
    np.testing.assert_allclose([p["reward"] for p in pool], expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Work on the main process only (preference-data annotation): the others wait, a failure stops them all


def test_work_on_the_main_process_runs_once_and_its_failure_is_raised():
    from prefgym.models.generation import main_process_only

    calls = []
    main_process_only("sampling", lambda: calls.append(1))
    assert calls == [1]
    with pytest.raises(ValueError, match="boom"):
        main_process_only("sampling", lambda: (_ for _ in ()).throw(ValueError("boom")))


EI_FAIL_SCRIPT = textwrap.dedent("""
    import sys
    from prefgym.models.generation import main_process_only

    def work():
        raise RuntimeError("no reward model here")

    main_process_only("best-of-n sampling", work)
    print("carried on")
""")


@pytest.mark.slow
def test_expert_iteration_workers_stop_when_the_main_process_fails(tmp_path):
    """Under 2 processes, the main process fails while sampling: both exit with an error (no hang)."""
    from helpers import launch_two_cpu_processes, run_process

    script = tmp_path / "ei_fail.py"
    script.write_text(EI_FAIL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = run_process(launch_two_cpu_processes(script), env=env, timeout=120)
    assert done.returncode != 0 and "carried on" not in done.stdout
    assert "no reward model here" in done.stderr
    assert "the main process failed during best-of-n sampling" in done.stderr
