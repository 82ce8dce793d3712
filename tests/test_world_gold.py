"""Gold quality of the built-in world on hand-written cases, for every family."""

import numpy as np
import pytest

from prefgym.world.demonstrations import STYLES, write_output
from prefgym.world.families import FAMILIES, parse_task, sample_task
from prefgym.world.gold import gold_components, gold_quality

# (instruction, input, output, expected correctness)
CASES = [
    # arithmetic
    ("What is 23 plus 45?", "", "68", 1.0),
    ("What is 23 plus 45?", "", "23 + 45 = 68", 1.0),
    ("What is 23 plus 45?", "", "The answer is sixty-eight. 67", 0.0),
    ("What is 23 plus 45?", "", "67", 0.0),
    ("What is 23 plus 45?", "", "68 or 69", 0.3),
    ("Subtract 5 from 10.", "", "10 - 5 = 5", 1.0),
    ("Multiply 7 by 8.", "", "Sure! The answer is 56. I hope this helps!", 1.0),
    ("Compute the product of the two numbers in the input.", "3 and 4", "12", 1.0),
    ("Compute the sum of the two numbers in the input.", "3 and 4", "It is seven.", 1.0),
    # list_items
    ("List 3 fruits.", "", "apple, pear, plum", 1.0),
    ("Name three animals.", "", "1. cat\n2. dog\n3. fox", 1.0),
    ("List 3 fruits.", "", "apple, pear", 0.4),          # one short
    ("List 3 fruits.", "", "apple, pear, plum, fig", 0.4),  # one too many
    ("List 3 fruits.", "", "apple, apple, apple", 1 / 3),  # duplicates
    ("List 3 fruits.", "", "cat, dog, fox", 0.0),         # wrong category
    ("List the given number of items from the given category.", "Category: tools\nNumber: 2", "saw, axe", 1.0),
    # word_transform
    ("Reverse the word 'table'.", "", "elbat", 1.0),
    ("Spell 'table' backwards.", "", "table", 0.0),
    ("Write 'pear' in uppercase.", "", "PEAR", 1.0),
    ("Convert the word 'pear' to capital letters.", "", "Pear", 0.0),
    ("What is the first letter of 'table'?", "", "The first letter is t.", 1.0),
    ("What is the last letter of the word 'table'?", "", "t", 0.0),
    ("Reverse the order of the words in the input.", "red cat runs", "runs cat red", 1.0),
    ("Write the input in uppercase.", "red cat", "RED CAT", 1.0),
    # sorting
    ("Sort these numbers in ascending order: 5, 2, 9.", "", "2, 5, 9", 1.0),
    ("Sort these numbers in ascending order: 5, 2, 9.", "", "9, 5, 2", 0.0),
    ("Sort the following numbers from largest to smallest.", "5, 2, 9", "9, 5, 2", 1.0),
    ("Put these words in alphabetical order: pear, apple, fig.", "", "apple, fig, pear", 1.0),
    ("Sort the words in the input alphabetically.", "pear, apple, fig", "Sure! Here they are: apple, fig, pear.", 1.0),
    # counting
    ("How many letters are in the word 'banana'?", "", "6", 1.0),
    ("Count the letters in 'banana'.", "", "There are 7 letters.", 0.0),
    ("How many times does the letter 'a' appear in 'banana'?", "", "It appears three times.", 1.0),
    ("How many words are in the following sentence?", "the old cat sees the park", "6", 1.0),
    ("Count the words in the input.", "the old cat", "2, or maybe 3", 0.3),
    # compare
    ("Which number is larger: 12 or 45?", "", "45", 1.0),
    ("Which number is larger: 12 or 45?", "", "45 is larger than 12.", 1.0),
    ("Which is smaller, 12 or 45?", "", "45", 0.0),
    ("Which of the two numbers in the input is bigger?", "12, 45", "45 or 12", 0.5),
    ("Which word comes first in alphabetical order: pear or apple?", "", "apple", 1.0),
    # describe
    ("Describe the sea in exactly 5 words.", "", "The sea is deep, blue.", 1.0),
    ("Use six words to describe the sun.", "", "The sun is bright and hot.", 1.0),
    ("Describe the topic in the input in exactly 4 words.", "rain", "The rain is wet.", 1.0),
    # explain_steps: the answer, and no false step
    ("Explain step by step how to work out 4 plus 5.", "", "Start from 4 and count on 5. 4 + 5 = 9. The answer is 9.", 1.0),
    ("Explain step by step how to work out 4 plus 5.", "", "9", 1.0),
    ("Explain step by step how to work out 4 plus 5.", "", "4 + 5 = 10. The answer is 9.", 0.3),  # a false step
    ("What is 10 minus 3? Explain your answer.", "", "The answer is 8.", 0.0),
    ("Show your working: what is 3 times 4?", "", "That is 3 groups of 4. 3 * 4 = 12. Check: 12 / 4 = 3. The answer is 12.", 1.0),
    ("Work out the sum of the two numbers in the input and show the steps.", "2 and 19", "The answer is 21.", 1.0),
    # explain
    ("Explain how to spell 'table' backwards.", "", "The word table has 5 letters. The answer is elbat.", 1.0),
    ("Explain how to spell 'table' backwards.", "", "The word table has 6 letters. The answer is elbat.", 0.3),
    ("Write 'table' backwards and explain how you did it.", "", "The answer is elbta.", 0.0),
    ("Spell the word in the input backwards and explain the steps.", "pear", "raep", 1.0),
    # compare_reasons
    ("Which is larger, 12 or 45? Give your reasons.", "", "45 is larger than 12. 45 - 12 = 33. The answer is 45.", 1.0),
    ("Which is larger, 12 or 45? Give your reasons.", "", "12 is larger than 45. The answer is 45.", 0.3),
    ("Compare 12 and 45: which is bigger, and why?", "", "The answer is 12.", 0.0),
    ("Compare the two numbers in the input and explain which is larger.", "30, 7", "30", 1.0),
]


@pytest.mark.parametrize("instruction,input,output,expected", CASES)
def test_correctness_on_hand_written_cases(instruction, input, output, expected):
    c = gold_components(instruction, input, output)
    assert c["family"] != "unknown"
    assert c["correctness"] == pytest.approx(expected, abs=1e-6)


def test_every_family_has_hand_written_cases():
    families = {gold_components(i, x, o)["family"] for i, x, o, _ in CASES}
    assert families == set(FAMILIES)
    assert len(FAMILIES) >= 6


def test_describe_partial_credit_for_wrong_count_and_topic():
    right = gold_components("Describe the sea in exactly 5 words.", "", "The sea is deep, blue.")
    off_by_one = gold_components("Describe the sea in exactly 5 words.", "", "The sea is deep and blue.")
    other_topic = gold_components("Describe the sea in exactly 5 words.", "", "The sun is bright, hot.")
    assert right["correctness"] > off_by_one["correctness"] > 0
    # count 1, no topic mention (0), adjectives all of another topic (0): 0.4
    assert other_topic["correctness"] == pytest.approx(0.4)


def test_padding_and_rambling_lower_quality_but_correctness_dominates():
    ins = "What is 23 plus 45?"
    clean, padded = gold_quality(ins, "", "68"), gold_quality(ins, "", "Sure! Here is the answer: 68. I hope this helps!")
    rambling = gold_quality(ins, "", "68. Numbers and words are fun to work with. Many people find this interesting.")
    wrong = gold_quality(ins, "", "67")
    assert clean == 1.0
    assert clean > padded > wrong
    assert clean > rambling > wrong
    # weights: 0.7 correctness + 0.15 conciseness + 0.15 format; "67" is concise and clean
    assert wrong == pytest.approx(0.3)
    assert gold_quality(ins, "", "") == 0.0


def test_repetition_lowers_format():
    c = gold_components("What is 2 plus 2?", "", "The answer is 4. The answer is 4. The answer is 4.")
    assert c["correctness"] == 1.0
    assert c["format"] < 0.5


def test_unknown_instruction_scores_style_only():
    c = gold_components("Write a poem about love.", "", "Roses are red.")
    assert c["family"] == "unknown" and c["correctness"] == 0.5
    assert 0.0 <= c["quality"] <= 1.0


def test_every_template_round_trips_and_styles_order_as_expected():
    rng = np.random.default_rng(0)
    for fam in FAMILIES.values():
        assert len(fam.templates) >= 4
        assert any(t.input for t in fam.templates), f"{fam.name} has no phrasing with an input"
        for _ in range(60):
            task = sample_task(rng, fam.name)
            parsed = parse_task(task.instruction, task.input)
            assert parsed is not None and parsed.family == fam.name
            assert {k: parsed.fields[k] for k in task.fields if k != "n_word"} == {
                k: v for k, v in task.fields.items() if k != "n_word"}
            assert gold_components(task.instruction, task.input, fam.clean(task.fields, rng))["correctness"] == 1.0
            assert gold_components(task.instruction, task.input, fam.wrong(task.fields, rng))["correctness"] < 1.0
            for style in STYLES:
                q = gold_quality(task.instruction, task.input, write_output(task, style, rng))
                assert 0.0 <= q <= 1.0


def test_mean_quality_by_style():
    rng = np.random.default_rng(1)
    mean = {s: [] for s in STYLES}
    for _ in range(300):
        task = sample_task(rng)
        for s in STYLES:
            mean[s].append(gold_quality(task.instruction, task.input, write_output(task, s, rng)))
    mean = {s: float(np.mean(v)) for s, v in mean.items()}
    assert mean["clean"] > 0.85  # detail tasks pay 0.3 for steps and reasons that a bare answer lacks
    assert mean["detailed"] > mean["padded"]
    assert mean["clean"] > mean["padded"] > mean["padded_wrong"]
    assert mean["clean"] > mean["rambling"] > mean["wrong"]
    assert mean["verbose"] > mean["partial"] > mean["wrong"]


DETAIL_TASK = "Explain step by step how to work out 4 plus 5."
FULL = ("We add the two numbers. Start from the first number and count on by the second. "
        "Here that is 4 plus 5. The answer is 9.")


def test_detail_is_credited_as_content():
    # detail = share of the three steps stated; weights 0.5 correctness, 0.3 detail, 0.1 conciseness, 0.1 format
    assert gold_components(DETAIL_TASK, "", FULL)["detail"] == 1.0
    assert gold_quality(DETAIL_TASK, "", FULL) == pytest.approx(1.0)
    two = "We add the two numbers. Here that is 4 plus 5. The answer is 9."
    assert gold_components(DETAIL_TASK, "", two)["detail"] == pytest.approx(2 / 3)
    assert gold_quality(DETAIL_TASK, "", two) == pytest.approx(0.5 + 0.3 * 2 / 3 + 0.1 + 0.1)
    assert gold_quality(DETAIL_TASK, "", "9") == pytest.approx(0.7)  # right, but no steps
    # exact-answer tasks give no credit for detail: the bare answer is best
    assert gold_components("What is 4 plus 5?", "", FULL)["detail"] == 0.0
    assert gold_quality("What is 4 plus 5?", "", "9") == 1.0 > gold_quality("What is 4 plus 5?", "", FULL)


def test_padding_and_false_steps_still_cost_in_detail_tasks():
    padded = "Sure! Great question! " + FULL + " I hope this helps!"
    rambling = "9. Numbers and words are fun to work with. Many people find tasks like this very interesting."
    false_step = "We add the two numbers. 4 + 5 = 10. Here that is 4 plus 5. The answer is 9."
    full = gold_quality(DETAIL_TASK, "", FULL)
    assert full > gold_quality(DETAIL_TASK, "", padded)
    assert gold_quality(DETAIL_TASK, "", "9") > gold_quality(DETAIL_TASK, "", rambling)
    assert gold_components(DETAIL_TASK, "", false_step)["correctness"] == 0.3
    assert gold_quality(DETAIL_TASK, "", false_step) < gold_quality(DETAIL_TASK, "", "9")


def test_detail_steps_are_a_small_fixed_vocabulary_per_operation():
    # the method steps do not depend on the task's numbers or word (a tiny model can learn them);
    # only the last step restates the task, and steps of another operation earn nothing
    rng = np.random.default_rng(0)
    for name in ("explain_steps", "explain", "compare_reasons"):
        fam = FAMILIES[name]
        heads = {tuple(fam.facts(sample_task(rng, name).fields)[:2]) for _ in range(200)}
        assert len(heads) == (3 if name == "explain_steps" else 1), name
    sub_step = "We subtract the second number from the first. The answer is 9."
    assert gold_components(DETAIL_TASK, "", sub_step)["detail"] == 0.0
    assert gold_components(DETAIL_TASK, "", "We add the two numbers. The answer is 9.")["detail"] == pytest.approx(1 / 3)
