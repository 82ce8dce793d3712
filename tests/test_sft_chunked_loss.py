"""SFT's loss, a time-slice of fp32 logits at a time, equals cross-entropy on the whole fp32 logits.

The reference is the expression SFT used before (`F.cross_entropy` on `logits[:, :-1].float()`),
written out here; values and every parameter's gradient are compared, in fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefgym.methods import common
from prefgym.methods.sft import _response_loss_sum
from prefgym.models import IGNORE_INDEX, collate

V = 11  # vocabulary: no other dimension of the tiny model is 11
PAD = 0
# (prompt, response) token ids: rows of different lengths, right-padded by `collate`; the last row's
# response was cut off entirely (a prompt as long as max_length), so it has no label at all.
ROWS = [([1, 3, 4], [5, 6, 2]), ([1, 7], [8, 9, 10, 3, 2]), ([1, 4, 4, 5, 6], [7, 2]), ([1, 9, 8, 7], [])]
START = 1  # the first position that predicts a label: the second row's, predicting its token 2


def tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=PAD, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def sft_batch() -> dict[str, torch.Tensor]:
    examples = [{"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r} for p, r in ROWS]
    return collate(examples, PAD)


def old_loss_sum(model, batch):
    """The expression `_response_loss_sum` replaced: cross-entropy on an fp32 (B, T - 1, V) copy."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def value_and_grads(loss_fn, model, batch):
    model.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(params=[None, 4 * V, 3 * 4 * V], ids=["default-chunk", "one-step-slices", "three-step-slices"])
def chunk(request, monkeypatch):
    """The default budget (one slice here) and budgets of one and three time steps of (B=4, V) logits."""
    if request.param is not None:
        monkeypatch.setattr(common, "LOGSOFTMAX_CHUNK_ELEMENTS", request.param)


# fp32: float rounding of a different summation order; bf16: one bf16 step (2^-7) of any gradient.
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-3, 8e-3)])
def test_loss_and_gradients_equal_cross_entropy_on_fp32_logits(chunk, dtype, atol, rtol):
    model, batch = tiny_llama(dtype), sft_batch()
    assert batch["labels"].shape == (4, 7) and (batch["attention_mask"] == 0).any()  # padded on the right
    want, want_grads = value_and_grads(old_loss_sum, model, batch)
    got, got_grads = value_and_grads(_response_loss_sum, model, batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name  # every parameter takes part, so the comparison means something
        torch.testing.assert_close(got_grads[name], grad, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_loss_is_the_nll_of_the_response_tokens_by_hand():
    """Independent of cross-entropy: each row alone, unpadded, log-softmax in fp64, summed over the response."""
    model = tiny_llama(torch.float32)
    want = 0.0
    with torch.no_grad():
        for prompt, response in ROWS:
            logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].double(), -1)
            want -= sum(logp[len(prompt) - 1 + k, token].item() for k, token in enumerate(response))
        got = _response_loss_sum(model, sft_batch()).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_lm_head_runs_only_from_the_first_position_that_predicts_a_label():
    model, batch = tiny_llama(torch.float32), sft_batch()
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    _response_loss_sum(model, batch)
    assert seen == [batch["input_ids"].shape[1] - START]


def test_a_batch_without_labels_has_loss_zero_and_backward_runs():
    """Only rows without a label: the loss is 0 (as cross-entropy's sum over nothing) and backward runs."""
    model = tiny_llama(torch.float32)
    batch = collate([{"input_ids": [1, 3, 4], "labels": [IGNORE_INDEX] * 3}], PAD)
    loss = _response_loss_sum(model, batch)
    loss.backward()
    assert loss.item() == 0 == old_loss_sum(model, batch).item()


def test_no_fp32_copy_of_all_logits_is_made(monkeypatch):
    """bf16 model, a budget of one time step: no fp32 conversion of more than one slice of logits."""
    monkeypatch.setattr(common, "LOGSOFTMAX_CHUNK_ELEMENTS", 4 * V)
    model, batch = tiny_llama(torch.bfloat16), sft_batch()
    converted = []
    real_float = torch.Tensor.float

    def spy(self, *args, **kwargs):
        if self.shape[-1:] == (V,):
            converted.append(self.numel())
        return real_float(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", spy)
    _response_loss_sum(model, batch).backward()
    assert converted and max(converted) <= 4 * V


class _IgnoresLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes **kwargs but returns every position's logits (as some do)."""

    def __init__(self, model, drop: int = 0):
        super().__init__()
        self.model, self.drop = model, drop

    def forward(self, input_ids, attention_mask, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = out.logits[:, self.drop:]
        return out


def test_a_model_that_ignores_logits_to_keep_gets_the_same_loss_or_a_clear_error():
    from prefgym.errors import ConfigError

    model, batch = tiny_llama(torch.float32), sft_batch()
    want = old_loss_sum(model, batch)
    torch.testing.assert_close(_response_loss_sum(_IgnoresLogitsToKeep(model), batch), want)
    start = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero()[0])
    with pytest.raises(ConfigError, match="returned logits for"):  # neither all positions nor the ones kept
        _response_loss_sum(_IgnoresLogitsToKeep(model, drop=start + 1), batch)
