"""Pairing several samples per instruction into pairs to annotate, as AlpacaFarm does."""

from __future__ import annotations

import logging

from prefgym.errors import DataError
from prefgym.seeding import rng_for

log = logging.getLogger(__name__)


def make_pairs(records_with_outputs: list[dict], seed: int = 0, pairs_per_instruction: int = 1,
               source=None) -> list[dict]:
    """Pairs of distinct samples for each record with n samples (`outputs`, or `output` as a list).

    Duplicate samples are dropped first; the distinct ones are shuffled (seeded by the record and
    `seed`) and paired off, up to `pairs_per_instruction` disjoint pairs per record (AlpacaFarm
    keeps one pair per instruction). Records with fewer than two distinct samples are skipped
    (and counted in a warning). Other fields (input, generator, ...) are kept. `source`: the
    file the records came from, named in errors.
    """
    pairs, skipped = [], 0
    for i, rec in enumerate(records_with_outputs):
        if not isinstance(rec, dict):
            raise DataError(f"expected an object, got {type(rec).__name__}", path=source, row=i)
        samples = rec.get("outputs", rec.get("output"))
        if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
            raise DataError("expected a list of sampled outputs (strings)", path=source, row=i,
                            field="outputs" if "outputs" in rec else "output")
        if not isinstance(rec.get("instruction"), str):
            raise DataError("missing or not a string", path=source, row=i, field="instruction")
        distinct = list(dict.fromkeys(samples))
        if len(distinct) < 2:
            skipped += 1
            continue
        rng = rng_for("make_pairs", seed, rec["instruction"], rec.get("input") or "")
        order = rng.permutation(len(distinct))
        base = {k: v for k, v in rec.items() if k not in ("outputs", "output")}
        base["input"] = rec.get("input") or ""
        for j in range(min(pairs_per_instruction, len(distinct) // 2)):
            pairs.append(dict(base, output_1=distinct[order[2 * j]], output_2=distinct[order[2 * j + 1]]))
    if skipped:
        log.warning("make_pairs: skipped %d of %d records with fewer than two distinct samples",
                    skipped, len(records_with_outputs))
    return pairs
