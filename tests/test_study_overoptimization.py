"""`prefgym study overoptimization`: the best-of-n estimator, its KL, Gao's fits, the KL of sampled
policies, bad options, and (slow) a whole `--quick` study on the tiny world."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from prefgym.cli import main
from prefgym.studies import overoptimization as oo


def brute_force_best_of_n(proxy: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Mean over every subset of n samples of the value of the subset's highest proxy."""
    m = proxy.shape[1]
    out = []
    for p, v in zip(proxy, values):
        picks = [v[max(subset, key=lambda j: p[j])] for subset in itertools.combinations(range(m), n)]
        out.append(np.mean(picks))
    return np.array(out)


@pytest.mark.parametrize("m", [1, 4, 7])
def test_best_of_n_estimate_equals_the_mean_over_all_subsets(m):
    rng = np.random.default_rng(m)
    proxy, values = rng.normal(size=(5, m)), rng.normal(size=(5, m))
    for n in range(1, m + 1):
        np.testing.assert_allclose(oo.best_of_n_estimate(proxy, values, n), brute_force_best_of_n(proxy, values, n),
                                   rtol=1e-10, atol=1e-12)


def test_best_of_n_estimate_matches_monte_carlo_draws():
    rng = np.random.default_rng(0)
    m, n, draws = 10, 3, 40000
    proxy, values = rng.normal(size=(1, m)), rng.normal(size=(1, m))
    picks = []
    for _ in range(draws):
        subset = rng.choice(m, size=n, replace=False)
        picks.append(values[0, subset[np.argmax(proxy[0, subset])]])
    se = np.std(picks) / math.sqrt(draws)
    assert abs(oo.best_of_n_estimate(proxy, values, n)[0] - np.mean(picks)) < 4 * se


def test_best_of_n_weights_are_a_distribution_and_n_1_is_the_plain_mean():
    for m, n in [(64, 1), (64, 2), (64, 17), (64, 64), (5, 3)]:
        w = oo.best_of_n_weights(m, n)
        assert w.sum() == pytest.approx(1.0, abs=1e-9)
        assert np.all(w[: n - 1] == 0) and w[-1] == pytest.approx(n / m)  # the largest is picked when drawn
    values = np.arange(12.0).reshape(2, 6)
    np.testing.assert_allclose(oo.best_of_n_estimate(-values, values, 1), values.mean(1))
    np.testing.assert_allclose(oo.best_of_n_estimate(values, values, 6), values.max(1))


def test_best_of_n_kl_formula_matches_the_kl_of_the_max_of_n_uniform_ranks():
    assert oo.best_of_n_kl(1) == 0.0
    assert oo.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    M = 200_000  # a base policy uniform over M outcomes, all ranked differently by the reward
    k = np.arange(1, M + 1)
    for n in (2, 4, 16, 64):
        p = (k / M) ** n - ((k - 1) / M) ** n  # P(best of n draws is the k-th ranked)
        kl = float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p * M, 1.0)), 0.0)))
        assert oo.best_of_n_kl(n) == pytest.approx(kl, abs=2e-3)


@pytest.mark.parametrize("form, fn", [("bon", lambda d, a, b: a * d - b * d ** 2),  # Gao et al. eq. 1 and 2,
                                       ("rl", lambda d, a, b: a * d - b * d * np.log(d))])  # written out again
def test_gao_fits_recover_known_coefficients(form, fn):
    rng = np.random.default_rng(1)
    alpha, beta = 0.30, 0.12
    d = np.tile(np.linspace(0.1, 3.0, 25), 2)
    gain = fn(d, alpha, beta) + rng.normal(scale=0.004, size=d.size)
    fit = oo.fit_gao(np.concatenate([[0.0], d]), np.concatenate([[0.0], gain]), form)  # d = 0 is left out
    assert fit["n_points"] == d.size
    assert abs(fit["alpha"] - alpha) < 4 * fit["alpha_se"] and abs(fit["beta"] - beta) < 4 * fit["beta_se"]
    assert fit["alpha_se"] < 0.01 and fit["beta_se"] < 0.01
    assert math.isnan(oo.fit_gao([0.5, 1.0], [0.1, 0.1], form)["alpha"])  # too few points


def test_best_of_n_curve_puts_points_at_root_kl_and_gains_over_one_sample():
    rng = np.random.default_rng(2)
    proxy = rng.normal(size=(30, 8))
    gold = proxy + rng.normal(size=(30, 8))
    wins = (gold > 0).astype(float)
    curve = oo.best_of_n_curve(proxy, proxy, gold, wins, np.ones((30, 8)), [1, 2, 4, 8])
    assert [p["n"] for p in curve] == [1, 2, 4, 8]
    for p in curve:
        assert p["sqrt_kl"] == pytest.approx(math.sqrt(math.log(p["n"]) - (p["n"] - 1) / p["n"]))
        assert p["gold_gain"] == pytest.approx(p["gold"] - gold.mean())
    best = proxy.argmax(1)  # n = m: the best of all samples
    assert curve[0]["gold_gain"] == 0.0 and curve[-1]["gold"] == pytest.approx(gold[np.arange(30), best].mean())
    assert curve[-1]["gold_win_rate"] == pytest.approx(100 * wins[np.arange(30), best].mean())


class StubJudge:
    reference_gold = np.array([0.5, 0.5, 0.5])

    def human_win_rate(self, outputs):
        return 50.0, 1.0


def test_point_summary_places_the_point_at_the_root_of_the_mean_k1():
    samples = {"k1": [0.5, 1.5, 1.0], "k3": [0.4, 1.0, 0.9], "outputs": ["a", "bb", "ccc"], "tokens": [2, 3, 4],
               "finished": [True, True, False]}
    point = oo.point_summary(samples, np.array([1.0, 2.0, 3.0]), np.array([0.6, 0.5, 0.2]),
                             np.array([0.5, 0.5, 0.5]), StubJudge())
    assert point["kl"] == pytest.approx(1.0) and point["sqrt_kl"] == pytest.approx(1.0 ** 0.5)
    assert point["gold_gain"] == pytest.approx((0.1 + 0.0 - 0.3) / 3)
    assert point["gold_win_rate"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert point["no_eos_fraction"] == pytest.approx(1 / 3)
    samples["k1"] = [4.0, 4.0, 4.0]
    point = oo.point_summary(samples, np.zeros(3), np.zeros(3), np.zeros(3), StubJudge())
    assert point["sqrt_kl"] == pytest.approx(2.0)


def test_sampled_kl_is_zero_against_itself_and_matches_unbatched_log_probs(tmp_path):
    import torch

    from prefgym.models import load_model_and_tokenizer
    from prefgym.models.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(tmp_path / "tok")
    for seed in (0, 1):
        make_tiny_model("llama", tokenizer, tmp_path / f"m{seed}", seed=seed)
    policy, tok = load_model_and_tokenizer(tmp_path / "m0", padding_side="left")
    reference, _ = load_model_and_tokenizer(tmp_path / "m1")
    prompts, seeds = ["The cat sat", "Sort these numbers: 3 1 2", "Hi"], [11, 12, 13]
    kw = dict(temperature=0.7, max_new_tokens=6, max_prompt_length=64, batch_size=2)
    same = oo.sample_with_kl(policy, policy, tok, prompts, seeds, **kw)
    assert same["k1"] == [0.0, 0.0, 0.0] and same["k3"] == [0.0, 0.0, 0.0]
    other = oo.sample_with_kl(policy, reference, tok, prompts, seeds, **kw)
    assert other["outputs"] == same["outputs"]  # the policy's samples, whatever the reference
    for i, prompt in enumerate(prompts):  # one sequence at a time, no padding: Σ log π − log π_ref at T
        p_ids = tok(prompt)["input_ids"]
        r_ids = other["ids"][i]
        assert len(r_ids) == other["tokens"][i] and (r_ids[-1] == tok.eos_token_id) == other["finished"][i]
        assert tok.decode(r_ids, skip_special_tokens=True) == other["outputs"][i]
        ids = torch.tensor([p_ids + r_ids])

        def logp(model):
            with torch.no_grad():
                logits = model(ids).logits[0, len(p_ids) - 1:-1] / 0.7
            return torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(p_ids):, None]).squeeze(-1)

        r = logp(policy) - logp(reference)
        assert other["k1"][i] == pytest.approx(float(r.sum()), abs=1e-4)
        assert other["k3"][i] == pytest.approx(float((torch.expm1(-r) + r).sum()), abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--sources", "pool,crowd"], "--sources: unknown source 'crowd'"),
    (["--max-n", "0"], "--max-n: n must be at least 1"),
    (["--kl-coefs", "0,-0.1"], "--kl-coefs"),
    (["--kl-coefs", "0,abc"], "--kl-coefs: expected comma-separated numbers"),
    (["--steps", "10", "--snapshot-steps", "20"], "--snapshot-steps"),
])
def test_bad_options_are_one_clear_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "study"
    assert main(["study", "overoptimization", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing written


@pytest.mark.slow
def test_quick_study_end_to_end(tiny_world, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "overoptimization", "--quick", "--world", str(tiny_world), "--out", str(out), "--seeds", "0,1"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "Gao et al.'s fits" in printed.out and "stage times" in printed.err
    study = json.loads((out / "study.json").read_text())
    cfg = study["config"]
    assert cfg["ppo_steps"] == 4 and cfg["snapshot_steps"] == 2
    ppo = [c for c in study["curves"] if c["method"] == "ppo"]
    bon = [c for c in study["curves"] if c["method"] == "best_of_n"]
    assert len(ppo) == 2 * 3 * len(cfg["kl_coefs"]) and len(bon) == 2 * 3  # seeds × sources (× kl coefs)
    for c in ppo:  # step 0 (SFT) and one point per snapshot
        assert [p["step"] for p in c["points"]] == [0, 2, 4]
        assert c["points"][0]["kl"] == 0.0 and c["points"][0]["gold_gain"] == 0.0
    for c in bon:
        assert [p["n"] for p in c["points"]] == [1, 2, 4]
    assert {f["source"] for f in study["fits"]} == set(oo.SOURCES)
    for name in ["overoptimization", *(f"overoptimization_{s}" for s in oo.SOURCES)]:
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64") == 4 and "Gao" in page
    # a rerun resumes: every stage is done already
    assert main(args) == 0
    assert "running it again" not in capsys.readouterr().err


def synthetic_curves() -> list[dict]:
    """Two seeds × two sources: PPO whose gold gain rises then falls, best-of-n that keeps rising."""
    curves = []
    for seed, source in itertools.product((0, 1), ("pool", "greedy")):
        ppo = [{"step": 10 * i, "sqrt_kl": d, "proxy": d, "proxy_se": 0.01, "gold_gain": oo.gao_rl(d, 0.1, 0.2)
                if d else 0.0, "gold_gain_se": 0.01, "human_win_rate": 40 + 10 * d, "human_win_rate_se": 2.0,
                "length_tokens": 10.0} for i, d in enumerate([0.0, 0.5, 1.0, 1.5, 2.0])]
        bon = [{"n": 2 ** i, "sqrt_kl": math.sqrt(oo.best_of_n_kl(2 ** i)), "proxy": i, "proxy_se": 0.0,
                "gold_gain": 0.01 * i, "gold_gain_se": 0.01, "human_win_rate": 40.0, "human_win_rate_se": 2.0,
                "length_tokens": 9.0} for i in range(4)]
        curves += [{"seed": seed, "source": source, "method": "ppo", "kl_coef": 0.0, "label": "PPO kl=0",
                    "points": ppo},
                   {"seed": seed, "source": source, "method": "best_of_n", "kl_coef": None, "label": "best-of-n",
                    "points": bon}]
    return curves


def test_summary_fits_and_table_from_curves():
    curves = synthetic_curves()
    fit_rows, rows = oo.fits(curves), oo.summary(curves)
    rl = next(f for f in fit_rows if f["source"] == "pool" and f["kl_coef"] == "all")
    assert rl["alpha"] == pytest.approx(0.1) and rl["beta"] == pytest.approx(0.2) and rl["n_points"] == 8
    ppo = next(r for r in rows if r["source"] == "greedy" and r["method"] == "PPO kl=0")
    peak = max(oo.gao_rl(d, 0.1, 0.2) for d in (0.5, 1.0, 1.5, 2.0))
    assert ppo["seeds"] == 2 and ppo["gold_gain_peak"] == pytest.approx(peak)
    assert ppo["drop"] == pytest.approx(oo.gao_rl(2.0, 0.1, 0.2) - peak) and ppo["drop"] < 0
    assert ppo["gold_gain_end_se"] == pytest.approx(math.sqrt(2 * 0.01 ** 2) / 2)  # SE of a mean of two seeds
    text = oo.summary_text(rows, fit_rows)
    assert "best-of-n d(α−βd)" in text and "PPO kl=all" in text and "PPO kl=0 d(α−β log d)" in text
