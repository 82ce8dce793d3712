"""Where progress goes: stderr. A command's stdout carries its results only, so it can be piped
(`prefgym leaderboard a.json | ...`); bars, stage banners and notices go to stderr."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def stderr_console():
    """The rich Console on stderr that every progress bar of prefgym draws on."""
    from rich.console import Console

    return Console(stderr=True)
