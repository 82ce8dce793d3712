"""Leaderboards: one row per generator from AlpacaEval annotation files, as CSV, Markdown or HTML.

The CSV has AlpacaEval's columns and index (the generator name), so a prefgym leaderboard and a
published AlpacaEval leaderboard can be read and compared with the same code.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from prefgym.errors import DataError
from prefgym.evaluation.winrate import LEADERBOARD_COLUMNS, leaderboard_row, load_annotations
from prefgym.io import write_text_atomic

FORMATS = ("csv", "md", "html")


def _generator_of(annotation: dict, path: Path) -> str:
    """The evaluated model: `generator_2`, else the folder holding `annotations*.json`, else the file name."""
    if annotation.get("generator_2"):
        return str(annotation["generator_2"])
    return path.parent.name if path.name.startswith("annotations") and path.parent.name else path.stem


def leaderboard_from_annotations(paths: Sequence[str | os.PathLike], *, length_controlled: bool = True,
                                 mode: str = "community") -> pd.DataFrame:
    """One row per generator (AlpacaEval's columns, index = generator), sorted by win-rate, best first.

    Annotations of the same generator in several files are pooled.
    """
    if not paths:
        raise DataError("no annotation files given")
    by_generator: dict[str, list[dict]] = {}
    for path in paths:
        path = Path(path)
        for a in load_annotations(path):
            by_generator.setdefault(_generator_of(a, path), []).append(a)
    rows = {name: leaderboard_row(anns, mode=mode, length_controlled=length_controlled)
            for name, anns in by_generator.items()}
    return sort_leaderboard(pd.DataFrame.from_dict(rows, orient="index")[LEADERBOARD_COLUMNS])


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
