"""LoRA on a bf16 base: the folder `save_model` writes, and the weights `full_weights` sends to the
vLLM engine, are the trained model. The trained model is peft's unmerged one (base output + x·A·B,
the adapters in fp32); merging its update into bf16 weights would round most of a small update away
(bf16 keeps 8 significant bits), so the merge happens in fp32 and the folder is fp32."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from prefgym.methods import common
from prefgym.models import vllm_engine
from prefgym.models.loading import load_generator, load_model_and_tokenizer, load_policy, load_tokenizer
from prefgym.models.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft on transformers 5

LORA = dict(use_lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
UPDATE_SCALE = 1e-4  # lora_B ~ N(0, 1e-4²): the update is below bf16's rounding step for most weights
Q = "model.layers.0.self_attn.q_proj.weight"


def lora_policy(base, dtype: str = "bfloat16", **peft_kwargs):
    """The base loaded as a training stage loads it (`load_policy` in `dtype`), wrapped by
    `apply_lora`, with a small random update in place of training (lora_B ~ N(0, UPDATE_SCALE²))."""
    cfg = SimpleNamespace(dtype=dtype, **LORA)
    policy = load_policy(base, cfg, trainable=False)
    if peft_kwargs:  # peft's own options (apply_lora takes none)
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), **peft_kwargs)
    else:
        policy = common.apply_lora(policy, cfg, "CAUSAL_LM")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, UPDATE_SCALE)
    return policy.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base folder, bf16-base LoRA policy, fixed batch of token ids, per-token log-probs of the
    trained model (unmerged, fp32 compute) and of the base (adapters off), saved folder)."""
    root = tmp_path_factory.mktemp("lora_merge")
    base = make_tiny_checkpoint(root / "base", "llama", hidden_size=64)
    policy = lora_policy(base)
    torch.manual_seed(2)
    ids = torch.randint(4, len(load_tokenizer(base)), (4, 24))
    trained = copy.deepcopy(policy).float()  # the trained model: peft's unmerged forward, in fp32
    logp_trained = logprobs(trained, ids)
    with trained.disable_adapter():
        logp_base = logprobs(trained, ids)
    folder = common.save_model(copy.deepcopy(policy), load_tokenizer(base), root / "saved")
    return base, policy, ids, logp_trained, logp_base, folder


def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) log p(token t | tokens < t), in fp32 whatever the model's dtype."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def lost_share(logp, logp_trained, logp_base) -> float:
    """|logp - trained| / |trained - base|: 0 when `logp` is the trained model's, ~1 when the update is gone."""
    return ((logp - logp_trained).norm() / (logp_trained - logp_base).norm()).item()


def test_premise_a_bf16_merge_rounds_most_of_the_update_away(setup):
    """The update is real (log-probs move far beyond fp32 noise), and rounding W + ΔW to bf16 (peft's
    merge on a bf16 base) leaves most weights unchanged and loses most of the update."""
    from peft.tuners.lora import LoraLayer

    _, policy, ids, logp_trained, logp_base, _ = setup
    assert (logp_trained - logp_base).abs().max() > 1e-3
    changed = total = 0
    for module in policy.modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight
            changed += ((w.float() + module.get_delta_weight("default")).to(w.dtype) != w).sum().item()
            total += w.numel()
    assert changed / total < 0.5
    rounded = copy.deepcopy(policy).merge_and_unload().float()  # peft's merge on the bf16 base
    assert lost_share(logprobs(rounded, ids), logp_trained, logp_base) > 0.5


@pytest.mark.parametrize("how", ["load_model_and_tokenizer", "load_policy float32", "load_generator hf",
                                 "transformers default (dtype auto)"])
def test_the_saved_folder_is_the_trained_model(setup, how):
    """Loaded back as prefgym's later stages load it (float32, their default) or as transformers
    does by default (the dtype the folder records), the folder's log-probs are the trained model's."""
    from transformers import AutoModelForCausalLM

    _, _, ids, logp_trained, logp_base, folder = setup
    model = {"load_model_and_tokenizer": lambda: load_model_and_tokenizer(folder)[0],
             "load_policy float32": lambda: load_policy(folder, SimpleNamespace(dtype="float32"), trainable=False),
             "load_generator hf": lambda: load_generator(folder, "hf")[0],
             "transformers default (dtype auto)": lambda: AutoModelForCausalLM.from_pretrained(folder)}[how]()
    assert model.dtype == torch.float32
    assert lost_share(logprobs(model.eval(), ids), logp_trained, logp_base) < 1e-3


def test_the_folder_is_float32_and_says_so(setup):
    """Every tensor is fp32 and config.json records float32 (what dtype "auto" loads read)."""
    *_, folder = setup
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_an_explicit_bf16_load_rounds_the_merged_weights_once(setup):
    """Loading the folder in bf16 is rounding by choice: each weight is the nearest bf16 of the fp32
    merge, W + ΔW (what peft's merge in bf16 gave), no worse."""
    _, policy, *_, folder = setup
    loaded = dict(load_model_and_tokenizer(folder, dtype="bfloat16")[0].named_parameters())
    layer = policy.get_base_model().model.layers[0].self_attn.q_proj
    merged = layer.get_base_layer().weight.float() + layer.get_delta_weight("default")
    assert loaded[Q].dtype == torch.bfloat16 and torch.equal(loaded[Q], merged.to(torch.bfloat16))


def test_a_model_without_adapters_keeps_its_dtype(tmp_path):
    """A full fine-tune in bf16 is saved as it is (bf16 holds its weights exactly): no fp32 copy."""
    base = make_tiny_checkpoint(tmp_path / "base", "llama", hidden_size=64)
    model = load_policy(base, SimpleNamespace(dtype="bfloat16"), trainable=False)
    folder = common.save_model(model, load_tokenizer(base), tmp_path / "saved")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@pytest.mark.parametrize("adapter_dtype", ["fp32", "bf16"])
def test_full_weights_of_a_bf16_base_are_merged_in_fp32(setup, adapter_dtype):
    """The engine gets each adapted weight as fp32 W + ΔW (whatever the adapters' dtype: peft keeps
    them fp32 by default, bf16 with autocast_adapter_dtype=False), the others as they are; a float32
    engine loading them (load_state_dict casts as vLLM's weight loaders do) is the trained model."""
    from transformers import AutoModelForCausalLM

    base, policy, ids, logp_trained, logp_base, _ = setup
    if adapter_dtype == "bf16":
        policy = lora_policy(base, autocast_adapter_dtype=False)
    weights = dict(vllm_engine.full_weights(policy))
    layer = policy.get_base_model().model.layers[0].self_attn.q_proj
    expected = layer.get_base_layer().weight.float() + layer.get_delta_weight("default").float()
    assert weights[Q].dtype == torch.float32 and torch.equal(weights[Q], expected)
    assert not any(w.requires_grad for w in weights.values())  # values, not a graph back to the adapters
    embed = policy.get_base_model().model.embed_tokens.weight
    assert torch.equal(weights["model.embed_tokens.weight"], embed)  # not adapted: as it is (bf16)
    if adapter_dtype == "fp32":
        engine = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        engine.load_state_dict(weights)
        assert lost_share(logprobs(engine, ids), logp_trained, logp_base) < 1e-3
