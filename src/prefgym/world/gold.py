"""Gold quality of an output in the built-in world: the programmatic ground truth.

`gold_quality(instruction, input, output)` recovers the task from the instruction (and input)
text, checks the output against the right answer, and returns a score in [0, 1]:

    quality = 0.7 * correctness + 0.15 * conciseness + 0.15 * format            (exact-answer tasks)
    quality = 0.5 * correctness + 0.3 * detail + 0.1 * conciseness + 0.1 * format (detail tasks)

- correctness: the family's check (right number, right items and count, sorted order, ...),
  with partial credit for near misses; in detail tasks a false step or reason costs it;
- detail: in tasks that ask to explain, give steps or compare with reasons, the share of the
  task's content (steps, reasons, facts) the output states correctly: real content, credited;
- conciseness: 1 up to a few words more than the ideal answer (for detail tasks: the answer
  sentence plus the steps the output states), then ideal/actual;
- format: 1 minus penalties for filler ("Sure!", "I hope this helps!"), and for repetition.

Texts that are not world tasks get correctness 0.5 (unknown) and are scored on style only.
"""

from __future__ import annotations

import functools
import re

from prefgym.world.families import FAMILIES, parse_task

WEIGHTS = {"correctness": 0.7, "conciseness": 0.15, "format": 0.15}
DETAIL_WEIGHTS = {"correctness": 0.5, "detail": 0.3, "conciseness": 0.1, "format": 0.1}

FILLER_PATTERNS = [r"\bsure\b", r"\bof course\b", r"\bcertainly\b",
                   r"\bgreat question\b", r"\bi hope this helps\b", r"\blet me know\b",
                   r"\bhave a nice day\b", r"\bas an ai\b"]


def filler_count(output: str) -> int:
    """How many filler phrases (padding that carries no answer) the output contains."""
    low = output.lower()
    return sum(bool(re.search(p, low)) for p in FILLER_PATTERNS)


def repetition(output: str) -> float:
    """Fraction of word trigrams that repeat an earlier one (0 = none)."""
    words = output.lower().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def gold_components(instruction: str, input: str, output: str) -> dict:
    """Family, correctness, detail (0 where the task asks for an answer only), conciseness, format
    and the combined quality of one output."""
    return dict(_components(instruction, input or "", output))


@functools.lru_cache(maxsize=1 << 16)  # humans and judges score the same outputs many times
def _components(instruction: str, input: str, output: str) -> dict:
    task = parse_task(instruction, input)
    words = output.split()
    if not words:
        return {"family": task.family if task else "unknown", "correctness": 0.0, "detail": 0.0,
                "conciseness": 0.0, "format": 0.0, "quality": 0.0}
    detail = None
    if task is None:
        family, correctness, ideal = "unknown", 0.5, 12
    else:
        fam = FAMILIES[task.family]
        family = task.family
        correctness = float(fam.correctness(task.fields, output))
        detail = fam.detail(task.fields, output)
        ideal = fam.ideal_words(task.fields, output)
    slack = max(3, ideal // 2)
    conciseness = min(1.0, (ideal + slack) / len(words))
    fmt = max(0.0, 1.0 - 0.35 * filler_count(output) - 1.5 * repetition(output))
    parts = {"correctness": correctness, "detail": detail or 0.0, "conciseness": conciseness, "format": fmt}
    weights = WEIGHTS if detail is None else DETAIL_WEIGHTS
    quality = sum(w * parts[k] for k, w in weights.items())
    return {"family": family, **parts, "quality": float(min(1.0, max(0.0, quality)))}


def gold_quality(instruction: str, input: str, output: str) -> float:
    """The gold quality in [0, 1] of `output` for the world task written in `instruction`/`input`."""
    return gold_components(instruction, input or "", output)["quality"]


def task_family(instruction: str, input: str = "") -> str:
    """The family of a world instruction, or "unknown"."""
    task = parse_task(instruction, input)
    return task.family if task else "unknown"
