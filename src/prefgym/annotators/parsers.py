"""Turning a judge's completion into preferences (1 = first output, 2 = second, 1.5 = tie).

Each parser returns one value per example of the prompt, in the order shown, or None for an
example whose answer cannot be read; a completion that cannot be split into exactly one answer
per example raises ParseError (then every example of that prompt is asked again, alone).
"""

from __future__ import annotations

import json
import math
import re

from prefgym.annotators.backends import Completion


class ParseError(ValueError):
    """The completion cannot be read as one answer per example."""


def _as_preference(value, value_map: dict | None = None) -> float | None:
    if value_map and str(value).strip() in value_map:
        value = value_map[str(value).strip()]
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if v == 0:  # AlpacaEval writes a draw as 0
        return 1.5
    return v if 1.0 <= v <= 2.0 else None


def regex_parser(completion: Completion, outputs_to_match: dict) -> list[float | None]:
    """Scan the text for the earliest match of any pattern, repeatedly (AlpacaEval's regex parser).

    `outputs_to_match` maps a preference (1, 2, or 1.5 for a tie) to a regular expression.
    """
    patterns = [(float(k), re.compile(p)) for k, p in outputs_to_match.items()]
    text, out = completion.text, []
    while True:
        found = [(m.start(), m.end(), pref) for pref, pat in patterns if (m := pat.search(text))]
        if not found:
            return out
        start, end, pref = min(found)
        out.append(pref)
        text = text[max(end, start + 1):]


def _find_json(text: str):
    """The first JSON object or list of objects in the text (reasoning before it, code fences allowed)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value = decoder.raw_decode(text[m.start():])[0]
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) or (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            return value
    raise ParseError("no valid JSON object or list of objects in the completion")


def json_parser(completion: Completion, annotation_key: str = "preference",
                value_map: dict | None = None) -> list[float | None]:
    """Read an object (one example) or a list of objects (a batch), each with `annotation_key`.

    `value_map` maps answer strings (e.g. "a", "b", "tie") to preferences.
    """
    data = _find_json(completion.text)
    rows = data if isinstance(data, list) else [data]
    vmap = {str(k): v for k, v in (value_map or {}).items()}
    return [_as_preference(r.get(annotation_key), vmap) if isinstance(r, dict) else None for r in rows]


def logprob_parser(completion: Completion, first_token: str = "m",
                   second_token: str = "M") -> list[float | None]:
    """Preference = 1 + P(second_token), normalised over the two tokens, from the first token's
    top_logprobs (AlpacaEval 2's weighted judge). A token absent from top_logprobs has probability 0.
    """
    if not completion.logprobs:
        raise ParseError("the completion has no logprobs (ask for logprobs and top_logprobs)")
    top = completion.logprobs[0].get("top_logprobs") or []
    lp = {t["token"]: t["logprob"] for t in top if t["token"] in (first_token, second_token)}
    if not lp:
        return [None]
    lp1, lp2 = lp.get(first_token, -math.inf), lp.get(second_token, -math.inf)
    log_norm = max(lp1, lp2) + math.log(math.exp(lp1 - max(lp1, lp2)) + math.exp(lp2 - max(lp1, lp2)))
    return [1.0 + math.exp(lp2 - log_norm)]


PARSERS = {"regex_parser": regex_parser, "json_parser": json_parser, "logprob_parser": logprob_parser}


def check_parser_kwargs(judge) -> None:
    """ConfigError naming the file and key for a parser setting the parser does not take."""
    import inspect

    from prefgym.errors import ConfigError

    params = set(inspect.signature(PARSERS[judge.fn_completion_parser]).parameters) - {"completion"}
    for key in judge.completion_parser_kwargs:
        if key not in params:
            raise ConfigError(f"{judge.source}: judge '{judge.name}': unknown key 'completion_parser_kwargs.{key}' "
                              f"for {judge.fn_completion_parser} (known: {', '.join(sorted(params))})")


def parse_completion(parser: str, kwargs: dict, completion: Completion,
                     n_examples: int) -> list[tuple[float | None, str | None]]:
    """(preference, error) per example; every example gets an error if the count is wrong."""
    try:
        prefs = PARSERS[parser](completion, **kwargs)
    except ParseError as e:
        return [(None, str(e))] * n_examples
    if len(prefs) != n_examples:
        return [(None, f"expected {n_examples} answers, parsed {len(prefs)}")] * n_examples
    snippet = completion.text[:80].replace("\n", " ")
    return [(p, None) if p is not None else (None, f"unreadable answer in {snippet!r}") for p in prefs]
