"""`prefgym` sub-commands for the learning methods (one per method module).

The method modules import torch and transformers; their commands are registered lazily (see
`prefgym.lazy_commands`) so that `prefgym --help` does not pay for those imports.
"""

import typer

from prefgym.lazy_commands import add_lazy_commands
from prefgym.methods.registry import METHODS

METHOD_MODULES = [f"prefgym.methods.{name}" for name in ("sft", "preference_data", "reward_model", *METHODS)]
"""The stages before the methods, then every method of `prefgym run` (`registry.METHODS`)."""


def add_commands(app: typer.Typer) -> None:
    """Add every method's sub-command(s) to the `prefgym` app."""
    add_lazy_commands(app, METHOD_MODULES)
