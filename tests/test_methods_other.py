"""Best-of-n, expert iteration, binary FeedME and binary reward conditioning on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prefgym.cli import main
from prefgym.io import read_records, write_jsonl
from prefgym.methods import best_of_n, expert_iteration, feedme, reward_conditioning
from prefgym.methods.reward_model import score
from prefgym.models.generation import SamplingConfig, generate_outputs

RECORDS = [{"instruction": f"Add {i} and {i + 2}.", "input": "" if i % 2 else f"{i} {i + 2}"} for i in range(5)]
PAIRS = [
    {"instruction": "Add 1 and 2.", "input": "", "output_1": "3", "output_2": "4", "preference": 1},
    {"instruction": "Add 2 and 2.", "input": "2 2", "output_1": "5", "output_2": "4", "preference": 2},
    {"instruction": "Add 3 and 2.", "input": "", "output_1": "5", "output_2": "five", "preference": 1.5},
    {"instruction": "Add 4 and 2.", "input": "", "output_1": "6", "output_2": "7", "preference": 0},
    {"instruction": "Add 5 and 2.", "input": "", "output_1": "7", "output_2": "8", "preference": 1.0},
]


def make_policy_and_reward_model(root):
    """A tiny random Llama policy and a reward model (same backbone, fixed random score head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from prefgym.models.tiny import make_tiny_checkpoint

    policy = make_tiny_checkpoint(root / "policy", "llama")
    config = AutoConfig.from_pretrained(policy)
    config.num_labels = 1
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.save_pretrained(root / "rm")
    from prefgym.methods.common import load_tokenizer

    load_tokenizer(policy).save_pretrained(root / "rm")
    return policy, root / "rm"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_policy_and_reward_model(tmp_path_factory.mktemp("methods_other"))


def _bon_cfg(models, out, **kw) -> best_of_n.BestOfNConfig:
    policy, rm = models
    write_jsonl(out.parent / "prompts.jsonl", RECORDS)
    base = dict(policy_model=str(policy), reward_model=str(rm), data=str(out.parent / "prompts.jsonl"),
                output_file=str(out), n=4, max_new_tokens=6, generation_batch_size=2, chunk_size=2,
                progress=False)
    return best_of_n.BestOfNConfig(**{**base, **kw})


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _assert_changed_and_reloads(before_dir, after_dir):
    from transformers import AutoModelForCausalLM

    before, after = _weights(before_dir), _weights(after_dir)
    changed = [k for k in before if k in after and before[k].shape == after[k].shape
               and not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, "training should change most weights"
    model = AutoModelForCausalLM.from_pretrained(str(after_dir))
    assert model.get_input_embeddings().weight.shape[0] >= before["model.embed_tokens.weight"].shape[0]


# ---------------------------------------------------------------------------------------------
# Best-of-n


def test_best_of_n_keeps_the_sample_with_the_highest_reward(models, tmp_path):
    # the random policy rarely emits EOS in 6 tokens: rank by the reward model alone here
    # (the missing-EOS rule has its own test in test_methods_other_quark.py)
    out = best_of_n.run(_bon_cfg(models, tmp_path / "bon.json", missing_eos_penalty=None))
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in RECORDS]
    varied = 0
    for row in rows:
        assert len(row["outputs"]) == 4
        # Score every sample on its own, independently of the batched scoring in best_of_n.
        rewards = np.array([score(models[1], [{**row, "output": s}])[0] for s in row["outputs"]])
        np.testing.assert_allclose(rewards, row["rewards"], atol=1e-4)
        assert row["best_index"] == int(np.argmax(rewards))
        assert row["output"] == row["outputs"][int(np.argmax(rewards))]
        assert row["reward"] == pytest.approx(rewards.max(), abs=1e-4)
        varied += len(set(row["outputs"])) > 1 and np.ptp(rewards) > 1e-3
    assert varied >= 3, "the samples should differ, or the test proves nothing"
    metrics = [json.loads(line) for line in (tmp_path / "bon.metrics.jsonl").read_text().splitlines()]
    assert [m["examples_done"] for m in metrics] == [2, 4, 5]
    assert all(m["best_reward"] >= m["mean_reward"] for m in metrics)
    assert not (tmp_path / "bon.json.partial.jsonl").exists()


def test_best_of_1_is_plain_sampling(models, tmp_path):
    cfg = _bon_cfg(models, tmp_path / "bon1.json", n=1, chunk_size=len(RECORDS), seed=3)
    rows = json.loads(best_of_n.run(cfg).read_text())
    plain = generate_outputs(models[0], RECORDS, SamplingConfig(temperature=1.0, max_new_tokens=6, batch_size=2,
                                                                seed=3))
    assert [r["output"] for r in rows] == [p["output"] for p in plain]


def test_best_of_n_resumes_where_it_stopped(models, tmp_path):
    full = json.loads(best_of_n.run(_bon_cfg(models, tmp_path / "a" / "bon.json")).read_text())
    # An interrupted run: the first chunk (2 instructions) is done; mark it to see it is kept.
    done = [{**r, "output": "MARK"} for r in full[:2]]
    write_jsonl(tmp_path / "b" / "bon.json.partial.jsonl", done)
    resumed = json.loads(best_of_n.run(_bon_cfg(models, tmp_path / "b" / "bon.json")).read_text())
    assert [r["output"] for r in resumed[:2]] == ["MARK", "MARK"]
    assert resumed[2:] == full[2:]


def test_best_of_n_cli_and_config_errors(models, tmp_path):
    policy, rm = models
    write_jsonl(tmp_path / "prompts.jsonl", RECORDS[:2])
    args = ["best-of-n", "--policy", str(policy), "--reward-model", str(rm), "--data",
            str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "o.json"), "--n", "2",
            "--max-new-tokens", "4", "--set", "progress=false"]
    assert main(args) == 0
    assert len(read_records(tmp_path / "o.json")) == 2
    assert main(args + ["--set", "n_samples=3"]) == 2  # unknown key: ConfigError, exit 2
    assert main(["best-of-n", "--policy", str(policy), "--data", str(tmp_path / "prompts.jsonl")]) == 2


# ---------------------------------------------------------------------------------------------
# Binary FeedME and binary reward conditioning: data


def test_feedme_keeps_the_preferred_output_and_drops_ties():
    records = feedme.feedme_records(PAIRS)
    assert [r["output"] for r in records] == ["3", "4", "7"]  # ties (1.5 and AlpacaEval's 0) dropped
    swapped = [{**p, "preference": {1: 2, 2: 1}.get(p["preference"], p["preference"])} for p in PAIRS]
    assert [r["output"] for r in feedme.feedme_records(swapped)] == ["4", "5", "8"]
    assert records[1]["input"] == "2 2"


def test_reward_conditioning_data_has_both_outputs_with_their_tokens():
    records = reward_conditioning.reward_conditioning_records(PAIRS)
    assert [(r["instruction"], r["output"]) for r in records] == [
        ("<good>Add 1 and 2.", "3"), ("<bad>Add 1 and 2.", "4"),
        ("<good>Add 2 and 2.", "4"), ("<bad>Add 2 and 2.", "5"),
        ("<good>Add 5 and 2.", "7"), ("<bad>Add 5 and 2.", "8"),
    ]
    with pytest.raises(Exception, match="preference"):
        reward_conditioning.reward_conditioning_records([{**PAIRS[0], "preference": 3}])


SOFT_PAIRS = [
    {"instruction": "Add 1 and 2.", "input": "", "output_1": "3", "output_2": "4", "preference": 1.2},
    {"instruction": "Add 2 and 2.", "input": "", "output_1": "5", "output_2": "4", "preference": 1.8},
    {"instruction": "Add 3 and 2.", "input": "", "output_1": "5", "output_2": "6", "preference": None},
    {"instruction": "Add 4 and 2.", "input": "", "output_1": "6", "output_2": "7", "preference": 1.49},
]


def test_soft_labels_are_rounded_by_the_shared_rule_and_unannotated_pairs_skipped():
    assert [r["output"] for r in feedme.feedme_records(SOFT_PAIRS)] == ["3", "4", "6"]
    records = reward_conditioning.reward_conditioning_records(SOFT_PAIRS)
    assert [(r["instruction"][:6], r["output"]) for r in records] == [
        ("<good>", "3"), ("<bad>A", "4"), ("<good>", "4"), ("<bad>A", "5"), ("<good>", "6"), ("<bad>A", "7")]


@pytest.mark.parametrize("method", ["feedme", "reward-conditioning"])
def test_a_meaningless_preference_names_file_row_and_field(method, models, tmp_path, capsys):
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3] + [{**PAIRS[3], "preference": 7}])
    assert main([method, "--model", str(models[0]), "--preferences", str(tmp_path / "pairs.jsonl"),
                 "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'pairs.jsonl'}, row 3, field 'preference'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_feedme_and_reward_conditioning_train_with_dropout_off_by_default():
    """Both train through `train_sft`; its `disable_dropout` (default on) reaches it unchanged."""
    for cls in (feedme.FeedMEConfig, reward_conditioning.RewardConditioningConfig):
        assert reward_conditioning.sft_config(cls()).disable_dropout is True
        assert reward_conditioning.sft_config(cls(disable_dropout=False)).disable_dropout is False


# ---------------------------------------------------------------------------------------------
# Training methods (a few SFT steps each)


def _sft_fields(out, **kw):
    return dict(output_dir=str(out), epochs=1, max_steps=2, lr=1e-2, warmup_ratio=0.0, per_device_batch_size=2,
                save_steps=0, progress=False, max_length=128, **kw)


def test_feedme_trains_on_preferred_outputs(models, tmp_path):
    out = feedme.train(feedme.FeedMEConfig(model_name_or_path=str(models[0]), **_sft_fields(tmp_path / "fm")),
                       pairs=PAIRS)
    _assert_changed_and_reloads(models[0], out)
    assert json.loads((out / "training_state.json").read_text())["done"]


def test_reward_conditioning_trains_with_control_tokens(models, tmp_path):
    from prefgym.models import load_model_and_tokenizer

    cfg = reward_conditioning.RewardConditioningConfig(model_name_or_path=str(models[0]),
                                                       **_sft_fields(tmp_path / "rc"))
    out = reward_conditioning.train(cfg, pairs=PAIRS)
    _assert_changed_and_reloads(models[0], out)
    model, tokenizer = load_model_and_tokenizer(out)
    good, bad = tokenizer.convert_tokens_to_ids(["<good>", "<bad>"])
    assert tokenizer("<good>Add")["input_ids"].count(good) == 1 and good != bad
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert reward_conditioning.read_conditioning(out) == "<good>"
    assert "<good>" in (out / "README.md").read_text()
    assert not (out / "init_model").exists()
    rows = reward_conditioning.generate_conditioned_outputs(out, RECORDS[:2], SamplingConfig(max_new_tokens=4))
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in RECORDS[:2]]


def test_generate_conditioned_outputs_applies_the_recorded_token(models, tmp_path):
    """With a token recorded, outputs equal generate_outputs on prefixed instructions; without, plain ones."""
    import shutil

    cond = tmp_path / "cond"
    shutil.copytree(models[0], cond)
    reward_conditioning.write_conditioning(cond, "Please: ", "test")
    sampling = SamplingConfig(max_new_tokens=5, seed=1)
    got = reward_conditioning.generate_conditioned_outputs(cond, RECORDS[:3], sampling)
    want = generate_outputs(cond, reward_conditioning.with_control_token(RECORDS[:3], "Please: "), sampling)
    assert [g["output"] for g in got] == [w["output"] for w in want]
    plain = reward_conditioning.generate_conditioned_outputs(models[0], RECORDS[:3], sampling)
    assert [p["output"] for p in plain] == [p["output"] for p in generate_outputs(models[0], RECORDS[:3], sampling)]


def test_expert_iteration_fine_tunes_on_best_of_n_outputs(models, tmp_path):
    policy, rm = models
    write_jsonl(tmp_path / "unlabeled.jsonl", RECORDS)
    cfg = expert_iteration.ExpertIterationConfig(
        model_name_or_path=str(policy), reward_model=str(rm), prompts_file=str(tmp_path / "unlabeled.jsonl"),
        n=3, max_new_tokens=6, **_sft_fields(tmp_path / "ei"))
    out = expert_iteration.train(cfg)
    chosen = read_records(out / expert_iteration.BEST_OF_N_FILE)
    assert len(chosen) == len(RECORDS)
    assert all(c["output"] == c["outputs"][int(np.argmax(c["rewards"]))] for c in chosen)
    _assert_changed_and_reloads(policy, out)


def test_method_commands_have_help_and_reject_unknown_keys(models, tmp_path, capsys):
    for command in ("best-of-n", "expert-iteration", "quark", "feedme", "reward-conditioning"):
        assert main([command, "--help"]) == 0
        assert "Reads" in capsys.readouterr().out
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code = main(["feedme", "--model", str(models[0]), "--preferences", str(tmp_path / "pairs.jsonl"),
                 "--out", str(tmp_path / "fm"), "--set", "learning_rate=1e-3"])
    assert code == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err


RC_SCRIPT = """
import sys
from prefgym.methods import reward_conditioning as rc
pairs = {pairs!r}
cfg = rc.RewardConditioningConfig(model_name_or_path={policy!r}, output_dir=sys.argv[1], epochs=1, max_steps=2,
                                  lr=1e-2, per_device_batch_size=1, save_steps=0, progress=False, max_length=128)
rc.train(cfg, pairs=pairs)
"""


@pytest.mark.slow
def test_reward_conditioning_under_two_processes(models, tmp_path):
    """Two CPU processes: the main one adds the tokens once, both train, one conditioned model comes out."""
    import os
    import subprocess

    from test_dpo import launch_two_cpu_processes

    script = tmp_path / "run_rc.py"
    script.write_text(RC_SCRIPT.format(pairs=PAIRS, policy=str(models[0])))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    subprocess.run(launch_two_cpu_processes(script, str(tmp_path / "rc")), check=True, env=env)
    out = tmp_path / "rc"
    assert reward_conditioning.read_conditioning(out) == "<good>"
    assert json.loads((out / "sft_config.json").read_text())["num_processes"] == 2
    _assert_changed_and_reloads(models[0], out)
