"""The `prefgym` command: one sub-command per stage, plus `run` for the whole pipeline.

Each area of the package adds its own sub-commands in its `commands.py` (`add_commands(app)`),
so that this file stays a table of contents.
"""

from __future__ import annotations

import sys

import typer

from prefgym.errors import PrefgymError

app = typer.Typer(
    name="prefgym",
    help="Learn from preference feedback in simulation: world, SFT, annotators, methods, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _build_app() -> typer.Typer:
    from prefgym.world import commands as world_commands
    from prefgym.data import commands as data_commands
    from prefgym.annotators import commands as annotator_commands
    from prefgym.methods import commands as method_commands
    from prefgym.evaluation import commands as evaluation_commands
    from prefgym.web import commands as web_commands
    from prefgym import pipeline_commands

    for module in (world_commands, data_commands, annotator_commands, method_commands,
                   evaluation_commands, web_commands, pipeline_commands):
        module.add_commands(app)
    return app


def _quiet_libraries() -> None:
    """prefgym shows its own progress; keep the libraries' per-load bars and notices out of it."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # transformers is a dependency; tolerate a broken install for --help
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the command; a PrefgymError prints one clear line and exits 2."""
    _build_app()
    _quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except PrefgymError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        return 2
    except KeyboardInterrupt:
        typer.secho("interrupted; rerun the same command to resume", err=True)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
