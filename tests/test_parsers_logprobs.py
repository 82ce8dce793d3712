"""The logprob parser on every shape a judge (or an AlpacaEval file) hands it, garbage included:
a clear ParseError naming what is missing, never a KeyError or TypeError."""

from __future__ import annotations

import json

import pytest

from prefgym.annotators.backends import Completion
from prefgym.annotators.parsers import ParseError, first_token_logprobs, logprob_parser, parse_completion

TOP = [{"token": "M", "logprob": -0.2}, {"token": "m", "logprob": -1.9}, {"token": "The", "logprob": -5.0}]
TOKENS = [{"token": "M", "logprob": -0.2, "top_logprobs": TOP}]
EXPECTED = 1 + 1 / (1 + 2.718281828459045 ** (-1.9 + 0.2))  # 1 + P(M) over {m, M}


@pytest.mark.parametrize("logprobs", [
    TOKENS,                                                            # prefgym's per-token list
    {"content": TOKENS},                                               # OpenAI chat `logprobs` object
    {"finish_reason": "length", "index": 0, "logprobs": {"content": TOKENS}},  # a whole choice (AlpacaEval raw_completion)
    {"tokens": ["M"], "token_logprobs": [-0.2], "top_logprobs": [{"M": -0.2, "m": -1.9, "The": -5.0}]},  # legacy
])
def test_accepted_shapes_give_the_same_preference(logprobs):
    (pref,) = logprob_parser(Completion("M", logprobs=logprobs))
    assert pref == pytest.approx(EXPECTED, abs=1e-12)


def test_a_whole_alpaca_eval_raw_completion(alpaca_eval_dir):
    rows = json.loads((alpaca_eval_dir / "alpaca-7b" / "annotations_weighted_alpaca_eval_gpt4_turbo.json").read_text())
    raw = next(r["raw_completion"] for r in rows if r["raw_completion"])
    whole = logprob_parser(Completion(raw["text"], logprobs=raw))
    assert whole == logprob_parser(Completion(raw["text"], logprobs=raw["logprobs"]["content"]))


@pytest.mark.parametrize("logprobs,message", [
    ("M: -0.2", "got a str"),
    (42, "got an int"),
    ({"choices": []}, "got an object with keys ['choices']"),
    ({"content": "oops"}, "got a str"),
    ([["M", -0.2]], "got a list"),
    ([], "no logprobs"),
    ({"content": []}, "logprobs list no token"),
    ([{"token": "M", "logprob": -0.2}], "the first token has no top_logprobs"),
    ([{"token": "M", "top_logprobs": []}], "the first token has no top_logprobs"),
    ([{"token": "M", "top_logprobs": "M"}], "the first token has no top_logprobs"),
    ([{"top_logprobs": [{"token": "M"}]}], "top_logprobs entry 0 must have 'token' and 'logprob'"),
    ([{"top_logprobs": [{"token": "m", "logprob": -1}, None]}], "top_logprobs entry 1 must have"),
    ([{"top_logprobs": [{"token": "M", "logprob": "high"}]}], "entry 0 ('M') has a non-numeric logprob 'high'"),
    ([{"top_logprobs": [{"token": "The", "logprob": -0.1}, {"token": " M", "logprob": -2}]}],
     "neither answer token 'm' nor 'M' in the first token's top_logprobs (saw 'The', ' M')"),
])
def test_garbage_is_a_clear_parse_error(logprobs, message):
    with pytest.raises(ParseError) as e:
        logprob_parser(Completion("x", logprobs=logprobs))
    assert message in str(e.value)
    # and the annotator records it as that example's error instead of crashing
    assert parse_completion("logprob_parser", {}, Completion("x", logprobs=logprobs), 1) == [(None, str(e.value))]


def test_first_token_logprobs_for_storing():
    assert first_token_logprobs({"content": TOKENS + TOKENS}) == TOKENS
    assert first_token_logprobs("garbage") == "garbage"  # stored as it came, never a crash
