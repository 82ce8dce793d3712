"""Reward over-optimization study: `prefgym study overoptimization` (Gao et al. 2022; AlpacaFarm Fig. 5).

For every seed, one run folder OUT/seed-<s>/ made of the pipeline's stages: the world, SFT, the
same preference pairs labelled by each source of feedback (`pool`: the run's noisy training pool,
`greedy`: one careful judge, `humans`: the world's simulated humans) and a reward model per
source. Each reward model is then optimised two ways:

- PPO at several KL coefficients, its policy saved every `snapshot_steps`; every snapshot (and
  step 0, the SFT policy) samples the first `n_eval` eval instructions with the evaluation
  sampling, and its KL(π‖π_SFT) is measured on those samples (k1: the mean over samples of the
  summed per-token log-ratio; k3 beside it);
- best-of-n for n = 1, 2, 4, ..., max_n from `max_n` SFT samples per instruction: the expected
  gold reward of the proxy's pick among n draws is estimated without bias from all max_n
  (`best_of_n_estimate`), at KL_bon = log n − (n − 1)/n; the humans judge real picks.

Every point carries the proxy (mean normalised reward-model score), the gold reward (the world's
gold quality) and its gain over SFT, the gold and human win-rates against the reference, each
with a standard error, and the mean response length. Gao's functional forms are fitted to the
gold gain against d = √KL: best-of-n R(d) = d(α − βd), RL R(d) = d(α − β log d).

Writes OUT/study.json (every number), OUT/figures/*.png, OUT/report.html (figures embedded) and
prints a summary table and the time of each stage. A rerun resumes (stage fingerprints, as
`prefgym run`); --overwrite redoes stages whose settings changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from prefgym.errors import ConfigError
from prefgym.methods.fields import REWARD_ENSEMBLE_RULES as ENSEMBLE_RULES

SOURCES = ("pool", "greedy", "humans")
"""Sources of preference labels, each training its own reward model."""
GREEDY_ANNOTATORS = "world_greedy"
ENSEMBLE_TAG = "pool-ensemble"
"""Folder of the ensemble of reward models trained on the pool's pairs (`--ensemble k`)."""


@dataclass
class StudyConfig:
    """Settings of the over-optimization study (defaults: the full study; its stage times are printed)."""

    out_dir: str = "prefgym-runs/overoptimization"
    """Study folder: one run folder per seed (seed-<s>/), study.json, figures/, report.html."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds; each builds its own world, SFT policy, labels and reward models."""
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    """Sources of labels: pool (the noisy training pool), greedy (one careful judge), humans."""
    kl_coefs: list[float] = field(default_factory=lambda: [0.0, 0.05])
    """PPO's (fixed) KL coefficients, one run each per source."""
    ppo_steps: int = 160
    """PPO steps per run (the pipeline's default run takes 100, at half the learning rate)."""
    snapshot_steps: int = 32
    """PPO policy saved and evaluated every this many steps."""
    ppo_lr: Optional[float] = 1e-4
    """PPO learning rate (None: the pipeline's, 5e-5 on the built-in world; a larger step shows
    over-optimization within fewer steps)."""
    max_n: int = 64
    """Samples per instruction for best-of-n; n runs over the powers of 2 up to it (and it)."""
    n_eval: int = 200
    """Eval instructions every policy is sampled and judged on (the first n_eval)."""
    scale: str = "default"
    """Scale of the built-in world and of the stages around PPO ('tiny', 'quick', 'default')."""
    world_dir: Optional[str] = None
    """An already built world folder for every seed (default: each seed builds its own)."""
    ensemble: int = 0
    """With k ≥ 2: also an ensemble of k reward models on the pool's labels, optimised as its mean,
    worst case and uncertainty-weighted score (pool source only)."""
    uwo_coef: float = 1.0
    """Weight of the members' variance in the uncertainty-weighted score (ensemble only)."""

    def ns(self) -> list[int]:
        """n of best-of-n: 1, 2, 4, ... up to max_n, and max_n itself."""
        ns = [2 ** k for k in range(int(math.log2(self.max_n)) + 1)]
        return ns + ([self.max_n] if ns[-1] != self.max_n else [])


QUICK = {"scale": "tiny", "kl_coefs": [0.0, 0.1], "ppo_steps": 4, "snapshot_steps": 2, "max_n": 4, "n_eval": 16}
"""`--quick`: a tiny study (seconds per stage) that exercises every part; used by the tests."""


def check_config(cfg: StudyConfig) -> None:
    """ConfigError naming the option for every setting out of range, before anything runs."""
    unknown = [s for s in cfg.sources if s not in SOURCES]
    if unknown or not cfg.sources:
        raise ConfigError(f"--sources: unknown source '{unknown[0] if unknown else ''}'; choose from "
                          f"{', '.join(SOURCES)}")
    checks = [("--seeds", bool(cfg.seeds) and len(set(cfg.seeds)) == len(cfg.seeds), "give distinct seeds"),
              ("--kl-coefs", bool(cfg.kl_coefs) and all(c >= 0 for c in cfg.kl_coefs), "give coefficients ≥ 0"),
              ("--max-n", cfg.max_n >= 1, f"n must be at least 1, got {cfg.max_n}"),
              ("--n-eval", cfg.n_eval >= 2, f"at least 2 instructions are needed, got {cfg.n_eval}"),
              ("--steps", cfg.ppo_steps >= 1, f"at least 1 PPO step, got {cfg.ppo_steps}"),
              ("--snapshot-steps", 1 <= cfg.snapshot_steps <= cfg.ppo_steps,
               f"between 1 and --steps ({cfg.ppo_steps}), got {cfg.snapshot_steps}"),
              ("--ensemble", cfg.ensemble == 0 or cfg.ensemble >= 2,
               f"0 (none) or at least 2 members, got {cfg.ensemble}"),
              ("--scale", cfg.scale in ("tiny", "quick", "default"), f"tiny, quick or default, got {cfg.scale!r}")]
    for option, ok, what in checks:
        if not ok:
            raise ConfigError(f"{option}: {what}")
    if cfg.ensemble and "pool" not in cfg.sources:
        raise ConfigError("--ensemble: the ensemble is trained on the pool's labels; add pool to --sources")


# ---------------------------------------------------------------------------------------------
# The maths


def best_of_n_weights(m: int, n: int) -> np.ndarray:
    """(m,) weight of the i-th smallest proxy (i = 1..m) being the best of n draws without
    replacement from m: C(i − 1, n − 1) / C(m, n). The weights sum to 1."""
    from scipy.special import gammaln

    i = np.arange(1, m + 1)
    log_w = np.full(m, -np.inf)
    ok = i >= n  # C(i − 1, n − 1) = 0 below n
    k = i[ok] - 1
    log_choose = gammaln(k + 1) - gammaln(n) - gammaln(k - n + 2)  # log C(k, n − 1)
    log_w[ok] = log_choose - (gammaln(m + 1) - gammaln(n + 1) - gammaln(m - n + 1))  # ... / C(m, n)
    return np.exp(log_w)


def best_of_n_estimate(proxy: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Unbiased estimate, per row, of E[value of the proxy's best among n of the row's samples].

    `proxy`, `values`: (N, m) scores and values of m samples per instruction. The best of n draws
    (without replacement) is the i-th smallest proxy with probability C(i − 1, n − 1) / C(m, n);
    averaging over all subsets of n this way uses every sample (Nakano et al. 2021, Gao et al. 2022).
    Returns (N,).
    """
    proxy, values = np.asarray(proxy, dtype=float), np.asarray(values, dtype=float)
    order = np.argsort(proxy, axis=1, kind="stable")
    return np.take_along_axis(values, order, axis=1) @ best_of_n_weights(proxy.shape[1], n)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ base policy) = log n − (n − 1)/n (Stiennon et al. 2020; Gao et al. 2022)."""
    return math.log(n) - (n - 1) / n


def best_of_n_curve(ranking, proxy, gold, wins, tokens, ns: list[int]) -> list[dict]:
    """Best-of-n points (all (N, m) arrays; `ranking` picks): for each n, KL_bon and its root, and
    the unbiased estimates (mean ± SE over instructions) of the pick's proxy, gold, gold gain over
    a single sample (paired per instruction), gold win-rate (%) and length."""
    curve = []
    base_gold = best_of_n_estimate(ranking, gold, 1)
    for n in ns:
        kl = best_of_n_kl(n)
        point = {"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl)}
        est_gold = best_of_n_estimate(ranking, gold, n)
        for name, values in (("proxy", best_of_n_estimate(ranking, proxy, n)), ("gold", est_gold),
                             ("gold_gain", est_gold - base_gold)):
            point[name], point[f"{name}_se"] = mean_se(values)
        win_rate = mean_se(best_of_n_estimate(ranking, wins, n))
        point["gold_win_rate"], point["gold_win_rate_se"] = 100 * win_rate[0], 100 * win_rate[1]
        point["length_tokens"] = float(best_of_n_estimate(ranking, tokens, n).mean())
        curve.append(point)
    return curve


def gao_bon(d, alpha, beta):
    """Gao et al.'s best-of-n form: gold gain R(d) = d(α − βd), d = √KL."""
    return d * (alpha - beta * d)


def gao_rl(d, alpha, beta):
    """Gao et al.'s RL form: gold gain R(d) = d(α − β log d), d = √KL."""
    return d * (alpha - beta * np.log(d))


def fit_gao(d, gain, form: str) -> dict:
    """α, β and their standard errors of `form` ('bon' or 'rl') fitted to gold gains at d = √KL.

    Points with d ≤ 0 (the SFT policy, where both forms are 0) are left out; fewer than 3 points
    left give NaN. Least squares by `scipy.optimize.curve_fit`, started at the linear solution.
    """
    from scipy.optimize import curve_fit

    fn = {"bon": gao_bon, "rl": gao_rl}[form]
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    keep = (d > 0) & np.isfinite(gain)
    d, gain = d[keep], gain[keep]
    nan = {"alpha": float("nan"), "beta": float("nan"), "alpha_se": float("nan"), "beta_se": float("nan"),
           "n_points": int(len(d))}
    if len(d) < 3:
        return nan
    basis = np.stack([d, -(d * d if form == "bon" else d * np.log(d))], axis=1)  # R = α·d − β·(d² or d log d)
    start = np.linalg.lstsq(basis, gain, rcond=None)[0]
    params, cov = curve_fit(fn, d, gain, p0=start)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    return {"alpha": float(params[0]), "beta": float(params[1]), "alpha_se": float(se[0]), "beta_se": float(se[1]),
            "n_points": int(len(d))}


def mean_se(x) -> tuple[float, float]:
    """Mean and its standard error (std with ddof 1 / √n) of a 1-d sample."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def gold_wins(gold: np.ndarray, reference_gold: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """1 where gold beats the reference's, 0 where it loses, 0.5 on a tie (`gold_win_rate`'s rule)."""
    gold = np.asarray(gold, dtype=float)
    ref = np.asarray(reference_gold, dtype=float)
    return np.where(gold > ref + tol, 1.0, np.where(gold < ref - tol, 0.0, 0.5))


# ---------------------------------------------------------------------------------------------
# Sampling and judging one policy


def as_records(records: list[dict], outputs: list[str]) -> list[dict]:
    """(instruction, input, output) records: what a reward model scores."""
    return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": o}
            for r, o in zip(records, outputs)]


class Judge:
    """What judges the points of one seed: the eval subset, its reference, the gold, the humans."""

    def __init__(self, records: list[dict], human_annotators: str, seed: int, cache_dir: Path):
        from prefgym.world.gold import gold_quality

        self.records, self.human_annotators, self.seed, self.cache_dir = records, human_annotators, seed, cache_dir
        self.gold_quality = gold_quality
        self.reference_gold = np.array([gold_quality(r["instruction"], r.get("input") or "", r["output"])
                                        for r in records])

    def gold(self, outputs: list[str], rows: list[int] | None = None) -> np.ndarray:
        rows = range(len(self.records)) if rows is None else rows
        return np.array([self.gold_quality(self.records[i]["instruction"], self.records[i].get("input") or "", o)
                         for i, o in zip(rows, outputs)])

    def human_win_rate(self, outputs: list[str]) -> tuple[float, float]:
        """Win-rate (%) and SE of `outputs` (one per record) against the reference, judged by the humans."""
        from prefgym.annotators import annotate_pairs
        from prefgym.evaluation.winrate import make_reference_pairs, win_rate

        model = [{**r, "output": o} for r, o in zip(self.records, outputs)]
        annotations = annotate_pairs(make_reference_pairs(model, self.records), self.human_annotators,
                                     seed=self.seed, cache_dir=self.cache_dir, progress=False)
        result = win_rate([a["preference"] for a in annotations])
        return result["win_rate"], result["standard_error"]


def sample_with_kl(policy, reference, tokenizer, prompts: list[str], seeds: list[int], temperature: float,
                   max_new_tokens: int, max_prompt_length: int, batch_size: int = 64) -> dict:
    """One sample per prompt from `policy` at `temperature`, with its KL to `reference` (None: 0).

    Returns outputs (texts), finished (ended with EOS), tokens (response length with EOS), ids
    (the response's token ids, EOS included), and
    per sample k1 = Σ_t log π/π_ref and k3 = Σ_t (e^{−r} − 1 + r), r the per-token log-ratio, both
    read at the sampling temperature: estimates of KL between the distributions sampled from.
    """
    import torch
    import torch.nn.functional as F

    from prefgym.methods import common

    out = {"outputs": [], "finished": [], "tokens": [], "k1": [], "k3": [], "ids": []}
    for start in range(0, len(prompts), batch_size):
        q_ids, q_mask, r_ids = common.sample_responses(
            policy, tokenizer, prompts[start:start + batch_size], seeds=seeds[start:start + batch_size],
            temperature=temperature, max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length)
        r_ids, r_mask, has_eos = common.truncate_after_eos(r_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
        P = q_ids.shape[1]
        ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
        if reference is None:
            ratio = torch.zeros(r_ids.shape, dtype=torch.float32, device=r_ids.device)
        else:
            with torch.no_grad():
                full = F.pad(r_mask, (P, 0))
                ratio = (common.response_logprobs(policy, ids, mask, temperature, full)
                         - common.response_logprobs(reference, ids, mask, temperature, full))[:, P:]
            ratio = torch.where(r_mask.bool(), ratio, torch.zeros_like(ratio))
        out["k1"] += common.masked_sum(ratio, r_mask, dim=-1).tolist()
        out["k3"] += common.masked_sum(torch.expm1(-ratio) + ratio, r_mask, dim=-1).tolist()
        out["outputs"] += tokenizer.batch_decode(r_ids, skip_special_tokens=True)
        out["finished"] += has_eos.tolist()
        out["tokens"] += r_mask.sum(-1).tolist()
        out["ids"] += [row[:n] for row, n in zip(r_ids.tolist(), r_mask.sum(-1).tolist())]
    return out


def point_summary(samples: dict, proxy: np.ndarray, gold: np.ndarray, sft_gold: np.ndarray, judge: Judge) -> dict:
    """One point of a curve: KL, proxy, gold (and its gain over SFT, paired), win-rates, length."""
    kl, kl_se = mean_se(samples["k1"])
    k3, _ = mean_se(samples["k3"])
    wins = gold_wins(gold, judge.reference_gold)
    human, human_se = judge.human_win_rate(samples["outputs"])
    row = {"kl": kl, "kl_se": kl_se, "kl_k3": k3, "sqrt_kl": math.sqrt(max(kl, 0.0))}
    for name, values in (("proxy", proxy), ("gold", gold), ("gold_gain", gold - sft_gold)):
        row[name], row[f"{name}_se"] = mean_se(values)
    row["gold_win_rate"], row["gold_win_rate_se"] = (100 * v for v in mean_se(wins))
    row.update(human_win_rate=human, human_win_rate_se=human_se, length_tokens=float(np.mean(samples["tokens"])),
               length_chars=float(np.mean([len(o) for o in samples["outputs"]])),
               no_eos_fraction=float(1 - np.mean(samples["finished"])))
    return row


# ---------------------------------------------------------------------------------------------
# One seed's run folder


class SeedRun:
    """The stages of one seed in OUT/seed-<s>/, built on the pipeline's (`prefgym.pipeline.Pipeline`)."""

    def __init__(self, study: StudyConfig, seed: int):
        from prefgym.pipeline import Pipeline, RunConfig

        self.study, self.seed = study, seed
        self.out = Path(study.out_dir) / f"seed-{seed}"
        self.run_cfg = RunConfig(out_dir=str(self.out), scale=study.scale, seed=seed, world_dir=study.world_dir,
                                 methods=["ppo"],
                                 stages={"ppo": {"steps": study.ppo_steps, "snapshot_steps": study.snapshot_steps,
                                                 **({"lr": study.ppo_lr} if study.ppo_lr else {})}})
        self.pipeline = Pipeline(self.run_cfg)
        self.annotators = {"pool": self.run_cfg.train_annotators, "greedy": GREEDY_ANNOTATORS,
                           "humans": self.run_cfg.human_annotators}

    # --- what the stages read and write ----------------------------------------------------------
    def ppo_config(self, tag: str, kl_coef: float, ensemble_rule: str | None = None):
        cfg = self.pipeline.method_config("ppo", tag)
        extra = {"reward_ensemble": ensemble_rule, "uwo_coef": self.study.uwo_coef} if ensemble_rule else {}
        return dataclasses.replace(cfg, kl_coef=kl_coef, output_dir=str(self.ppo_dir(tag, kl_coef, ensemble_rule)),
                                   **extra)

    def ppo_dir(self, tag: str, kl_coef: float, ensemble_rule: str | None = None) -> Path:
        return self.pipeline.method_dir(f"ppo-kl{kl_coef:g}" + (f"-{ensemble_rule}" if ensemble_rule else ""), tag)

    def eval_settings(self) -> dict:
        sampling = self.pipeline.sampling()
        return {"n_eval": self.study.n_eval, "temperature": sampling.temperature,
                "max_new_tokens": sampling.max_new_tokens, "human_annotators": self.run_cfg.human_annotators,
                "eval_data": self.pipeline.fingerprint_settings({"split": self.pipeline.split("eval")})["split"]}

    def judge(self) -> Judge:
        return Judge(self.pipeline.records("eval")[:self.study.n_eval], self.run_cfg.human_annotators, self.seed,
                     self.out / "annotator_cache")

    def prompts(self, tokenizer) -> list[str]:
        from prefgym.data.prompts import make_prompt_formatter

        fmt = make_prompt_formatter(tokenizer, self.pipeline.method_config("ppo", "pool").prompt_format)
        return [fmt(r) for r in self.pipeline.records("eval")[:self.study.n_eval]]

    # --- stages ----------------------------------------------------------------------------------
    def stages(self) -> list:
        from prefgym.methods.reward_model import train as reward_model
        from prefgym.methods.sft import train_sft
        from prefgym.pipeline import Stage

        p, out, settings = self.pipeline, self.out, self.pipeline.fingerprint_settings
        sft = p.sft_config()
        plan = [Stage("world", p.build_world, 1, settings=p.world_settings(), outputs=p.world_outputs()),
                Stage("sft", lambda: train_sft(sft), 2, settings=settings(sft), after=("world",),
                      outputs=(out / "sft",))]
        first = self.study.sources[0]
        for tag in self.study.sources:
            pairs, rm = p.preference_data_config(self.annotators[tag], tag), p.reward_model_config(tag)
            after_pairs = ("sft",) if tag == first else ("sft", f"{first}/preference_data")
            plan.append(Stage(f"{tag}/preference_data", lambda c=pairs, t=tag: self.label_pairs(c, t, first), 1,
                              settings=settings(pairs), after=after_pairs, outputs=(out / tag / "preference",)))
            plan.append(Stage(f"{tag}/reward_model", lambda c=rm: reward_model(c), 1, settings=settings(rm),
                              after=("sft", f"{tag}/preference_data"), outputs=(out / tag / "reward_model",)))
        if self.study.ensemble:  # k reward models on the pool's pairs (members differ in seed)
            rm = dataclasses.replace(p.reward_model_config(ENSEMBLE_TAG), preference_file=p.pairs_file("pool"),
                                     ensemble_size=self.study.ensemble)
            plan.append(Stage(f"{ENSEMBLE_TAG}/reward_model", lambda c=rm: reward_model(c), self.study.ensemble,
                              settings=settings(rm), after=("sft", "pool/preference_data"),
                              outputs=(out / ENSEMBLE_TAG / "reward_model",)))
        ev = self.eval_settings()
        plan.append(Stage("eval/sft", self.evaluate_sft, 1, settings=ev, after=("sft",),
                          outputs=(out / "study" / "sft.json",)))
        plan.append(Stage("eval/bon_samples", self.sample_best_of_n, 2, settings={**ev, "max_n": self.study.max_n},
                          after=("sft",), outputs=(out / "study" / "bon_samples.json",)))
        for tag, rule in self.optimised():
            for c in self.study.kl_coefs:
                ppo = self.ppo_config(tag, c, rule)
                run_name = self.ppo_dir(tag, c, rule).name
                name = f"{tag}/{run_name}"
                plan.append(Stage(name, lambda cfg=ppo: self.train_ppo(cfg), 4, settings=settings(ppo),
                                  after=("sft", f"{tag}/reward_model"), outputs=(Path(ppo.output_dir),)))
                plan.append(Stage(f"{tag}/curve-{run_name}", lambda t=tag, k=c, r=rule: self.evaluate_ppo(t, k, r), 2,
                                  settings=ev, after=(name, "eval/sft", f"{tag}/reward_model"),
                                  outputs=(self.curve_file(tag, c, rule),)))
            bon = f"{tag}/bon" + (f"-{rule}" if rule else "")
            plan.append(Stage(bon, lambda t=tag, r=rule: self.evaluate_best_of_n(t, r), 1,
                              settings={**ev, "ns": self.study.ns(), "uwo_coef": self.study.uwo_coef if rule else None},
                              after=("eval/bon_samples", f"{tag}/reward_model"), outputs=(self.bon_file(tag, rule),)))
        return plan

    def optimised(self) -> list[tuple[str, str | None]]:
        """(source, ensemble rule or None) of every reward model optimised."""
        pairs = [(tag, None) for tag in self.study.sources]
        if self.study.ensemble:
            pairs += [(ENSEMBLE_TAG, rule) for rule in ENSEMBLE_RULES]
        return pairs

    def curve_file(self, tag: str, kl_coef: float, rule: str | None = None) -> Path:
        return self.out / "study" / f"{tag}-{self.ppo_dir(tag, kl_coef, rule).name}.json"

    def bon_file(self, tag: str, rule: str | None = None) -> Path:
        return self.out / "study" / (f"{tag}-bon" + (f"-{rule}" if rule else "") + ".json")

    def label_pairs(self, cfg, tag: str, first: str) -> None:
        """The first source samples and labels the pairs; the others label the same samples' pairs
        (the same seed pairs them alike), so every reward model learns from the same comparisons."""
        from prefgym.methods.preference_data import run as preference_data

        if tag != first:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.out / first / "preference" / "samples.jsonl", Path(cfg.output_dir) / "samples.jsonl")
        preference_data(cfg)

    @staticmethod
    def train_ppo(cfg) -> None:
        from prefgym.methods.ppo import train

        train(cfg)

    def _models(self, policy_dir: Path | None):
        from prefgym.models import load_model_and_tokenizer

        sft, tokenizer = load_model_and_tokenizer(self.out / "sft", device="auto", padding_side="left")
        policy = None if policy_dir is None else load_model_and_tokenizer(policy_dir, device="auto")[0]
        return sft, policy, tokenizer

    def _sample(self, policy, reference, tokenizer, prompts, seeds) -> dict:
        sampling, ppo = self.pipeline.sampling(), self.pipeline.method_config("ppo", "pool")
        return sample_with_kl(policy, reference, tokenizer, prompts, seeds, sampling.temperature,
                              sampling.max_new_tokens, ppo.max_prompt_length, batch_size=sampling.batch_size)

    def eval_seeds(self) -> list[int]:
        """One sampling seed per eval instruction, the same for every policy (common random numbers)."""
        from prefgym.seeding import stable_hash

        return [stable_hash(self.seed, "overoptimization-eval", i) for i in range(self.study.n_eval)]

    def evaluate_sft(self) -> None:
        """The SFT policy's samples on the eval subset (step 0 of every curve), gold and human win-rate."""
        from prefgym.io import write_json

        sft, _, tokenizer = self._models(None)
        prompts = self.prompts(tokenizer)
        samples = self._sample(sft, None, tokenizer, prompts, self.eval_seeds()[:len(prompts)])
        judge = self.judge()
        samples["gold"] = judge.gold(samples["outputs"]).tolist()
        write_json(self.out / "study" / "sft.json", samples)

    def evaluate_ppo(self, tag: str, kl_coef: float, rule: str | None) -> None:
        """Every snapshot of one PPO run (and step 0, the SFT policy) sampled, measured and judged."""
        from prefgym.io import read_records, write_json

        judge, score = self.judge(), self.scorer(tag, rule)

        def proxy(samples):
            return score(as_records(judge.records, samples["outputs"]))

        sft_samples = json.loads((self.out / "study" / "sft.json").read_text())
        sft_gold = np.array(sft_samples["gold"])
        snapshots = sorted((self.ppo_dir(tag, kl_coef, rule) / "snapshots").glob("step-*"),
                           key=lambda p: int(p.name.split("-")[1]))
        curve = [{"step": 0, **point_summary(sft_samples, proxy(sft_samples), sft_gold, sft_gold, judge)}]
        for snapshot in snapshots:
            sft, policy, tokenizer = self._models(snapshot)
            samples = self._sample(policy, sft, tokenizer, self.prompts(tokenizer), self.eval_seeds())
            curve.append({"step": int(snapshot.name.split("-")[1]),
                          **point_summary(samples, proxy(samples), judge.gold(samples["outputs"]), sft_gold, judge)})
        metrics = read_records(self.ppo_dir(tag, kl_coef, rule) / "metrics.jsonl")
        by_step = {m["step"]: m for m in metrics}
        for point in curve[1:]:  # what PPO saw while training, beside what the study measured
            point["train_score"] = by_step.get(point["step"], {}).get("score")
        write_json(self.curve_file(tag, kl_coef, rule), curve)

    def scorer(self, tag: str, rule: str | None):
        """records -> (N,) normalised proxy scores of the reward model `tag` optimises (or the ensemble rule)."""
        from prefgym.methods.reward_model import load_reward_scorer
        from prefgym.models.loading import resolve_device

        return load_reward_scorer(self.out / tag / "reward_model", rule or "mean", self.study.uwo_coef,
                                  device=resolve_device("auto"), batch_size=64).score

    def sample_best_of_n(self) -> None:
        """max_n SFT samples per eval instruction, with their gold reward."""
        from prefgym.io import write_json
        from prefgym.seeding import stable_hash

        m = self.study.max_n
        sft, _, tokenizer = self._models(None)
        prompts = self.prompts(tokenizer)
        seeds = [stable_hash(self.seed, "overoptimization-bon", i, j) for i in range(len(prompts)) for j in range(m)]
        samples = self._sample(sft, None, tokenizer, [p for p in prompts for _ in range(m)], seeds)
        gold = self.judge().gold(samples["outputs"], [i for i in range(len(prompts)) for _ in range(m)])
        write_json(self.out / "study" / "bon_samples.json",
                   {"outputs": samples["outputs"], "finished": samples["finished"], "tokens": samples["tokens"],
                    "gold": gold.tolist(), "max_n": m})

    def evaluate_best_of_n(self, tag: str, rule: str | None) -> None:
        """Best-of-n curve of one reward model: unbiased gold and proxy from all samples; humans judge real picks."""
        from prefgym.io import write_json
        from prefgym.methods.best_of_n import BestOfNConfig
        from prefgym.methods.common import missing_eos_scores

        judge = self.judge()
        data = json.loads((self.out / "study" / "bon_samples.json").read_text())
        m, N = data["max_n"], len(judge.records)
        outputs = np.array(data["outputs"], dtype=object).reshape(N, m)
        records = as_records([r for r in judge.records for _ in range(m)], list(outputs.ravel()))
        proxy = np.asarray(self.scorer(tag, rule)(records), dtype=float).reshape(N, m)
        finished = np.array(data["finished"]).reshape(N, m)
        ranking = missing_eos_scores(proxy, finished, BestOfNConfig.missing_eos_penalty)  # what best-of-n picks by
        gold = np.array(data["gold"]).reshape(N, m)
        wins = gold_wins(gold, judge.reference_gold[:, None])
        tokens = np.array(data["tokens"], dtype=float).reshape(N, m)
        curve = best_of_n_curve(ranking, proxy, gold, wins, tokens, self.study.ns())
        for point in curve:
            picks = [row[int(np.argmax(r[:point["n"]]))] for row, r in zip(outputs, ranking)]  # best of the first n
            point["human_win_rate"], point["human_win_rate_se"] = judge.human_win_rate(picks)
        write_json(self.bon_file(tag, rule), curve)


# ---------------------------------------------------------------------------------------------
# The study: every seed, then the fits, figures, study.json and report.html


def method_label(kl_coef: float | None = None, rule: str | None = None) -> str:
    name = "best-of-n" if kl_coef is None else f"PPO kl={kl_coef:g}"
    return name + (f" ({rule} of ensemble)" if rule else "")


def collect(study: StudyConfig, runs: list[SeedRun]) -> list[dict]:
    """One record per (seed, source, method): its curve of points."""
    curves = []
    for run in runs:
        for tag, rule in run.optimised():
            source = tag if rule is None else f"{tag}-{rule}"
            for c in study.kl_coefs:
                curves.append({"seed": run.seed, "source": source, "method": "ppo", "kl_coef": c,
                               "label": method_label(c),
                               "points": json.loads(run.curve_file(tag, c, rule).read_text())})
            curves.append({"seed": run.seed, "source": source, "method": "best_of_n", "kl_coef": None,
                           "label": method_label(), "points": json.loads(run.bon_file(tag, rule).read_text())})
    return curves


def fits(curves: list[dict]) -> list[dict]:
    """Gao's forms per source: best-of-n, RL pooled over KL coefficients, and RL per coefficient
    (each over all seeds' points)."""
    rows = []
    for source in dict.fromkeys(c["source"] for c in curves):
        mine = [c for c in curves if c["source"] == source]
        groups = [("best_of_n", None, "bon", [c for c in mine if c["method"] == "best_of_n"]),
                  ("ppo", "all", "rl", [c for c in mine if c["method"] == "ppo"])]
        groups += [("ppo", k, "rl", [c for c in mine if c["method"] == "ppo" and c["kl_coef"] == k])
                   for k in dict.fromkeys(c["kl_coef"] for c in mine if c["method"] == "ppo")]
        for method, kl_coef, form, group in groups:
            points = [p for c in group for p in c["points"]]
            fit = fit_gao([p["sqrt_kl"] for p in points], [p["gold_gain"] for p in points], form)
            rows.append({"source": source, "method": method, "kl_coef": kl_coef, "form": form, **fit})
    return rows


def summary(curves: list[dict]) -> list[dict]:
    """Per (source, method), averaged over seeds: where gold peaks and where it ends, the proxy's
    rise, the human win-rate at SFT, peak and end; `drop` = end − peak of the gold gain (≤ 0)."""
    rows = []
    keys = dict.fromkeys((c["source"], c["label"]) for c in curves)
    for source, label in keys:
        group = [c for c in curves if c["source"] == source and c["label"] == label]
        per_seed = []
        for c in group:
            pts = c["points"]
            peak = max(pts, key=lambda p: p["gold_gain"])
            end = pts[-1]
            per_seed.append({"sqrt_kl_end": end["sqrt_kl"], "proxy_rise": end["proxy"] - pts[0]["proxy"],
                             "gold_gain_peak": peak["gold_gain"], "sqrt_kl_peak": peak["sqrt_kl"],
                             "gold_gain_end": end["gold_gain"], "gold_gain_end_se": end["gold_gain_se"],
                             "drop": end["gold_gain"] - peak["gold_gain"],
                             "human_sft": pts[0]["human_win_rate"], "human_peak": max(p["human_win_rate"] for p in pts),
                             "human_end": end["human_win_rate"], "human_end_se": end["human_win_rate_se"],
                             "length_end": end["length_tokens"]})
        row = {"source": source, "method": label, "seeds": len(per_seed)}
        for key in per_seed[0]:
            values = [s[key] for s in per_seed]
            # the standard error of a mean over seeds: √(Σ SE²) / k
            row[key] = float(np.sqrt(np.sum(np.square(values))) / len(values)) if key.endswith("_se") \
                else float(np.mean(values))
            if key in ("drop", "gold_gain_end", "human_end", "proxy_rise"):
                row[f"{key}_seeds"] = [round(v, 4) for v in values]
        rows.append(row)
    return rows


SOURCE_TITLES = {"pool": "noisy pool", "greedy": "greedy judge", "humans": "simulated humans",
                 **{f"{ENSEMBLE_TAG}-{r}": f"noisy pool, ensemble {r}" for r in ENSEMBLE_RULES}}
PANELS = [("proxy", "proxy: reward-model score (normalised)"), ("gold_gain", "gold reward gain over SFT"),
          ("human_win_rate", "human win-rate vs reference (%)")]


def draw_source(axes, curves: list[dict], fit_rows: list[dict], source: str) -> None:
    """Three panels (proxy, gold gain with Gao's fits, human win-rate) against √KL for one source:
    a colour per method, a line per seed (later seeds fainter), ± 1.96 SE bars."""
    import matplotlib.pyplot as plt

    mine = [c for c in curves if c["source"] == source]
    labels = list(dict.fromkeys(c["label"] for c in mine))
    colours = dict(zip(labels, plt.get_cmap("tab10").colors))
    seeds = sorted({c["seed"] for c in mine})
    for c in mine:
        alpha = 1.0 if c["seed"] == seeds[0] else 0.45
        x = [p["sqrt_kl"] for p in c["points"]]
        for ax, (metric, _) in zip(axes, PANELS):
            y = [p[metric] for p in c["points"]]
            e = [1.96 * (p.get(f"{metric}_se") or 0) for p in c["points"]]
            ax.errorbar(x, y, yerr=e, color=colours[c["label"]], alpha=alpha, marker="o", ms=3, lw=1.2, capsize=2,
                        label=c["label"] if c["seed"] == seeds[0] else None)
    top = max((p["sqrt_kl"] for c in mine for p in c["points"]), default=1.0) or 1.0
    d = np.linspace(1e-3, top, 100)
    for fit in fit_rows:
        if fit["source"] == source and fit["kl_coef"] in (None, "all") and np.isfinite(fit["alpha"]):
            fn = gao_bon if fit["form"] == "bon" else gao_rl
            axes[1].plot(d, fn(d, fit["alpha"], fit["beta"]), ls="--", lw=1,
                         color="black" if fit["form"] == "bon" else "grey",
                         label=f"fit {'d(α−βd)' if fit['form'] == 'bon' else 'd(α−β log d)'}")
    axes[1].axhline(0, color="grey", lw=0.6)
    axes[2].axhline(50, color="grey", lw=0.6, ls=":")
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(f"{SOURCE_TITLES.get(source, source)}: {title}", fontsize=9)
        ax.set_xlabel("√KL(π ‖ π_SFT)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)


def write_figures(folder: Path, curves: list[dict], fit_rows: list[dict]) -> dict[str, Path]:
    """One figure per source and one with every source (a row each); caption -> PNG path."""
    import matplotlib.pyplot as plt

    from prefgym.evaluation.plots import save_figure

    sources = list(dict.fromkeys(c["source"] for c in curves))
    figures = {}
    fig, axes = plt.subplots(len(sources), 3, figsize=(13, 3.3 * len(sources)), squeeze=False, sharex=True)
    for row, source in zip(axes, sources):
        draw_source(row, curves, fit_rows, source)
    fig.suptitle("Over-optimization: proxy, gold and human win-rate against √KL (seeds: solid, faint)")
    fig.tight_layout()
    figures["Every source"] = save_figure(fig, folder / "overoptimization.png")
    for source in sources:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        draw_source(axes, curves, fit_rows, source)
        fig.tight_layout()
        figures[SOURCE_TITLES.get(source, source)] = save_figure(fig, folder / f"overoptimization_{source}.png")
    return figures


def summary_text(rows: list[dict], fit_rows: list[dict]) -> str:
    """The printed summary: one line per (source, method), then the fits."""
    head = (f"{'source':<22} {'method':<30} {'√KL end':>7} {'proxy↑':>7} {'gold peak (√KL)':>16} "
            f"{'gold end':>9} {'drop':>7} {'human SFT→peak→end':>20}")
    lines = ["gold gain over SFT (world gold quality, 0-1) and human win-rate (%) vs the reference; mean over seeds",
             head]
    for r in rows:
        lines.append(f"{r['source']:<22} {r['method']:<30} {r['sqrt_kl_end']:7.2f} {r['proxy_rise']:+7.2f} "
                     f"{r['gold_gain_peak']:+8.3f} ({r['sqrt_kl_peak']:4.2f}) {r['gold_gain_end']:+9.3f} "
                     f"{r['drop']:+7.3f} {r['human_sft']:6.1f}→{r['human_peak']:5.1f}→{r['human_end']:5.1f}")
    lines += ["", "Gao et al.'s fits of the gold gain against d = √KL (all seeds' points):"]
    for f in fit_rows:
        kl = f["kl_coef"] if f["kl_coef"] in (None, "all") else format(f["kl_coef"], "g")
        what = "best-of-n d(α−βd)" if f["form"] == "bon" else f"PPO kl={kl} d(α−β log d)"
        lines.append(f"  {f['source']:<22} {what:<30} α = {f['alpha']:+.4f} ± {f['alpha_se']:.4f}   "
                     f"β = {f['beta']:+.4f} ± {f['beta_se']:.4f}   ({f['n_points']} points)")
    return "\n".join(lines)


def report_html(study: StudyConfig, rows: list[dict], fit_rows: list[dict], figures: dict[str, Path],
                times: dict[str, float]) -> str:
    """The self-contained report page: what was run, the summary and fit tables, the figures."""
    import pandas as pd

    from prefgym.evaluation.plots import render_report_html_text

    intro = (f"<p>Seeds {', '.join(map(str, study.seeds))}; scale {study.scale}; PPO {study.ppo_steps} steps at "
             f"kl_coef "
             f"{', '.join(f'{c:g}' for c in study.kl_coefs)}, evaluated every {study.snapshot_steps} steps; best-of-n "
             f"up to n = {study.max_n}; {study.n_eval} eval instructions. KL is the k1 estimate on the eval samples; "
             "gold is the world's gold quality; the human win-rate is the simulated humans' judgement against the "
             f"reference. Total time {sum(times.values()):.0f} s.</p>")
    tables = ["<h2>Summary (mean over seeds)</h2>", pd.DataFrame(rows).round(4).to_html(index=False),
              "<h2>Gao et al.'s fits of the gold gain against √KL</h2>",
              pd.DataFrame(fit_rows).round(5).to_html(index=False),
              "<h2>Stage times (s, all seeds)</h2>", pd.DataFrame([times]).round(1).to_html(index=False)]
    page = render_report_html_text(None, figures, title="prefgym over-optimization study")
    head, body = page.split("</h1>", 1)  # the summary between the title and the figures
    return head + "</h1>" + intro + "\n".join(tables) + body


def run_study(study: StudyConfig, overwrite: bool = False) -> dict:
    """Run (or resume) every seed's stages, then fit, plot and report; returns study.json's content."""
    from prefgym.io import write_json, write_text_atomic
    from prefgym.pipeline import plan_stages, run_stages
    from prefgym.progress import stderr_console

    check_config(study)
    runs = [SeedRun(study, s) for s in study.seeds]
    plans = [(run, run.stages()) for run in runs]
    for run, stages in plans:  # fail now, not twenty minutes in
        plan_stages(stages, run.out, overwrite)
    times: dict[str, float] = {}
    for run, stages in plans:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / "run_config.json", dataclasses.asdict(run.run_cfg))
        ran = run_stages(stages, run.out, overwrite=overwrite)
        for stage in stages:  # timings.json may hold stages of older studies in the same folder
            times[stage.name] = times.get(stage.name, 0.0) + ran.get(stage.name, 0.0)
    out = Path(study.out_dir)
    curves = collect(study, runs)
    fit_rows, rows = fits(curves), summary(curves)
    figures = write_figures(out / "figures", curves, fit_rows)
    result = {"config": dataclasses.asdict(study), "summary": rows, "fits": fit_rows, "curves": curves,
              "stage_seconds": times, "total_seconds": round(sum(times.values()), 1)}
    write_json(out / "study.json", result)
    write_text_atomic(out / "report.html", report_html(study, rows, fit_rows, figures, times))
    typer.echo(summary_text(rows, fit_rows))
    stderr_console().print("stage times, all seeds: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
                  + f"; total {sum(times.values()):.0f}s", highlight=False, markup=False)
    return result


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym study overoptimization`."""

    @app.command("overoptimization")
    def overoptimization_command(
        out: Path = typer.Option(None, "--out", help="Study folder (default prefgym-runs/overoptimization)."),
        seeds: str = typer.Option("0,1", "--seeds", help="Comma-separated seeds (≥ 2 for intervals across seeds)."),
        sources: str = typer.Option(",".join(SOURCES), "--sources", help="Sources of labels: pool, greedy, humans."),
        kl_coefs: str = typer.Option(None, "--kl-coefs", help="PPO KL coefficients (default 0,0.05)."),
        steps: int = typer.Option(None, "--steps", help="PPO steps per run (default 160)."),
        snapshot_steps: int = typer.Option(None, "--snapshot-steps",
                                           help="Evaluate PPO every this many steps (default 32)."),
        lr: float = typer.Option(None, "--lr", help="PPO learning rate (default 1e-4)."),
        max_n: int = typer.Option(None, "--max-n", help="Largest n of best-of-n (default 64)."),
        n_eval: int = typer.Option(None, "--n-eval", help="Eval instructions per point (default 200)."),
        scale: str = typer.Option(None, "--scale", help="World scale: tiny, quick or default (the default)."),
        world: Path = typer.Option(None, "--world", help="An already built world folder for every seed."),
        ensemble: int = typer.Option(0, "--ensemble", help="Also k pool reward models optimised as mean/worst/uwo."),
        quick: bool = typer.Option(False, "--quick", help="A tiny study (tiny world, a few steps) to try it out."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo stages made with other settings."),
    ) -> None:
        """Reward over-optimization: gold, human win-rate and proxy against √KL, per source of labels.

        Per seed (OUT/seed-<s>/): world, SFT, the same pairs labelled by each source (the noisy
        pool, the greedy judge, the simulated humans), a reward model each; PPO at each KL
        coefficient (evaluated at every snapshot) and best-of-n (n = 1 … max_n, unbiased
        estimator). Fits Gao et al.'s forms (best-of-n d(α − βd), RL d(α − β log d)).
        Writes OUT/study.json, OUT/figures/*.png, OUT/report.html; prints a summary and the
        stage times. Rerun to resume.
        """
        values = dict(QUICK) if quick else {}
        from prefgym.pipeline import parse_numbers, parse_seeds

        given = {"out_dir": str(out) if out else None, "seeds": parse_seeds(seeds),
                 "sources": [s.strip() for s in sources.split(",") if s.strip()],
                 "kl_coefs": parse_numbers(kl_coefs, "--kl-coefs") if kl_coefs else None, "ppo_steps": steps,
                 "snapshot_steps": snapshot_steps, "ppo_lr": lr, "max_n": max_n, "n_eval": n_eval, "scale": scale,
                 "world_dir": str(world) if world else None, "ensemble": ensemble}
        values.update({k: v for k, v in given.items() if v is not None})
        study = StudyConfig(**values)
        result = run_study(study, overwrite=overwrite)
        folder = Path(study.out_dir)
        typer.echo(f"wrote {folder / 'study.json'}, {folder / 'report.html'}, {folder / 'figures'} "
                   f"({result['total_seconds']:.0f} s)")
