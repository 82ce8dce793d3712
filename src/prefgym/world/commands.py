"""`prefgym world ...`: build the built-in world and show what is in one."""

from __future__ import annotations

from pathlib import Path

import typer

world_app = typer.Typer(
    help="The built-in world: synthetic instruction data, simulated humans and judges, a tiny base model.",
    no_args_is_help=True,
)


@world_app.command("build")
def build_cmd(
    out: Path = typer.Option(None, "--out", help="Folder to write the world into (default: $PREFGYM_HOME/worlds/"
                             "<scale>-seed<seed> or ~/.cache/prefgym/worlds/<scale>-seed<seed>)."),
    scale: str = typer.Option("default", "--scale", help="Sizes: tiny (tests, seconds), quick (CI), default."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice; same seed, same bytes."),
) -> None:
    """Build the built-in world (synthetic) into a folder.

    Writes world.json (manifest: sizes, families, sha256 of every file), data/{sft,preference,
    unlabeled,val,eval}.json (Alpaca fields: instruction, input, output; eval also generator),
    tokenizer/ and base_model/ (a tiny causal LM pretrained on world text, Hugging Face format).
    A complete world already in the folder is left as it is.
    """
    from prefgym.world.build import build_world, default_world_dir, read_manifest

    out = out or default_world_dir(scale, seed)
    if read_manifest(out) is not None:
        build_world(out, scale=scale, seed=seed)
        typer.echo(f"world already complete at {out}")
        return
    build_world(out, scale=scale, seed=seed, progress=True)
    typer.echo(f"world written to {out}")
    _print_info(out)


@world_app.command("info")
def info_cmd(world_dir: Path = typer.Argument(..., help="A folder written by `prefgym world build`.")) -> None:
    """Show a built world's scale, split sizes, families and measured human agreement.

    Reads WORLD_DIR/world.json; prints; writes nothing.
    """
    _print_info(world_dir)


def _print_info(world_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from prefgym.errors import DataError
    from prefgym.world.build import SPLITS, read_manifest

    manifest = read_manifest(world_dir)
    if manifest is None:
        raise DataError("not a complete prefgym world (no complete world.json); build it with "
                        "`prefgym world build --out DIR`", path=world_dir)
    console = Console()
    console.print(f"world {world_dir}: scale={manifest['scale']} seed={manifest['seed']}  (synthetic)")
    table = Table("family", *SPLITS)
    for family in manifest["families"]:
        table.add_row(family, *(str(manifest["family_counts"][s].get(family, 0)) for s in SPLITS))
    table.add_row("total", *(str(manifest["sizes"][s]) for s in SPLITS), style="bold")
    console.print(table)
    pre = manifest["pretraining"]
    console.print(f"base model: {pre['parameters']:,} parameters, pretrained {pre['steps']} steps "
                  f"({pre['tokens']:,} tokens), final loss {pre['final_loss']}")
    console.print(f"human-human agreement on policy-like pairs: {manifest['human_agreement']:.3f}")


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym world build|info`."""
    app.add_typer(world_app, name="world")
