"""Annotators: configs, prompts, parsers, the world backends, pools, noise, cache and accounting."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from prefgym.annotators import annotate_pairs, load_pool, make_pairs, summarize
from prefgym.annotators.annotate import example_key
from prefgym.annotators.backends import Completion
from prefgym.annotators.config import JudgeConfig, available_configs
from prefgym.annotators.parsers import ParseError, json_parser, logprob_parser, parse_completion, regex_parser
from prefgym.annotators.prompts import Item, render_prompt
from prefgym.errors import ConfigError, DataError
from prefgym.seeding import stable_hash


@pytest.fixture(scope="module")
def world_pairs():
    from prefgym.world.agreement import policy_like_pairs

    return policy_like_pairs(600, seed=3)


def write_pool(path, judges: dict, **extra):
    path.write_text(yaml.safe_dump({"judges": judges, **extra}))
    return path


# ---------------------------------------------------------------- configs


def test_builtin_configs_load():
    names = available_configs()
    for name in ("world_pool_noisy", "world_pool", "world_greedy", "world_humans",
                 "gpt4_b1", "gpt4_b5", "gpt4_cot_json", "gpt4_logprob"):
        assert name in names
    noisy, clean = load_pool("world_pool_noisy"), load_pool("world_pool")
    assert len(noisy.judges) == 13 and noisy.label_flip_prob == 0.25 and clean.label_flip_prob == 0.0
    assert [j.cache_hash() for j in noisy.judges] == [j.cache_hash() for j in clean.judges]
    assert load_pool("gpt4_b5").judges[0].batch_size == 5


def test_unknown_keys_name_file_and_key(tmp_path):
    p = write_pool(tmp_path / "bad.yaml", {"j": {"fn_completions": "world_judges", "temprature": 0}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'temprature'"):
        load_pool(p)
    p = write_pool(tmp_path / "bad2.yaml", {"j": {"fn_completions": "world_judges"}}, noise=0.1)
    with pytest.raises(ConfigError, match=r"bad2\.yaml.*'noise'"):
        load_pool(p)
    p = write_pool(tmp_path / "bad3.yaml", {"j": {"fn_completions": "world_judges", "prompt_template": "{instruction}",
                                                   "completions_kwargs": {"model_name": "world-judge-01", "tmp": 1}}})
    with pytest.raises(ConfigError, match=r"bad3\.yaml.*completions_kwargs\.tmp"):
        annotate_pairs([{"instruction": "a", "output_1": "x", "output_2": "y"}], p, cache_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="unknown annotators"):
        load_pool("no_such_pool")


def test_cache_hash_ignores_key_env_and_prices_but_not_prompt():
    a = JudgeConfig(name="a", fn_completions="openai_chat", prompt_template="x {instruction}",
                    completions_kwargs={"model_name": "m", "api_key_env": "K1"}, price_per_prompt_token=1.0)
    b = JudgeConfig(name="b", fn_completions="openai_chat", prompt_template="x {instruction}",
                    completions_kwargs={"model_name": "m", "api_key_env": "K2"}, max_concurrency=9)
    c = JudgeConfig(name="a", fn_completions="openai_chat", prompt_template="y {instruction}",
                    completions_kwargs={"model_name": "m", "api_key_env": "K1"})
    assert a.cache_hash() == b.cache_hash() != c.cache_hash()


# ---------------------------------------------------------------- prompts


def test_render_prompt_swaps_and_batches_without_filling_output_text():
    judge = load_pool("world_pool").judges[3]  # batch of 5
    items = [Item("k1", "Sort.", "3 1 2", "A1 {output_2}", "B1", swapped=False),
             Item("k2", "Say hi.", "", "A2", "B2", swapped=True)]
    prompt = render_prompt(judge, items)
    assert "Now the real task: 2 examples" in prompt
    ex1, ex2 = prompt.split("# Example 1")[1].split("# Example 2")
    assert "## Input\n3 1 2" in ex1 and "A1 {output_2}" in ex1  # placeholder-like text left alone
    assert ex1.index("A1") < ex1.index("B1")
    assert "## Input" not in ex2 and ex2.index("B2") < ex2.index("A2")  # swapped, no-input template
    single = load_pool("world_greedy").judges[0]
    p = render_prompt(single, [Item("k", "Add 2 and 2.", "", "4", "5")])
    assert "## Input" not in p and "Add 2 and 2." in p


# ---------------------------------------------------------------- parsers


def test_regex_and_json_parsers():
    kw = {"outputs_to_match": {1: r"Output \(a\)", 2: r"Output \(b\)"}}
    assert regex_parser(Completion("Example 1: Output (b)\nExample 2: Output (a)\nOutput (b)"), **kw) == [2, 1, 2]
    tie_kw = {"outputs_to_match": {**kw["outputs_to_match"], 1.5: r"\bTie\b"}}
    assert regex_parser(Completion("1: Tie\n2: Output (a)"), **tie_kw) == [1.5, 1.0]
    assert json_parser(Completion('```json\n{"concise_explanation": "x", "preference": 2}\n```')) == [2.0]
    assert json_parser(Completion('[{"preference": 1}, {"preference": "b"}, {"preference": 0}]'),
                       value_map={"b": 2}) == [1.0, 2.0, 1.5]
    out = parse_completion("regex_parser", kw, Completion("Output (a)"), 2)
    assert out[0][0] is None and "expected 2 answers" in out[0][1]
    out = parse_completion("json_parser", {}, Completion("no json here"), 1)
    assert out == [(None, "no valid JSON object or list of objects in the completion")]
    cot = 'Output 1 cites [1] wrongly; so {"concise_explanation": "2 is right", "preference": 2} done'
    assert json_parser(Completion(cot)) == [2.0]
    out = parse_completion("json_parser", {}, Completion('[{"preference": 1}, {"preference": 7}]'), 2)
    assert out[0] == (1.0, None) and out[1][0] is None


def test_logprob_parser_reproduces_alpaca_eval_weighted_gpt4_turbo(alpaca_eval_dir):
    rows = json.loads((alpaca_eval_dir / "alpaca-7b" / "annotations_weighted_alpaca_eval_gpt4_turbo.json").read_text())
    checked = 0
    for r in rows:
        if r["raw_completion"] is None:
            assert r["output_1"] == r["output_2"] and r["preference"] == 1.5  # identical outputs: a tie, no call
            continue
        c = Completion(text=r["raw_completion"]["text"], logprobs=r["raw_completion"]["logprobs"]["content"])
        (pref,) = logprob_parser(c, first_token="m", second_token="M")
        # AlpacaEval showed the outputs swapped for a seeded half of the instructions, then swapped back.
        swapped = random.Random(f"is_switched_outputs{r['instruction']}0").choices([False, True], k=1)[0]
        if swapped:
            pref = 3 - pref
        assert abs(pref - r["preference"]) < 1e-6
        checked += 1
    assert checked == 802


def test_logprob_parser_missing_tokens():
    c = Completion("x", logprobs=[{"token": "x", "logprob": -0.1, "top_logprobs": [{"token": "M", "logprob": -3.0}]}])
    assert logprob_parser(c) == [2.0]
    c.logprobs[0]["top_logprobs"] = [{"token": "The", "logprob": -0.1}]
    with pytest.raises(ParseError, match="neither answer token 'm' nor 'M'.*saw 'The'"):
        logprob_parser(c)


# ---------------------------------------------------------------- world backends, pools, noise


def test_world_greedy_matches_world_judge_prob_and_swaps_back(world_pairs, tmp_path):
    from prefgym.world.judges import WORLD_JUDGES, world_judge_prob

    rows = annotate_pairs(world_pairs, "world_greedy", seed=0, cache_dir=tmp_path, progress=False)
    params = WORLD_JUDGES["world-judge-greedy"]
    # The greedy judge has a position bias: its answer is determined, whichever order the
    # annotator shows the outputs in, where both orders give the same side of 0.5.
    probs = [[world_judge_prob(params, p["instruction"], p["input"], p["output_1"], p["output_2"],
                               position_swapped=s) for s in (False, True)] for p in world_pairs]
    decided = [i for i, (a, b) in enumerate(probs) if (a - 0.5) * (b - 0.5) > 0]
    assert len(decided) > 0.6 * len(world_pairs)
    assert [rows[i]["preference"] for i in decided] == [2.0 if probs[i][0] > 0.5 else 1.0 for i in decided]
    # The same pairs reversed: where the order does not decide, the mirror label.
    reversed_pairs = [dict(p, output_1=p["output_2"], output_2=p["output_1"]) for p in world_pairs]
    rev = annotate_pairs(reversed_pairs, "world_greedy", seed=0, cache_dir=tmp_path, progress=False)
    assert all(rows[i]["preference"] == 3 - rev[i]["preference"] for i in decided)


def test_pool_is_seeded_and_noise_flips_a_quarter(world_pairs, tmp_path):
    st1, st2 = {}, {}
    a = annotate_pairs(world_pairs, "world_pool", seed=0, cache_dir=tmp_path / "c1", progress=False, stats=st1)
    b = annotate_pairs(world_pairs, "world_pool", seed=0, cache_dir=tmp_path / "c2", progress=False)
    assert a == b  # same seed, fresh cache: identical
    assert st1["n_calls"] < len(world_pairs)  # two judges answer in batches of 5
    counts = Counter(r["annotator"] for r in a)
    assert len(counts) == 13 and max(counts.values()) < 2.5 * len(world_pairs) / 13
    c = annotate_pairs(world_pairs, "world_pool", seed=1, cache_dir=tmp_path / "c1", progress=False)
    assert sum(x["preference"] != y["preference"] for x, y in zip(a, c)) > 0.1 * len(a)
    st = {}
    noisy = annotate_pairs(world_pairs, "world_pool_noisy", seed=0, cache_dir=tmp_path / "c1", progress=False, stats=st)
    assert st["n_cached"] == len(world_pairs) and st["n_calls"] == 0  # noise is applied after the cache
    flipped = np.mean([x["preference"] != y["preference"] for x, y in zip(a, noisy)])
    assert 0.19 < flipped < 0.31  # p = 0.25 (replacement by a coin with probability 0.5)
    assert [r["annotator"] for r in noisy] == [r["annotator"] for r in a]


def test_world_humans_and_identical_outputs(world_pairs, tmp_path):
    from prefgym.world.humans import HumanPopulation

    pairs = world_pairs[:200] + [{"instruction": "Say hi.", "output_1": "hi", "output_2": "hi"}]
    rows = annotate_pairs(pairs, "world_humans", seed=0, cache_dir=tmp_path, progress=False)
    pop = HumanPopulation(0)
    for p, r in zip(pairs[:200], rows):
        options = {pop.preference(l, p["instruction"], p["input"], p["output_1"], p["output_2"]) for l in range(16)}
        assert r["preference"] in options
    assert rows[-1]["preference"] == 1.5 and rows[-1]["price_per_example"] == 0.0
    s = summarize(rows[:200])
    assert s["price_per_1000_labels"] == pytest.approx(300.0) and s["seconds_per_1000_labels"] == pytest.approx(36800.0)


def test_world_logprob_judge_gives_soft_preference(world_pairs, tmp_path):
    from prefgym.world.judges import WORLD_JUDGES, world_judge_prob

    judge = {"fn_completions": "world_judges", "prompt_template": "{instruction}\na: {output_1}\nb: {output_2}",
             "completions_kwargs": {"model_name": "world-judge-01", "temperature": 0},
             "fn_completion_parser": "logprob_parser", "completion_parser_kwargs": {"first_token": "a", "second_token": "b"}}
    cfg = write_pool(tmp_path / "lp.yaml", {"lp": judge})
    rows = annotate_pairs(world_pairs[:50], cfg, seed=0, cache_dir=tmp_path, progress=False)
    params = WORLD_JUDGES["world-judge-01"]
    for p, r in zip(world_pairs, rows):
        key = example_key(p["instruction"], p["input"], p["output_1"], p["output_2"])
        swapped = stable_hash("swap", 0, key) / 2.0**64 < 0.5
        p2 = world_judge_prob(params, p["instruction"], p["input"], p["output_1"], p["output_2"], position_swapped=swapped)
        assert r["preference"] == pytest.approx(1 + p2, abs=1e-9)


def test_bad_pairs_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="row 1.*output_2"):
        annotate_pairs([{"instruction": "a", "output_1": "x", "output_2": "y"}, {"instruction": "b", "output_1": "x"}],
                       "world_greedy", cache_dir=tmp_path, progress=False)


# ---------------------------------------------------------------- pairs


def test_make_pairs_distinct_and_seeded():
    recs = [{"instruction": "i1", "input": "", "outputs": ["a", "b", "a", "c"], "generator": "g"},
            {"instruction": "i2", "outputs": ["same", "same"]},
            {"instruction": "i3", "output": ["x", "y", "z", "w"]}]
    pairs = make_pairs(recs, seed=0)
    assert len(pairs) == 2  # i2 has one distinct sample
    for p in pairs:
        assert p["output_1"] != p["output_2"] and "outputs" not in p
    assert pairs[0]["generator"] == "g" and {pairs[0]["output_1"], pairs[0]["output_2"]} <= {"a", "b", "c"}
    assert make_pairs(recs, seed=0) == pairs
    many = make_pairs(recs, seed=0, pairs_per_instruction=5)
    assert len([p for p in many if p["instruction"] == "i3"]) == 2
    i3 = [p for p in many if p["instruction"] == "i3"]
    assert len({i3[0]["output_1"], i3[0]["output_2"], i3[1]["output_1"], i3[1]["output_2"]}) == 4
    seeds = {tuple(sorted((p["output_1"], p["output_2"])))
             for s in range(10) for p in make_pairs(recs[:1], seed=s)}
    assert len(seeds) > 1
    with pytest.raises(DataError, match="row 0"):
        make_pairs([{"instruction": "x", "outputs": "notalist"}])


# ---------------------------------------------------------------- analysis


def test_analysis_maths_on_known_labels():
    from prefgym.annotators.analysis import _agree, _mode_dist, _one_vs_mode, _one_vs_rest

    assert _mode_dist([1, 1, 2]) == {1.0: 1.0} and _mode_dist([2, 2, 1.5]) == {2.0: 1.0}
    assert _mode_dist([1, 2]) == {1.0: 0.5, 2.0: 0.5}  # a tie between modes: each half the time
    assert _agree(1, 1.5) == 0.5 and _agree(2, 2) == 1.0
    # 4 humans 2,2,2,1: held-out 2 -> mode(2,2,1)=2 agree; held-out 1 -> mode(2,2,2)=2 disagree
    assert _one_vs_rest([2, 2, 2, 1]) == pytest.approx(0.75)
    # an annotator always saying 2 vs the mode of these humans (2) -> 1.0
    assert _one_vs_mode([2, 2, 2, 2], [2, 2, 2, 1]) == 1.0


def test_analyze_world_annotators(tmp_path):
    from prefgym.annotators.analysis import analyze_annotators, make_world_cross_annotations

    cross = make_world_cross_annotations(n_pairs=150, n_humans=4, seed=0)
    assert len(cross) == 600 and len({r["annotator_index"] for r in cross[:4]}) == 4
    rows = analyze_annotators(cross, ["world_greedy", "world_pool_noisy"], cache_dir=tmp_path, n_bootstrap=200)
    humans, greedy, noisy = rows
    assert humans["bias"] == 0 and humans["variance"] == pytest.approx(1 - humans["human_agreement"])
    assert 0.5 < humans["human_agreement"] < 0.8
    lo, hi = greedy["human_agreement_ci"]
    assert lo <= greedy["human_agreement"] <= hi
    assert greedy["variance"] < noisy["variance"]  # the greedy judge is the low-variance one
    assert 0 <= greedy["proba_prefer_longer"] <= 1 and greedy["price_per_1000"] > 0


def test_load_cross_annotations_alpaca_eval_format(tmp_path):
    from prefgym.annotators.analysis import analyze_annotators, load_cross_annotations

    rows = []
    for i in range(20):
        for h in range(4):
            rows.append({"instruction": f"q{i}", "output_1": "short", "output_2": "a much longer answer, by over 30 characters",
                         "preference": 0 if h == 3 else (1 + (i % 2)), "annotator_index": h})
    path = tmp_path / "cross.json"
    path.write_text(json.dumps(rows))
    loaded = load_cross_annotations(path)
    assert loaded[3]["preference"] == 1.5 and loaded[0]["input"] == ""
    (humans,) = analyze_annotators(loaded, [], n_bootstrap=50)
    # three agree, one draw: held-out agreeing human -> 1, held-out draw -> 0.5: (3 + 0.5) / 4
    assert humans["human_agreement"] == pytest.approx(0.875)
    assert humans["proba_prefer_longer"] == pytest.approx(0.5)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output_1": "a", "output_2": "b", "preference": 3, "annotator_index": 0}]))
    with pytest.raises(DataError, match="preference"):
        load_cross_annotations(bad)


# ---------------------------------------------------------------- CLI


def test_cli_annotate_writes_fields_and_summary(world_pairs, tmp_path, capsys):
    from prefgym.cli import main

    src = tmp_path / "pairs.json"
    src.write_text(json.dumps(world_pairs[:40]))
    out = tmp_path / "out.json"
    rc = main(["annotate", str(src), "--annotators", "world_pool_noisy", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 40
    for r in rows:
        assert r["preference"] in (1.0, 2.0) and r["annotator"].startswith("world-judge-")
        assert r["price_per_example"] > 0 and r["prompt_tokens_per_example"] > 0 and "time_per_example" in r
    err = capsys.readouterr().err
    assert "price / 1000 labels" in err and "labelled" in err
    rc = main(["annotate", str(src), "--annotators", str(tmp_path / "missing.yaml"), "--out", str(out)])
    assert rc == 2


def test_unknown_placeholder_and_parser_key(tmp_path):
    base = {"fn_completions": "world_judges", "completions_kwargs": {"model_name": "world-judge-01"}}
    p = write_pool(tmp_path / "ph.yaml", {"j": {**base, "prompt_template": "{instruction} {outptu_1}"}})
    with pytest.raises(ConfigError, match=r"ph\.yaml.*prompt_template.*outptu_1"):
        load_pool(p)
    p = write_pool(tmp_path / "pk.yaml", {"j": {**base, "prompt_template": "{instruction}",
                                               "completion_parser_kwargs": {"outputs_to_mach": {}}}})
    with pytest.raises(ConfigError, match=r"pk\.yaml.*completion_parser_kwargs\.outputs_to_mach"):
        annotate_pairs([{"instruction": "a", "output_1": "x", "output_2": "y"}], p, cache_dir=tmp_path, progress=False)


def test_default_cache_dir_is_prefgym_home(tmp_path, monkeypatch):
    from prefgym.annotators.cache import default_cache_dir

    monkeypatch.setenv("PREFGYM_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "cache"
    annotate_pairs([{"instruction": "Add 2 and 2.", "output_1": "4", "output_2": "5"}], "world_greedy", progress=False)
    assert (tmp_path / "home" / "cache" / "annotations.sqlite").exists()
    monkeypatch.delenv("PREFGYM_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "prefgym"


def test_wrong_types_in_a_judge_name_file_key_and_type(tmp_path):
    base = {"fn_completions": "world_judges", "prompt_template": "{instruction}",
            "completions_kwargs": {"model_name": "world-judge-01"}}
    for key, value, expected in (("max_concurrency", "8", "int"), ("max_concurrency", True, "int"),
                                 ("price_per_prompt_token", "cheap", "int or float"),
                                 ("is_randomize_output_order", "no", "bool"),
                                 ("system_prompt", 3, "str or null"), ("completions_kwargs", [1], "dict")):
        p = write_pool(tmp_path / "types.yaml", {"j": {**base, key: value}})
        with pytest.raises(ConfigError, match=rf"types\.yaml: judge 'j': key '{key}' must be {expected}, got "):
            load_pool(p)
    p = write_pool(tmp_path / "low.yaml", {"j": {**base, "max_concurrency": 0}})
    with pytest.raises(ConfigError, match=r"low\.yaml.*'max_concurrency' must be an integer >= 1"):
        load_pool(p)
    load_pool(write_pool(tmp_path / "ok.yaml", {"j": {**base, "price_per_example": 1, "seconds_per_example": None}}))


def test_make_pairs_errors_name_the_file(tmp_path, capsys):
    from prefgym.cli import main

    src = tmp_path / "samples.json"
    src.write_text(json.dumps([{"instruction": "a", "outputs": ["x", "y"]}, {"instruction": "b", "outputs": "xy"}]))
    assert main(["make-pairs", str(src), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "row 1" in err and "outputs" in err
    assert not (tmp_path / "p.json").exists()
