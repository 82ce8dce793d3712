"""Outputs of mixed quality for world tasks: demonstrations (SFT data) and reference outputs.

An output is written in one *style*: clean (concise and right), verbose (right, in a sentence),
detailed (right, with steps / reasons where the task asks to explain; else as verbose), padded
("Sure! ... I hope this helps!"), wrong, partial (wrong count, half sorted, hedged, a false step),
rambling (the answer, then small talk), padded_wrong, repetitive. The mixtures below set how
often each style appears, so that supervised fine-tuning on demonstrations leaves room for
preference learning, and the reference is decent but beatable.
"""

from __future__ import annotations

import numpy as np

from prefgym.world.families import FAMILIES, FILLER_SENTENCES, PAD_CLOSERS, PAD_OPENERS, Task, _choice

STYLES = ("clean", "verbose", "padded", "wrong", "partial", "rambling", "padded_wrong", "repetitive", "detailed")

# Demonstrations are right about three times in four; three in ten explain their answer (steps,
# reasons where the task asks for them; a sentence elsewhere), one in five carries padding,
# small talk or repetition: habits that SFT imitates and preference feedback can remove.
DEMONSTRATION_MIX = {"clean": 0.20, "verbose": 0.10, "detailed": 0.30, "padded": 0.09, "wrong": 0.11,
                     "partial": 0.08, "rambling": 0.06, "padded_wrong": 0.03, "repetitive": 0.03}
# The reference (the davinci-003 stand-in) is right about half the time and often padded: decent,
# and beatable by a policy that learns to answer concisely.
REFERENCE_MIX = {"clean": 0.10, "verbose": 0.10, "detailed": 0.08, "padded": 0.18, "wrong": 0.23,
                 "partial": 0.14, "rambling": 0.08, "padded_wrong": 0.06, "repetitive": 0.03}


def _pad(text: str, rng: np.random.Generator) -> str:
    opener, closer = _choice(rng, PAD_OPENERS), _choice(rng, PAD_CLOSERS)
    if closer and text[-1] not in ".!?":
        text += "."
    return " ".join(p for p in (opener, text, closer) if p)


def write_output(task: Task, style: str, rng: np.random.Generator) -> str:
    """An output for `task` in the given style."""
    fam, f = FAMILIES[task.family], task.fields
    if style == "clean":
        return fam.clean(f, rng)
    if style == "verbose":
        return fam.verbose(f, rng)
    if style == "detailed":
        return fam.detailed(f, rng)
    if style == "padded":
        return _pad(fam.verbose(f, rng) if rng.random() < 0.5 else fam.clean(f, rng), rng)
    if style == "wrong":
        return fam.wrong(f, rng)
    if style == "partial":
        return fam.partial(f, rng)
    if style == "rambling":
        return f"{fam.clean(f, rng)} {_choice(rng, FILLER_SENTENCES)}"
    if style == "padded_wrong":
        return _pad(fam.wrong(f, rng), rng)
    if style == "repetitive":
        x = fam.verbose(f, rng)
        return f"{x} {x}"
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def sample_style(rng: np.random.Generator, mix: dict) -> str:
    p = np.array([mix.get(s, 0.0) for s in STYLES])
    return STYLES[int(rng.choice(len(STYLES), p=p / p.sum()))]


def sample_output(task: Task, rng: np.random.Generator, mix: dict = DEMONSTRATION_MIX) -> str:
    """An output for `task` in a style drawn from `mix`."""
    return write_output(task, sample_style(rng, mix), rng)
