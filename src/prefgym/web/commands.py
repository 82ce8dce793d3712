"""`prefgym` sub-commands of the human side: serve-annotate, arena, human-token and human-export."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

DB_HELP = "SQLite database of tokens, data, labels and votes (created if missing; rerun on it to resume)."


def _show_admin_link(web, host: str, port: int) -> None:
    """How to reach /admin. A generated token is written once to the terminal (/dev/tty), never to
    stdout or stderr, which may be a log file; only its hash is kept. Without a terminal, set
    PREFGYM_ADMIN_TOKEN."""
    import os

    from prefgym.errors import PrefgymError
    from prefgym.web.security import ADMIN_ENV

    if os.environ.get(ADMIN_ENV, "").strip():
        typer.echo(f"admin page: http://{host}:{port}/admin?token=<{ADMIN_ENV}>")
        return
    try:
        with open("/dev/tty", "w", encoding="utf-8") as tty:
            tty.write(f"admin link (shown once, kept nowhere; set {ADMIN_ENV} to choose the token): "
                      f"http://{host}:{port}/admin?token={web.state.admin_token}\n")
    except OSError:
        raise PrefgymError(f"no terminal to show the generated admin token on; set {ADMIN_ENV} "
                           "(16 or more characters) and start again") from None
    typer.echo("admin link: written to the terminal")


def _serve(web, host: str, port: int) -> None:
    """uvicorn, with access tokens blanked out of its access log."""
    import logging

    import uvicorn

    from prefgym.web.security import RedactTokens

    config = uvicorn.Config(web, host=host, port=port)  # configures uvicorn's logging
    logging.getLogger("uvicorn.access").addFilter(RedactTokens())
    uvicorn.Server(config).run()


def add_commands(app: typer.Typer) -> None:
    """Add this area's sub-commands to the `prefgym` app."""

    @app.command("serve-annotate")
    def serve_annotate(
        pairs: Optional[Path] = typer.Argument(None, help="Pairs to load (.json/.jsonl: instruction, input?, output_1, "
                                                          "output_2); the admin page can load more."),
        db: Path = typer.Option(..., "--db", help=DB_HELP),
        guidelines: Optional[Path] = typer.Option(None, "--guidelines", help="Text file of labelling guidelines "
                                                  "shown above each pair (default: prefgym's short guidelines)."),
        labels_per_pair: int = typer.Option(1, "--labels-per-pair", help="Distinct labelers wanted per pair."),
        import_jsonl: Optional[Path] = typer.Option(None, "--import-jsonl", help="Import an old labels.jsonl "
                                                    "(a torn last line is skipped with a warning)."),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port"),
    ):
        """Serve the labelling page (left better / right better / tie). Writes labels to --db; people
        come in through links made on /admin."""
        from prefgym.errors import DataError
        from prefgym.web.app import annotation_app

        text = None
        if guidelines is not None:
            try:
                text = guidelines.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"cannot read the guidelines ({e.__class__.__name__})", path=guidelines) from None
        web = annotation_app(db, pairs, labels_per_pair=labels_per_pair, guidelines=text, import_jsonl=import_jsonl)
        typer.echo(f"annotation page on http://{host}:{port}/ ; labels -> {db}")
        _show_admin_link(web, host, port)
        _serve(web, host, port)

    @app.command("arena")
    def arena(
        outputs: List[Path] = typer.Argument(None, help="model_outputs.json files (instruction, input?, output, "
                                                        "generator); the admin page can load more."),
        db: Path = typer.Option(..., "--db", help=DB_HELP),
        seed: int = typer.Option(0, "--seed", help="Seed of the battles dealt."),
        import_jsonl: Optional[Path] = typer.Option(None, "--import-jsonl", help="Import an old battles.jsonl "
                                                    "(a torn last line is skipped with a warning)."),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port"),
    ):
        """Serve an arena of anonymous battles between generators, with a leaderboard at /leaderboard.
        Writes votes to --db; `prefgym human-export --battles` turns them into a file for `prefgym elo`."""
        from prefgym.web.app import arena_app

        web = arena_app(db, outputs or (), seed=seed, import_jsonl=import_jsonl)
        typer.echo(f"arena on http://{host}:{port}/ (leaderboard: /leaderboard); votes -> {db}")
        _show_admin_link(web, host, port)
        _serve(web, host, port)

    @app.command("human-token")
    def human_token(
        db: Path = typer.Argument(..., help=DB_HELP),
        name: str = typer.Option(..., "--name", help="Who the token is for (letters, digits, . _ @ + - and spaces)."),
        role: str = typer.Option("labeler", "--role", help="labeler (annotation page) or voter (arena)."),
        revoke: bool = typer.Option(False, "--revoke", help="Revoke the name's token instead."),
    ):
        """Make (or revoke) a labeller's or voter's access token. Writes the token's hash to DB and
        prints the token once: give it as ?token=... on /annotate or /battle."""
        from prefgym.errors import PrefgymError
        from prefgym.web.app import TokenIn, _validation_message
        from prefgym.web.store import ROLES, Store

        from pydantic import ValidationError

        if role not in ROLES:
            raise PrefgymError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
        try:
            name = TokenIn(name=name).name
        except ValidationError as e:
            raise PrefgymError(f"--name: {_validation_message(e.errors())}") from None
        store = Store(db)
        if revoke:
            typer.echo("revoked" if store.revoke_token(name, role) else f"{name} has no live {role} token")
            return
        try:
            typer.echo(store.create_token(name, role))
        except ValueError as e:
            raise PrefgymError(str(e)) from None

    @app.command("human-export")
    def human_export(
        db: Path = typer.Argument(..., help=DB_HELP),
        labels: Optional[Path] = typer.Option(None, "--labels", help="Write the labels here: AlpacaFarm cross-annotation "
                                              "rows, for `analyze-annotators --human-annotations`."),
        battles: Optional[Path] = typer.Option(None, "--battles", help="Write the votes here: Chatbot Arena battles, "
                                               "for `prefgym elo`."),
    ):
        """Export what people did from DB. Writes --labels and/or --battles (JSON, atomically)."""
        from prefgym.errors import DataError, PrefgymError
        from prefgym.io import write_json
        from prefgym.web.app import Annotation
        from prefgym.web.store import Store

        if labels is None and battles is None:
            raise PrefgymError("give --labels FILE and/or --battles FILE")
        if not db.is_file():
            raise DataError("database not found", path=db)
        store = Store(db)
        if labels is not None:
            rows = Annotation(store).export()
            write_json(labels, rows)
            typer.echo(f"{len(rows)} labels -> {labels}")
        if battles is not None:
            rows = store.battles()
            write_json(battles, rows)
            typer.echo(f"{len(rows)} battles -> {battles}")
