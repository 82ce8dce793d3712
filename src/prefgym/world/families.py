"""Instruction families of the built-in world: how tasks are phrased, solved and answered.

Every family knows four things about its tasks:
- the phrasings (`templates`): an instruction, an optional `input`, and constants (e.g. the
  operation) fixed by the phrasing; the same templates turn back into regexes, so a task can be
  recovered from its text alone (`parse_task`);
- how to draw a task (`sample`);
- how to score an output's correctness against the programmatic ground truth (`correctness`);
- how to write answers of several kinds: `clean` (concise and right), `verbose` (right, in a
  sentence), `detailed` (right, with content: steps, reasons, examples), `wrong`, and `partial`
  (e.g. a wrong count, a half-sorted list).

Two kinds of family: *exact-answer* families (arithmetic, sorting, ...), where the answer is all
the value and more words are padding; and *detail* families (`DetailFamily`: explain, give steps,
compare with reasons), where each correct content sentence (`facts`) is real value that the gold
reward credits (`detail`), and a false claim costs correctness.

Field values are kept as the strings that appear in the text, so that rendering and parsing are
exact inverses.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import numpy as np

CATEGORIES = {
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon", "kiwi", "fig"],
    "animals": ["cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf", "fox", "rabbit"],
    "colors": ["red", "blue", "green", "yellow", "black", "white", "purple", "pink", "brown", "gray", "gold", "silver"],
    "vegetables": ["carrot", "potato", "onion", "pepper", "cabbage", "lettuce", "bean", "pea", "corn", "garlic", "spinach", "celery"],
    "countries": ["France", "Spain", "Italy", "Japan", "China", "India", "Brazil", "Canada", "Mexico", "Egypt", "Kenya", "Peru"],
    "tools": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "axe", "knife", "ruler", "pliers", "chisel", "ladder"],
}
ITEM_CATEGORY = {item.lower(): cat for cat, items in CATEGORIES.items() for item in items}

TOPICS = {
    "sea": ["blue", "deep", "wide", "salty", "calm", "wild", "cold", "vast"],
    "sun": ["bright", "hot", "yellow", "warm", "golden", "big", "shining", "strong"],
    "forest": ["green", "dark", "quiet", "old", "dense", "tall", "wild", "deep"],
    "city": ["busy", "loud", "bright", "big", "crowded", "modern", "old", "tall"],
    "river": ["long", "cold", "fast", "clear", "wide", "calm", "blue", "deep"],
    "mountain": ["tall", "cold", "steep", "high", "rocky", "white", "quiet", "big"],
    "garden": ["green", "small", "quiet", "bright", "lovely", "fresh", "full", "calm"],
    "winter": ["cold", "white", "long", "dark", "quiet", "snowy", "grey", "harsh"],
    "night": ["dark", "quiet", "cold", "calm", "long", "black", "still", "deep"],
    "cat": ["soft", "small", "lazy", "quiet", "clever", "warm", "quick", "cute"],
    "rain": ["wet", "cold", "grey", "soft", "heavy", "steady", "light", "fresh"],
    "book": ["long", "old", "thick", "good", "small", "heavy", "new", "dusty"],
}

WORDS = sorted({w for items in CATEGORIES.values() for w in items if w.islower() and len(w) >= 3}
               | {"table", "window", "planet", "simple", "market", "candle", "pencil", "garden", "river",
                  "summer", "paper", "music", "stone", "cloud", "bridge", "letter", "doctor", "friend"})

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
WORD_TO_NUMBER = {w: i for i, w in enumerate(NUMBER_WORDS)}

SENTENCE_ADJ = ["small", "old", "quick", "happy", "lazy", "brown", "quiet", "young"]
SENTENCE_VERBS = ["sees", "likes", "finds", "follows", "watches", "needs"]
SENTENCE_PLACES = ["park", "house", "road", "field", "shop", "school"]

# Small talk that carries no answer: what rambling answers wander into.
FILLER_SENTENCES = [
    "Numbers and words are fun to work with.",
    "There are many ways to think about this question.",
    "It is always good to check your work twice.",
    "Many people find tasks like this very interesting.",
    "This is a common question that comes up often.",
    "Let me know if you have any other questions.",
    "Learning new things every day is a good habit.",
]
PAD_OPENERS = ["Sure!", "Sure! Here is the answer:", "Of course!", "Certainly!", "Great question!"]
PAD_CLOSERS = ["I hope this helps!", "Let me know if you need anything else.", "Have a nice day!", ""]


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _numbers(text: str) -> list[int]:
    """Integers in `text`, in order; number words (zero..twelve) count too."""
    out = []
    for tok in re.findall(r"-?\d+|[A-Za-z]+", text):
        if tok.lstrip("-").isdigit():
            out.append(int(tok))
        elif tok.lower() in WORD_TO_NUMBER:
            out.append(WORD_TO_NUMBER[tok.lower()])
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def _join(items) -> str:
    return ", ".join(str(x) for x in items)


@dataclass(frozen=True)
class Template:
    """One phrasing: instruction and input with {field} slots, plus constants it fixes."""

    instruction: str
    input: str = ""
    const: dict = field(default_factory=dict)


# What each field slot may match when a phrasing is turned back into a regex.
FIELD_PATTERNS = {
    "a": r"-?\d+", "b": r"-?\d+", "n": r"\d+", "n_word": "|".join(NUMBER_WORDS),
    "category": "|".join(CATEGORIES), "topic": "|".join(TOPICS),
    "word": r"[A-Za-z]+", "letter": r"[a-z]", "w1": r"[A-Za-z]+", "w2": r"[A-Za-z]+",
    "items": r"[A-Za-z0-9, \-]+?", "sentence": r"[A-Za-z ]+?",
}


def template_regex(text: str) -> re.Pattern:
    """The regex that recovers the {fields} of a rendered template (exact match)."""
    parts = re.split(r"\{(\w+)\}", text)
    rx = ""
    for i, part in enumerate(parts):
        if i % 2 == 0:
            rx += re.escape(part)
        else:
            rx += f"(?P<{part}>{FIELD_PATTERNS[part]})"
    return re.compile(rx + r"\Z")


class Family:
    """Base class: a family of tasks with programmatic ground truth."""

    name = ""
    templates: list[Template] = []

    def sample(self, rng: np.random.Generator) -> tuple[Template, dict]:
        raise NotImplementedError

    def clean(self, f: dict, rng: np.random.Generator | None = None) -> str:
        """A concise, correct answer (with rng: one of several correct formats)."""
        raise NotImplementedError

    def verbose(self, f: dict, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def detailed(self, f: dict, rng: np.random.Generator) -> str:
        """Right, with as much content as the task has room for (exact-answer families: `verbose`)."""
        return self.verbose(f, rng)

    def ideal_words(self, f: dict, output: str = "") -> int:
        """Words of the ideal answer (given what `output` says): more than this, plus some slack,
        is not concise."""
        return len(self.clean(f).split())

    def detail(self, f: dict, output: str) -> float | None:
        """Share of the task's content the output gives; None where the task asks for an answer only."""
        return None

    def wrong(self, f: dict, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def partial(self, f: dict, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def correctness(self, f: dict, output: str) -> float:
        raise NotImplementedError

    def normalize(self, groups: dict) -> dict:
        """Fill derived fields after parsing (e.g. `n` from `n_word`)."""
        if "n_word" in groups and "n" not in groups:
            groups["n"] = str(WORD_TO_NUMBER[groups["n_word"]])
        return groups


def _number_answer_correctness(output: str, answer: int, operands=()) -> float:
    """1 if the numbers the output gives (the operands it echoes set aside) are all the answer;
    0.3 if it hedges between the answer and others; else 0."""
    nums = _numbers(output)
    if not nums:
        return 0.0
    given = list(nums)
    for x in operands:
        if x in given:
            given.remove(x)
    given = given or nums
    if all(x == answer for x in given):
        return 1.0
    return 0.3 if answer in given else 0.0


def _operands(rng: np.random.Generator, op: str) -> dict:
    """The fields of a sum, difference or product. Small numbers: a tiny model can learn these
    facts, as a pretrained LM knows its sums."""
    if op == "add":
        a, b = rng.integers(1, 21, size=2)
    elif op == "sub":
        a = rng.integers(5, 26)
        b = rng.integers(1, a)
    else:
        a, b = rng.integers(2, 10, size=2)
    return {"a": str(int(a)), "b": str(int(b)), "op": op}


def _apply(f: dict) -> int:
    a, b = int(f["a"]), int(f["b"])
    return {"add": a + b, "sub": a - b, "mul": a * b}[f["op"]]


class Arithmetic(Family):
    name = "arithmetic"
    templates = [
        Template("What is {a} plus {b}?", const={"op": "add"}),
        Template("What is {a} minus {b}?", const={"op": "sub"}),
        Template("What is {a} times {b}?", const={"op": "mul"}),
        Template("Add {a} and {b}.", const={"op": "add"}),
        Template("Subtract {b} from {a}.", const={"op": "sub"}),
        Template("Multiply {a} by {b}.", const={"op": "mul"}),
        Template("Compute the sum of the two numbers in the input.", "{a} and {b}", {"op": "add"}),
        Template("Compute the product of the two numbers in the input.", "{a} and {b}", {"op": "mul"}),
    ]
    SYMBOL = {"add": "+", "sub": "-", "mul": "*"}

    def sample(self, rng):
        t = _choice(rng, self.templates)
        return t, _operands(rng, t.const["op"])

    def answer(self, f) -> int:
        return _apply(f)

    def clean(self, f, rng=None):
        ans = self.answer(f)
        if rng is not None and rng.random() < 0.3:
            return f"{f['a']} {self.SYMBOL[f['op']]} {f['b']} = {ans}"
        return str(ans)

    def verbose(self, f, rng):
        return _choice(rng, ["The answer is {x}.", "The result is {x}.", "It is {x}."]).format(x=self.answer(f))

    def wrong(self, f, rng):
        ans = self.answer(f)
        delta = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
        return str(ans + delta)

    def partial(self, f, rng):
        # The right number among distractors: the operands echoed back.
        return f"{self.answer(f)} or {self.answer(f) + int(rng.integers(1, 3))}"

    def correctness(self, f, output):
        return _number_answer_correctness(output, self.answer(f), (int(f["a"]), int(f["b"])))


class ListItems(Family):
    name = "list_items"
    templates = [
        Template("List {n} {category}."),
        Template("Name {n_word} {category}."),
        Template("Give me a list of {n} {category}."),
        Template("Write down {n_word} examples of {category}."),
        Template("List the given number of items from the given category.", "Category: {category}\nNumber: {n}"),
    ]

    def sample(self, rng):
        t = _choice(rng, self.templates)
        n = int(rng.integers(2, 6))
        return t, {"n": str(n), "n_word": NUMBER_WORDS[n], "category": _choice(rng, list(CATEGORIES))}

    def _items(self, f, k, rng=None):
        pool = CATEGORIES[f["category"]]
        if rng is None:
            return pool[:k]
        return [pool[i] for i in rng.permutation(len(pool))[:k]]

    def clean(self, f, rng=None):
        items = self._items(f, int(f["n"]), rng)
        if rng is not None and rng.random() < 0.3:
            return "\n".join(f"{i + 1}. {x}" for i, x in enumerate(items))
        return _join(items)

    def verbose(self, f, rng):
        return f"Here are {f['n']} {f['category']}: {_join(self._items(f, int(f['n']), rng))}."

    def wrong(self, f, rng):
        other = _choice(rng, [c for c in CATEGORIES if c != f["category"]])
        return _join(self._items({"category": other}, int(f["n"]), rng))

    def partial(self, f, rng):
        n = int(f["n"])
        k = n + _choice(rng, [-1, 1]) if n > 2 else n + 1
        return _join(self._items(f, k, rng))

    def correctness(self, f, output):
        items = [w.lower() for w in _words(output) if w.lower() in ITEM_CATEGORY]
        if not items:
            return 0.0
        n = int(f["n"])
        member = sum(ITEM_CATEGORY[w] == f["category"] for w in items) / len(items)
        unique = len(set(items)) / len(items)
        count = 1.0 if len(items) == n else max(0.0, 1.0 - 0.6 * abs(len(items) - n))
        return member * unique * count


class WordTransform(Family):
    name = "word_transform"
    templates = [
        Template("Reverse the word '{word}'.", const={"op": "reverse"}),
        Template("Spell '{word}' backwards.", const={"op": "reverse"}),
        Template("Write '{word}' in uppercase.", const={"op": "upper"}),
        Template("Convert the word '{word}' to capital letters.", const={"op": "upper"}),
        Template("What is the first letter of '{word}'?", const={"op": "first"}),
        Template("What is the last letter of the word '{word}'?", const={"op": "last"}),
        Template("Reverse the order of the words in the input.", "{sentence}", {"op": "reverse_words"}),
        Template("Write the input in uppercase.", "{sentence}", {"op": "upper_sentence"}),
    ]

    def sample(self, rng):
        t = _choice(rng, self.templates)
        if t.const["op"] in ("reverse_words", "upper_sentence"):
            k = int(rng.integers(2, 5))
            words = [WORDS[i] for i in rng.permutation(len(WORDS))[:k]]
            return t, {"sentence": " ".join(words), "op": t.const["op"]}
        return t, {"word": _choice(rng, WORDS), "op": t.const["op"]}

    def target(self, f) -> str:
        op = f["op"]
        if op == "reverse":
            return f["word"][::-1]
        if op == "upper":
            return f["word"].upper()
        if op == "first":
            return f["word"][0]
        if op == "last":
            return f["word"][-1]
        if op == "reverse_words":
            return " ".join(f["sentence"].split()[::-1])
        return f["sentence"].upper()

    def clean(self, f, rng=None):
        return self.target(f)

    def verbose(self, f, rng):
        x = self.target(f)
        if f["op"] in ("first", "last"):
            return f"The {f['op']} letter is {x}."
        return _choice(rng, [f"The result is: {x}", f"Here it is: {x}"])

    def wrong(self, f, rng):
        op = f["op"]
        if op in ("first", "last"):
            letters = [c for c in "bcdfghklmnprstw" if c != self.target(f)]
            return _choice(rng, letters)
        if op == "reverse":
            w = f["word"]
            return w[::-1][1:] + w[-1] if len(w) > 3 else w  # a botched reversal
        if op == "upper":
            return f["word"].capitalize()
        if op == "reverse_words":
            return f["sentence"]
        return f["sentence"].capitalize()

    def partial(self, f, rng):
        x, op = self.target(f), f["op"]
        if op == "reverse":
            return x[:-1]  # a letter lost
        if op in ("upper", "upper_sentence"):
            cut = max(1, len(x) // 2)
            return x[:cut] + (f.get("word") or f["sentence"])[cut:]  # half converted
        if op == "reverse_words":
            return " ".join(x.split()[:-1])  # a word lost
        return f"{x}{x}"

    def correctness(self, f, output):
        target = self.target(f)
        if f["op"] in ("first", "last"):
            singles = [w for w in _words(output) if len(w) == 1 and w.lower() != "a" or w == target]
            if not singles:
                return 0.0
            return 1.0 if singles[-1] == target else 0.0
        text = " ".join(re.findall(r"[A-Za-z]+", output))
        if re.search(r"(?<![A-Za-z])" + re.escape(target) + r"(?![A-Za-z])", text):
            return 1.0
        # Closest run of as many words as the target has.
        n = len(target.split())
        words = text.split()
        best = max((difflib.SequenceMatcher(None, " ".join(words[i:i + n]), target).ratio()
                    for i in range(max(1, len(words) - n + 1))), default=0.0)
        return 0.4 * best if best >= 0.6 else 0.0


class Sorting(Family):
    name = "sorting"
    templates = [
        Template("Sort these numbers in ascending order: {items}.", const={"kind": "num", "order": "asc"}),
        Template("Sort the following numbers from largest to smallest.", "{items}", {"kind": "num", "order": "desc"}),
        Template("Sort the numbers in the input from smallest to largest.", "{items}", {"kind": "num", "order": "asc"}),
        Template("Put these words in alphabetical order: {items}.", const={"kind": "word", "order": "asc"}),
        Template("Sort the words in the input alphabetically.", "{items}", {"kind": "word", "order": "asc"}),
    ]

    def sample(self, rng):
        t = _choice(rng, self.templates)
        k = int(rng.integers(3, 6))
        if t.const["kind"] == "num":
            items = [int(x) for x in rng.choice(np.arange(1, 31), size=k, replace=False)]
        else:
            items = [WORDS[i] for i in rng.permutation(len(WORDS))[:k]]
        while items in (sorted(items), sorted(items, reverse=True)):  # an already sorted input tests nothing
            items = [items[i] for i in rng.permutation(k)]
        return t, {"items": _join(items), **t.const}

    def _input(self, f):
        parts = [p.strip() for p in f["items"].split(",")]
        return [int(p) for p in parts] if f["kind"] == "num" else parts

    def target(self, f):
        return sorted(self._input(f), reverse=f["order"] == "desc")

    def clean(self, f, rng=None):
        return _join(self.target(f))

    def verbose(self, f, rng):
        return f"The sorted list is: {_join(self.target(f))}."

    def wrong(self, f, rng):
        items = self._input(f)
        return _join(sorted(items, reverse=f["order"] != "desc") if rng.random() < 0.5 else items)

    def partial(self, f, rng):
        t = self.target(f)
        i = int(rng.integers(len(t) - 1))
        t[i], t[i + 1] = t[i + 1], t[i]
        return _join(t[:-1] if rng.random() < 0.3 else t)

    def correctness(self, f, output):
        items = self._input(f)
        if f["kind"] == "num":
            seq = [x for x in _numbers(output) if x in items]
        else:
            seq = [w for w in _words(output) if w in items]
        target = self.target(f)
        if seq == target:
            return 1.0
        if not seq:
            return 0.0
        coverage = len(set(seq)) / len(items) * (len(set(seq)) / len(seq))
        rank = {x: i for i, x in enumerate(target)}
        pairs = [(rank[x] < rank[y]) for i, x in enumerate(seq) for y in seq[i + 1:] if x != y]
        ordered = sum(pairs) / len(pairs) if pairs else 0.0
        return 0.6 * coverage * ordered


class Counting(Family):
    name = "counting"
    templates = [
        Template("How many letters are in the word '{word}'?", const={"op": "letters"}),
        Template("Count the letters in '{word}'.", const={"op": "letters"}),
        Template("How many words are in the following sentence?", "{sentence}", {"op": "words"}),
        Template("Count the words in the input.", "{sentence}", {"op": "words"}),
        Template("How many times does the letter '{letter}' appear in '{word}'?", const={"op": "letter"}),
    ]

    def sample(self, rng):
        t = _choice(rng, self.templates)
        op = t.const["op"]
        if op == "words":
            k = int(rng.integers(3, 9))
            words = ["the", _choice(rng, SENTENCE_ADJ), _choice(rng, CATEGORIES["animals"]),
                     _choice(rng, SENTENCE_VERBS), "the", _choice(rng, SENTENCE_ADJ),
                     _choice(rng, SENTENCE_PLACES), "today"]
            return t, {"sentence": " ".join(words[:k]), "op": op}
        word = _choice(rng, WORDS)
        f = {"word": word, "op": op}
        if op == "letter":
            f["letter"] = _choice(rng, word) if rng.random() < 0.7 else _choice(rng, "aeioustn")
        return t, f

    def answer(self, f) -> int:
        if f["op"] == "letters":
            return len(f["word"])
        if f["op"] == "words":
            return len(f["sentence"].split())
        return f["word"].count(f["letter"])

    def clean(self, f, rng=None):
        return str(self.answer(f))

    def verbose(self, f, rng):
        unit = {"letters": "letters", "words": "words", "letter": "times"}[f["op"]]
        return f"There are {self.answer(f)} {unit}." if f["op"] != "letter" else f"It appears {self.answer(f)} times."

    def wrong(self, f, rng):
        ans = self.answer(f)
        return str(max(0, ans + _choice(rng, [-2, -1, 1, 2]))) if ans > 1 else str(ans + int(rng.integers(1, 3)))

    def partial(self, f, rng):
        return f"{self.wrong(f, rng)}, or maybe {self.answer(f)}"

    def correctness(self, f, output):
        return _number_answer_correctness(output, self.answer(f))


class Compare(Family):
    name = "compare"
    templates = [
        Template("Which number is larger: {a} or {b}?", const={"op": "max"}),
        Template("Which is smaller, {a} or {b}?", const={"op": "min"}),
        Template("Which of the two numbers in the input is bigger?", "{a}, {b}", {"op": "max"}),
        Template("Which word comes first in alphabetical order: {w1} or {w2}?", const={"op": "alpha"}),
    ]

    def sample(self, rng):
        t = _choice(rng, self.templates)
        if t.const["op"] == "alpha":
            w1, w2 = [WORDS[i] for i in rng.permutation(len(WORDS))[:2]]
            return t, {"w1": w1, "w2": w2, "op": "alpha"}
        a, b = rng.choice(np.arange(1, 31), size=2, replace=False)
        return t, {"a": str(int(a)), "b": str(int(b)), "op": t.const["op"]}

    def _pair(self, f):
        return (f["w1"], f["w2"]) if f["op"] == "alpha" else (int(f["a"]), int(f["b"]))

    def answer(self, f):
        x, y = self._pair(f)
        return max(x, y) if f["op"] == "max" else min(x, y)

    def clean(self, f, rng=None):
        return str(self.answer(f))

    def verbose(self, f, rng):
        if f["op"] == "alpha":
            return f"The word {self.answer(f)} comes first."
        return f"The {'larger' if f['op'] == 'max' else 'smaller'} number is {self.answer(f)}."

    def wrong(self, f, rng):
        x, y = self._pair(f)
        return str(y if self.answer(f) == x else x)

    def partial(self, f, rng):
        x, y = self._pair(f)
        return f"{x} or {y}" if rng.random() < 0.5 else f"{y} or {x}"

    def correctness(self, f, output):
        x, y = self._pair(f)
        if f["op"] == "alpha":
            mentions = [w for w in _words(output) if w in (x, y)]
        else:
            mentions = [v for v in _numbers(output) if v in (x, y)]
        if not mentions:
            return 0.0
        if mentions[0] != self.answer(f):
            return 0.0
        return 0.5 if re.search(r"\bor\b", output) and len(set(mentions)) > 1 else 1.0


class Describe(Family):
    name = "describe"
    templates = [
        Template("Describe the {topic} in exactly {n} words."),
        Template("Write a sentence of exactly {n} words about the {topic}."),
        Template("Use {n_word} words to describe the {topic}."),
        Template("Describe the topic in the input in exactly {n} words.", "{topic}"),
    ]

    def sample(self, rng):
        t = _choice(rng, self.templates)
        n = int(rng.integers(4, 9))
        return t, {"topic": _choice(rng, list(TOPICS)), "n": str(n), "n_word": NUMBER_WORDS[n]}

    def _sentence(self, topic, n, rng=None):
        adj = TOPICS[topic] if rng is None else [TOPICS[topic][i] for i in rng.permutation(8)]
        patterns = {
            3: f"The {topic} sleeps.",
            4: f"The {topic} is {adj[0]}.",
            5: f"The {topic} is {adj[0]}, {adj[1]}.",
            6: f"The {topic} is {adj[0]} and {adj[1]}.",
            7: f"The {topic} is {adj[0]}, {adj[1]} and {adj[2]}.",
            8: f"The {topic} is very {adj[0]}, {adj[1]} and {adj[2]}.",
            9: f"The {topic} is very {adj[0]}, {adj[1]}, {adj[2]} and {adj[3]}.",
            10: f"The {topic} is very {adj[0]}, {adj[1]}, {adj[2]} and {adj[3]} today.",
        }
        return patterns[n]

    def clean(self, f, rng=None):
        return self._sentence(f["topic"], int(f["n"]), rng)

    def verbose(self, f, rng):
        return self.clean(f, rng)  # a preamble would break the word count: the answer is the sentence

    def wrong(self, f, rng):
        other = _choice(rng, [t for t in TOPICS if t != f["topic"]])
        return self._sentence(other, int(f["n"]) + _choice(rng, [-1, 0, 1, 2]), rng)

    def partial(self, f, rng):
        n = int(f["n"])
        return self._sentence(f["topic"], n + (_choice(rng, [-1, 1, 2]) if n > 4 else _choice(rng, [1, 2])), rng)

    def correctness(self, f, output):
        words = output.split()
        if not words:
            return 0.0
        n = int(f["n"])
        count = 1.0 if len(words) == n else max(0.0, 1.0 - 0.35 * abs(len(words) - n))
        lowered = [w.lower() for w in _words(output)]
        mention = 1.0 if f["topic"] in lowered else 0.0
        adjs = [w for w in lowered if w in {a for v in TOPICS.values() for a in v}]
        relevant = sum(w in TOPICS[f["topic"]] for w in adjs) / len(adjs) if adjs else 0.0
        return count * (0.4 + 0.4 * mention + 0.2 * relevant)


_CLAIM_EQUATION = re.compile(r"(-?\d+) ([+\-*/]) (-?\d+) = (-?\d+)")
_CLAIM_LETTERS = re.compile(r"\b([A-Za-z]+) has (\d+) letters")
_CLAIM_LARGER = re.compile(r"(-?\d+) is larger than (-?\d+)")


def false_claims(output: str) -> int:
    """How many checkable claims in `output` are false: equations ("4 + 5 = 9"), letter counts
    ("The word pear has 4 letters"), comparisons ("9 is larger than 4")."""
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
           "/": lambda x, y: x / y if y else None}
    bad = sum(ops[op](int(x), int(y)) != int(z) for x, op, y, z in _CLAIM_EQUATION.findall(output))
    bad += sum(len(w) != int(n) for w, n in _CLAIM_LETTERS.findall(output))
    bad += sum(int(x) <= int(y) for x, y in _CLAIM_LARGER.findall(output))
    return bad


class DetailFamily(Family):
    """A task where detail is real value: the answer, and content sentences (`facts`) that explain
    it. correctness: 1 if the answer is given and no checkable claim is false, 0.3 if a claim is
    false, 0 without the answer; detail: the share of `facts` the output states."""

    ANSWER_TEMPLATES = ["The answer is {x}.", "So the answer is {x}.", "Answer: {x}."]

    def answer(self, f) -> str:
        raise NotImplementedError

    def facts(self, f) -> list[str]:
        raise NotImplementedError

    def clean(self, f, rng=None):
        return self.answer(f)

    def verbose(self, f, rng):
        return _choice(rng, self.ANSWER_TEMPLATES).format(x=self.answer(f))

    def detailed(self, f, rng, k: int | None = None):
        # the first k steps, in order: a regular pattern that a small model can learn to continue
        facts = self.facts(f)
        k = k if k is not None else int(rng.integers(1, len(facts) + 1))
        return " ".join(facts[:k] + [self.verbose(f, rng)])

    def _stated(self, f, output) -> list[str]:
        low = " ".join(output.lower().split())
        return [fact for fact in self.facts(f) if fact.lower() in low]

    def ideal_words(self, f, output=""):
        # the answer sentence plus the steps the output states: words beyond those are padding
        return len(" ".join(self._stated(f, output) + [self.ANSWER_TEMPLATES[0].format(x=self.answer(f))]).split())

    def detail(self, f, output):
        return len(self._stated(f, output)) / len(self.facts(f))

    def wrong_answer(self, f, rng) -> str:
        raise NotImplementedError

    def wrong(self, f, rng):
        return _choice(rng, self.ANSWER_TEMPLATES).format(x=self.wrong_answer(f, rng))

    def false_fact(self, f, rng) -> str:
        raise NotImplementedError

    def partial(self, f, rng):
        # The right answer explained with a false step: content that misleads.
        return f"{self.false_fact(f, rng)} {self.verbose(f, rng)}"

    def correctness(self, f, output):
        if not re.search(r"(?<![\w-])" + re.escape(self.answer(f)) + r"(?!\w)", output):
            return 0.0
        return 0.3 if false_claims(output) else 1.0


class ExplainSteps(DetailFamily):
    name = "explain_steps"
    templates = [
        Template("Explain step by step how to work out {a} plus {b}.", const={"op": "add"}),
        Template("What is {a} minus {b}? Explain your answer.", const={"op": "sub"}),
        Template("Show your working: what is {a} times {b}?", const={"op": "mul"}),
        Template("Work out the sum of the two numbers in the input and show the steps.", "{a} and {b}", {"op": "add"}),
    ]

    METHOD = {
        "add": ["We add the two numbers.", "Start from the first number and count on by the second."],
        "sub": ["We subtract the second number from the first.",
                "Start from the first number and count back by the second."],
        "mul": ["We multiply the two numbers.", "Add the first number to itself as many times as the second says."],
    }
    WORD = {"add": "plus", "sub": "minus", "mul": "times"}

    def sample(self, rng):
        t = _choice(rng, self.templates)
        return t, _operands(rng, t.const["op"])

    def answer(self, f):
        return str(_apply(f))

    def facts(self, f):
        # the method, in fixed steps per operation (a small model can learn them), then the numbers
        return [*self.METHOD[f["op"]], f"Here that is {f['a']} {self.WORD[f['op']]} {f['b']}."]

    def wrong_answer(self, f, rng):
        return str(_apply(f) + int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1))

    def false_fact(self, f, rng):
        sym = Arithmetic.SYMBOL[f["op"]]
        return f"{f['a']} {sym} {f['b']} = {self.wrong_answer(f, rng)}."


class Explain(DetailFamily):
    name = "explain"
    templates = [
        Template("Explain how to spell '{word}' backwards."),
        Template("Write '{word}' backwards and explain how you did it."),
        Template("Spell the word in the input backwards and explain the steps.", "{word}"),
        Template("Read '{word}' backwards, explaining each step."),
    ]

    def sample(self, rng):
        return _choice(rng, self.templates), {"word": _choice(rng, WORDS)}

    def answer(self, f):
        return f["word"][::-1]

    def facts(self, f):
        w = f["word"]
        return ["Start from the last letter.", "Write the letters in reverse order.", f"The word is {w}."]

    def wrong_answer(self, f, rng):
        w = f["word"]
        return w[::-1][1:] + w[-1] if len(w) > 3 else w

    def false_fact(self, f, rng):
        return f"The word {f['word']} has {len(f['word']) + _choice(rng, [-1, 1, 2])} letters."


class CompareReasons(DetailFamily):
    name = "compare_reasons"
    templates = [
        Template("Which is larger, {a} or {b}? Give your reasons."),
        Template("Compare {a} and {b}: which is bigger, and why?"),
        Template("Compare the two numbers in the input and explain which is larger.", "{a}, {b}"),
        Template("Tell me which number is bigger, {a} or {b}, and explain why."),
    ]

    def sample(self, rng):
        a, b = rng.choice(np.arange(1, 31), size=2, replace=False)
        return _choice(rng, self.templates), {"a": str(int(a)), "b": str(int(b))}

    def _big_small(self, f):
        a, b = int(f["a"]), int(f["b"])
        return max(a, b), min(a, b)

    def answer(self, f):
        return str(self._big_small(f)[0])

    def facts(self, f):
        big, small = self._big_small(f)
        return ["Compare the two numbers.", "The larger number comes later when counting.",
                f"{big} is larger than {small}."]

    def wrong_answer(self, f, rng):
        return str(self._big_small(f)[1])

    def false_fact(self, f, rng):
        big, small = self._big_small(f)
        return f"{small} is larger than {big}."

    def correctness(self, f, output):
        big, small = self._big_small(f)
        if not re.search(rf"(?<![\w-]){big}(?!\w)", output) or re.search(rf"answer(:| is) {small}\b", output):
            return 0.0
        return 0.3 if false_claims(output) else 1.0


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Arithmetic(), ListItems(), WordTransform(), Sorting(), Counting(), Compare(), Describe(),  # exact answers
    ExplainSteps(), Explain(), CompareReasons(),  # detail is value
)}

_PARSERS = [(fam, t, template_regex(t.instruction), template_regex(t.input) if t.input else None)
            for fam in FAMILIES.values() for t in fam.templates]


@dataclass
class Task:
    """One world task: its family, its text, and the fields that define the ground truth."""

    family: str
    instruction: str
    input: str
    fields: dict


def render(fam: Family, template: Template, fields: dict) -> Task:
    return Task(fam.name, template.instruction.format(**fields), template.input.format(**fields), fields)


def parse_task(instruction: str, input: str = "") -> Task | None:
    """Recover a world task from its text; None when the text is not one of the world's phrasings."""
    instruction, input = instruction.strip(), (input or "").strip()
    for fam, t, rx_ins, rx_inp in _PARSERS:
        m = rx_ins.match(instruction)
        if not m or bool(rx_inp) != bool(input):
            continue
        groups = dict(m.groupdict())
        if rx_inp:
            m2 = rx_inp.match(input)
            if not m2:
                continue
            groups.update(m2.groupdict())
        groups.update(t.const)
        return Task(fam.name, instruction, input, fam.normalize(groups))
    return None


DETAIL_SHARE = 2
"""Each detail family is drawn this many times as often as an exact-answer family: on real
instructions, most length differences between two answers are content."""
FAMILY_DRAWS: list[str] = [name for name, fam in FAMILIES.items()
                           for _ in range(DETAIL_SHARE if isinstance(fam, DetailFamily) else 1)]
"""Family names, each repeated by its weight: a uniform draw (or a round-robin) over this list."""


def sample_task(rng: np.random.Generator, family: str | None = None) -> Task:
    fam = FAMILIES[family] if family else FAMILIES[_choice(rng, FAMILY_DRAWS)]
    template, fields = fam.sample(rng)
    return render(fam, template, fields)
