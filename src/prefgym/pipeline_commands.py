"""`prefgym` sub-commands of this area."""

import typer


def add_commands(app: typer.Typer) -> None:
    """Add this area's sub-commands to the `prefgym` app."""
