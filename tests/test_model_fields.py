"""Shared model fields (dtype, gradient checkpointing, attention, prompt format, trackers) on every config."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefgym.errors import ConfigError
from prefgym.methods import fields
from prefgym.methods.common import load_config
from prefgym.models.loading import auto_dtype, load_policy, load_score_model, resolve_dtype
from prefgym.models.tiny import make_tiny_checkpoint

TRAINING_CONFIGS = [("sft", "SFTConfig"), ("feedme", "FeedMEConfig"), ("expert_iteration", "ExpertIterationConfig"),
                    ("reward_conditioning", "RewardConditioningConfig"), ("reward_model", "RewardModelConfig"),
                    ("dpo", "DPOConfig"), ("ppo", "PPOConfig"), ("quark", "QuarkConfig"), ("rloo", "RLOOConfig"),
                    ("grpo", "GRPOConfig"), ("kto", "KTOConfig"), ("simpo", "SimPOConfig")]
SAMPLING_CONFIGS = [("best_of_n", "BestOfNConfig"), ("preference_data", "PreferenceDataConfig")]


def config_class(module: str, name: str):
    return getattr(importlib.import_module(f"prefgym.methods.{module}"), name)


@pytest.mark.parametrize("module,name", TRAINING_CONFIGS)
def test_every_training_config_takes_the_shared_fields(module, name):
    cls = config_class(module, name)
    cfg = load_config(cls, overrides={"dtype": "bfloat16", "gradient_checkpointing": True,
                                      "attn_implementation": "eager", "report_to": "none", "prompt_format": "chat",
                                      "use_lora": True, "lora_r": 4})
    assert (cfg.dtype, cfg.gradient_checkpointing, cfg.attn_implementation, cfg.prompt_format) == \
        ("bfloat16", True, "eager", "chat")
    assert cfg.use_lora and cfg.lora_r == 4
    # defined once: the field objects come from the mixins, not from copies in each config
    own = cls.__dict__.get("__annotations__", {})
    for shared in ("dtype", "gradient_checkpointing", "attn_implementation", "report_to", "prompt_format",
                   "use_lora", "lora_r", "lora_alpha", "lora_dropout"):
        assert shared not in own, f"{name} redefines {shared}"
    assert issubclass(cls, fields.TrainFields) and issubclass(cls, fields.LoraFields)


@pytest.mark.parametrize("module,name", SAMPLING_CONFIGS)
def test_sampling_configs_take_the_model_fields(module, name):
    cfg = load_config(config_class(module, name), overrides={"dtype": "auto", "attn_implementation": "sdpa",
                                                              "prompt_format": "alpaca"})
    assert (cfg.dtype, cfg.attn_implementation, cfg.prompt_format) == ("auto", "sdpa", "alpaca")


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "fp8", "key 'dtype' should be one of"),
    ("prompt_format", "vicuna", "key 'prompt_format' should be one of"),
    ("report_to", "tensorbored", "unknown tracker 'tensorbored'"),
    ("report_to", "tensorboard,nope", "unknown tracker 'nope'"),
])
def test_bad_values_are_config_errors_naming_the_key(key, value, message):
    from prefgym.methods.dpo import DPOConfig

    with pytest.raises(ConfigError, match=message):
        load_config(DPOConfig, overrides={key: value})


def test_tracker_names():
    assert fields.tracker_names("none") == [] and fields.tracker_names("") == []
    assert fields.tracker_names("all") == ["all"]
    installed = [n for n in ("tensorboard", "wandb", "trackio") if importlib.util.find_spec(n)]
    missing = [n for n in ("tensorboard", "wandb", "trackio") if n not in installed]
    if installed:
        assert fields.tracker_names(",".join(installed)) == installed
    for name in missing:  # Accelerate would drop it without a word
        with pytest.raises(ConfigError, match=f"tracker '{name}' is not installed"):
            fields.tracker_names(name)


def test_resolve_dtype_auto_follows_the_device(monkeypatch):
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto") is auto_dtype()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert auto_dtype("cpu") is torch.float32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert auto_dtype("cpu") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert auto_dtype("cuda") is torch.float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")


def test_loaders_apply_dtype_attention_and_checkpointing(tiny):
    from prefgym.methods.dpo import DPOConfig

    cfg = DPOConfig(dtype="bfloat16", attn_implementation="eager", gradient_checkpointing=True)
    model = load_policy(tiny, cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert model.is_gradient_checkpointing
    assert not load_policy(tiny, cfg, trainable=False).is_gradient_checkpointing  # frozen references: no need
    scorer = load_score_model(tiny, DPOConfig(attn_implementation="sdpa"))
    assert scorer.score.weight.dtype is torch.float32 and scorer.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="attn_implementation=flash_attention_9"):
        load_policy(tiny, DPOConfig(attn_implementation="flash_attention_9"))


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    """Checkpointing recomputes activations: the gradients must be those of the plain backward."""
    from prefgym.methods.sft import SFTConfig

    ids = torch.randint(5, 100, (2, 12))
    grads = []
    for gc in (False, True):
        model = load_policy(tiny, SFTConfig(gradient_checkpointing=gc))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_trainable_models_come_in_train_mode_and_checkpoint(tiny):
    """from_pretrained gives eval mode, where transformers skips checkpointing: PPO and RLOO, which
    never call .train(), trained without it. A trainable model now comes in train mode and its
    layers go through the checkpoint function; generation models stay in eval mode."""
    from prefgym.methods.ppo import PPOConfig
    from prefgym.models.loading import load_model_and_tokenizer

    calls = []
    for gc in (False, True):
        model = load_policy(tiny, PPOConfig(gradient_checkpointing=gc))
        assert model.training
        n = [0]
        for layer in model.model.layers:
            inner = getattr(layer, "_gradient_checkpointing_func", None)
            if inner is not None:
                layer._gradient_checkpointing_func = lambda *a, inner=inner, n=n, **k: (
                    n.__setitem__(0, n[0] + 1), inner(*a, **k))[1]
        ids = torch.randint(5, 100, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        calls.append(n[0])
    assert calls == [0, len(model.model.layers)]
    assert not load_policy(tiny, PPOConfig(), trainable=False).training
    assert not load_model_and_tokenizer(tiny, cfg=PPOConfig())[0].training  # generation: no dropout


def test_sft_set_dtype_and_report_to_on_the_cli(tiny, tmp_path):
    """`prefgym sft --set dtype=bfloat16` (sft has --set too); an unknown tracker exits 2."""
    from prefgym.cli import main
    from prefgym.io import write_jsonl

    data = tmp_path / "demos.jsonl"
    write_jsonl(data, [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("cat", "dog", "sun", "red")])
    base = ["sft", "--model", str(tiny), "--data", str(data), "--out", str(tmp_path / "out"), "--max-steps", "2",
            "--batch-size", "2", "--lr", "1e-2", "--no-progress"]
    assert main(base + ["--set", "report_to=nonsense"]) == 2
    assert main(base + ["--set", "dtype=bfloat16", "--set", "gradient_checkpointing=true"]) == 0
    saved = json.loads((tmp_path / "out" / "sft_config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["gradient_checkpointing"] is True
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    before = load_file(Path(tiny) / "model.safetensors")
    assert any(not torch.equal(before[k].to(torch.bfloat16), weights[k]) for k in weights)


def _pairs(n=16):
    words = ["cat", "dog", "sun", "red", "blue", "tree", "fish", "bird"]
    return [{"instruction": f"Name thing {i}.", "input": "", "output_1": words[i % 8] + " good",
             "output_2": words[(i + 3) % 8], "preference": 1 + i % 2} for i in range(n)]


@pytest.mark.parametrize("method", ["dpo", "reward_model"])
def test_bf16_training_runs_finite_and_saves_bf16(method, tiny, tmp_path):
    module = importlib.import_module(f"prefgym.methods.{method}")
    cls = module.DPOConfig if method == "dpo" else module.RewardModelConfig
    cfg = cls(model_name_or_path=str(tiny), output_dir=str(tmp_path / method), dtype="bfloat16",
              gradient_checkpointing=True, epochs=1, per_device_batch_size=4, max_length=48, lr=1e-2)
    out = module.train(cfg, records=_pairs())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    before = load_file(Path(tiny) / "model.safetensors")
    changed = [k for k in weights if k in before and not torch.equal(before[k].to(torch.bfloat16), weights[k])]
    assert changed, "no weight moved"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_report_to_tensorboard_writes_events(tiny, tmp_path):
    from prefgym.methods import dpo

    cfg = dpo.DPOConfig(model_name_or_path=str(tiny), output_dir=str(tmp_path / "tb"), report_to="tensorboard",
                        epochs=1, per_device_batch_size=4, max_length=48)
    out = dpo.train(cfg, records=_pairs())
    assert list((out / "tracking").rglob("events.out.tfevents.*"))
    assert (out / "metrics.jsonl").exists()


def test_track_sends_numbers_at_the_step():
    class FakeAccelerator:
        trackers = [object()]

        def __init__(self):
            self.logged = []

        def log(self, values, step=None):
            self.logged.append((values, step))

    acc = FakeAccelerator()
    fields.track(acc, {"step": 3, "loss": 0.5, "note": "x", "done": True, "n": 2})
    fields.track(acc, {"iteration": 1, "reward": 1.0}, step=1)
    assert acc.logged == [({"loss": 0.5, "n": 2}, 3), ({"iteration": 1, "reward": 1.0}, 1)]
    assert dataclasses.is_dataclass(fields.TrainFields)


def test_pair_logps_without_the_cache_equal_the_cached_ones(tiny):
    """DPO's PairLogps runs whole rows under gradient checkpointing (no KV cache in training):
    the same summed log-probs as the cached prompt-once path."""
    from prefgym.methods.common import load_tokenizer
    from prefgym.methods.dpo import DPOConfig, PairLogps, _pair_batch

    tokenizer = load_tokenizer(tiny)
    examples = [("Say a word.", "cat", "the dog ran", 1.0), ("Add 3 and 4 please now.", "7", "", 1.0)]
    batch = _pair_batch(tokenizer, examples, 64, "cpu")
    model = PairLogps(load_policy(tiny, DPOConfig(gradient_checkpointing=True)))
    model.eval()
    cached = model(*batch)
    model.train()
    uncached = model(*batch)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a, b.detach(), atol=1e-4, rtol=1e-5)
    (uncached[0].sum() - uncached[1].sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_resolved_dtype_names_what_auto_loads():
    from prefgym.methods import fields
    from prefgym.models.loading import auto_dtype

    assert fields.resolved_dtype("auto") == {torch.bfloat16: "bfloat16", torch.float32: "float32"}[auto_dtype()]
    assert [fields.resolved_dtype(d) for d in ("float32", "bfloat16", "float16")] == ["float32", "bfloat16", "float16"]
