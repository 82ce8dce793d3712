"""The human side of prefgym: a pairwise annotation page and an arena with an Elo leaderboard."""

from prefgym.lazy_exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {"app": ["annotation_app", "arena_app"]})
