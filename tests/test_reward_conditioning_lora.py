"""Binary reward conditioning under LoRA: the control tokens' embedding rows train, and are saved.

LoRA adapts linear layers only; the `<good>` / `<bad>` rows added to the vocabulary start nearly
equal (mean resizing), so unless they train beside the adapters the model cannot tell the two
tokens apart. Tiny random models from local configs: Llama (separate output embeddings) and
Qwen2 (input and output embeddings tied, as SmolLM2's are).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prefgym.data.prompts import format_record
from prefgym.errors import ConfigError
from prefgym.methods import common, reward_conditioning as rc
from prefgym.models import load_model_and_tokenizer
from prefgym.models.tiny import make_tiny_checkpoint

WORDS = ["red", "blue", "cat", "dog", "sun", "tree", "one", "two"]
# The preferred answer is always "good", the other "bad": only the control token tells them apart.
PAIRS = [{"instruction": f"Say {w}.", "input": "", "output_1": "good" if i % 2 == 0 else "bad",
          "output_2": "bad" if i % 2 == 0 else "good", "preference": 1 + i % 2} for i, w in enumerate(WORDS)]
TRAIN = dict(epochs=30, lr=1e-2, per_device_batch_size=4, max_length=64, progress=False, save_steps=0)


def _response_logprob(model, tokenizer, token: str, instruction: str, response: str) -> float:
    """log p(response | Alpaca prompt with `token` before the instruction), by a full log-softmax."""
    prompt = tokenizer(format_record({"instruction": token + instruction}))["input_ids"]
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return logps[len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None]).sum().item()


def conditioning_margin(out) -> float:
    """Mean over instructions of how much more likely each answer is behind its own token:
    ½ [log p(good | <good>) − log p(good | <bad>) + log p(bad | <bad>) − log p(bad | <good>)]."""
    model, tokenizer = load_model_and_tokenizer(out)
    total = 0.0
    for w in WORDS:
        lp = lambda token, answer: _response_logprob(model, tokenizer, token, f"Say {w}.", answer)  # noqa: E731
        total += (lp("<good>", "good") - lp("<bad>", "good") + lp("<bad>", "bad") - lp("<good>", "bad")) / 2
    return total / len(WORDS)


def control_rows(out) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved input-embedding rows of <good> and <bad>."""
    model, tokenizer = load_model_and_tokenizer(out)
    good, bad = tokenizer.convert_tokens_to_ids(["<good>", "<bad>"])
    weight = model.get_input_embeddings().weight.detach()
    return weight[good], weight[bad]


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def train_rc(base, out, **changes):
    cfg = rc.RewardConditioningConfig(model_name_or_path=str(base), output_dir=str(out), **{**TRAIN, **changes})
    return rc.train(cfg, pairs=PAIRS)


def test_lora_learns_the_control_tokens_as_full_fine_tuning_does(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base", "llama")
    full = train_rc(base, tmp_path / "full", use_lora=False)
    lora = train_rc(base, tmp_path / "lora", use_lora=True)
    full_margin, lora_margin = conditioning_margin(full), conditioning_margin(lora)
    # Full fine-tuning learns to answer by the token (the reference magnitude) ...
    assert full_margin > 1.0, full_margin
    # ... and so does LoRA, to the same order of magnitude (measured: 1.19 against 3.35 nats; with
    # the rows left out of training, 4e-7).
    assert lora_margin > 0.1 * full_margin, (lora_margin, full_margin)
    # The rows started nearly equal (mean resizing: ~1e-3 apart) and moved apart in training.
    assert relative_distance(*control_rows(lora)) > 0.1


@pytest.mark.parametrize("dtype,checkpointing", [("float32", False), ("bfloat16", True)])
def test_tied_embeddings_train_the_rows_and_the_merged_folder_carries_them(tmp_path, monkeypatch, dtype,
                                                                           checkpointing):
    base = make_tiny_checkpoint(tmp_path / "base", "qwen2")  # tie_word_embeddings, as SmolLM2
    trained = {}
    save_model = common.save_model

    def spy(model, tokenizer, out_dir):  # the trained rows, read from the adapter before the merge
        adapter = getattr(model.get_base_model().get_input_embeddings(), "token_adapter", None)
        if adapter is not None:
            trained["ids"] = list(adapter.token_indices["default"])
            trained["rows"] = adapter.trainable_tokens_delta["default"].detach().clone()
        return save_model(model, tokenizer, out_dir)

    monkeypatch.setattr(common, "save_model", spy)
    out = train_rc(base, tmp_path / "lora", use_lora=True, dtype=dtype, gradient_checkpointing=checkpointing)

    assert trained, "under LoRA the control tokens' embedding rows were not trainable"
    tokenizer = load_model_and_tokenizer(out)[1]
    assert trained["ids"] == tokenizer.convert_tokens_to_ids(["<good>", "<bad>"])
    saved = load_file(str(out / "model.safetensors"))
    assert not [k for k in saved if "lora_" in k or "token_adapter" in k or "base_layer" in k]
    assert not (out / "adapter_config.json").exists()
    embed = saved["model.embed_tokens.weight"]
    # The trained rows as they are (fp32), in the folder's dtype: the merge copies them in.
    assert torch.equal(embed[trained["ids"]], trained["rows"].to(embed.dtype)), "saved rows are not the trained ones"
    embed = embed.float()
    assert relative_distance(embed[trained["ids"][0]], embed[trained["ids"][1]]) > 0.1
    # The output rows are the input rows (still tied after the merge), so generation sees them too.
    model, _ = load_model_and_tokenizer(out)
    assert model.config.tie_word_embeddings
    torch.testing.assert_close(model.get_output_embeddings().weight[trained["ids"]].detach(), embed[trained["ids"]])
    assert conditioning_margin(out) > 0.3


def test_the_starting_model_is_loaded_and_saved_in_the_configured_dtype(tmp_path, monkeypatch):
    base = make_tiny_checkpoint(tmp_path / "base", "llama")  # saved in float32
    seen = {}

    def fake_train_sft(cfg, records=None, trainable_tokens=()):
        init = cfg.model_name_or_path
        seen["dtypes"] = {t.dtype for t in load_file(f"{init}/model.safetensors").values() if t.is_floating_point()}
        seen["config_dtype"] = json.loads(open(f"{init}/config.json").read()).get("dtype")
        seen["trainable_tokens"] = tuple(trainable_tokens)
        return cfg.output_dir

    monkeypatch.setattr(rc, "train_sft", fake_train_sft)
    train_rc(base, tmp_path / "bf16", use_lora=True, dtype="bfloat16")
    assert seen == {"dtypes": {torch.bfloat16}, "config_dtype": "bfloat16", "trainable_tokens": ("<good>", "<bad>")}
    train_rc(base, tmp_path / "fp32", use_lora=True)  # the default dtype: float32
    assert seen["dtypes"] == {torch.float32}


def test_sft_names_a_trainable_token_the_tokenizer_lacks(tmp_path):
    from prefgym.methods.sft import SFTConfig, train_sft

    base = make_tiny_checkpoint(tmp_path / "base", "llama")
    cfg = SFTConfig(model_name_or_path=str(base), output_dir=str(tmp_path / "sft"), use_lora=True, progress=False)
    with pytest.raises(ConfigError, match="'<nope>' is not a token"):
        train_sft(cfg, records=[{"instruction": "Hi.", "output": "Hello."}], trainable_tokens=("<nope>",))
