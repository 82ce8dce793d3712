"""Quark's loss a chunk of rows at a time equals the full fp32 expressions, values and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefgym.methods import common, quark
from prefgym.methods.reward_conditioning import add_control_tokens
from prefgym.models import load_model_and_tokenizer

from test_methods_other import make_policy_and_reward_model
from test_methods_other_quark import SAMPLES

N, V, K = 7, 11, 3  # response tokens, original vocabulary, columns appended for control tokens


def old_terms(pol, ref, targets, control_ids):
    """Quark's loss terms as written before chunking (fp32 (N, V) log-softmaxes kept by autograd),
    per token (`reduction="none"` and no `.mean()`) so that each row can be weighed differently."""
    pol, ref = pol.float(), ref.float()
    nll = F.cross_entropy(pol, targets, reduction="none")
    vocab = ref.shape[-1]
    pol_v = pol[:, :vocab]
    if control_ids:
        pol_v = pol_v.index_fill(-1, torch.tensor(control_ids), -1e9)
        ref = ref.index_fill(-1, torch.tensor(control_ids), -1e9)
    logp, ref_logp = F.log_softmax(pol_v, dim=-1), F.log_softmax(ref, dim=-1)
    p = logp.exp()
    return nll, (p * (logp - ref_logp)).sum(-1), -(p * logp).sum(-1)


def old_quark_loss(policy, reference, tokenizer, samples, quantiles, tokens, kl_coef, entropy_coef, max_length):
    """`quark.quark_loss` as written before chunking (Alpaca prompts)."""
    from prefgym.data.prompts import format_record
    from prefgym.methods.reward_conditioning import with_control_token

    fmt = format_record
    device = next(policy.parameters()).device
    responses = [s["output"] for s in samples]
    conditioned = [fmt(with_control_token([s], tokens[q])[0]) for s, q in zip(samples, quantiles)]
    plain = [fmt(s) for s in samples]
    pb = common.tokenize_prompt_response(tokenizer, conditioned, responses, max_length)
    rb = common.tokenize_prompt_response(tokenizer, plain, responses, max_length)
    pb, rb = ({k: v.to(device) for k, v in b.items()} for b in (pb, rb))

    logits = policy(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"]).logits
    with torch.no_grad():
        ref_logits = reference(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits
    pol_mask, ref_mask = pb["response_mask"][:, 1:].bool(), rb["response_mask"][:, 1:].bool()
    pol = logits[:, :-1][pol_mask].float()
    ref = ref_logits[:, :-1][ref_mask].float()
    targets = pb["input_ids"][:, 1:][pol_mask]
    nll = F.cross_entropy(pol, targets)
    vocab = ref.shape[-1]
    pol_v = pol[:, :vocab]
    added = tokenizer.get_added_vocab()
    control_ids = [added[t] for t in tokens if t in added and added[t] < vocab]
    if control_ids:
        pol_v = pol_v.index_fill(-1, torch.tensor(control_ids, device=device), -1e9)
        ref = ref.index_fill(-1, torch.tensor(control_ids, device=device), -1e9)
    logp, ref_logp = F.log_softmax(pol_v, dim=-1), F.log_softmax(ref, dim=-1)
    p = logp.exp()
    kl = (p * (logp - ref_logp)).sum(-1).mean()
    entropy = -(p * logp).sum(-1).mean()
    loss = nll + kl_coef * kl - entropy_coef * entropy
    return loss, {"loss": loss.item(), "nll": nll.item(), "kl": kl.item(), "entropy": entropy.item()}


@pytest.fixture(params=[None, 1, 3], ids=["one-chunk", "one-row-chunks", "three-row-chunks"])
def chunk(request, monkeypatch):
    """Default chunking (all rows at once here), and budgets of one and three rows of V + K logits
    per chunk (7 rows: the last chunk of three is shorter)."""
    if request.param is not None:
        monkeypatch.setattr(common, "LOGSOFTMAX_CHUNK_ELEMENTS", request.param * (V + K))
    return request.param


PLACEMENTS = {  # policy columns, control-token columns below V
    "appended": (V + K, []),  # the vocabulary grew: control tokens at V .. V+K-1
    "inside": (V, [2, 5, 9]),  # the tokens took unused rows of a padded vocabulary
    "both": (V + K, [0, 10]),  # columns masked at both ends of the vocabulary, and columns beyond it
}


def _random_case(width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pol = (3 * torch.randn(N, width, generator=g)).to(dtype)
    ref = (3 * torch.randn(N, V, generator=g)).to(dtype)
    targets = torch.randint(0, width, (N,), generator=g)
    weights = torch.randn(3, N, generator=g)  # every term and token weighed differently
    return pol, ref, targets, weights


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_terms_equal_the_unchunked_expressions_values_and_gradients(chunk, placement, dtype):
    width, control_ids = PLACEMENTS[placement]
    pol0, ref, targets, weights = _random_case(width, dtype)
    results = []
    for fn, ids in ((old_terms, control_ids), (quark._quark_token_terms, torch.tensor(control_ids, dtype=torch.long))):
        pol = pol0.clone().requires_grad_(True)
        terms = torch.stack(fn(pol, ref, targets, ids))
        (terms * weights).sum().backward()
        results.append((terms.detach(), pol.grad))
    (want, want_grad), (got, got_grad) = results
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5)
    else:  # the same fp32 gradient rounded to bf16: at most an ulp or so apart
        torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=1e-5, rtol=1.6e-2)
    if control_ids:  # only the NLL reaches masked columns: softmax over all columns minus the target
        probs = torch.softmax(pol0.float(), -1)
        nll_grad = weights[0, :, None] * (probs - F.one_hot(targets, width))
        torch.testing.assert_close(got_grad[:, control_ids].float(), nll_grad[:, control_ids],
                                   atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 1.6e-2)


def test_terms_against_hand_computed_distributions(chunk):
    """Independent of the old expressions: NLL, KL(p || q) and H(p) from explicit softmaxes of one
    row at a time, the masked columns dropped from both distributions."""
    width, control_ids = PLACEMENTS["both"]
    pol, ref, targets, _ = _random_case(width, torch.float64, seed=3)
    nll, kl, entropy = quark._quark_token_terms(pol, ref, targets, torch.tensor(control_ids))
    keep = [j for j in range(V) if j not in control_ids]
    for i in range(N):
        z = pol[i].tolist()
        assert nll[i].item() == pytest.approx(math.log(sum(map(math.exp, z))) - z[targets[i]], rel=1e-5)
        ep, eq = [math.exp(z[j]) for j in keep], [math.exp(ref[i, j].item()) for j in keep]
        p, q = [e / sum(ep) for e in ep], [e / sum(eq) for e in eq]
        assert kl[i].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-4, abs=1e-6)
        assert entropy[i].item() == pytest.approx(-sum(a * math.log(a) for a in p), rel=1e-4)


def test_no_fp32_copy_of_the_logits_is_kept_or_made(monkeypatch):
    """Autograd keeps only the logits as given (bf16) and per-token values; the fp32 softmaxes run
    on at most one chunk of rows, forward and backward."""
    monkeypatch.setattr(common, "LOGSOFTMAX_CHUNK_ELEMENTS", 2 * (V + K))
    pol, ref, targets, weights = _random_case(V + K, torch.bfloat16)
    pol.requires_grad_(True)
    saved = []
    rows = []
    real = quark._log_softmaxes
    monkeypatch.setattr(quark, "_log_softmaxes", lambda p, r, c: rows.append(len(p)) or real(p, r, c))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        terms = torch.stack(quark._quark_token_terms(pol, ref, targets, torch.tensor([1, 4])))
    (terms * weights).sum().backward()
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= N * V]
    assert rows == [2, 2, 2, 1] * 2  # 7 rows in chunks of 2, forward then backward


def _policy_and_reference(root, inside: bool, dtype):
    """A tiny Llama policy with three control tokens and its reference. `inside`: the checkpoint's
    vocabulary is padded beyond the tokenizer, so the tokens take unused rows (ids < V)."""
    path = make_policy_and_reward_model(root)[0]
    if inside:
        model, tokenizer = load_model_and_tokenizer(path)
        model.resize_token_embeddings(len(tokenizer) + 8)
        model.save_pretrained(root / "padded")
        tokenizer.save_pretrained(root / "padded")
        path = root / "padded"
    reference, tokenizer = load_model_and_tokenizer(path)
    policy, _ = load_model_and_tokenizer(path)
    tokens = quark.quark_tokens(3)
    ids = add_control_tokens(policy, tokenizer, tokens)
    vocab = reference.get_input_embeddings().weight.shape[0]
    assert all(i < vocab for i in ids) == inside and policy.get_input_embeddings().weight.shape[0] >= vocab
    torch.manual_seed(0)
    with torch.no_grad():  # peaked next-token distributions, and a policy away from its reference
        for model in (policy, reference):
            model.get_output_embeddings().weight.mul_(30)
        for w in policy.parameters():
            w.add_(0.3 * w.std() * torch.randn_like(w))
    return policy.to(dtype), reference.to(dtype), tokenizer, tokens


@pytest.mark.parametrize("inside", [False, True], ids=["appended", "inside"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quark_loss_equals_the_unchunked_loss_values_and_parameter_gradients(tmp_path, monkeypatch, inside, dtype):
    monkeypatch.setattr(common, "LOGSOFTMAX_CHUNK_ELEMENTS", 4 * 470)  # 4 rows of the ~470-token vocabulary
    policy, reference, tokenizer, tokens = _policy_and_reference(tmp_path, inside, dtype)
    quantiles = np.array([2, 0, 1])
    results = []
    for fn in (old_quark_loss, quark.quark_loss):
        policy.zero_grad()
        loss, stats = fn(policy, reference, tokenizer, SAMPLES, quantiles, tokens, kl_coef=0.3, entropy_coef=0.2,
                         max_length=128)
        loss.backward()
        results.append((stats, {n: p.grad.float().clone() for n, p in policy.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    assert set(got) == {"loss", "nll", "kl", "entropy"} and got["kl"] > 0.05 and got["entropy"] > 0.5
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-4, rtol=1.6e-2)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tol, msg=lambda m: f"{name}: {m}")
