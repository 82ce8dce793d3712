"""Leaderboards: one row per generator from AlpacaEval annotation files, as CSV, Markdown or HTML.

The CSV has AlpacaEval's columns and index (the generator name), so a prefgym leaderboard and a
published AlpacaEval leaderboard can be read and compared with the same code.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from prefgym.errors import DataError
from prefgym.evaluation.winrate import LEADERBOARD_COLUMNS, key_of, leaderboard_row, load_annotations
from prefgym.io import write_text_atomic

log = logging.getLogger(__name__)

FORMATS = ("csv", "md", "html")
LC_COLUMNS = ("length_controlled_winrate", "lc_standard_error", "lc_ci_low", "lc_ci_high")
COLUMNS = LEADERBOARD_COLUMNS + ["lc_ci_low", "lc_ci_high"]  # AlpacaEval's, then the LC bootstrap interval


def _generator_of(annotation: dict, path: Path) -> str:
    """The evaluated model: `generator_2`, else the folder holding `annotations*.json`, else the file name."""
    if annotation.get("generator_2"):
        return str(annotation["generator_2"])
    return path.parent.name if path.name.startswith("annotations") and path.parent.name else path.stem


def load_leaderboard_annotations(path: str | os.PathLike) -> list[dict]:
    """`load_annotations`, plus each row's instruction: paired statistics and the GLM key on it."""
    rows = load_annotations(path)
    for i, r in enumerate(rows):
        if not isinstance(r.get("instruction"), str):
            raise DataError("missing or non-text instruction; leaderboards match annotations across files and "
                            "with instruction difficulties by it", path=path, row=i, field="instruction")
    return rows


class _Generator:
    """A generator's pooled annotations, the file where each (instruction, input) was first seen, and repeats."""

    def __init__(self):
        self.annotations: list[dict] = []
        self.first_file: dict[tuple[str, str], Path] = {}
        self.repeats: dict[tuple[Path, Path], int] = {}

    def add(self, annotation: dict, path: Path) -> None:
        self.annotations.append(annotation)
        first = self.first_file.setdefault(key_of(annotation), path)
        if len(self.first_file) < len(self.annotations):  # the key was already there
            self.repeats[(first, path)] = self.repeats.get((first, path), 0) + 1

    def instructions(self) -> set[str]:
        return {instruction for instruction, _ in self.first_file}


def _load_checked(path: Path, difficulty: Mapping[str, float] | None) -> list[dict]:
    rows = load_leaderboard_annotations(path)
    for i, a in enumerate(rows):
        if difficulty is not None and a["instruction"] not in difficulty:
            raise DataError("instruction not in the instruction-difficulty file", path=path, row=i, field="instruction")
    return rows


def _pool_by_generator(paths: Sequence[str | os.PathLike], difficulty: Mapping[str, float] | None) -> dict[str, _Generator]:
    by_generator: dict[str, _Generator] = {}
    for path in map(Path, paths):
        for a in _load_checked(path, difficulty):
            by_generator.setdefault(_generator_of(a, path), _Generator()).add(a, path)
    return by_generator


def _warn_repeats(name: str, g: _Generator) -> None:
    for (first, path), n in g.repeats.items():
        where = f"{path} repeats {n} instructions of its own" if first == path else \
            f"{path} repeats {n} instructions already annotated in {first}"
        log.warning("generator %s: %s; the rows are pooled and counted twice (a copy, or a mislabelled "
                    "generator_2?)", name, where)


def _warn_missing(name: str, g: _Generator, eval_set: set[str], source: str) -> None:
    missing = len(eval_set - g.instructions())
    if missing:
        log.warning("generator %s: no annotation for %d of the %d instructions %s; its win-rate and avg_length "
                    "are over the %d rows present", name, missing, len(eval_set), source, len(g.annotations))


def leaderboard_from_annotations(paths: Sequence[str | os.PathLike], *, length_controlled: bool = True,
                                 mode: str = "community", instruction_difficulty=None,
                                 baseline_annotations: Sequence[str | os.PathLike] = (),
                                 lc_bootstrap: int = 200, seed: int = 0) -> pd.DataFrame:
    """One row per generator (AlpacaEval's columns + lc_ci_low/lc_ci_high, index = generator), best first.

    Annotations of the same generator in several files are pooled; instructions repeated across
    (or within) files are logged as a warning naming the files. A generator missing instructions
    that the difficulty file (else any other generator) has is logged as a warning; its
    `avg_length` is, as AlpacaEval computes it, the mean over the rows it has.
    instruction_difficulty: a path to AlpacaEval's difficulty file, or a mapping instruction -> difficulty.
    baseline_annotations: files of the baseline judged against its verbose / concise variants.
    """
    from prefgym.evaluation.length_control import length_controlled_win_rate, load_instruction_difficulty

    if not paths:
        raise DataError("no annotation files given")
    difficulty = instruction_difficulty
    if difficulty is not None and not isinstance(difficulty, Mapping):
        difficulty = load_instruction_difficulty(difficulty)
    by_generator = _pool_by_generator(paths, difficulty)
    baseline_sets = [_load_checked(Path(p), difficulty) for p in baseline_annotations]
    eval_set = set(difficulty) if difficulty is not None else set().union(*(g.instructions() for g in by_generator.values()))
    source = "in the instruction-difficulty file" if difficulty is not None else "annotated for other generators"
    rows = {}
    for name, g in by_generator.items():
        _warn_repeats(name, g)
        _warn_missing(name, g, eval_set, source)
        row = leaderboard_row(g.annotations, mode=mode, length_controlled=False)
        row["lc_ci_low"] = row["lc_ci_high"] = float("nan")
        if length_controlled:
            lc = length_controlled_win_rate(g.annotations, instruction_difficulty=difficulty,
                                            baseline_annotations=baseline_sets, n_bootstrap=lc_bootstrap, seed=seed)
            row.update({k: lc[k] for k in LC_COLUMNS})
        rows[name] = row
    return sort_leaderboard(pd.DataFrame.from_dict(rows, orient="index")[COLUMNS])


def sort_leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("win_rate", ascending=False, kind="stable")


def read_leaderboard(path: str | os.PathLike) -> pd.DataFrame:
    """Read a leaderboard CSV (AlpacaEval's or ours); index = generator."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    try:
        df = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"not a leaderboard CSV: {e}", path=path) from None
    for col in ("win_rate", "standard_error"):
        if col not in df.columns:
            raise DataError("missing column", path=path, field=col)
    return df


def _lc_text(row, digits: int) -> str:
    lc, se = row.get("length_controlled_winrate", float("nan")), row.get("lc_standard_error", float("nan"))
    if pd.isna(lc):
        return ""
    return f"{lc:.{digits}f}" if pd.isna(se) else f"{lc:.{digits}f} ± {se:.{digits}f}"


def to_markdown(df: pd.DataFrame, digits: int = 2) -> str:
    """A Markdown table: generator, win-rate ± SE, LC win-rate, counts, average length."""
    lines = ["| generator | win-rate (%) | LC win-rate (%) | wins | losses | draws | n | avg length |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in df.iterrows():
        lc_text = _lc_text(r, digits)
        lines.append(f"| {name} | {r['win_rate']:.{digits}f} ± {r['standard_error']:.{digits}f} | {lc_text} | "
                     f"{int(r['n_wins'])} | {int(r['n_wins_base'])} | {int(r['n_draws'])} | {int(r['n_total'])} | "
                     f"{int(r['avg_length'])} |")
    return "\n".join(lines) + "\n"


def to_html_table(df: pd.DataFrame, digits: int = 2) -> str:
    """An HTML table of the leaderboard (escaped)."""
    head = ("<tr><th>#</th><th>generator</th><th>win-rate (%)</th><th>± SE</th><th>LC win-rate (%)</th>"
            "<th>wins</th><th>losses</th><th>draws</th><th>n</th><th>avg length</th></tr>")
    body = []
    for rank, (name, r) in enumerate(df.iterrows(), start=1):
        cells = [str(rank), html.escape(str(name)), f"{r['win_rate']:.{digits}f}", f"{r['standard_error']:.{digits}f}",
                 _lc_text(r, digits), str(int(r["n_wins"])), str(int(r["n_wins_base"])),
                 str(int(r["n_draws"])), str(int(r["n_total"])), str(int(r["avg_length"]))]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def to_html_page(df: pd.DataFrame, title: str = "Leaderboard") -> str:
    """A self-contained HTML page: the bar chart with error bars (embedded PNG) and the table."""
    from prefgym.evaluation.plots import leaderboard_figure, render_report_html_text

    return render_report_html_text(df, {"Win-rate against the reference": leaderboard_figure(df)}, title=title)


def write_leaderboard(df: pd.DataFrame, path: str | os.PathLike, fmt: str | None = None, title: str = "Leaderboard") -> Path:
    """Write the leaderboard atomically as csv, md or html (default: from the file suffix, else csv)."""
    path = Path(path)
    fmt = fmt or {".md": "md", ".html": "html", ".htm": "html"}.get(path.suffix.lower(), "csv")
    if fmt not in FORMATS:
        raise DataError(f"unknown leaderboard format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        text = sort_leaderboard(df).to_csv()
    elif fmt == "md":
        text = to_markdown(sort_leaderboard(df))
    else:
        text = to_html_page(sort_leaderboard(df), title=title)
    write_text_atomic(path, text)
    return path
