"""How much the world's simulated humans and judges agree, measured as AlpacaFarm does.

- human–human agreement: two different labelers label the same pair; how often they match;
- judge–human agreement: a judge's label (drawn from its probability) against a held-out
  labeler's label on the same pair;
- variance: how often an annotator disagrees with itself when asked the same pair twice
  (2 p (1 - p), averaged), the "variance" column of AlpacaFarm's annotator table;
- prefers_longer: how often the chosen output is the longer one (pairs of unequal length).

All on *policy-like* pairs: two demonstrations drawn independently for the same instruction,
as two samples of an SFT policy would be.
"""

from __future__ import annotations

import numpy as np

from prefgym.seeding import rng_for
from prefgym.world.demonstrations import DEMONSTRATION_MIX, sample_style, write_output
from prefgym.world.families import sample_task
from prefgym.world.humans import HumanPopulation
from prefgym.world.judges import POOL, WORLD_JUDGES, world_judge_prob


def policy_like_pairs(n: int, seed: int = 0, with_styles: bool = False) -> list[dict]:
    """`n` pairs of two different demonstrations drawn independently for the same instruction.

    with_styles: also give the style each output was written in (`style_1`, `style_2`)."""
    rng = rng_for("world-policy-like-pairs", seed)
    pairs = []
    while len(pairs) < n:
        task = sample_task(rng)
        s1 = sample_style(rng, DEMONSTRATION_MIX)
        o1 = write_output(task, s1, rng)
        s2 = sample_style(rng, DEMONSTRATION_MIX)
        o2 = write_output(task, s2, rng)
        if o1 != o2:
            pair = {"instruction": task.instruction, "input": task.input, "output_1": o1, "output_2": o2}
            pairs.append({**pair, "style_1": s1, "style_2": s2} if with_styles else pair)
    return pairs


def _args(pair: dict) -> tuple:
    return pair["instruction"], pair.get("input", "") or "", pair["output_1"], pair["output_2"]


def human_agreement(pairs: list[dict], population: HumanPopulation | None = None, seed: int = 0) -> float:
    """Fraction of pairs on which two different labelers (drawn per pair) give the same preference."""
    population = population or HumanPopulation(seed)
    rng = rng_for("world-human-agreement", seed)
    same = 0
    for pair in pairs:
        a, b = rng.choice(population.n_labelers, size=2, replace=False)
        same += population.preference(int(a), *_args(pair)) == population.preference(int(b), *_args(pair))
    return same / len(pairs)


def judge_agreement(pairs: list[dict], judges: list[str] | None = None, population: HumanPopulation | None = None,
                    seed: int = 0, label_flip_prob: float = 0.0) -> dict:
    """Agreement of judges with a held-out human, and the judges' variance.

    judges: names in WORLD_JUDGES; one is drawn per pair (a pool) and shown the pair in a random
    order, as the annotator layer does. label_flip_prob: chance the label is flipped (training noise).
    """
    judges = judges or POOL
    population = population or HumanPopulation(seed)
    rng = rng_for("world-judge-agreement", seed, *judges, label_flip_prob)
    agree, variance, longer, human_longer = [], [], [], []
    for pair in pairs:
        params = WORLD_JUDGES[judges[int(rng.integers(len(judges)))]]
        p2 = world_judge_prob(params, *_args(pair), position_swapped=bool(rng.random() < 0.5))
        p2 = label_flip_prob + (1 - 2 * label_flip_prob) * p2
        label = 2 if rng.random() < p2 else 1
        human = population.preference(int(rng.integers(population.n_labelers)), *_args(pair))
        agree.append(label == human)
        variance.append(2 * p2 * (1 - p2))
        n1, n2 = len(pair["output_1"]), len(pair["output_2"])
        if n1 != n2:
            longer.append(label == (2 if n2 > n1 else 1))
            human_longer.append(human == (2 if n2 > n1 else 1))
    return {"agreement": float(np.mean(agree)), "agreement_se": float(np.std(agree) / np.sqrt(len(agree))),
            "variance": float(np.mean(variance)), "prefers_longer": float(np.mean(longer)),
            "human_prefers_longer": float(np.mean(human_longer))}


def human_variance(pairs: list[dict], population: HumanPopulation | None = None, seed: int = 0) -> float:
    """Mean 2 p (1 - p) of a random labeler per pair: how often a labeler would contradict itself."""
    population = population or HumanPopulation(seed)
    rng = rng_for("world-human-variance", seed)
    v = [2 * p * (1 - p) for p in (population.prob_output_2(int(rng.integers(population.n_labelers)), *_args(pair))
                                   for pair in pairs)]
    return float(np.mean(v))


def agreement_report(n_pairs: int = 2000, seed: int = 0) -> dict:
    """Every agreement number of the world on `n_pairs` policy-like pairs."""
    pairs = policy_like_pairs(n_pairs, seed)
    population = HumanPopulation(seed)
    report = {"pairs": n_pairs, "seed": seed,
              "human_human": human_agreement(pairs, population, seed),
              "human_variance": human_variance(pairs, population, seed),
              "pool": judge_agreement(pairs, POOL, population, seed),
              "pool_noisy": judge_agreement(pairs, POOL, population, seed, label_flip_prob=0.25),
              "greedy": judge_agreement(pairs, ["world-judge-greedy"], population, seed)}
    report["per_judge"] = {name: judge_agreement(pairs, [name], population, seed) for name in WORLD_JUDGES}
    return report
