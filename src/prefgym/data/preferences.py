"""What a preference value means: one definition, used by every method and metric.

A pair (`output_1`, `output_2`) carries `preference`, in the AlpacaFarm / AlpacaEval convention:

    value         meaning                                          P(output_2 better)
    1             output_1 better                                  0
    2             output_2 better                                  1
    1 < v < 2     soft: 1 + P(output_2 better), as logprob judges   v - 1
                  (AlpacaEval's `weighted_*` annotators) write it
    1.5           tie                                              0.5
    0             tie (AlpacaEval's draw code, read as 1.5 there)  0.5
    null / NaN    not annotated: skipped by every method and metric
    anything else (7, -1, 0.5, "2", true) is a DataError naming the file, row and field

Rounding rule, for whatever needs one output to be "the better one" (FeedME, reward
conditioning, DPO's orientation of a pair, accuracies): with p = P(output_2 better),

    winner = 2 if p > 0.5;  1 if p < 0.5;  none (a tie: dropped, or excluded from accuracies) if p == 0.5

which is AlpacaEval's split into n_wins / n_wins_base / n_draws. The label's confidence in its
winner is `p_winner = max(p, 1 - p)`: 1 for a hard label, 0.5 for a tie.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from prefgym.errors import DataError

ACCEPTED = "1, 2, a number in between (1 + P(output_2 better)), 1.5 or 0 for a tie, or null"


@dataclass(frozen=True)
class Preference:
    """One parsed annotation: `p2` = P(output_2 better), in [0, 1]."""

    p2: float

    @property
    def value(self) -> float:
        """The preference in [1, 2] (AlpacaEval's 0 read as 1.5): 1 + p2."""
        return 1.0 + self.p2

    @property
    def p1(self) -> float:
        """P(output_1 better) = 1 - p2."""
        return 1.0 - self.p2

    @property
    def winner(self) -> int | None:
        """1 or 2 by the rounding rule; None for a tie (p2 == 0.5)."""
        return 2 if self.p2 > 0.5 else 1 if self.p2 < 0.5 else None

    @property
    def p_winner(self) -> float:
        """P(the rounded winner is better): 1 for a hard label, 0.5 for a tie."""
        return max(self.p2, 1.0 - self.p2)


def parse_preference(value, *, row: int | None = None, path=None, field: str = "preference") -> Preference | None:
    """The meaning of one `preference` value; None when it is missing (null or NaN).

    Raises DataError naming `path`, `row` and `field` for anything outside the table above.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"expected a number, got {type(value).__name__} {value!r}; a preference is {ACCEPTED}",
                        path=path, row=row, field=field)
    v = float(value)
    if math.isnan(v):
        return None
    if v == 0:
        return Preference(0.5)
    if not 1.0 <= v <= 2.0:
        raise DataError(f"a preference is {ACCEPTED}; got {value!r}", path=path, row=row, field=field)
    return Preference(v - 1.0)


def prob_output_2(value, *, row: int | None = None, path=None) -> float | None:
    """P(output_2 better) in [0, 1] (the soft target), or None when not annotated."""
    pref = parse_preference(value, row=row, path=path)
    return None if pref is None else pref.p2


def preferred_output(value, *, row: int | None = None, path=None) -> int | None:
    """1 or 2 by the rounding rule; None for a tie or a missing annotation."""
    pref = parse_preference(value, row=row, path=path)
    return None if pref is None else pref.winner


def annotated_pairs(records: list[dict], *, path=None) -> list[tuple[int, dict, Preference]]:
    """(row, record, Preference) for every record with a preference; unannotated rows are skipped.

    Every record must have instruction, output_1, output_2 and preference (DataError otherwise).
    """
    out = []
    for i, r in enumerate(records):
        for f in ("instruction", "output_1", "output_2", "preference"):
            if f not in r:
                raise DataError("missing field", path=path, row=i, field=f)
        pref = parse_preference(r["preference"], row=i, path=path)
        if pref is not None:
            out.append((i, r, pref))
    return out
