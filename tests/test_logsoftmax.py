"""Chunked per-token log-probs and entropies equal the full fp32 log-softmax, values and gradients."""

from __future__ import annotations

import pytest
import torch

from prefgym.methods import common


def naive_logprobs(logits, ids, temperature):
    """The unchunked expression `token_logprobs` replaces (fp32 (B, T, V) log-softmax, then gather)."""
    logps = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return torch.nn.functional.pad(logps.gather(2, ids[:, 1:, None]).squeeze(-1), (1, 0))


@pytest.fixture(params=[None, 3 * 7, 2 * 3 * 7], ids=["one-chunk", "one-step-slices", "two-step-slices"])
def chunk(request, monkeypatch):
    """Default chunking (the whole tensor here), and budgets of one and two time steps of (B=3, V=7)
    logits per slice (the last slice then shorter: an uneven split)."""
    if request.param is not None:
        monkeypatch.setattr(common, "LOGSOFTMAX_CHUNK_ELEMENTS", request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_full_log_softmax_values_and_gradients(chunk, dtype, temperature):
    torch.manual_seed(0)
    B, T, V = 3, 6, 7
    base = (3 * torch.randn(B, T, V)).to(dtype)
    ids = torch.randint(0, V, (B, T))
    weights = torch.randn(B, T)  # a loss that weighs every position differently
    results = []
    for fn in (naive_logprobs, common.token_logprobs):
        logits = base.clone().requires_grad_(True)
        out = fn(logits, ids, temperature)
        (out * weights).sum().backward()
        results.append((out.detach(), logits.grad))
    (want, want_grad), (got, got_grad) = results
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=0 if dtype == torch.float32 else 8e-3)  # bf16: 1 ulp
    assert torch.all(got_grad[:, -1] == 0)  # the last position predicts nothing


def test_token_logprobs_against_a_loop_of_softmaxes(chunk):
    """Independent of the naive expression: p(ids[b, t]) from softmax(logits[b, t - 1] / T), by hand."""
    torch.manual_seed(1)
    logits, ids, T = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5)), 0.5
    got = common.token_logprobs(logits, ids, T)
    for b in range(3):
        assert got[b, 0] == 0
        for t in range(1, 5):
            z = torch.exp(logits[b, t - 1] / T)
            assert abs(got[b, t].item() - torch.log(z[ids[b, t]] / z.sum()).item()) < 1e-5


def test_token_entropy_equals_full_computation(chunk):
    torch.manual_seed(2)
    logits = (2 * torch.randn(3, 6, 7)).bfloat16()
    p = torch.softmax(logits[:, :-1].float() / 0.8, -1)
    want = torch.nn.functional.pad(-(p * p.log()).sum(-1), (1, 0))
    torch.testing.assert_close(common.token_entropy(logits, 0.8), want, atol=1e-5, rtol=0)


def test_no_fp32_copy_of_all_logits_is_made(monkeypatch):
    """With a budget of one step of logits, no fp32 tensor larger than one slice is created."""
    monkeypatch.setattr(common, "LOGSOFTMAX_CHUNK_ELEMENTS", 2 * 50)
    logits = torch.randn(2, 9, 50).bfloat16().requires_grad_(True)
    largest = []
    real_float = torch.Tensor.float

    def spy(self, *args, **kwargs):
        largest.append(self.numel())
        return real_float(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", spy)
    common.token_logprobs(logits, torch.zeros(2, 9, dtype=torch.long), 1.0).sum().backward()
    assert largest and max(largest) <= 2 * 50
