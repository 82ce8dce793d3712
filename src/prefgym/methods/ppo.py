"""Placeholder until this method lands."""

import typer


def add_commands(app: typer.Typer) -> None:
    """Add this method's sub-command(s) to the `prefgym` app."""
