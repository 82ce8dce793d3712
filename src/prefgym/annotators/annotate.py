"""Annotating pairs with a pool of judges: AlpacaFarm's simulated annotators.

For each example (instruction, input, output_1, output_2):
  1. a judge is drawn from the pool,
  2. the two outputs are shown in a random order (and the answer swapped back),
  3. examples without a stored answer are shuffled into batches and sent to the judge's backend
     (an example whose answer cannot be parsed is asked again, alone),
  4. every answer is stored in the durable cache by the thread that made the call, as soon as it
     returns; a call that fails (after its retries) leaves its rows with `error`, not cached;
     examples another run is asking about at the same time are waited for, not asked again,
  5. label-flip noise is applied (after the cache, so one cache serves every noise level).
Every random choice is seeded by a stable hash of the example and the seed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from prefgym.annotators.backends import BackendError, make_backend
from prefgym.annotators.cache import HEARTBEAT_SECONDS, AnnotationCache
from prefgym.annotators.config import JudgeConfig, PoolConfig, load_pool
from prefgym.annotators.parsers import check_parser_kwargs, first_token_logprobs, parse_completion
from prefgym.annotators.prompts import Item, render_prompt
from prefgym.errors import DataError
from prefgym.progress import stderr_console
from prefgym.seeding import stable_hash

log = logging.getLogger(__name__)

POLL_SECONDS = (0.05, 1.0)
"""First and longest pause between two looks at examples another run is answering."""
COST_FIELDS = ("price_per_example", "time_per_example", "prompt_tokens_per_example",
               "completion_tokens_per_example")


def example_key(instruction: str, input: str, output_1: str, output_2: str) -> str:
    """A stable hash of one example (identical across runs, processes and machines)."""
    blob = "\x1f".join((instruction, input or "", output_1, output_2))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def uniform(*parts) -> float:
    """A number in [0, 1) from a stable hash of `parts` (cheaper than a generator per choice)."""
    return stable_hash(*parts) / 2.0**64


def _is_seeded(judge: JudgeConfig) -> bool:
    """Whether the judge's answers are drawn with the run's seed (simulations), hence keyed by it."""
    if judge.fn_completions == "world_humans":
        return True
    return judge.fn_completions == "world_judges" and float(judge.completions_kwargs.get("temperature", 1.0)) > 0


def _validate(pairs: list[dict], source=None) -> list[dict]:
    rows = []
    for i, p in enumerate(pairs):
        if not isinstance(p, dict):
            raise DataError(f"expected an object, got {type(p).__name__}", path=source, row=i)
        for f in ("instruction", "output_1", "output_2"):
            if not isinstance(p.get(f), str):
                raise DataError("missing or not a string (pairs need instruction, output_1, output_2)",
                                path=source, row=i, field=f)
        if not isinstance(p.get("input") or "", str):
            raise DataError("not a string", path=source, row=i, field="input")
        rows.append(dict(p, input=p.get("input") or ""))
    return rows


@dataclass
class _JudgeRun:
    """What the calls of one judge share: its backend, the cache, and cost and retry counts per example."""

    judge: JudgeConfig
    backend: object
    cache_keys: dict[str, str]
    cache: AnnotationCache
    spent: dict[str, list[float]] = field(default_factory=dict)  # prompt tokens, completion tokens, USD, seconds
    parse_retries: Counter = field(default_factory=Counter)


def _ask(run: _JudgeRun, batch: list[Item]) -> tuple[dict[str, dict], list[Item]]:
    """One call about `batch`, in a worker thread: its answers, stored in the cache before they are
    returned, and the examples whose answer could not be read (to ask again, alone)."""
    judge = run.judge
    try:
        completion = run.backend.complete(render_prompt(judge, batch), batch)
    except BackendError as e:  # failed after its retries: not stored, so a rerun asks again
        run.cache.release([run.cache_keys[it.key] for it in batch])
        return {it.key: {"preference": None, "error": f"api error: {e}", "cached": False} for it in batch}, []
    price = completion.price if completion.price is not None else (
        completion.prompt_tokens * judge.price_per_prompt_token
        + completion.completion_tokens * judge.price_per_completion_token)
    costs = (completion.prompt_tokens, completion.completion_tokens, price, completion.seconds)
    parsed = parse_completion(judge.fn_completion_parser, judge.completion_parser_kwargs, completion, len(batch))
    answers, to_store, again = {}, [], []
    for it, (pref, err) in zip(batch, parsed):
        run.spent[it.key] = [acc + v / len(batch) for acc, v in zip(run.spent.get(it.key, [0.0] * 4), costs)]
        if pref is None and run.parse_retries[it.key] < judge.max_parse_retries:
            run.parse_retries[it.key] += 1
            again.append(it)
            continue
        if pref is not None and it.swapped:
            pref = 3.0 - pref
        raw = {"text": completion.text, **completion.raw, "swapped": it.swapped,
               "batch_size": len(batch), "attempts": run.parse_retries[it.key] + 1}
        if judge.fn_completion_parser == "logprob_parser" and completion.logprobs:
            raw["logprobs"] = first_token_logprobs(completion.logprobs)
        tokens_in, tokens_out, usd, seconds = run.spent[it.key]
        answer = {"preference": pref, "error": err, "prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                  "price": usd + judge.price_per_example,
                  "seconds": seconds if judge.seconds_per_example is None else judge.seconds_per_example,
                  "raw": raw}
        to_store.append((run.cache_keys[it.key], judge.name, answer))
        answers[it.key] = {**answer, "cached": False}
    run.cache.put_many(to_store)
    return answers, again


def _run_calls(run: _JudgeRun, items: list[Item], answers: dict[str, dict], advance) -> int:
    """Ask about `items` (claimed by this run) in batches, `max_concurrency` calls at once.

    Returns the number of calls made. Failed calls leave answers with `error` that are not cached.
    """
    size, n_calls = run.judge.batch_size, 0
    with ThreadPoolExecutor(max_workers=run.judge.max_concurrency) as pool:
        futures = {pool.submit(_ask, run, items[i:i + size]) for i in range(0, len(items), size)}
        try:
            while futures:
                done, futures = wait(futures, timeout=HEARTBEAT_SECONDS, return_when=FIRST_COMPLETED)
                run.cache.heartbeat()
                for fut in done:
                    n_calls += 1
                    got, again = fut.result()
                    answers.update(got)
                    advance(len(got))
                    futures |= {pool.submit(_ask, run, [it]) for it in again}
        except BaseException:  # Ctrl-C or a refused request: drop the calls not yet started
            for fut in futures:  # (calls under way finish, and store their answers)
                fut.cancel()
            raise
    return n_calls


def _answers_key(judge: JudgeConfig, config_hash: str) -> str:
    """The cache key's judge part: its config hash, and for the built-in world's judges and humans
    (whose weights are code, not config) the fingerprint of that code."""
    if judge.fn_completions in ("world_judges", "world_humans"):
        from prefgym.world.behaviour import behaviour_hash

        return f"{config_hash}-w{behaviour_hash()}"
    return config_hash


def _annotate_with(judge: JudgeConfig, items: list[Item], cache_keys: dict[str, str], cache: AnnotationCache,
                   answers: dict[str, dict], counts: Counter, advance) -> None:
    """Answers for `items` (not stored when the run began): asked here for the examples this run
    claims, waited for (never paid twice) for those another live run is asking about now."""
    item_of = {cache_keys[it.key]: it for it in items}
    pending, run, pause = list(item_of), None, POLL_SECONDS[0]
    while pending:
        mine, stored, taken = cache.claim(pending)
        for ckey, answer in stored.items():  # answered by another run meanwhile
            answers[item_of[ckey].key] = {**answer, "cached": True}
        counts["n_waited"] += len(stored)
        advance(len(stored))
        if mine:
            run = run or _JudgeRun(judge, make_backend(judge), cache_keys, cache)
            counts["n_calls"] += _run_calls(run, [item_of[k] for k in mine], answers, advance)
            counts["n_called"] += len(mine)
        elif taken:
            time.sleep(pause)
            pause = min(2 * pause, POLL_SECONDS[1])
        pending = taken


def annotate_pairs(pairs: list[dict], annotators: str | PoolConfig = "world_pool_noisy", *, seed: int = 0,
                   cache_dir=None, progress: bool = True, stats: dict | None = None,
                   source=None) -> list[dict]:
    """Label pairs (instruction, input, output_1, output_2) with a pool of judges.

    `annotators`: a built-in name ("world_pool_noisy", "world_pool", "world_greedy", "world_humans",
    "gpt4_b1", ...), a YAML path, or a PoolConfig. Returns copies of the pairs with `preference`
    (1, 2, 1.5 for a tie, a float for logprob judges; None with `error` when no label could be had),
    `annotator`, `price_per_example`, `time_per_example`, `prompt_tokens_per_example`,
    `completion_tokens_per_example`. If `stats` is a dict, it receives counts of this run
    (calls made, examples asked, answers from the cache, of which received from another run
    asking at the same time, seconds). `source`: the file the pairs came from, named in errors.
    """
    start = time.perf_counter()
    pool = annotators if isinstance(annotators, PoolConfig) else load_pool(annotators)
    for judge in pool.judges:
        check_parser_kwargs(judge)
    rows = _validate(pairs, source)
    keys = [example_key(r["instruction"], r["input"], r["output_1"], r["output_2"]) for r in rows]

    # 1-2. Draw a judge and an order per distinct example.
    hashes = [judge.cache_hash() for judge in pool.judges]
    by_judge: dict[int, dict[str, Item]] = {}
    judge_of: dict[str, int] = {}
    for r, key in zip(rows, keys):
        if key in judge_of:
            continue
        j = int(uniform("judge", seed, key) * len(pool.judges))
        judge_of[key] = j
        if r["output_1"] == r["output_2"]:
            continue  # nothing to judge: a tie, no call
        judge = pool.judges[j]
        swapped = judge.is_randomize_output_order and uniform("swap", seed, key) < 0.5
        by_judge.setdefault(j, {})[key] = Item(key, r["instruction"], r["input"], r["output_1"], r["output_2"],
                                               swapped, stable_hash("sample", seed, hashes[j], key))

    # 3-4. Answers from the cache, then from the judges (or from a run asking at the same time).
    cache = AnnotationCache(cache_dir)
    answers: dict[str, dict] = {}
    counts = Counter(n_calls=0, n_called=0, n_waited=0)
    try:
        todo: list[tuple[JudgeConfig, list[Item], dict[str, str]]] = []
        for j, items in sorted(by_judge.items()):
            judge = pool.judges[j]
            jhash, sample = _answers_key(judge, hashes[j]), (seed if _is_seeded(judge) else "")
            cache_keys = {k: f"{jhash}:{k}:{int(it.swapped)}:{sample}" for k, it in items.items()}
            stored = cache.get_many(list(cache_keys.values()))
            missing = []
            for k, it in items.items():
                if cache_keys[k] in stored:
                    answers[k] = {**stored[cache_keys[k]], "cached": True}
                else:
                    missing.append(it)
            missing.sort(key=lambda it: stable_hash("batch", seed, it.key))  # seeded shuffle into batches
            if missing:
                todo.append((judge, missing, cache_keys))
        total = sum(len(m) for _, m, _ in todo)
        columns = [TextColumn("annotating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not progress or total == 0, console=stderr_console()) as bar:
            task = bar.add_task("annotate", total=total)
            for judge, missing, cache_keys in todo:
                _annotate_with(judge, missing, cache_keys, cache, answers, counts, lambda n: bar.advance(task, n))
    finally:
        try:
            cache.release()  # whatever happened, leave no claim behind
        finally:
            cache.close()

    # 5. Assemble rows; label-flip noise after the cache.
    out = []
    for r, key in zip(rows, keys):
        judge = pool.judges[judge_of[key]]
        row = dict(r, annotator=judge.name)
        row.pop("error", None)
        a = answers.get(key)
        if a is None:  # identical outputs
            row.update(preference=1.5, price_per_example=0.0, time_per_example=0.0,
                       prompt_tokens_per_example=0.0, completion_tokens_per_example=0.0)
            out.append(row)
            continue
        pref = a["preference"]
        if pref is not None and pool.label_flip_prob > 0:
            # AlpacaFarm's noise: with probability 2p the label is replaced by a fair coin flip.
            if uniform("flip", seed, key) < 2 * pool.label_flip_prob:
                pref = 1.0 if uniform("coin", seed, key) < 0.5 else 2.0
        row["preference"] = pref
        row["price_per_example"] = a.get("price", 0.0)
        row["time_per_example"] = a.get("seconds", 0.0)
        row["prompt_tokens_per_example"] = a.get("prompt_tokens", 0.0)
        row["completion_tokens_per_example"] = a.get("completion_tokens", 0.0)
        if pref is None:
            row["error"] = a["error"]
        out.append(row)
    if stats is not None:
        stats.update(n_rows=len(out), n_examples=len(judge_of), **counts,
                     n_cached=sum(1 for a in answers.values() if a["cached"]),
                     wall_seconds=time.perf_counter() - start)
    missing = [r for r in out if r["preference"] is None]
    if missing:
        log.warning("%d of %d rows have no label: %s", len(missing), len(out),
                    dict(Counter(r["error"].split(":")[0] for r in missing)))
    return out


def summarize(rows: list[dict]) -> dict:
    """Totals of an annotated file: labels, missing labels by reason, tokens, price and time per 1000."""
    from prefgym.data.preferences import prob_output_2

    n = len(rows)
    labelled = [r for r in rows if r.get("preference") is not None]
    def total(f):
        return float(sum(r.get(f) or 0.0 for r in rows))
    n_lab = max(len(labelled), 1)
    return {
        "n_rows": n,
        "n_labelled": len(labelled),
        "n_missing": n - len(labelled),
        "missing_reasons": dict(Counter((r.get("error") or "unknown").split(":")[0]
                                        for r in rows if r.get("preference") is None)),
        "p_output_2": (sum(prob_output_2(r["preference"], row=i) for i, r in enumerate(labelled)) / n_lab
                       if labelled else None),
        "prompt_tokens_per_label": total("prompt_tokens_per_example") / n_lab,
        "completion_tokens_per_label": total("completion_tokens_per_example") / n_lab,
        "price_per_1000_labels": 1000 * total("price_per_example") / n_lab,
        "seconds_per_1000_labels": 1000 * total("time_per_example") / n_lab,
        "annotators": dict(Counter(r.get("annotator") for r in rows)),
    }
