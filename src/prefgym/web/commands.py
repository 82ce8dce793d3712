"""`prefgym` sub-commands of the human side: serve-annotate and arena."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer


def add_commands(app: typer.Typer) -> None:
    """Add this area's sub-commands to the `prefgym` app."""

    @app.command("serve-annotate")
    def serve_annotate(
        pairs: Path = typer.Argument(..., help="Pairs to label (.json/.jsonl): instruction, input?, output_1, output_2."),
        out: Path = typer.Option(..., "--out", help="Labels are appended here (JSONL); rerun with the same file to resume."),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port"),
        labels_per_pair: int = typer.Option(1, "--labels-per-pair", help="Distinct labelers wanted per pair."),
        annotator_id_required: bool = typer.Option(False, "--annotator-id-required",
                                                   help="Refuse labels without a labeler id (else 'anonymous')."),
    ):
        """Serve a web page where people label pairs (left better / right better / tie)."""
        import uvicorn

        from prefgym.web.app import annotation_app

        web = annotation_app(pairs, out, labels_per_pair=labels_per_pair, annotator_id_required=annotator_id_required)
        typer.echo(f"annotation page on http://{host}:{port}/ ; labels -> {out}")
        uvicorn.run(web, host=host, port=port)

    @app.command("arena")
    def arena(
        outputs: List[Path] = typer.Argument(..., help="model_outputs.json files (instruction, input?, output, generator)."),
        battles: Path = typer.Option(..., "--battles", help="Votes are appended here (JSONL); `prefgym elo` reads it."),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port"),
        seed: int = typer.Option(0, "--seed", help="Seed of the battles dealt."),
    ):
        """Serve an arena of anonymous battles between generators, with a leaderboard at /leaderboard."""
        import uvicorn

        from prefgym.web.app import arena_app

        web = arena_app(outputs, battles, seed=seed)
        typer.echo(f"arena on http://{host}:{port}/ (leaderboard: /leaderboard); battles -> {battles}")
        uvicorn.run(web, host=host, port=port)
