"""Filling judge prompts: one example or a batch, outputs shown in a seeded order."""

from __future__ import annotations

import re
from dataclasses import dataclass

from prefgym.annotators.config import JudgeConfig

_EXAMPLE_FIELDS = re.compile(r"\{(instruction|input|output_1|output_2|index)\}")
_PROMPT_FIELDS = re.compile(r"\{(examples|n_examples)\}")
_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass
class Item:
    """One example as a judge sees it (outputs in the original order; `swapped` = shown reversed)."""

    key: str
    """Stable hash of (instruction, input, output_1, output_2)."""
    instruction: str
    input: str
    output_1: str
    output_2: str
    swapped: bool = False
    """True when output_2 is shown first."""
    sample_seed: int = 0
    """Seed of this example's sampling (simulated judges and labelers)."""

    @property
    def shown(self) -> tuple[str, str]:
        """The two outputs in the order they appear in the prompt."""
        return (self.output_2, self.output_1) if self.swapped else (self.output_1, self.output_2)


def _fill(template: str, pattern: re.Pattern, values: dict) -> str:
    # One pass, so that text inside an output that looks like a placeholder is never filled.
    return pattern.sub(lambda m: str(values[m.group(1)]), template)


def render_prompt(judge: JudgeConfig, items: list[Item]) -> str:
    """The prompt the judge gets for `items` (one example, or a batch when `example_template` is set)."""
    def values(item: Item, index: int) -> dict:
        first, second = item.shown
        return {"instruction": item.instruction, "input": item.input, "output_1": first,
                "output_2": second, "index": index}

    if judge.example_template is None:
        assert len(items) == 1, "a judge without example_template takes one example per prompt"
        item = items[0]
        template = judge.prompt_template if item.input else (judge.prompt_template_no_input or judge.prompt_template)
        return _fill(template, _EXAMPLE_FIELDS, values(item, 1))
    parts = []
    for i, item in enumerate(items, start=1):
        template = judge.example_template if item.input else (
            judge.example_template_no_input or judge.example_template)
        parts.append(_fill(template, _EXAMPLE_FIELDS, values(item, i)))
    header = judge.prompt_template if any(it.input for it in items) else (
        judge.prompt_template_no_input or judge.prompt_template)
    return _fill(header, _PROMPT_FIELDS, {"examples": "\n".join(parts), "n_examples": len(items)})


def count_tokens(text: str) -> int:
    """Approximate token count (words and punctuation marks) for judges that report none."""
    return len(_TOKEN.findall(text))
