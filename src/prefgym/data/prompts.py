"""The Alpaca prompt format (AlpacaFarm's), with and without an `input` field."""

from __future__ import annotations

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str | None = "") -> str:
    """The Alpaca prompt for one example; the response follows directly (then EOS)."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def format_record(record: dict) -> str:
    """The prompt for a record with `instruction` and optional `input`."""
    return format_prompt(record["instruction"], record.get("input", "") or "")
