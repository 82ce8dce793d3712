"""The human side of prefgym: a pairwise annotation page and an arena with an Elo leaderboard."""

from prefgym.web.app import annotation_app, arena_app

__all__ = ["annotation_app", "arena_app"]
