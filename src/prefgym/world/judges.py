"""Simulated API judges of the built-in world (the stand-in for LLM annotators such as GPT-4).

A judge scores each output as

    score = correctness_weight * (correctness if checked else 0.5) + detail_weight * detail
            + conciseness_weight * conciseness
            + format_weight * format + length_bias * log(1 + words) + list_bias * is_list
            + politeness_bias * filler_phrases

and prefers the output shown second with probability
sigmoid((score_second - score_first - position_bias) / temperature). It checks the answer with
probability `check_prob`; `world_judge_prob` returns the mixture, a deterministic probability
(the annotator layer draws the label). The 13 pool judges differ in these weights and biases,
as the prompts / models / batch sizes of AlpacaFarm's pool do; "world-judge-greedy" is the
careful one that answers with its most likely label (the GPT-4 greedy stand-in): like GPT-4, it
values detail and length more than people do, and its answer can change with the order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from prefgym.world.gold import filler_count, gold_components


@dataclass(frozen=True)
class WorldJudgeParams:
    """The taste, care and biases of one simulated API judge, and its price."""

    correctness_weight: float = 3.0
    """Weight on correctness, when the judge checks it."""
    check_prob: float = 0.8
    """Probability that the judge actually checks whether the answer is right."""
    detail_weight: float = 2.0
    """Weight on detail: the share of the task's content (steps, reasons) the output states."""
    conciseness_weight: float = 0.8
    """Weight on conciseness."""
    format_weight: float = 0.8
    """Weight on format (no filler, no repetition)."""
    length_bias: float = 0.15
    """Weight on log(1 + words): > 0 prefers longer outputs."""
    position_bias: float = 0.0
    """Logit added in favour of the output shown first (< 0 favours the second)."""
    list_bias: float = 0.0
    """Bonus for outputs written as a list (commas or numbered lines)."""
    politeness_bias: float = 0.0
    """Bonus per filler phrase ("Sure!", "I hope this helps!"): > 0 likes that style."""
    temperature: float = 0.6
    """Decision noise: larger means closer to a coin flip."""
    batch_size: int = 1
    """Examples per (simulated) call; only for price/time accounting."""
    price_per_1k_tokens: float = 0.03
    """Simulated price in dollars per 1000 prompt+completion tokens."""
    seconds_per_1k_tokens: float = 1.0
    """Simulated latency per 1000 tokens."""


def _is_list(output: str) -> bool:
    return bool(re.search(r"^\s*\d+\.", output, re.M)) or output.count(",") >= 2


def judge_score(params: WorldJudgeParams, instruction: str, input: str, output: str, checked: bool) -> float:
    """The judge's score of one output (checking the answer or not)."""
    c = gold_components(instruction, input, output)
    correct = c["correctness"] if checked else 0.5
    return (params.correctness_weight * correct + params.detail_weight * c["detail"]
            + params.conciseness_weight * c["conciseness"]
            + params.format_weight * c["format"] + params.length_bias * math.log1p(len(output.split()))
            + params.list_bias * _is_list(output) + params.politeness_bias * filler_count(output))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def world_judge_prob(params: WorldJudgeParams, instruction: str, input: str, output_1: str, output_2: str,
                     position_swapped: bool = False) -> float:
    """Probability that the judge prefers output_2.

    position_swapped: output_2 is shown first (the position bias then favours output_2).
    """
    input = input or ""
    first, second = (output_2, output_1) if position_swapped else (output_1, output_2)
    p_second = 0.0
    for checked, weight in ((True, params.check_prob), (False, 1.0 - params.check_prob)):
        if weight == 0.0:
            continue
        d = (judge_score(params, instruction, input, second, checked)
             - judge_score(params, instruction, input, first, checked) - params.position_bias)
        p_second += weight * _sigmoid(d / params.temperature)
    return 1.0 - p_second if position_swapped else p_second


_BASE = WorldJudgeParams()

# The pool: like AlpacaFarm's 13 simulated annotators, each with its own systematic biases.
WORLD_JUDGES: dict[str, WorldJudgeParams] = {
    "world-judge-01": replace(_BASE),
    "world-judge-02": replace(_BASE, length_bias=0.4, conciseness_weight=0.4),
    "world-judge-03": replace(_BASE, position_bias=0.4),
    "world-judge-04": replace(_BASE, position_bias=-0.4, batch_size=5, price_per_1k_tokens=0.01),
    "world-judge-05": replace(_BASE, list_bias=0.5),
    "world-judge-06": replace(_BASE, politeness_bias=0.4, format_weight=0.3),
    "world-judge-07": replace(_BASE, check_prob=0.5, temperature=0.9, price_per_1k_tokens=0.002,
                              seconds_per_1k_tokens=0.3),
    "world-judge-08": replace(_BASE, correctness_weight=4.0, check_prob=0.9, temperature=0.6,
                              price_per_1k_tokens=0.06),
    "world-judge-09": replace(_BASE, length_bias=0.25, position_bias=0.2),
    "world-judge-10": replace(_BASE, conciseness_weight=1.5, length_bias=-0.2),
    "world-judge-11": replace(_BASE, batch_size=5, temperature=1.0, price_per_1k_tokens=0.01),
    "world-judge-12": replace(_BASE, politeness_bias=0.2, length_bias=0.2, list_bias=0.3),
    "world-judge-13": replace(_BASE, check_prob=0.65, format_weight=1.2, position_bias=-0.2),
    # The GPT-4 stand-in: careful, and (like GPT-4 judges) fonder of long, detailed and list-like
    # answers than people are, and answering differently when the order is swapped.
    "world-judge-greedy": replace(_BASE, correctness_weight=3.5, check_prob=0.8, temperature=0.35,
                                  length_bias=0.3, detail_weight=4.5, position_bias=0.6, list_bias=0.3,
                                  price_per_1k_tokens=0.03),
}
POOL = [f"world-judge-{i:02d}" for i in range(1, 14)]
