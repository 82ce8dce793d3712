"""PPO's pieces pinned to independent computations (plain-Python loops, numpy, per-prefix forwards).

Each test here fails on a plausible bug: values or log-probs read one token late, advantage
whitening dropped, reward whitening that moves the mean, a KL coefficient that is not used, a
clip that never clips, a sign flip in the surrogate, value clipping dropped, a missing-EOS
penalty not applied.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefgym.errors import ConfigError
from prefgym.methods import common, ppo
from test_prefdata_toy import make_toy_model, one_torch_thread  # noqa: F401 (autouse fixture)

LENGTHS = [6, 3, 1, 5]  # ragged responses; R = 6


def ragged(seed=0, R=6):
    rng = np.random.default_rng(seed)
    B = len(LENGTHS)
    mask = np.array([[1] * L + [0] * (R - L) for L in LENGTHS])
    garbage = lambda x: np.where(mask == 1, x, 777.0)  # noqa: E731 (values outside the response must not matter)
    logps, ref, values = (garbage(rng.normal(size=(B, R))) for _ in range(3))
    score = rng.normal(size=B) * 2 + 1.0
    return mask, logps, ref, values, score


def whiten_np(x, mask, shift_mean=True):
    v = x[mask == 1]
    mean, std = v.mean(), v.std(ddof=1)
    out = (x - mean) / np.sqrt(std ** 2 + 1e-8)
    if not shift_mean:
        out = out + mean
    return np.where(mask == 1, out, 0.0)


def gae_loop(rewards, values, lengths, gamma, lam):
    adv = np.zeros_like(rewards)
    for b, L in enumerate(lengths):
        last = 0.0
        for t in reversed(range(L)):
            next_value = values[b, t + 1] if t + 1 < L else 0.0
            last = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * last
            adv[b, t] = last
    return adv, adv + values


def reference_pipeline(score, logps, ref, values, mask, kl_coef, gamma, lam, whiten_rewards):
    """The rollout maths written out token by token: rewards, whitening, GAE, whitening."""
    B, R = mask.shape
    rewards = np.zeros((B, R))
    for b in range(B):
        for t in range(LENGTHS[b]):
            rewards[b, t] = -kl_coef * (logps[b, t] - ref[b, t])
        rewards[b, LENGTHS[b] - 1] += score[b]
    shaped = whiten_np(rewards, mask, shift_mean=False) if whiten_rewards else rewards
    adv, ret = gae_loop(shaped, np.where(mask == 1, values, 0.0), LENGTHS, gamma, lam)
    return rewards, whiten_np(adv, mask), ret


@pytest.mark.parametrize("kl_coef,gamma,lam,whiten_rewards", [(0.1, 1.0, 0.95, True), (0.5, 0.9, 0.8, False),
                                                               (0.0, 1.0, 1.0, True), (2.0, 0.99, 0.0, True)])
def test_advantages_and_returns_equal_token_by_token_pipeline(kl_coef, gamma, lam, whiten_rewards):
    mask, logps, ref, values, score = ragged(1)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out = ppo.advantages_and_returns(t(score), t(logps), t(ref), t(values), torch.tensor(mask), kl_coef,
                                     gamma, lam, whiten_rewards)
    rewards, adv, ret = reference_pipeline(score, logps, ref, values, mask, kl_coef, gamma, lam, whiten_rewards)
    on = mask == 1
    np.testing.assert_allclose(out["rewards"].numpy()[on], rewards[on], atol=1e-10)
    np.testing.assert_allclose(out["advantages"].numpy()[on], adv[on], atol=1e-5)  # whitening stats are float32
    np.testing.assert_allclose(out["returns"].numpy()[on], ret[on], atol=1e-5)
    # the KL term that entered the rewards, per response: -kl_coef * Σ_t (log π - log π_ref)
    kl_sum = np.where(on, logps - ref, 0).sum(1)
    np.testing.assert_allclose(out["non_score_reward"].numpy(), -kl_coef * kl_sum, atol=1e-10)
    np.testing.assert_allclose(out["kl"].numpy(), np.where(on, logps - ref, 0.0), atol=1e-12)


def test_advantages_are_whitened_over_response_tokens_only():
    mask, logps, ref, values, score = ragged(2)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    adv = ppo.advantages_and_returns(t(score), t(logps), t(ref), t(values), torch.tensor(mask), 0.1, 1.0, 0.95,
                                     True)["advantages"].numpy()
    on = mask == 1
    assert adv[on].mean() == pytest.approx(0.0, abs=1e-6)
    assert adv[on].std(ddof=1) == pytest.approx(1.0, abs=1e-6)
    assert (adv[~on] == 0).all()


def test_reward_whitening_keeps_the_mean_and_scales_to_unit_std():
    mask, *_ = ragged(3)
    x = torch.tensor(np.random.default_rng(3).normal(3.0, 5.0, size=mask.shape))
    m = torch.tensor(mask)
    kept = common.masked_whiten(x, m, shift_mean=False).numpy()
    on = mask == 1
    assert kept[on].mean() == pytest.approx(x.numpy()[on].mean(), abs=1e-6)
    assert kept[on].std(ddof=1) == pytest.approx(1.0, abs=1e-6)
    centred = common.masked_whiten(x, m).numpy()
    assert centred[on].mean() == pytest.approx(0.0, abs=1e-6)


def test_gae_equals_loop_on_ragged_masks_with_garbage_outside():
    mask, _, _, values, _ = ragged(4)
    rewards = np.random.default_rng(4).normal(size=mask.shape)
    adv, ret = ppo.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), 0.97, 0.9)
    adv_l, ret_l = gae_loop(np.where(mask == 1, rewards, 0), np.where(mask == 1, values, 0), LENGTHS, 0.97, 0.9)
    on = mask == 1
    np.testing.assert_allclose(adv.numpy()[on], adv_l[on], atol=1e-10)
    np.testing.assert_allclose(ret.numpy()[on], ret_l[on], atol=1e-10)


def test_score_lands_on_the_last_response_token_and_kl_on_each():
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, 9.0, 9.0]])
    ref = torch.tensor([[-1.5, -2.5, -2.0, -4.0], [-1.0, 0.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rewards, kl = ppo.per_token_rewards(torch.tensor([10.0, 20.0]), logps, ref, mask, kl_coef=0.5)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.5, -1.0, 0.0], [0.5, -0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, -0.25, 0.5, 10.0], [-0.25, 20.25, 0.0, 0.0]]))


def test_missing_eos_penalty_replaces_the_score_of_cut_off_responses():
    scores, has_eos = torch.tensor([0.3, -2.0, 1.5]), torch.tensor([True, False, False])
    torch.testing.assert_close(common.missing_eos_scores(scores, has_eos, -1.0), torch.tensor([0.3, -1.0, -1.0]))
    assert common.missing_eos_scores(scores, has_eos, None) is scores
    np.testing.assert_allclose(common.missing_eos_scores(np.array([0.3, -2.0]), [True, False], -5.0), [0.3, -5.0])


def surrogate_loop(new, old, adv, vpred, old_v, ret, mask, eps, eps_v):
    pg, vf, n = 0.0, 0.0, 0
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            r = float(np.exp(new[b][t] - old[b][t]))
            pg += max(-adv[b][t] * r, -adv[b][t] * min(max(r, 1 - eps), 1 + eps))
            v_clip = old_v[b][t] + min(max(vpred[b][t] - old_v[b][t], -eps_v), eps_v)
            vf += 0.5 * max((vpred[b][t] - ret[b][t]) ** 2, (v_clip - ret[b][t]) ** 2)
            n += 1
    return pg / n, vf / n


def test_clipped_surrogate_and_value_loss_equal_loop():
    rng = np.random.default_rng(5)
    mask = np.array([[1] * L + [0] * (6 - L) for L in LENGTHS])
    old, adv, old_v, ret = (rng.normal(size=mask.shape) for _ in range(4))
    new = old + rng.normal(scale=0.5, size=mask.shape)  # ratios well outside [0.8, 1.2]
    vpred = old_v + rng.normal(scale=0.5, size=mask.shape)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out = ppo.ppo_losses(t(new), t(old), t(adv), t(vpred), t(old_v), t(ret), torch.tensor(mask), 0.2, 0.2)
    pg, vf = surrogate_loop(new, old, adv, vpred, old_v, ret, mask, 0.2, 0.2)
    assert out["pg_loss"].item() == pytest.approx(pg, abs=1e-10)
    assert out["vf_loss"].item() == pytest.approx(vf, abs=1e-10)
    assert 0 < out["pg_clipfrac"].item() < 1 and 0 < out["vf_clipfrac"].item() < 1
    # the clips matter here: without them (huge ε) the losses differ
    loose = ppo.ppo_losses(t(new), t(old), t(adv), t(vpred), t(old_v), t(ret), torch.tensor(mask), 1e9, 1e9)
    assert loose["pg_loss"].item() != pytest.approx(pg, abs=1e-3) and loose["vf_loss"].item() != pytest.approx(vf, abs=1e-3)


def test_surrogate_gradient_raises_probability_of_positive_advantage_tokens():
    old = torch.zeros(1, 2)
    new = torch.zeros(1, 2, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    zeros = torch.zeros(1, 2)
    ppo.ppo_losses(new, old, adv, zeros, zeros, zeros, torch.ones(1, 2), 0.2, 0.2)["pg_loss"].backward()
    # descending the loss raises log π of the A>0 token and lowers the A<0 one (d loss / d logπ = -A / n)
    torch.testing.assert_close(new.grad, torch.tensor([[-0.5, 0.5]]))


# ---------------------------------------------------------------------------------------------
# Alignment of log-probs and values with the response tokens, against per-prefix forwards


@pytest.fixture(scope="module")
def policy_and_value(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = make_toy_model(tmp_path_factory.mktemp("align") / "m", seed=5)
    policy = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    value = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, dtype=torch.float32).eval()
    value.config.pad_token_id = 0
    return ppo.PolicyAndValue(policy, value)


def test_logps_and_values_belong_to_the_state_before_each_response_token(policy_and_value):
    """Token j of the response is scored by a forward over the tokens before it alone: its log-prob is
    the prefix's last next-token distribution and its value is the prefix's last value. Reading either
    one position late (the state after the token) fails this."""
    torch.manual_seed(0)
    queries = [[1, 5, 6, 7, 8], [1, 9, 10]]  # left-padded to P = 5
    responses = [[11, 12, 13, 2], [14, 2]]  # right-padded to R = 4
    P, R, T = 5, 4, 0.7
    ids = torch.zeros(2, P + R, dtype=torch.long)
    mask = torch.zeros(2, P + R, dtype=torch.long)
    for b, (q, r) in enumerate(zip(queries, responses)):
        ids[b, P - len(q):P], mask[b, P - len(q):P] = torch.tensor(q), 1
        ids[b, P:P + len(r)], mask[b, P:P + len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        logps, values, _ = ppo.response_logps_and_values(policy_and_value, ids, mask, P, T)
        for b, (q, r) in enumerate(zip(queries, responses)):
            for j, token in enumerate(r):
                prefix = torch.tensor([q + r[:j]])
                ones = torch.ones_like(prefix)
                logits = policy_and_value.policy(input_ids=prefix, attention_mask=ones).logits[0, -1]
                expected_logp = torch.log_softmax(logits / T, -1)[token]
                expected_value = common.token_scores(policy_and_value.value_model, prefix, ones)[0, -1]
                assert logps[b, j].item() == pytest.approx(expected_logp.item(), abs=1e-5), (b, j)
                assert values[b, j].item() == pytest.approx(expected_value.item(), abs=1e-5), (b, j)


# ---------------------------------------------------------------------------------------------
# Value model initialisation


def test_value_head_starts_on_the_normalised_reward_scale(policy_and_value, tmp_path):
    import copy

    value = copy.deepcopy(policy_and_value.value_model)
    ids = torch.tensor([[1, 5, 6, 7], [1, 9, 10, 11]])
    ones = torch.ones_like(ids)
    raw = common.token_scores(value, ids, ones).detach()
    norm = {"mean": 0.7, "std": 2.5}
    ppo.init_value_head(value, "reward", norm)
    torch.testing.assert_close(common.token_scores(value, ids, ones), raw)
    ppo.init_value_head(value, "normalized_reward", norm)
    torch.testing.assert_close(common.token_scores(value, ids, ones), (raw - 0.7) / 2.5, atol=1e-5, rtol=1e-5)
    ppo.init_value_head(value, "zero", norm)
    assert torch.count_nonzero(common.token_scores(value, ids, ones)) == 0
    with pytest.raises(ConfigError, match="value_init"):
        ppo.init_value_head(value, "raw", norm)
