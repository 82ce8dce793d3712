"""PPO's faster paths compute what the plain ones do: the fused AdamW step against the update by hand."""

from __future__ import annotations

import pytest
import torch

from prefgym.methods import ppo


def adamw_by_hand(p, grads, lr, betas, eps, weight_decay):
    """Loshchilov & Hutter's AdamW, one parameter tensor, step by step (float64)."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_ppo_adamw_is_fused_on_cpu_and_equals_adamw_by_hand(weight_decay):
    torch.manual_seed(0)
    cfg = ppo.PPOConfig(lr=3e-3, weight_decay=weight_decay)
    start = [torch.randn(5, 3), torch.randn(7)]
    params = [torch.nn.Parameter(s.clone()) for s in start]
    optimizer = ppo.adamw(params, cfg, torch.device("cpu"))
    assert optimizer.param_groups[0]["fused"] is True
    grads = [[1e-4 * torch.randn_like(s) for s in start] for _ in range(4)]  # small: eps (1e-5) matters
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        optimizer.step()
    for i, p in enumerate(params):
        want = adamw_by_hand(start[i], [step[i] for step in grads], cfg.lr, (0.9, 0.999), 1e-5, weight_decay)
        torch.testing.assert_close(p.detach().double(), want, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(p.detach(), start[i])  # the parameters moved


def test_ppo_adamw_is_not_fused_where_torch_has_no_kernel():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not ppo.adamw(params, ppo.PPOConfig(), torch.device("meta")).param_groups[0]["fused"]


# ---------------------------------------------------------------------------------------------
# LoRA-PPO: the value model is the reward model's trunk with adapters


@pytest.fixture(scope="module")
def policy_and_rm(tmp_path_factory):
    """A tiny random policy and a reward model of its shape, with a normalisation (mean 0.3, std 2)."""
    import json

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from prefgym.models.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("lora_value")
    policy = make_tiny_checkpoint(root / "policy", "llama", hidden_size=32, num_layers=2)
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(policy, num_labels=1))
    rm.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(policy).save_pretrained(root / "rm")
    (root / "rm" / "reward_normalization.json").write_text(json.dumps({"mean": 0.3, "std": 2.0}))
    return policy, root / "rm"


def test_lora_ppo_keeps_one_trunk_for_reward_and_value_and_scores_with_the_reward_model(policy_and_rm, tmp_path):
    from prefgym.methods import common
    from prefgym.methods.reward_model import RewardScorer

    policy, rm = policy_and_rm
    cfg = ppo.PPOConfig(policy_model=str(policy), reward_model=str(rm), output_dir=str(tmp_path), use_lora=True,
                        lora_r=4)
    _, model, reference, scorer = ppo._load_models(cfg)
    assert reference is None  # the policy with its adapters off
    assert common.unwrap_peft(model.value_model) is scorer.model  # one reward-model trunk, not two
    fresh = RewardScorer(rm)
    ids = torch.randint(4, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    raw = common.token_scores(fresh.model, ids, mask)
    # value_init normalized_reward: at the start the value is the normalised reward at every token
    torch.testing.assert_close(common.token_scores(model.value_model, ids, mask), (raw - 0.3) / 2.0)
    # trained adapters and value head change the value model, not the reward model's scores
    with torch.no_grad():
        for name, p in model.value_model.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    assert not torch.allclose(common.token_scores(model.value_model, ids, mask), (raw - 0.3) / 2.0, atol=1e-3)
    model.value_model.train()
    torch.testing.assert_close(ppo._reward_scores(scorer, model.value_model, ids, mask), fresh.score_tokens(ids, mask))
    assert model.value_model.training  # its mode is given back
    assert any(p.requires_grad for p in model.value_model.parameters())  # and its trainable parameters


# ---------------------------------------------------------------------------------------------
# The rollout's forward pass doubles as the first update's


@pytest.mark.parametrize("n_first", [3, 6], ids=["two-minibatches", "one-minibatch"])
def test_rollout_forward_equals_one_pass_over_the_batch_and_keeps_the_first_minibatch(policy_and_rm, n_first):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from prefgym.methods import common

    policy_dir, rm = policy_and_rm
    model = ppo.PolicyAndValue(AutoModelForCausalLM.from_pretrained(policy_dir),
                               AutoModelForSequenceClassification.from_pretrained(rm))
    torch.manual_seed(3)
    P, R = 5, 4
    ids = torch.randint(4, 100, (6, P + R))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left-padded prompts
    mask[4, :1] = 0
    mask[2, -1] = 0  # a response padded after its EOS
    first = torch.tensor([4, 0, 5, 1, 3, 2][:n_first])
    rows_seen = []
    hook = model.policy.register_forward_hook(lambda module, args, kwargs, out: rows_seen.append(len(kwargs["input_ids"])),
                                              with_kwargs=True)
    logps, values, entropy, kept_logps, kept_values = ppo.rollout_logps_and_values(model, ids, mask, P, 0.7, first)
    hook.remove()
    assert sum(rows_seen) == 6  # every row through the policy once
    with torch.no_grad():
        want_logps, want_values, logits = ppo.response_logps_and_values(model, ids, mask, P, 0.7)
    want_entropy = common.token_entropy(logits, 0.7)[:, 1:]
    for got, want in ((logps, want_logps), (values, want_values), (entropy, want_entropy)):
        assert got.shape == (6, R) and not got.requires_grad
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert kept_logps.requires_grad and kept_values.requires_grad  # the first update backpropagates through them
    torch.testing.assert_close(kept_logps.detach(), want_logps[first], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept_values.detach(), want_values[first], atol=1e-5, rtol=1e-5)
