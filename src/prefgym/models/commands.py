"""`prefgym models ...`: bring a model into the form every prefgym command loads."""

from __future__ import annotations

from pathlib import Path

import typer


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym models import-gguf` to the `prefgym` app."""
    models_app = typer.Typer(help="Import and inspect models.", no_args_is_help=True)
    app.add_typer(models_app, name="models")

    @models_app.command("import-gguf")
    def import_gguf_command(
        source: str = typer.Argument(..., help="A .gguf file, or 'smollm2' for the SmolLM2-135M-Instruct "
                                               "file that prefgym\\[smollm2] installs."),
        out: Path = typer.Option(..., "--out", help="Folder to write (must not exist or be empty)."),
        dtype: str = typer.Option("float32", help="Dtype to store the dequantised weights in: float32 or bfloat16."),
    ) -> None:
        """Dequantise a GGUF model into a trainable save_pretrained folder (safetensors).

        Reads SOURCE (needs the gguf package). Writes OUT: config.json, model.safetensors,
        generation_config.json, the tokenizer files and its chat template; written to
        OUT.partial first and renamed, so OUT is never half-written.
        """
        from prefgym.models.gguf import import_gguf, smollm2_gguf

        path = smollm2_gguf() if source == "smollm2" else Path(source)
        typer.echo(f"wrote {import_gguf(path, out, dtype=dtype)}")
