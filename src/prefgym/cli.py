"""The `prefgym` command: one sub-command per stage, plus `run` for the whole pipeline.

Each area of the package adds its own sub-commands in its `commands.py` (`add_commands(app)`),
so that this file stays a table of contents.
"""

from __future__ import annotations

import errno
import sys

import typer
from typer import Abort
from typer._click.exceptions import ClickException, UsageError  # typer bundles its own click

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
    from prefgym.models import commands as model_commands
    from prefgym import pipeline_commands
    from prefgym.studies import commands as study_commands

    for module in (world_commands, data_commands, annotator_commands, method_commands,
                   evaluation_commands, web_commands, model_commands, pipeline_commands, study_commands):
        module.add_commands(app)
    return app


def _quiet_libraries() -> None:
    """prefgym shows its own progress; keep the libraries' per-load bars and notices out of it.

    Through the environment only: importing transformers here would cost every command (and
    `prefgym --help`) seconds; transformers reads these when a command imports it.
    """
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # = transformers' disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("accelerate").setLevel(logging.ERROR)


INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C
USAGE_ERROR = 2
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: list[str] | None = None) -> int:
    """Entry point. Exit status: 0 done; 2 a problem the user can fix (a PrefgymError, a usage
    error, an output that cannot be written), printed as one line; 130 interrupted (Ctrl-C)."""
    _build_app()
    _quiet_libraries()
    try:
        result = app(args=argv, standalone_mode=False)
    except PrefgymError as e:
        return _fail(str(e))
    except KeyboardInterrupt:  # raised outside a command (typer turns one inside into exit 130)
        result = INTERRUPTED
    except ClickException as e:  # typer's own copy of click: usage errors
        if not e.format_message():  # no arguments: the help was printed
            return e.exit_code
        where = f"; see '{e.ctx.command_path} --help'" if isinstance(e, UsageError) and e.ctx else ""
        return _fail(f"{e.format_message()}{where}", e.exit_code)
    except Abort:
        result = INTERRUPTED
    except OSError as e:  # disk full, read-only or forbidden folder outside prefgym's own writers
        if e.errno not in _DISK_ERRNOS or e.filename is None:
            raise
        return _fail(f"{e.filename}: cannot write ({e.strerror})")
    code = result if isinstance(result, int) and not isinstance(result, bool) else 0  # typer.Exit(n) -> n
    if code == 0:
        _end_process_group()
    if code == INTERRUPTED:
        typer.secho("interrupted; rerun to resume", err=True)
    return code


def _end_process_group() -> None:
    """After a command that shared its work across processes without ending their group (generation
    under `accelerate launch`; training commands end theirs): every process ends it here together.
    A gloo group left to interpreter shutdown can abort the process ("terminate called without an
    active exception") or hang there."""
    if "torch" not in sys.modules:  # not imported: no group (and `prefgym --help` stays fast)
        return
    from prefgym.methods.common import end_process_group
    from prefgym.models.vllm_engine import release_engine

    release_engine()  # a vLLM engine ends its own group (a world of one) first
    end_process_group()


def _fail(message: str, code: int = USAGE_ERROR) -> int:
    typer.secho(f"error: {redact_secrets(message)}", err=True, fg=typer.colors.RED)
    return code


def redact_secrets(text: str) -> str:
    """`text` with the value of every secret-looking environment variable (API keys, tokens,
    passwords) replaced by `***`, so that error messages never print a credential."""
    import os

    for name, value in os.environ.items():
        if len(value) >= 8 and any(word in name.upper() for word in _SECRET_WORDS):
            text = text.replace(value, "***")
    return text


_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


if __name__ == "__main__":
    sys.exit(main())
