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


def _describe(value) -> str:
    if isinstance(value, dict):
        return f"an object with keys {sorted(map(str, value))[:8]}"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def token_logprobs(logprobs) -> list[dict]:
    """The per-token list [{token, logprob, top_logprobs: [{token, logprob}, ...]}, ...] from any shape a
    judge returns: that list; OpenAI's chat `logprobs` object ({"content": [...]}, as AlpacaEval stores it);
    a whole choice ({"logprobs": ...}); or the legacy completions object (tokens, token_logprobs,
    top_logprobs as one {token: logprob} dict per token). Anything else raises ParseError saying what it got.
    """
    if isinstance(logprobs, dict):
        if "content" in logprobs:
            return token_logprobs(logprobs["content"])
        if "logprobs" in logprobs:
            return token_logprobs(logprobs["logprobs"])
        if isinstance(logprobs.get("tokens"), list) and isinstance(logprobs.get("top_logprobs"), list):
            tops = logprobs["top_logprobs"]
            lps = logprobs.get("token_logprobs") or [None] * len(tops)
            if all(isinstance(t, dict) for t in tops):
                return [{"token": tok, "logprob": lp, "top_logprobs": [{"token": k, "logprob": v} for k, v in top.items()]}
                        for tok, lp, top in zip(logprobs["tokens"], lps, tops)]
    if isinstance(logprobs, list) and all(isinstance(t, dict) for t in logprobs):
        return logprobs
    raise ParseError(f"logprobs must be a list of tokens or an OpenAI logprobs object with 'content', got "
                     f"{_describe(logprobs)}")


def _top_logprobs(first: dict) -> dict[str, float]:
    """{token: logprob} of the first generated token's alternatives; ParseError naming a malformed entry."""
    top = first.get("top_logprobs")
    if not isinstance(top, list) or not top:
        raise ParseError("the first token has no top_logprobs (ask for logprobs with top_logprobs >= 2); "
                         f"it is {_describe(first)}")
    out = {}
    for i, entry in enumerate(top):
        if not isinstance(entry, dict) or "token" not in entry or "logprob" not in entry:
            raise ParseError(f"top_logprobs entry {i} must have 'token' and 'logprob', got {_describe(entry)}")
        try:
            out[str(entry["token"])] = float(entry["logprob"])  # a repeated token: the last, as before
        except (TypeError, ValueError):
            raise ParseError(f"top_logprobs entry {i} ({entry['token']!r}) has a non-numeric logprob "
                             f"{entry['logprob']!r}") from None
    return out


def first_token_logprobs(logprobs) -> list[dict] | object:
    """The first token's entry as a one-element list, for storing; the object unchanged if it is unreadable."""
    try:
        return token_logprobs(logprobs)[:1]
    except ParseError:
        return logprobs


def logprob_parser(completion: Completion, first_token: str = "m",
                   second_token: str = "M") -> list[float | None]:
    """Preference = 1 + P(second_token), normalised over the two tokens, from the first token's
    top_logprobs (AlpacaEval 2's weighted judge). A token absent from top_logprobs has probability 0;
    when both are absent, ParseError lists the tokens that were there.
    """
    if not completion.logprobs:
        raise ParseError("the completion has no logprobs (ask for logprobs and top_logprobs)")
    tokens = token_logprobs(completion.logprobs)
    if not tokens:
        raise ParseError("the completion's logprobs list no token")
    top = _top_logprobs(tokens[0])
    if first_token not in top and second_token not in top:
        seen = ", ".join(repr(t) for t in list(top)[:10])
        raise ParseError(f"neither answer token {first_token!r} nor {second_token!r} in the first token's "
                         f"top_logprobs (saw {seen})")
    lp1, lp2 = top.get(first_token, -math.inf), top.get(second_token, -math.inf)
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
