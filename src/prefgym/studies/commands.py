"""`prefgym study ...`: one sub-command per study; each study module registers its own."""

from __future__ import annotations

import typer

STUDY_MODULES = ["prefgym.studies.overoptimization", "prefgym.studies.feedback_budget"]


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym study <name>` for every study module (imported only when its command runs)."""
    import importlib.util

    from prefgym.lazy_commands import add_lazy_commands

    study_app = typer.Typer(help="Studies over many runs: over-optimization, feedback budget.", no_args_is_help=True)
    app.add_typer(study_app, name="study")
    add_lazy_commands(study_app, [m for m in STUDY_MODULES if importlib.util.find_spec(m) is not None])
