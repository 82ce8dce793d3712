"""Simulated human labelers of the built-in world (the stand-in for crowdworkers).

Each labeler values an output as

    utility = w_correct * checked_correctness + w_detail * detail + w_concise * conciseness
              + w_format * format + w_length * log(1 + words)

`detail` is the share of the task's content (steps, reasons) an output states, in tasks that ask
to explain; people value it, and most also like a longer answer a little for its own sake
(w_length > 0), while padding and rambling still cost through conciseness and format.

with their own weights, and prefers output_2 with probability sigmoid((u_2 - u_1) / temperature).
Labelers do not always check the answer: with probability 1 - check_prob they take it on trust
(correctness counts as 0.5 for both outputs). The draw of each decision is seeded by the
population seed, the labeler and the example, so a labeler answers the same question the same way.

With the defaults, on policy-like pairs (two demonstrations drawn independently for the same
instruction) one labeler agrees with the mode of three others on about 65% of pairs and picks the
longer output (by more than 30 characters) about 63% of the time, as crowdworkers do in
AlpacaFarm / AlpacaEval (65.7% and 0.64); `prefgym analyze-annotators` measures both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from prefgym.seeding import rng_for
from prefgym.world.gold import gold_components


@dataclass(frozen=True)
class Labeler:
    """One simulated labeler's taste and care."""

    w_correct: float
    """Weight on correctness (when checked)."""
    w_detail: float
    """Weight on detail: the share of the task's content (steps, reasons) the output states."""
    w_concise: float
    """Weight on conciseness."""
    w_format: float
    """Weight on format (no filler, no repetition)."""
    w_length: float
    """Weight on log(1 + words): > 0 likes longer answers."""
    check_prob: float
    """Probability of actually checking whether the answer is right."""
    temperature: float
    """Decision noise: larger means closer to a coin flip."""


HUMAN_DETAIL_WEIGHT = 3.0
"""Median weight of the population on detail."""
HUMAN_LENGTH_WEIGHT = 0.12
"""Mean weight of the population on log(1 + words)."""
HUMAN_TEMPERATURE = (0.75, 1.4)
"""Range of the labelers' decision noise."""


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class HumanPopulation:
    """A population of simulated human labelers; `preference(...)` is deterministic given the seed."""

    def __init__(self, seed: int = 0, n_labelers: int = 16):
        self.seed = seed
        self.n_labelers = n_labelers
        self.labelers = [self._draw_labeler(i) for i in range(n_labelers)]

    def _draw_labeler(self, i: int) -> Labeler:
        rng = rng_for("world-human", self.seed, i)
        return Labeler(
            w_correct=float(rng.lognormal(np.log(3.0), 0.3)),
            w_detail=float(rng.lognormal(np.log(HUMAN_DETAIL_WEIGHT), 0.4)),
            w_concise=float(rng.lognormal(np.log(0.8), 0.5)),
            w_format=float(rng.lognormal(np.log(0.8), 0.5)),
            w_length=float(rng.normal(HUMAN_LENGTH_WEIGHT, 0.15)),
            check_prob=float(rng.uniform(0.5, 0.95)),
            temperature=float(rng.uniform(*HUMAN_TEMPERATURE)),
        )

    def utility(self, labeler: int, instruction: str, input: str, output: str, checked: bool) -> float:
        lab = self.labelers[labeler]
        c = gold_components(instruction, input, output)
        correct = c["correctness"] if checked else 0.5
        return (lab.w_correct * correct + lab.w_detail * c["detail"] + lab.w_concise * c["conciseness"]
                + lab.w_format * c["format"] + lab.w_length * math.log1p(len(output.split())))

    def prob_output_2(self, labeler: int, instruction: str, input: str, output_1: str, output_2: str) -> float:
        """Probability that this labeler prefers output_2 (averaged over checking or not)."""
        lab = self.labelers[labeler]
        p = 0.0
        for checked, weight in ((True, lab.check_prob), (False, 1.0 - lab.check_prob)):
            u1 = self.utility(labeler, instruction, input, output_1, checked)
            u2 = self.utility(labeler, instruction, input, output_2, checked)
            p += weight * sigmoid((u2 - u1) / lab.temperature)
        return p

    def preference(self, labeler: int, instruction: str, input: str, output_1: str, output_2: str) -> int:
        """1 if the labeler prefers output_1, 2 if output_2."""
        if not 0 <= labeler < self.n_labelers:
            raise ValueError(f"labeler must be in [0, {self.n_labelers}), got {labeler}")
        p = self.prob_output_2(labeler, instruction, input or "", output_1, output_2)
        u = rng_for("world-human-decision", self.seed, labeler, instruction, input or "", output_1, output_2).random()
        return 2 if u < p else 1

