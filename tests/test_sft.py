"""SFT: response-only loss, any architecture, equal global batches, resume after a kill, config."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from helpers import launch_two_cpu_processes, run_process
from prefgym.cli import main
from prefgym.data import format_record
from prefgym.errors import ConfigError
from prefgym.methods.common import CheckpointSchedule, load_config
from prefgym.methods.sft import CRASH_AFTER_STEP_ENV, SFTConfig, train_sft
from prefgym.models import IGNORE_INDEX, load_model_and_tokenizer, tokenize_example
from prefgym.models.tiny import make_tiny_checkpoint

# Responses of different lengths, so that per-micro-batch averaging would differ from ours.
RECORDS = [{"instruction": f"Add {i} and {i + 2}.", "input": "" if i % 3 else f"{i} {i + 2}",
            "output": f"{2 * i + 2}" + " is the sum of the two numbers" * (i % 4)} for i in range(10)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


def _cfg(model, out, **kw) -> SFTConfig:
    base = dict(model_name_or_path=str(model), output_dir=str(out), epochs=2, lr=1e-2, warmup_ratio=0.0,
                per_device_batch_size=4, save_steps=0, progress=False, seed=0)
    return SFTConfig(**{**base, **kw})


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_tokenize_example_masks_the_prompt_and_appends_eos(llama):
    _, tokenizer = load_model_and_tokenizer(llama)
    prompt, response = format_record(RECORDS[1]), RECORDS[1]["output"]
    n_prompt = len(tokenizer(prompt).input_ids)
    ex = tokenize_example(tokenizer, prompt, response, max_length=512)
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["input_ids"][n_prompt:-1]) == response
    cut = tokenize_example(tokenizer, prompt, response, max_length=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and cut["input_ids"][-1] != tokenizer.eos_token_id
    assert cut["input_ids"] == ex["input_ids"][:n_prompt + 2]


def test_first_logged_loss_is_mean_nll_of_response_tokens(llama, tmp_path):
    """Independent reference: one unpadded sequence at a time, log-softmax by hand."""
    model, tokenizer = load_model_and_tokenizer(llama)
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in RECORDS:
            prompt_ids = tokenizer(format_record(r)).input_ids
            response_ids = tokenizer(r["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt_ids + response_ids])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            for k, token in enumerate(response_ids):
                nll -= logp[len(prompt_ids) + k - 1, token].item()
                count += 1
    out = train_sft(_cfg(llama, tmp_path / "sft", epochs=1, per_device_batch_size=len(RECORDS)), RECORDS)
    first = _metrics(out)[0]
    assert first["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert first["tokens"] == sum(len(tokenize_example(tokenizer, format_record(r), r["output"], 512)["input_ids"])
                                  for r in RECORDS)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_sft_trains_any_causal_lm_and_saves_it(arch, tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base", arch)
    out = train_sft(_cfg(base, tmp_path / "sft", epochs=4), RECORDS)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))  # 10 records, batch 4 -> 3 steps x 4 epochs
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "tokens", "tokens_per_s"}
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert all(rows[i]["tokens"] < rows[i + 1]["tokens"] for i in range(len(rows) - 1))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "sft_config.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoints").exists()
    before, after = _weights(base), _weights(out)
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("q_proj.weight") or "c_attn.weight" in k)
    model, tokenizer = load_model_and_tokenizer(out)  # loads back with the plain HF classes
    assert tokenizer.eos_token_id == model.config.eos_token_id


def test_gradient_accumulation_gives_the_same_steps(llama, tmp_path):
    """Batch 4 x 1 = batch 2 x 2 accumulation = batch 1 x 4: the loss is averaged over the global batch."""
    runs = [train_sft(_cfg(llama, tmp_path / f"r{bs}", per_device_batch_size=bs, grad_accum=4 // bs), RECORDS)
            for bs in (4, 2, 1)]
    curves = [[r["loss"] for r in _metrics(out)] for out in runs]
    for curve in curves[1:]:
        assert curve == pytest.approx(curves[0], rel=1e-5)
    ref = _weights(runs[0])
    for out in runs[1:]:
        # 1.2e-5 apart at most on some CPUs (batch 1 vs 4: other kernels round otherwise, and Adam at
        # lr 1e-2 turns a near-zero gradient's rounding into a full step)
        assert all(torch.allclose(ref[k], v, atol=3e-5) for k, v in _weights(out).items())


def test_bf16_mixed_precision_trains_and_leaves_no_setting_behind(llama, tmp_path):
    from accelerate import Accelerator

    fp32 = train_sft(_cfg(llama, tmp_path / "fp32"), RECORDS)
    bf16 = train_sft(_cfg(llama, tmp_path / "bf16", mixed_precision="bf16"), RECORDS)
    fp32_losses, bf16_losses = [r["loss"] for r in _metrics(fp32)], [r["loss"] for r in _metrics(bf16)]
    assert bf16_losses == pytest.approx(fp32_losses, rel=2e-2)  # bf16 rounding, same steps
    assert bf16_losses != fp32_losses
    assert Accelerator().mixed_precision == "no"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def test_two_processes_follow_the_one_process_loss_curve(llama, tmp_path):
    data = tmp_path / "demos.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    one = train_sft(_cfg(llama, tmp_path / "one", train_file=str(data), per_device_batch_size=4))
    config = tmp_path / "two.yaml"
    config.write_text(f"model_name_or_path: {llama}\ntrain_file: {data}\noutput_dir: {tmp_path / 'two'}\n"
                      "epochs: 2\nlr: 0.01\nwarmup_ratio: 0.0\nper_device_batch_size: 2\nprogress: false\n")
    # `--multi_gpu` starts the processes with torchrun; without a GPU they train on CPU (gloo).
    # A deadline, and the whole process group killed on failure: a hang must not leave orphans.
    cmd = launch_two_cpu_processes("-m", "prefgym.cli", "sft", "--config", str(config))
    proc = run_process(cmd, env=_env(), timeout=600)  # 300 s was exceeded once on a heavily loaded 2-core machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert json.loads((two / "sft_config.json").read_text())["num_processes"] == 2
    one_rows, two_rows = _metrics(one), _metrics(two)
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == list(range(1, 7))
    assert [r["loss"] for r in two_rows] == pytest.approx([r["loss"] for r in one_rows], rel=1e-4)
    assert [r["tokens"] for r in two_rows] == [r["tokens"] for r in one_rows]
    ref = _weights(one)
    assert all(torch.allclose(ref[k], v, atol=1e-5) for k, v in _weights(two).items())


def test_resume_after_kill_ends_with_the_same_weights(tmp_path):
    # gpt2 keeps its default dropout (0.1): resuming must also restore the random state.
    base = make_tiny_checkpoint(tmp_path / "base", "gpt2")
    data = tmp_path / "demos.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    kw = dict(train_file=str(data), epochs=2, save_steps=2)
    whole = train_sft(_cfg(base, tmp_path / "whole", **kw))

    killed = tmp_path / "killed"
    script = ("import sys, torch; torch.set_num_threads(1); from prefgym.methods.sft import SFTConfig, train_sft; "
              f"train_sft(SFTConfig(**{_cfg(base, killed, **kw).__dict__!r}))")
    proc = run_process([sys.executable, "-c", script], env={**_env(), CRASH_AFTER_STEP_ENV: "3"})
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert (killed / "checkpoints" / "step_2" / "progress.json").exists()
    assert not (killed / "model.safetensors").exists()
    assert [r["step"] for r in _metrics(killed)] == [1, 2, 3]

    resumed = train_sft(_cfg(base, killed, **kw))
    assert [r["step"] for r in _metrics(resumed)] == list(range(1, 7))
    assert [r["loss"] for r in _metrics(resumed)] == pytest.approx([r["loss"] for r in _metrics(whole)], rel=1e-6)
    ref = _weights(whole)
    resumed_weights = _weights(resumed)
    assert ref.keys() == resumed_weights.keys()
    assert all(torch.allclose(ref[k], resumed_weights[k], atol=1e-7) for k in ref)
    assert not torch.equal(ref["transformer.h.0.attn.c_attn.weight"], _weights(base)["transformer.h.0.attn.c_attn.weight"])


def test_finished_run_is_not_redone_and_no_resume_starts_over(llama, tmp_path):
    cfg = _cfg(llama, tmp_path / "sft", epochs=1)
    out = train_sft(cfg, RECORDS)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert train_sft(cfg, RECORDS) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    train_sft(_cfg(llama, tmp_path / "sft", epochs=1, resume=False), RECORDS)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]  # started over, not appended


def test_config_file_unknown_key_and_wrong_type(tmp_path, capsys):
    good = tmp_path / "sft.yaml"
    good.write_text("lr: 0.001\nepochs: 5\nmodel_name_or_path: some/model\n", encoding="utf-8")
    cfg = load_config(SFTConfig, good, {"lr": 0.5, "epochs": None})
    assert (cfg.lr, cfg.epochs, cfg.model_name_or_path) == (0.5, 5, "some/model")

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": 0.001, "learning_rate": 3}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.json: unknown key 'learning_rate'"):
        load_config(SFTConfig, bad)
    assert main(["sft", "--config", str(bad)]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("epochs: three\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"wrong.yaml: key 'epochs' should be"):
        load_config(SFTConfig, wrong)


def test_sft_cli_end_to_end_and_help(llama, tmp_path, capsys):
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    out = tmp_path / "sft"
    argv = ["sft", "--model", str(llama), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--lr", "1e-3", "--batch-size", "5", "--no-progress"]
    assert main(argv) == 0
    assert (out / "model.safetensors").exists() and len(_metrics(out)) == 2
    saved = json.loads((out / "sft_config.json").read_text())
    assert (saved["lr"], saved["per_device_batch_size"], saved["global_batch_size"]) == (1e-3, 5, 5)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]), encoding="utf-8")
    assert main(["sft", "--model", str(llama), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "row 0, field 'output'" in capsys.readouterr().err

    assert main(["sft", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Reads" in text and "Writes" in text and "metrics.jsonl" in text


def test_lora_sft_trains_only_adapters_and_saves_a_merged_plain_model(llama, tmp_path):
    out = train_sft(_cfg(llama, tmp_path / "lora", epochs=3, lr=5e-2, use_lora=True, lora_r=4), RECORDS)
    rows = _metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    before, after = _weights(llama), _weights(out)
    assert before.keys() == after.keys()  # merged: no adapter tensors left, same names as the base
    # LoRA touches the linear layers only; embeddings and norms stay exactly as they were
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert all(torch.equal(before[k], after[k]) for k in after if "norm" in k)
    changed = [k for k in after if k.endswith("q_proj.weight") and not torch.equal(before[k], after[k])]
    assert changed
    # the merged update of a (out, in) weight has rank <= lora_r
    k = changed[0]
    assert torch.linalg.matrix_rank(after[k] - before[k]).item() <= 4
    model, _ = load_model_and_tokenizer(out)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_checkpoint_schedule_by_steps_and_by_time():
    now = [0.0]
    schedule = CheckpointSchedule(save_steps=5, save_every_seconds=10.0, clock=lambda: now[0])
    due = []
    for step in range(1, 11):
        now[0] += 3.0  # 3 s per step
        if schedule.due(step, total_steps=10):
            due.append(step)
    # 4: 12 s since the start; 5: by steps; 9: 12 s since step 5; never at the last step (10,
    # due by steps), when the final model is saved anyway
    assert due == [4, 5, 9]
    slow = CheckpointSchedule(save_steps=100, save_every_seconds=10.0, clock=lambda: now[0])
    due = []
    for step in range(1, 10):
        now[0] += 4.0
        if slow.due(step, total_steps=100):
            due.append(step)
    assert due == [3, 6, 9]  # 12 s since the last save each time
    never = CheckpointSchedule(save_steps=0, save_every_seconds=0, clock=lambda: now[0])
    now[0] += 1e6
    assert not never.due(5, total_steps=10)


def test_time_based_checkpoints_make_an_interrupted_run_resumable(llama, tmp_path, monkeypatch):
    """save_steps 0 (never by steps) and a tiny save_every_seconds: a checkpoint after every step,
    so a run interrupted during step 3 resumes from step 2 and ends where an uninterrupted one does."""
    from prefgym.methods import sft

    kw = dict(epochs=2, save_steps=0, save_every_seconds=1e-9)
    whole = train_sft(_cfg(llama, tmp_path / "whole", **kw), RECORDS)
    real_loss, calls = sft._response_loss_sum, []

    def interrupt_in_step_3(model, batch):  # one forward per step (no accumulation)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(sft, "_response_loss_sum", interrupt_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_sft(_cfg(llama, tmp_path / "cut", **kw), RECORDS)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step_2"]
    monkeypatch.setattr(sft, "_response_loss_sum", real_loss)
    resumed = train_sft(_cfg(llama, tmp_path / "cut", **kw), RECORDS)
    assert [r["step"] for r in _metrics(resumed)] == list(range(1, 7))
    ref = _weights(whole)
    assert all(torch.equal(ref[k], v) for k, v in _weights(resumed).items())

    # by steps only, and no step a multiple of save_steps yet: no checkpoint
    calls.clear()
    monkeypatch.setattr(sft, "_response_loss_sum", interrupt_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_sft(_cfg(llama, tmp_path / "none", epochs=2, save_steps=4, save_every_seconds=0), RECORDS)
    assert not (tmp_path / "none" / "checkpoints").exists()


def test_output_folder_made_with_other_settings_is_an_error(llama, tmp_path, capsys):
    out = tmp_path / "sft"
    train_sft(_cfg(llama, out, epochs=1), RECORDS)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"other settings \(epochs: 1 -> 2; lr: 0.01 -> 0.02\).*--no-resume"):
        train_sft(_cfg(llama, out, epochs=2, lr=0.02), RECORDS)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # nothing touched
    # settings that do not change the result (progress, checkpoint frequency) are not differences
    assert train_sft(_cfg(llama, out, epochs=1, progress=True, save_steps=7), RECORDS) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # --no-resume starts over with the new settings
    train_sft(_cfg(llama, out, epochs=2, lr=0.02, resume=False), RECORDS)
    assert json.loads((out / "sft_config.json").read_text())["lr"] == 0.02
    assert [r["step"] for r in _metrics(out)] == list(range(1, 7))
    data = tmp_path / "demos.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    argv = ["sft", "--model", str(llama), "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv + ["--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "epochs: 2 -> 3" in err and "train_file: None ->" in err
