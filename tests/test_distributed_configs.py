"""The shipped Accelerate configs (configs/accelerate/) fit every training loop.

FSDP: the wrapper modules the loops hand to `accelerator.prepare` (TokenScorer, PairLogps,
PolicyAndValue) expose their models' decoder-layer classes, so Accelerate's
TRANSFORMER_BASED_WRAP gives each decoder layer its own FSDP unit (checked with Accelerate's own
auto-wrap policy functions, plain and LoRA models of two architectures; slow: Accelerate's FSDP 2
preparation on 2 gloo processes, which Accelerate's launcher does not make on CPU). Saving: every
process gathers the full weights and the main process writes them (`common.save_trained`); slow: DPO
(full, LoRA) and SFT (checkpointed, killed, resumed) on 2 processes with the state set to FSDP 2 save
the weights one process saves.

DeepSpeed: no loop passes a DataLoader to `prepare`, so prefgym fills the batch fields Accelerate
would otherwise refuse to guess (`fields.fit_deepspeed_config`), and marks where an accumulation of
micro-batches ends (`common.no_sync_unless`). The launch environment comes from Accelerate's own
launcher code. The slow tests at the end run real DeepSpeed ZeRO-2 and ZeRO-3 (one CPU process)
when the `deepspeed` package is importable, and are skipped otherwise. ZeRO-3 (`prefgym.methods.zero3`):
the trained model loads partitioned, the frozen ones whole, rollouts sample on gathered weights,
saves gather them, checkpoints resume.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from prefgym.errors import ConfigError
from prefgym.methods import fields

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


# ---------------------------------------------------------------------------------------------
# FSDP: decoder layers are their own units


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from prefgym.models.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer(tempfile.mkdtemp(prefix="prefgym-tokenizer-"))


def _tiny(arch: str, seq_cls: bool = False, lora: bool = False):
    """A tiny random causal LM (or, `seq_cls`, a sequence classifier of its config), optionally LoRA-wrapped."""
    from transformers import AutoModelForSequenceClassification

    from prefgym.models.tiny import make_tiny_model

    model = make_tiny_model(arch, _tokenizer(), num_layers=2)
    if seq_cls:
        model.config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(model.config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                                 task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM"))
    return model


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a (possibly LoRA-wrapped) tiny model, found by position, not by class name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "model", None) or base.transformer
    return list(body.layers if hasattr(body, "layers") else body.h)


def _wrappers(arch: str, lora: bool):
    """(name, wrapper as the loops build it, its decoder layers) for each wrapper the loops prepare."""
    from prefgym.methods.common import TokenScorer
    from prefgym.methods.dpo import PairLogps
    from prefgym.methods.ppo import PolicyAndValue

    other = {"llama": "gpt2", "gpt2": "llama"}[arch]  # a value model of another architecture: both kinds of layer
    rm, lm, policy, value = (_tiny(arch, seq_cls=True, lora=lora), _tiny(arch, lora=lora),
                             _tiny(arch, lora=lora), _tiny(other, seq_cls=True))
    return [("TokenScorer", TokenScorer(rm), _decoder_layers(rm)),
            ("PairLogps", PairLogps(lm), _decoder_layers(lm)),
            ("PolicyAndValue", PolicyAndValue(policy, value), _decoder_layers(policy) + _decoder_layers(value))]


def _shipped_fsdp_plugin(version: int):
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    return FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fsdp2_auto_wrap_gives_each_decoder_layer_of_every_wrapper_its_own_unit(arch, lora):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = _shipped_fsdp_plugin(2)
    for name, wrapper, layers in _wrappers(arch, lora):
        policy = fsdp2_prepare_auto_wrap_policy(plugin, wrapper)
        units = [m for m in wrapper.modules() if policy(m)]
        assert len(units) == len(layers) == (4 if name == "PolicyAndValue" else 2), name
        assert {id(m) for m in units} == {id(m) for m in layers}, name


def test_fsdp1_auto_wrap_policy_reads_the_same_classes():
    """FSDP 1 (`fsdp_version: 1` in a user's config) builds its policy from the same attribute."""
    from prefgym.methods.dpo import PairLogps

    plugin = _shipped_fsdp_plugin(1)
    model = PairLogps(_tiny("gpt2", lora=True))
    plugin.set_auto_wrap_policy(model)
    assert {c.__name__ for c in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]} == {"GPT2Block"}


def test_no_split_modules_joins_the_models_and_reads_through_peft():
    from prefgym.methods.common import no_split_modules

    llama, gpt2 = _tiny("llama", lora=True), _tiny("gpt2")
    assert no_split_modules(llama) == ["LlamaDecoderLayer"]
    assert no_split_modules(llama, gpt2) == ["GPT2Block", "LlamaDecoderLayer"]
    assert no_split_modules(torch.nn.Linear(2, 2)) == []


FSDP_SCRIPT = textwrap.dedent("""
    import copy, json, sys
    import torch
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForSequenceClassification
    from prefgym.methods.common import TokenScorer
    from prefgym.methods.dpo import PairLogps
    from prefgym.methods.ppo import PolicyAndValue
    from prefgym.models.tiny import make_tiny_model, make_tiny_tokenizer

    accelerator = Accelerator(cpu=True)  # gloo; Accelerate makes FSDP only on GPUs, so its FSDP 2 step is called here
    tokenizer = make_tiny_tokenizer(sys.argv[1] + "/tokenizer")
    torch.manual_seed(0)
    lm = make_tiny_model("llama", tokenizer, num_layers=2)
    value = make_tiny_model("gpt2", tokenizer, num_layers=2)
    value = AutoModelForSequenceClassification.from_config(value.config)
    wrappers = {"PairLogps": PairLogps(lm), "TokenScorer": TokenScorer(copy.deepcopy(value)),
                "PolicyAndValue": PolicyAndValue(copy.deepcopy(lm), copy.deepcopy(value))}
    batch = (torch.tensor([[1, 5, 6, 7], [0, 1, 5, 9]]), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]),
             torch.tensor([[8, 9, 2], [10, 11, 2], [8, 2, 0], [9, 9, 2]]),
             torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]]))
    whole = [t.tolist() for t in copy.deepcopy(wrappers["PairLogps"])(*batch)]
    result = {"whole": whole}
    for name, wrapper in wrappers.items():
        layer_names = [n for n, m in wrapper.named_modules() if type(m).__name__ in ("LlamaDecoderLayer", "GPT2Block")]
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(  # one per model, as one per launch
            fsdp_version=2, auto_wrap_policy=sys.argv[2], cpu_ram_efficient_loading=False)
        sharded = fsdp2_prepare_model(accelerator, wrapper)
        result[name] = [n for n in layer_names if isinstance(sharded.get_submodule(n), FSDPModule)]
        result[name + "/layers"] = layer_names
        if name == "PairLogps":
            chosen, rejected = sharded(*batch)
            (chosen - rejected).sum().backward()
            result["sharded"] = [chosen.tolist(), rejected.tolist()]
    if accelerator.is_main_process:
        with open(sys.argv[1] + "/result.json", "w") as f:
            json.dump(result, f)
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_shards_each_decoder_layer_and_computes_the_whole_models_values(tmp_path):
    """Accelerate's own FSDP 2 preparation (`fsdp2_prepare_model`, the shipped config's policy) on 2
    gloo processes: every decoder layer of each wrapper is an FSDP unit, and PairLogps's two-pass
    forward (prompt, then responses on its cache) gives the unsharded model's log-probs, backward too."""
    import json

    from helpers import run_process

    policy = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]["fsdp_auto_wrap_policy"].lower()
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP_SCRIPT)
    run_process([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(_port()), str(script), str(tmp_path), policy],
                env={**_env(), "ACCELERATE_USE_CPU": "1"}, timeout=300, check=True)
    result = json.loads((tmp_path / "result.json").read_text())
    for name, count in (("PairLogps", 2), ("TokenScorer", 2), ("PolicyAndValue", 4)):
        assert len(result[name + "/layers"]) == count and result[name] == result[name + "/layers"], name
    torch.testing.assert_close(torch.tensor(result["sharded"]), torch.tensor(result["whole"]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# DeepSpeed: the plugin Accelerate builds from the shipped config, fitted by prefgym


def _launch_env(config: Path) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch --config_file CONFIG` gives each process
    (Accelerate's own launcher functions; nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--mixed_precision", "no", "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.fixture
def zero2_env(monkeypatch):
    for key, value in _launch_env(CONFIGS / "deepspeed_zero2.yaml").items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def _configs():
    from prefgym.methods import dpo, ppo, reward_model, rloo, sft

    return {"sft": sft.SFTConfig(per_device_batch_size=3, grad_accum=2, max_grad_norm=0.5),
            "reward-model": reward_model.RewardModelConfig(per_device_batch_size=5),
            "dpo": dpo.DPOConfig(per_device_batch_size=6, grad_accum=4),
            "ppo": ppo.PPOConfig(per_device_rollout_batch_size=16, num_mini_batches=4),
            "rloo": rloo.RLOOConfig(per_device_prompts=3, k=4, num_mini_batches=2)}


def test_shipped_deepspeed_config_leaves_batch_fields_to_prefgym(zero2_env):
    """Without prefgym's filling, Accelerate's `prepare` raises: the audit's failure, reproduced at its condition."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()  # what Accelerate builds from the launch environment
    assert plugin.zero_stage == 2 and plugin.is_auto("train_micro_batch_size_per_gpu")


def _start_tracking(cfg):
    """`fields.start_tracking` as a loop calls it, on an Accelerator whose state holds the plugin
    Accelerate builds from the launch environment; returns that plugin."""
    import types

    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin), log_with=[])
    fields.start_tracking(accelerator, cfg, "test")
    return plugin


@pytest.mark.parametrize("name, micro, clip", [("sft", 3, 0.5), ("reward-model", 5, 0.0), ("dpo", 6, 0.0),
                                                ("ppo", 4, 1.0), ("rloo", 6, 1.0)])
def test_start_tracking_fits_each_methods_micro_batch_and_clipping_to_deepspeed(zero2_env, name, micro, clip):
    plugin = _start_tracking(_configs()[name])
    config = plugin.deepspeed_config
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")  # the condition of Accelerate's ValueError
    assert config["train_micro_batch_size_per_gpu"] == micro
    assert config["gradient_clipping"] == clip  # the loop's max_grad_norm; 0 (none) where the loop does not clip
    assert config["gradient_accumulation_steps"] == 1 and config["train_batch_size"] == "auto"


def test_a_later_training_of_the_launch_refits_the_plugin_and_keeps_what_the_user_set(zero2_env):
    from accelerate.utils import DeepSpeedPlugin

    plugin = fields.fit_deepspeed_config(DeepSpeedPlugin(), _configs()["dpo"])
    plugin.deepspeed_config["train_batch_size"] = 12  # what Accelerate's prepare writes back
    fields.fit_deepspeed_config(plugin, _configs()["sft"])
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    assert plugin.deepspeed_config["train_batch_size"] == "auto" and plugin.deepspeed_config["gradient_clipping"] == 0.5
    mine = DeepSpeedPlugin()
    mine.deepspeed_config.update(train_micro_batch_size_per_gpu=7, gradient_clipping=2.0)
    fields.fit_deepspeed_config(mine, _configs()["dpo"])
    assert mine.deepspeed_config["train_micro_batch_size_per_gpu"] == 7 and mine.deepspeed_config["gradient_clipping"] == 2.0


def test_deepspeed_gradient_accumulation_is_refused_with_a_message(zero2_env):
    zero2_env.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 4; set it to 1"):
        _start_tracking(_configs()["dpo"])


def test_a_deepspeed_scheduler_section_is_refused_with_a_message(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config={
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}})
    with pytest.raises(ConfigError, match=r"DeepSpeed config has a 'scheduler' section \(WarmupLR\); remove it"):
        fields.fit_deepspeed_config(plugin, _configs()["dpo"])
    del plugin.deepspeed_config["scheduler"]
    assert fields.fit_deepspeed_config(plugin, _configs()["dpo"]).deepspeed_config["train_micro_batch_size_per_gpu"] == 6


def test_shipped_zero3_config_gathers_the_weights_to_save_and_one_that_does_not_is_refused(monkeypatch):
    for key, value in _launch_env(CONFIGS / "deepspeed_zero3.yaml").items():
        monkeypatch.setenv(key, value)
    plugin = _start_tracking(_configs()["ppo"])
    assert plugin.zero_stage == 3 and plugin.zero3_init_flag
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")
    with pytest.raises(ConfigError, match="ZeRO stage 3: zero_optimization.stage3_gather_16bit_weights_on_model_save "
                                          "is False; set it to true"):
        _start_tracking(_configs()["ppo"])


def _user_zero3_plugin():
    """A plugin from a user's DeepSpeed config that leaves the bucket sizes to Accelerate ("auto")."""
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config={
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 1000,
                              "stage3_param_persistence_threshold": "auto",
                              "stage3_gather_16bit_weights_on_model_save": True}})


def test_each_training_of_a_launch_gets_the_bucket_sizes_of_its_own_model(monkeypatch, tmp_path):
    """A DeepSpeed config file may leave the bucket sizes to "auto" (HF's ZeRO-3 template does);
    Accelerate sizes them from the prepared module's `config`, which prefgym's wrappers lack, so
    prefgym sizes them from the model folder's hidden size h, as Accelerate would (h², 0.9·h², 10·h).
    The plugin is shared by the trainings of a launch (an ensemble's members, a pipeline's stages):
    each gets its own model's sizes, not the first one's; a value the user set is kept."""
    from transformers import LlamaConfig

    from prefgym.methods import reward_model, sft

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    plugin = _user_zero3_plugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    for h in (4, 8):
        LlamaConfig(hidden_size=h, intermediate_size=2 * h, num_attention_heads=2).save_pretrained(tmp_path / f"h{h}")
    for cfg, h in ((sft.SFTConfig(model_name_or_path=str(tmp_path / "h4")), 4),
                   (reward_model.RewardModelConfig(model_name_or_path=str(tmp_path / "h8")), 8)):
        fields.fit_deepspeed_config(plugin, cfg)
        assert zero["reduce_bucket_size"] == h * h and zero["stage3_param_persistence_threshold"] == 10 * h
        assert zero["stage3_prefetch_bucket_size"] == 1000
        plugin.deepspeed_config_process(must_match=False, train_batch_size=6)  # what `prepare` fills: nothing left
    with pytest.raises(ConfigError, match="left to auto are sized from the model's hidden size, but '.*missing'"):
        fields.fit_deepspeed_config(_user_zero3_plugin(), sft.SFTConfig(model_name_or_path=str(tmp_path / "missing")))


def test_zero3_helpers_leave_unpartitioned_models_as_they_are_and_read_a_partitions_full_shape():
    """Without ZeRO-3 (no `ds_id` on the parameters) `gathered` changes nothing; with it, a
    parameter's dimensions (SFT's weight-decay split) come from its full shape, `ds_shape`."""
    from prefgym.methods import zero3

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    assert not zero3.is_partitioned(model)
    with zero3.gathered(model):
        assert model[0].weight.shape == (2, 3)
    assert [zero3.full_ndim(p) for p in model.parameters()] == [2, 1, 1, 1]
    for p in model.parameters():  # what zero.Init leaves: a 1-d shard, the full shape in ds_shape
        p.ds_id, p.ds_shape, p.data = id(p), p.shape, torch.empty(0)
    assert zero3.is_partitioned(model) and [zero3.full_ndim(p) for p in model.parameters()] == [2, 1, 1, 1]


@pytest.mark.parametrize("config, dtype", [
    ({}, None), ({"bf16": {"enabled": True}}, torch.bfloat16), ({"bf16": {"enabled": "true"}}, torch.bfloat16),
    ({"bfloat16": {"enabled": True}}, torch.bfloat16), ({"fp16": {"enabled": True, "auto_cast": True}}, torch.float16),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, torch.float16), ({"bf16": {"enabled": "auto"}}, None),
    ({"bf16": {"enabled": False}, "fp16": {"enabled": "false"}}, None)])
def test_the_engine_dtype_is_read_from_the_deepspeed_config_as_deepspeed_reads_it(config, dtype):
    """fp16 before bf16 (the engine's order), `bfloat16` as bf16's old key, "true" as Accelerate writes it."""
    from prefgym.methods import zero3

    assert zero3.config_dtype(config) == dtype


def _fake_state(monkeypatch, plugin) -> None:
    """An initialised Accelerate state holding `plugin` (None: not DeepSpeed), for `zero3.engine_dtype`."""
    import types

    import accelerate.state

    monkeypatch.setattr(accelerate.state, "is_initialized", lambda: True)
    monkeypatch.setattr(accelerate.state, "AcceleratorState", lambda: types.SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("mixed, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("no", None)])
def test_the_engine_dtype_follows_the_launchers_mixed_precision_under_deepspeed_only(zero2_env, mixed, dtype):
    """The plugin as Accelerate fills it from `--mixed_precision` (`set_mixed_precision`); no state or
    a state without DeepSpeed: None."""
    import accelerate.state
    from accelerate.utils import DeepSpeedPlugin

    from prefgym.methods import zero3

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(accelerate.state, "is_initialized", lambda: False)
        assert zero3.engine_dtype() is None
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(mixed)
    _fake_state(zero2_env, plugin)
    assert zero3.engine_dtype() == dtype
    _fake_state(zero2_env, None)
    assert zero3.engine_dtype() is None


def test_cast_parameters_casts_floating_parameters_only_as_deepspeeds_engine_does():
    """Buffers (rotary `inv_freq`) stay float32, ZeRO-3 partitions and integer parameters as they are."""
    from prefgym.methods import zero3

    model = _tiny("llama")
    model.register_parameter("counts", torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False))
    shard = model.lm_head.weight
    shard.ds_id = 0  # what zero.Init leaves (already in the engine's dtype)
    kept = shard.detach().clone()
    buffers = dict(model.named_buffers())
    assert any("inv_freq" in name for name in buffers)
    zero3.cast_parameters(model, torch.bfloat16)
    for name, p in model.named_parameters():
        want = torch.long if name == "counts" else torch.float32 if p is shard else torch.bfloat16
        assert p.dtype == want, name
    assert torch.equal(shard, kept)
    assert all(b.dtype == torch.float32 and b is buffers[n] for n, b in model.named_buffers())


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trained"])
def test_under_deepspeed_bf16_every_model_loads_with_the_engines_parameter_dtype(zero2_env, tmp_path, trainable):
    """`load_policy` / `load_score_model` (the reference, the reward models; the trained model, which
    DPO's and KTO's reference pre-pass reads before `prepare`): bf16 parameters, float32 buffers,
    the float32 weights rounded once; without DeepSpeed float32 as loaded."""
    from accelerate.utils import DeepSpeedPlugin

    from prefgym.methods.fields import ModelFields
    from prefgym.models.loading import load_policy, load_score_model
    from prefgym.models.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "policy", "llama")
    plain = load_policy(folder, ModelFields(), trainable=trainable)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")
    _fake_state(zero2_env, plugin)
    for load in (load_policy, load_score_model):
        model = load(folder, ModelFields(), trainable=trainable)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, load.__name__
        assert {b.dtype for b in model.buffers()} == {torch.float32}, load.__name__
    want = {k: v.to(torch.bfloat16) for k, v in plain.state_dict().items() if v.is_floating_point()}
    got = load_policy(folder, ModelFields(), trainable=trainable).state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if k in dict(plain.named_parameters()))


def test_no_sync_unless_ends_an_accumulation_only_on_the_last_micro_batch_under_deepspeed():
    """DeepSpeed's engine steps inside `accelerator.backward` whenever sync_gradients is set."""
    import types

    from accelerate.state import GradientState
    from accelerate.utils import DistributedType

    from prefgym.methods.common import no_sync_unless

    state = GradientState()
    acc = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, gradient_state=state,
                                no_sync=lambda model: __import__("contextlib").nullcontext())
    seen = []
    for micro in range(3):
        with no_sync_unless(acc, None, micro == 2):
            seen.append(state.sync_gradients)
    assert seen == [False, False, True] and state.sync_gradients is True
    with pytest.raises(RuntimeError), no_sync_unless(acc, None, False):
        raise RuntimeError("a failed micro-batch")
    assert state.sync_gradients is True  # restored whatever happens


# ---------------------------------------------------------------------------------------------
# Real DeepSpeed (ZeRO-2, one CPU process): every training loop trains what it trains without it

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed")

METHOD_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from prefgym.io import write_jsonl
    from prefgym.methods import dpo, kto, ppo, quark, reward_model, rloo, grpo, simpo
    from prefgym.methods.sft import SFTConfig, train_sft
    from test_archs import DEMOS, PAIRS, PROMPTS
    from prefgym.methods import common
    from prefgym.models import generation
    whole = []  # per rollout: were the sampling model's weights all there (not ZeRO-3 partitions)?
    def spied(sample):
        def sample_and_note(model, *args, **kwargs):
            whole.append(all(p.numel() > 0 for p in model.parameters()))
            return sample(model, *args, **kwargs)
        return sample_and_note
    common.sample_responses = spied(common.sample_responses)
    generation.generate_with_eos = spied(generation.generate_with_eos)  # Quark's sampler
    method, root, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    method, lora = method.removesuffix("-lora"), dict(use_lora=method.endswith("-lora"))  # "ppo-lora": LoRA
    method, reference = method.removesuffix("-reference"), method.endswith("-reference")  # "dpo-reference"
    ckpt = dict(save_steps=int(os.environ["SAVE_STEPS"])) if "SAVE_STEPS" in os.environ else dict()
    policy, rm, pairs, prompts = str(root / "policy"), str(root / "rm"), str(root / "pairs.jsonl"), str(root / "prompts.jsonl")
    batch = int(os.environ.get("PER_DEVICE_BATCH_SIZE", "2"))
    # warmup_steps: the hand-stepped schedule must reach the optimizer DeepSpeed steps
    pref = dict(model_name_or_path=policy, preference_file=pairs, per_device_batch_size=batch, grad_accum=2, epochs=1,
                lr=1e-2, max_length=64, output_dir=out, warmup_steps=3, **lora)
    rl = dict(policy_model=policy, reward_model=rm, prompt_file=prompts, steps=2, lr=1e-2, max_new_tokens=4,
              max_prompt_length=48, missing_eos_penalty=None, output_dir=out, **lora, **ckpt)
    if method == "sft":
        train_sft(SFTConfig(model_name_or_path=policy, output_dir=out, max_steps=2, per_device_batch_size=2,
                            grad_accum=2, lr=1e-2, weight_decay=0.1, progress=False, max_length=64, **lora, **ckpt),
                  records=DEMOS)
    elif method == "reward-conditioning":  # SFT on control-token pairs, the embeddings grown first
        from prefgym.methods import reward_conditioning as rc
        rc.train(rc.RewardConditioningConfig(model_name_or_path=policy, preference_file=pairs, output_dir=out,
                 max_steps=2, per_device_batch_size=2, lr=1e-2, progress=False, max_length=64))
    elif method == "reward-model":
        reward_model.train(reward_model.RewardModelConfig(eval_fraction=0.0, **pref))
    elif method == "reward-model-ensemble":  # two trainings in one launch: the second refits the plugin
        reward_model.train_ensemble(reward_model.RewardModelConfig(eval_fraction=0.25, ensemble_size=2, **pref))
    elif method in ("dpo", "simpo", "kto"):
        module = dict(dpo=dpo, simpo=simpo, kto=kto)[method]
        extra = dict(reference_model=policy) if reference else dict()  # a frozen reference, loaded whole
        module.train(dict(dpo=dpo.DPOConfig, simpo=simpo.SimPOConfig, kto=kto.KTOConfig)[method](**pref, **extra))
    elif method == "ppo":
        ppo.train(ppo.PPOConfig(per_device_rollout_batch_size=4, num_mini_batches=2, **rl))
    elif method in ("rloo", "grpo"):
        module = dict(rloo=rloo, grpo=grpo)[method]
        module.train(dict(rloo=rloo.RLOOConfig, grpo=grpo.GRPOConfig)[method](per_device_prompts=2, k=2, **rl))
    elif method == "online-dpo":  # on the tiny world: its annotator pool labels the pairs
        from prefgym.io import read_records
        from prefgym.methods import online_dpo
        world = root / "world"
        online_dpo.train(online_dpo.OnlineDPOConfig(
            policy_model=str(world / "base_model"), output_dir=out, rounds=2, pairs_per_round=4, steps_per_round=2,
            per_device_batch_size=2, max_new_tokens=4, max_prompt_length=64, max_length=96, lr=1e-2, seed=3),
            read_records(world / "data" / "preference.json")[:8])
    elif method == "quark":
        quark.train(quark.QuarkConfig(policy_model=policy, reward_model=rm, prompts_file=prompts, output_dir=out,
                    num_quantiles=2, iterations=1, rollout_batch_size=4, steps_per_iteration=2,
                    per_device_batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, max_new_tokens=4,
                    progress=False, max_length=64))
    import json
    json.dump(whole, open(out + "/sampled_on_whole_weights.json", "w"))
""")

DS_METHODS = ["sft", "reward-model", "reward-model-ensemble", "dpo", "simpo", "kto", "ppo", "rloo", "grpo", "quark",
              "online-dpo"]


@pytest.fixture(scope="module")
def ds_root(tmp_path_factory, tiny_world):
    from test_archs import make_arch_folder

    root = tmp_path_factory.mktemp("deepspeed")
    make_arch_folder(root, "llama")
    (root / "world").symlink_to(tiny_world)
    (root / "run_method.py").write_text(METHOD_SCRIPT.format(tests=os.path.dirname(__file__)))
    return root


# The shipped deepspeed_zero3.yaml as a DeepSpeed config file, but for two values: with the tiny test
# models DeepSpeed would keep every weight gathered (each is under stage3_param_persistence_threshold),
# so it is 0 here: every layer gathered for its forward and freed after, as a real model's large
# ones are; and the bucket sizes left to "auto", which prefgym sizes (fields.fit_deepspeed_config).
ZERO3_STRICT = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": 1,
                "gradient_clipping": "auto",
                "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                      "stage3_param_persistence_threshold": 0, "reduce_bucket_size": "auto",
                                      "stage3_prefetch_bucket_size": "auto"}}


@pytest.fixture(scope="module")
def zero3_strict(tmp_path_factory) -> Path:
    """An Accelerate config: the shipped deepspeed_zero3.yaml pointing at ZERO3_STRICT."""
    import json

    folder = tmp_path_factory.mktemp("zero3-strict")
    (folder / "ds.json").write_text(json.dumps(ZERO3_STRICT))
    config = yaml.safe_load((CONFIGS / "deepspeed_zero3.yaml").read_text())
    assert config["deepspeed_config"]["zero3_init_flag"] and config["deepspeed_config"]["zero3_save_16bit_model"]
    config["deepspeed_config"] = {"deepspeed_config_file": str(folder / "ds.json"), "zero3_init_flag": True}
    del config["mixed_precision"]  # a config file's own (the command line's "no" here)
    (folder / "accelerate.yaml").write_text(yaml.safe_dump(config))
    return folder / "accelerate.yaml"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("method, stage", [(m, 2) for m in DS_METHODS] +
                         [(m, 3) for m in DS_METHODS + ["sft-lora", "dpo-lora", "ppo-lora", "reward-conditioning"]])
def test_every_training_command_under_deepspeed_zero_trains_the_model_it_trains_without(ds_root, zero3_strict,
                                                                                        tmp_path, method, stage):
    """One process under the shipped ZeRO-2 config (ZeRO-3: `zero3_strict`) against plain Python: the
    same weights (grad_accum 2 where the method has it, so a step per micro-batch, or a clipping the
    loop does not do, shows). ZeRO-3: the trained model loads partitioned, the frozen ones whole,
    rollouts sample on gathered weights and the save gathers them (full-shaped, the plain run's values)."""
    from safetensors.torch import load_file

    from helpers import run_process

    script = str(ds_root / "run_method.py")
    run_process([sys.executable, script, method, str(ds_root), str(tmp_path / "plain")], env=_env(), check=True)
    config = zero3_strict if stage == 3 else CONFIGS / "deepspeed_zero2.yaml"
    run_process([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(config), "--num_processes", "1", "--mixed_precision", "no",
                 "--main_process_port", str(_port()), script, method, str(ds_root), str(tmp_path / "ds")],
                env=_env(), timeout=600, check=True)
    if method.removesuffix("-lora") in ("ppo", "rloo", "grpo", "quark", "online-dpo"):
        import json

        whole = json.loads((tmp_path / "ds" / "sampled_on_whole_weights.json").read_text())
        assert whole and all(whole), whole  # ZeRO-3: every rollout sampled on the gathered policy
    weights = "member-1/model.safetensors" if method == "reward-model-ensemble" else "model.safetensors"
    plain, ds = load_file(str(tmp_path / "plain" / weights)), load_file(str(tmp_path / "ds" / weights))
    start = load_file(str(ds_root / ("world/base_model" if method == "online-dpo" else "policy") / "model.safetensors"))
    assert any(not torch.equal(plain[k], start[k]) for k in start if k in plain)  # training moved the weights
    assert sorted(ds) == sorted(plain)
    # ZeRO-3 computes on gathered copies of the weights, so the last bits of a gradient may differ,
    # and where a gradient is near Adam's eps such a difference moves an update by a few per cent of
    # lr (1e-2): a fresh reward model's trunk (small score head), measured 5e-4; a dozen of the
    # reward-conditioned model's 3e4 weights, measured 1.8e-3 (its losses agree to 1e-6).
    atol = {"reward-model": 1e-3, "reward-model-ensemble": 1e-3, "reward-conditioning": 5e-3}.get(method, 1e-5)
    atol = atol if stage == 3 else 1e-5
    for k in plain:
        torch.testing.assert_close(ds[k], plain[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{method} {k}: {m}")


def _ds_launch(config: Path, script: str, *args: str) -> list[str]:
    """`accelerate launch` of `script` on one process (float32) under the Accelerate `config`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
            "--mixed_precision", "no", "--main_process_port", str(_port()), script, *args]


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "ppo"])
def test_a_zero3_training_killed_after_a_checkpoint_resumes_to_the_model_it_trains_uninterrupted(ds_root, tmp_path,
                                                                                                 method):
    """DeepSpeed's own checkpoint of the partitioned model and optimizer (Accelerate's save_state),
    SFT's hand-stepped scheduler and PPO's KL coefficient with it: killed after step 1, resumed, step
    1's logged row kept (its timing too: not trained again) and the plain run's weights."""
    from safetensors.torch import load_file

    from helpers import run_process
    from prefgym.methods.sft import CRASH_AFTER_STEP_ENV

    script, out = str(ds_root / "run_method.py"), tmp_path / "ds"
    run_process([sys.executable, script, method, str(ds_root), str(tmp_path / "plain")], env=_env(), check=True)
    env = {**_env(), "SAVE_STEPS": "1"}
    zero3 = CONFIGS / "deepspeed_zero3.yaml"
    killed = run_process(_ds_launch(zero3, script, method, str(ds_root), str(out)),
                         env={**env, CRASH_AFTER_STEP_ENV: "1"}, timeout=600)
    assert killed.returncode != 0 and list(out.glob("checkpoint*")) and not (out / "model.safetensors").exists()
    before = (out / "metrics.jsonl").read_text().splitlines()
    run_process(_ds_launch(zero3, script, method, str(ds_root), str(out)), env=env, timeout=600, check=True)
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert len(before) == 1 and after[:1] == before and len(after) == 2
    plain, ds = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(ds) == sorted(plain)
    for k in plain:
        torch.testing.assert_close(ds[k], plain[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{method} {k}: {m}")


ZERO3_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from accelerate import Accelerator
    from prefgym.methods import common, fields, zero3
    from prefgym.methods.sft import SFTConfig
    from prefgym.models.loading import load_policy
    folder, out = sys.argv[1], sys.argv[2]
    accelerator = Accelerator()
    cfg = SFTConfig(model_name_or_path=folder, per_device_batch_size=2)
    fields.start_tracking(accelerator, cfg, "zero3")
    tokenizer = common.load_tokenizer(folder)
    policy, frozen = load_policy(folder, cfg), load_policy(folder, cfg, trainable=False)
    numel = lambda m: sum(p.numel() for p in m.parameters())
    r = {"full": sum(p.ds_numel for p in policy.parameters()), "policy": numel(policy), "frozen": numel(frozen)}
    model, optimizer = accelerator.prepare(policy, torch.optim.AdamW(policy.parameters(), lr=1e-2))
    rank = accelerator.process_index  # each process its own prompts: responses of different lengths
    prompts = [["Say hi", "Tell me a long story about a dog"], ["Name a colour", "Why?"]][rank]
    kw = dict(seeds=[rank, 7], temperature=1.0, max_new_tokens=8, max_prompt_length=32)
    with zero3.gathered(model):
        r["inside"] = numel(model)
        got = common.sample_responses(accelerator.unwrap_model(model), tokenizer, prompts, **kw)
        r["after_generate"] = numel(model)  # the hooks lifted: nothing freed after each layer
    r["outside"] = numel(model)
    want = common.sample_responses(frozen, tokenizer, prompts, **kw)  # the whole model's samples
    r["same_samples"] = all(torch.equal(a, b) for a, b in zip(got, want))
    ids = torch.cat(got[:2], 0)[:, :4]
    loss = model(input_ids=ids, labels=ids).loss  # a training step after: the hooks are back
    accelerator.backward(loss)
    optimizer.step()
    with zero3.gathered(model):
        r["trained"] = any(not torch.equal(p, q) for p, q in zip(model.parameters(), frozen.parameters()))
    json.dump(r, open(f"{out}/rank{rank}.json", "w"))
""")


@needs_deepspeed
@pytest.mark.slow
def test_under_zero3_the_trained_model_loads_partitioned_the_frozen_whole_and_rollouts_sample_on_gathered_weights(
        ds_root, zero3_strict, tmp_path):
    """The pieces the loops use: `load_policy` partitions the trained model (zero.Init) and loads a
    frozen one whole; inside `zero3.gathered(engine)` the weights are whole and stay whole through
    generation (DeepSpeed's per-layer hooks lifted), the samples are the whole model's; after it the
    weights are partitioned again and a training step runs (`zero3_strict`: DeepSpeed frees each
    layer's weights after its forward unless its hooks are lifted)."""
    import json

    from helpers import run_process

    script = tmp_path / "zero3.py"
    script.write_text(ZERO3_SCRIPT)
    run_process(_ds_launch(zero3_strict, str(script), str(ds_root / "policy"), str(tmp_path)), env=_env(), timeout=300,
                check=True)
    r = json.loads((tmp_path / "rank0.json").read_text())
    assert r["full"] > 0 and r["policy"] == 0 and r["frozen"] == r["full"]
    assert r["inside"] == r["after_generate"] == r["full"] and r["outside"] == 0
    assert r["same_samples"] and r["trained"]


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage, method", [(2, "dpo"), (2, "ppo"), (2, "rloo"), (3, "dpo-reference"), (3, "ppo"),
                                           (3, "ppo-lora")])
def test_under_deepspeed_bf16_the_frozen_models_compute_as_the_engine_so_step_1_is_exactly_the_reference(
        ds_root, zero3_strict, tmp_path, stage, method):
    """`--mixed_precision bf16`: DeepSpeed trains bf16 parameters (its `autocast` is a no-op), so the
    reference, the reward model and DPO's pre-pass on the policy load with bf16 parameters too
    (`zero3.to_engine_dtype`): DPO's step-1 implicit rewards (the policy as its own reference, or a
    `reference_model`) and PPO's / RLOO's step-1 KL are exactly 0 (float32 references gave ~1e-4).
    PPO with LoRA under ZeRO-3: its adapters and value head in bf16 too (`prepare` there casts
    nothing and refuses trainable partitions of two dtypes)."""
    import json

    from helpers import run_process

    config = zero3_strict if stage == 3 else CONFIGS / "deepspeed_zero2.yaml"
    launch = _ds_launch(config, str(ds_root / "run_method.py"), method, str(ds_root), str(tmp_path))
    launch[launch.index("--mixed_precision") + 1] = "bf16"
    # DPO: one pair per micro-batch, so the training forward pads each pair as the reference pre-pass
    # did (pairs batched with other partners are padded otherwise: last-bit differences, 1e-6 in fp32)
    run_process(launch, env={**_env(), "PER_DEVICE_BATCH_SIZE": "1"}, timeout=600, check=True)
    step1 = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    keys = {"dpo": ["rewards/chosen", "rewards/rejected"], "ppo": ["kl", "kl_k3"], "rloo": ["kl"]}[method.split("-")[0]]
    assert step1["step"] == 1 and {k: step1[k] for k in keys} == dict.fromkeys(keys, 0.0), step1


# ---------------------------------------------------------------------------------------------
# Saving under FSDP: the full weights gathered on every process, written by the main one

FSDP_METHOD_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import yaml
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    # Accelerate makes FSDP only on GPUs: on 2 gloo processes the state is set to FSDP 2 with the
    # shipped config's plugin fields, so the loops' own `prepare` and saves run Accelerate's FSDP 2 code.
    shipped = yaml.safe_load(open({config!r}))["fsdp_config"]
    _init = AcceleratorState.__init__
    def _fsdp_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if getattr(self, "fsdp_plugin", None) is None:
                self.fsdp_plugin = FullyShardedDataParallelPlugin(
                    fsdp_version=shipped["fsdp_version"], auto_wrap_policy=shipped["fsdp_auto_wrap_policy"].lower(),
                    state_dict_type=shipped["fsdp_state_dict_type"], cpu_ram_efficient_loading=False)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        AcceleratorState.__init__ = _fsdp_init

    sys.path.insert(0, {tests!r})
    from prefgym.methods import dpo
    from prefgym.methods.sft import SFTConfig, train_sft
    from test_archs import DEMOS
    method, root, out, lora = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "lora"
    accum = 2 // int(os.environ.get("WORLD_SIZE", "1"))  # one global batch of 4 whatever the processes
    if method == "sft":  # a checkpoint after each step (all but the last)
        train_sft(SFTConfig(model_name_or_path=str(root / "policy"), output_dir=out, max_steps=3, save_steps=1,
                            per_device_batch_size=2, grad_accum=accum, lr=1e-2, progress=False, max_length=64,
                            use_lora=lora), records=DEMOS)
    else:
        dpo.train(dpo.DPOConfig(model_name_or_path=str(root / "policy"), preference_file=str(root / "pairs.jsonl"),
                                per_device_batch_size=2, grad_accum=accum, epochs=1, lr=1e-2, max_length=64,
                                output_dir=out, use_lora=lora))
""")


@pytest.fixture(scope="module")
def fsdp_root(tmp_path_factory):
    from prefgym.io import write_jsonl
    from prefgym.models.tiny import make_tiny_checkpoint
    from test_archs import PAIRS

    root = tmp_path_factory.mktemp("fsdp-save")
    make_tiny_checkpoint(root / "policy", "llama")
    write_jsonl(root / "pairs.jsonl", PAIRS)
    (root / "run_method.py").write_text(FSDP_METHOD_SCRIPT.format(config=str(CONFIGS / "fsdp.yaml"),
                                                                  tests=os.path.dirname(__file__)))
    return root


def _assert_same_folder(got: Path, want: Path, start: Path) -> None:
    """The same weights (names, dtypes, values within float noise) and config; training moved them."""
    import json

    from safetensors.torch import load_file

    a, b, s = (load_file(str(p / "model.safetensors")) for p in (got, want, start))
    assert sorted(a) == sorted(b)
    assert any(not torch.equal(b[k], s[k]) for k in s if k in b)
    for k in b:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert json.loads((got / "config.json").read_text()) == json.loads((want / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method, lora", [("dpo", "full"), ("dpo", "lora"), ("sft", "full")])
def test_a_training_under_fsdp2_on_two_processes_saves_the_model_one_process_saves(fsdp_root, tmp_path, method, lora):
    """The final save gathers the sharded weights (LoRA: merged in float32 on the main process); SFT
    also checkpoints under FSDP after each step, is killed after step 2 and resumes from there."""
    from helpers import run_process

    script = str(fsdp_root / "run_method.py")
    run_process([sys.executable, script, method, str(fsdp_root), str(tmp_path / "one"), lora], env=_env(),
                timeout=300, check=True)
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           script, method, str(fsdp_root), str(tmp_path / "two"), lora]
    env = {**_env(), "ACCELERATE_USE_CPU": "1"}
    if method == "sft":
        from prefgym.methods.sft import CRASH_AFTER_STEP_ENV

        killed = run_process(two, env={**env, CRASH_AFTER_STEP_ENV: "2"}, timeout=300)
        assert killed.returncode != 0 and (tmp_path / "two" / "checkpoints" / "step_2" / "progress.json").exists()
        assert not (tmp_path / "two" / "model.safetensors").exists()
        before = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
        two[6] = str(_port())
    run_process(two, env=env, timeout=300, check=True)  # a save that waits on a process that never gathers times out
    _assert_same_folder(tmp_path / "two", tmp_path / "one", fsdp_root / "policy")
    if method == "sft":  # resumed: steps 1-2 as the killed run logged them (a restart re-times them), then step 3
        after = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
        assert len(before) == 2 and after[:2] == before and len(after) == 3


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_save_trained_without_fsdp_writes_the_bytes_save_model_writes(tmp_path, lora):
    """One process (also DDP, DeepSpeed ZeRO-2): the main process saves the unwrapped part as before."""
    import copy

    from accelerate import Accelerator

    from prefgym.methods.common import save_model, save_trained
    from prefgym.methods.dpo import PairLogps

    wrapper = PairLogps(_tiny("llama", lora=lora))
    expected = save_model(copy.deepcopy(wrapper.model), _tokenizer(), tmp_path / "save_model")
    accelerator = Accelerator(cpu=True)
    save_trained(accelerator, accelerator.prepare(wrapper), _tokenizer(), tmp_path / "save_trained", "model")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "save_trained" / name).read_bytes() == (expected / name).read_bytes(), name


def test_save_model_merges_given_full_lora_weights_on_a_copy_as_it_merges_a_model_holding_them(tmp_path):
    """What the main process does with the weights gathered under FSDP: the folder a model holding
    them would give (adapters merged in float32), the model itself left as it was, unmerged."""
    import copy

    from peft import PeftModel
    from safetensors.torch import load_file

    from prefgym.methods.common import save_model

    model = _tiny("llama", lora=True).to(torch.bfloat16)
    gathered = {k: torch.randn_like(v) if "lora_B" in k else v.clone() for k, v in model.state_dict().items()}
    holding = copy.deepcopy(model)
    holding.load_state_dict(gathered)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(model, _tokenizer(), tmp_path / "given", state_dict=gathered)
    save_model(holding, _tokenizer(), tmp_path / "held")
    assert (tmp_path / "given" / "model.safetensors").read_bytes() == (tmp_path / "held" / "model.safetensors").read_bytes()
    assert load_file(str(tmp_path / "given" / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.float32
    assert isinstance(model, PeftModel) and all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())
