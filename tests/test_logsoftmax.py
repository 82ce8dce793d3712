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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprobs_equal_gather_of_full_log_softmax(chunk, dtype):
    """Position t's logits scored against token t (no shift), values and gradients."""
    torch.manual_seed(3)
    base, ids, weights = (3 * torch.randn(3, 6, 7)).to(dtype), torch.randint(0, 7, (3, 6)), torch.randn(3, 6)
    results = []
    for fn in (lambda x: torch.log_softmax(x.float() / 0.9, -1).gather(2, ids[..., None]).squeeze(-1),
               lambda x: common.target_logprobs(x, ids, 0.9)):
        logits = base.clone().requires_grad_(True)
        out = fn(logits)
        (out * weights).sum().backward()
        results.append((out.detach(), logits.grad))
    (want, want_grad), (got, got_grad) = results
    assert got.shape == (3, 6)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=0 if dtype == torch.float32 else 8e-3)


def test_dpo_pair_logps_equal_whole_sequence_log_probs_by_hand(chunk):
    """DPO's (and KTO's, SimPO's, online DPO's) summed response log-probs and their parameter
    gradients equal each prompt + response run alone through the model, log-softmax in fp64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefgym.methods.dpo import PairLogps

    torch.manual_seed(4)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=7, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
    prompts, responses = [[3, 4, 5], [6, 2]], [[1, 2], [4, 5, 6, 1], [2], [3, 3, 1]]  # pair i: rows 2i, 2i+1
    P, R = 3, 4
    prompt_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    response_ids = torch.tensor([r + [0] * (R - len(r)) for r in responses])
    response_mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in responses])
    chosen, rejected = PairLogps(model)(prompt_ids, prompt_mask, response_ids, response_mask)
    weights = torch.tensor([0.7, -1.3, 0.4, 2.0])
    (torch.stack([chosen, rejected], 1).flatten() * weights).sum().backward()
    got_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = []
    for i, r in enumerate(responses):
        ids = torch.tensor([prompts[i // 2] + r])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        want.append(sum(logp[len(prompts[i // 2]) - 1 + t, tok] for t, tok in enumerate(r)))
    (torch.stack(want).float() * weights).sum().backward()
    torch.testing.assert_close(torch.stack([chosen, rejected], 1).flatten().detach(), torch.stack(want).float(),
                               atol=1e-5, rtol=0)
    for got, p in zip(got_grad, model.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4)
