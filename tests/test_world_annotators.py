"""Simulated humans and API judges of the built-in world: agreement, variance, biases, determinism."""

import math

import pytest

from prefgym.world.agreement import human_agreement, human_variance, judge_agreement, policy_like_pairs
from prefgym.world.humans import HumanPopulation
from prefgym.world.judges import POOL, WORLD_JUDGES, WorldJudgeParams, world_judge_prob

N_PAIRS = 1500


@pytest.fixture(scope="module")
def pairs():
    return policy_like_pairs(N_PAIRS, seed=0)


@pytest.fixture(scope="module")
def population():
    return HumanPopulation(seed=0)


def test_pairs_are_policy_like(pairs):
    assert len(pairs) == N_PAIRS
    assert all(p["output_1"] != p["output_2"] for p in pairs)
    assert policy_like_pairs(20, seed=0) == pairs[:20]


def test_human_preferences_are_deterministic_and_valid(pairs, population):
    p = pairs[0]
    args = (p["instruction"], p["input"], p["output_1"], p["output_2"])
    labels = [population.preference(i, *args) for i in range(population.n_labelers)]
    assert set(labels) <= {1, 2}
    assert labels == [HumanPopulation(seed=0).preference(i, *args) for i in range(population.n_labelers)]
    with pytest.raises(ValueError):
        population.preference(population.n_labelers, *args)


def test_human_human_agreement_is_alpacafarm_like(pairs, population):
    # AlpacaFarm: crowdworkers agree on ~65% of pairs. The range allows for the sampling error of
    # 1500 pairs (SE ~1.2 points) and for populations drawn with other seeds.
    agree = human_agreement(pairs, population, seed=0)
    assert 0.60 <= agree <= 0.72
    for seed in (1, 2):
        assert 0.58 <= human_agreement(pairs, HumanPopulation(seed), seed=seed) <= 0.74


def test_humans_prefer_better_outputs():
    pop = HumanPopulation(seed=0)
    ins = "What is 23 plus 45?"
    right, wrong = "68", "67"
    p_right = [pop.prob_output_2(i, ins, "", wrong, right) for i in range(pop.n_labelers)]
    assert min(p_right) > 0.5
    assert sum(p_right) / len(p_right) > 0.75
    # labelers differ from one another
    assert max(p_right) - min(p_right) > 0.05


def test_pool_agrees_with_humans_about_as_humans_do_and_greedy_a_bit_more(pairs, population):
    hh = human_agreement(pairs, population, seed=0)
    pool = judge_agreement(pairs, POOL, population, seed=0)
    greedy = judge_agreement(pairs, ["world-judge-greedy"], population, seed=0)
    noisy = judge_agreement(pairs, POOL, population, seed=0, label_flip_prob=0.25)
    assert abs(pool["agreement"] - hh) < 0.05
    assert greedy["agreement"] > pool["agreement"]
    assert greedy["variance"] < pool["variance"]
    # label flips cost agreement and add variance, exactly as mixing with a coin predicts
    assert noisy["agreement"] < pool["agreement"] - 0.03
    assert noisy["variance"] > pool["variance"]
    assert 0.2 < human_variance(pairs, population) < 0.45


def test_thirteen_pool_judges_plus_greedy_all_distinct():
    assert POOL == [f"world-judge-{i:02d}" for i in range(1, 14)]
    assert set(WORLD_JUDGES) == set(POOL) | {"world-judge-greedy"}
    assert len(set(WORLD_JUDGES.values())) == 14
    assert all(isinstance(p, WorldJudgeParams) for p in WORLD_JUDGES.values())


def test_judge_prob_is_deterministic_and_matches_the_formula():
    ins, a, b = "What is 2 plus 2?", "4", "5"
    params = WorldJudgeParams(check_prob=1.0, temperature=0.5, position_bias=0.0)
    p = world_judge_prob(params, ins, "", a, b)
    assert p == world_judge_prob(params, ins, "", a, b)
    # both concise and clean; only correctness differs (1 vs 0): P(5 preferred) = sigmoid(-3 / 0.5)
    assert p == pytest.approx(1 / (1 + math.exp(3.0 / 0.5)))
    unchecked = WorldJudgeParams(check_prob=0.0)
    assert world_judge_prob(unchecked, ins, "", a, b) == pytest.approx(0.5)


def test_position_bias_and_swap():
    ins, a, b = "What is 2 plus 2?", "4", "four"
    likes_first = WorldJudgeParams(position_bias=1.0)
    assert world_judge_prob(likes_first, ins, "", a, a) < 0.5
    assert world_judge_prob(likes_first, ins, "", a, a, position_swapped=True) > 0.5
    neutral = WorldJudgeParams()
    assert world_judge_prob(neutral, ins, "", a, b) == pytest.approx(
        world_judge_prob(neutral, ins, "", a, b, position_swapped=True))


def test_systematic_biases():
    ins = "What is 2 plus 2?"
    short, long_ = "4", "The answer is 4, which is the sum of the two numbers you gave me here."
    padded = "Sure! The answer is 4. I hope this helps!"
    base = WorldJudgeParams()
    longer = WorldJudgeParams(length_bias=1.0)
    polite = WorldJudgeParams(politeness_bias=1.0, format_weight=0.0)
    assert world_judge_prob(longer, ins, "", short, long_) > world_judge_prob(base, ins, "", short, long_)
    assert world_judge_prob(polite, ins, "", short, padded) > 0.5 > world_judge_prob(base, ins, "", short, padded)
    lists = WorldJudgeParams(list_bias=1.0)
    lins = "List 3 fruits."
    assert world_judge_prob(lists, lins, "", "apple pear plum", "apple, pear, plum") > world_judge_prob(
        base, lins, "", "apple pear plum", "apple, pear, plum")
    # the pool has judges biased each way on length and position
    assert any(p.length_bias > 0 for p in WORLD_JUDGES.values())
    assert any(p.length_bias < 0 for p in WORLD_JUDGES.values())
    assert any(p.position_bias > 0 for p in WORLD_JUDGES.values())
    assert any(p.position_bias < 0 for p in WORLD_JUDGES.values())


DETAIL_TASK = "Explain step by step how to work out 4 plus 5."
EXACT_TASK = "What is 4 plus 5?"
DETAILED = ("We add the two numbers. Start from the first number and count on by the second. "
            "Here that is 4 plus 5. The answer is 9.")
RAMBLING = "9. Numbers and words are fun to work with. Many people find tasks like this very interesting."
PADDED = "Sure! The answer is 9. I hope this helps!"


def _mean_p2(population, ins, a, b):
    return sum(population.prob_output_2(i, ins, "", a, b) for i in range(population.n_labelers)) / population.n_labelers


def test_people_prefer_content_not_padding(population):
    # detail that is content wins; padding and small talk still lose, for people and the judge
    greedy = WORLD_JUDGES["world-judge-greedy"]
    assert _mean_p2(population, DETAIL_TASK, "9", DETAILED) > 0.75
    assert _mean_p2(population, DETAIL_TASK, "9", RAMBLING) < 0.5
    assert _mean_p2(population, EXACT_TASK, "9", PADDED) < 0.45
    assert world_judge_prob(greedy, DETAIL_TASK, "", "9", DETAILED) > _mean_p2(population, DETAIL_TASK, "9", DETAILED)
    assert world_judge_prob(greedy, DETAIL_TASK, "", "9", RAMBLING) < 0.5
    assert world_judge_prob(greedy, EXACT_TASK, "", "9", PADDED) < 0.2


def test_annotator_table_is_alpaca_eval_like(tmp_path):
    # AlpacaEval: humans agree 65.7% and pick the longer output 64% of the time; GPT-4 69.2% and 0.68;
    # always-the-longer agrees 62.2%, below the humans. Ranges allow for 400 pairs (SE ~2.5 points).
    from prefgym.annotators.analysis import analyze_annotators, make_world_cross_annotations

    cross = make_world_cross_annotations(n_pairs=400, n_humans=4, seed=0)
    humans, greedy, longer = analyze_annotators(cross, ["world_greedy", "longer"], cache_dir=tmp_path, n_bootstrap=50)
    assert 0.60 < humans["human_agreement"] < 0.71
    assert 0.57 < humans["proba_prefer_longer"] < 0.71
    assert greedy["proba_prefer_longer"] > humans["proba_prefer_longer"]  # judges like length more than people
    assert greedy["human_agreement"] > humans["human_agreement"]
    assert longer["human_agreement"] < humans["human_agreement"]


def test_cached_world_answers_are_not_reused_once_the_worlds_people_change(pairs, tmp_path, monkeypatch):
    """World judges' weights are code, not config: a cache filled before that code changed is not read."""
    import dataclasses

    from prefgym.annotators.annotate import annotate_pairs
    from prefgym.world import behaviour, judges

    few = pairs[:40]
    first, stats = annotate_pairs(few, "world_greedy", cache_dir=tmp_path, progress=False), {}
    again = annotate_pairs(few, "world_greedy", cache_dir=tmp_path, progress=False, stats=stats)
    assert [r["preference"] for r in again] == [r["preference"] for r in first] and stats["n_cached"] == len(few)

    # the greedy judge now counts only length: its labels change, and the cache must not hide that
    changed = dataclasses.replace(judges.WORLD_JUDGES["world-judge-greedy"], length_bias=50.0, position_bias=0.0)
    monkeypatch.setitem(judges.WORLD_JUDGES, "world-judge-greedy", changed)
    monkeypatch.setattr(behaviour, "behaviour_hash", lambda: "changed-world-code")
    stats = {}
    new = annotate_pairs(few, "world_greedy", cache_dir=tmp_path, progress=False, stats=stats)
    assert stats["n_cached"] == 0
    words = [(len(r["output_1"].split()), len(r["output_2"].split())) for r in few]
    longer = [2 if w2 > w1 else 1 for w1, w2 in words]
    differ = [i for i, (w1, w2) in enumerate(words) if w1 != w2]
    assert len(differ) > 20
    assert [new[i]["preference"] for i in differ] == [longer[i] for i in differ]
    assert [r["preference"] for r in new] != [r["preference"] for r in first]


def test_behaviour_hash_covers_the_code_of_judges_humans_and_gold():
    from prefgym.world import behaviour

    behaviour.behaviour_hash.cache_clear()
    h = behaviour.behaviour_hash()
    assert len(h) == 16 and h == behaviour.behaviour_hash()
    assert set(behaviour._MODULES) >= {"judges.py", "humans.py", "gold.py"}
