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


def user_turn(record: dict) -> str:
    """The user message of a record in chat format: the instruction, then the input after a blank
    line when there is one (AlpacaFarm's `instruction + "\\n\\n" + input`)."""
    instruction, input = record["instruction"], record.get("input") or ""
    return f"{instruction}\n\n{input}" if input else instruction


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


PROMPT_FORMAT_KEY = "prefgym_prompt_format"
"""Key in a model folder's tokenizer_config.json: the prompt format prefgym trained the model with."""


def recorded_prompt_format(tokenizer) -> str | None:
    """The prompt format a prefgym-trained model was trained with ("alpaca" / "chat"), None when the
    folder does not say (a model from elsewhere, or trained by an older prefgym)."""
    fmt = (getattr(tokenizer, "init_kwargs", None) or {}).get(PROMPT_FORMAT_KEY)
    return fmt if fmt in ("alpaca", "chat") else None


def resolve_prompt_format(tokenizer, prompt_format: str = "auto") -> str:
    """"alpaca" or "chat". "auto": the format the model was trained with when its folder records one
    (see `make_prompt_formatter`), else chat when the tokenizer has a chat template, else alpaca.

    "chat" with a tokenizer without a template is a ConfigError; a format other than the recorded
    one is used as asked, with a warning (the model will see prompts unlike its training ones).
    """
    from prefgym.errors import ConfigError

    recorded = recorded_prompt_format(tokenizer)
    if prompt_format == "auto":
        return recorded or ("chat" if has_chat_template(tokenizer) else "alpaca")
    if prompt_format == "chat" and not has_chat_template(tokenizer):
        raise ConfigError(f"prompt_format: chat, but the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} "
                          "has no chat template; use prompt_format: alpaca (or auto)")
    if prompt_format not in ("alpaca", "chat"):
        raise ConfigError(f"prompt_format should be auto, alpaca or chat, got {prompt_format!r}")
    if recorded and recorded != prompt_format:
        _warn_once(f"prompt_format {prompt_format}: the model {getattr(tokenizer, 'name_or_path', '?')!r} was "
                   f"trained on {recorded} prompts (prompt_format auto uses them)")
    return prompt_format


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import logging

    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger("prefgym").warning(message)


def make_prompt_formatter(tokenizer, prompt_format: str = "auto"):
    """`record -> prompt text` for the policy, the reward model and the judges alike. The format is
    recorded on the tokenizer (`PROMPT_FORMAT_KEY`), so a model saved with it keeps it.

    alpaca: `format_record`. chat: the tokenizer's chat template with `user_turn(record)` as the
    only user message and the assistant turn opened (`add_generation_prompt=True`); the response
    follows, then EOS. prefgym tokenises prompts with `add_special_tokens=True`, so when the
    tokenizer prepends BOS itself and the template also starts with the BOS text, that text is
    left out of the prompt: the tokens are exactly the template's, with one BOS.
    """
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    if hasattr(tokenizer, "init_kwargs"):  # saved with the model: `auto` later prompts it as it was trained
        tokenizer.init_kwargs[PROMPT_FORMAT_KEY] = fmt
    if fmt == "alpaca":
        return format_record
    bos = _auto_bos_text(tokenizer)

    def chat(record: dict) -> str:
        return chat_prompt(tokenizer, [{"role": "user", "content": user_turn(record)}], bos)

    return chat


def chat_prompt(tokenizer, messages: list[dict], bos: str | None = None) -> str:
    """`messages` through the tokenizer's chat template, the assistant turn opened, without the
    leading BOS text when the tokenizer adds BOS itself (`bos`: that text, found when None)."""
    bos = _auto_bos_text(tokenizer) if bos is None else bos
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text[len(bos):] if bos and text.startswith(bos) else text


def _auto_bos_text(tokenizer) -> str:
    """The BOS text when the tokenizer adds BOS itself with add_special_tokens=True, else ""."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""
