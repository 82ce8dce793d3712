"""`prefgym annotate`, `prefgym make-pairs` and `prefgym analyze-annotators`."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from prefgym.io import read_records, write_json


def _print_summary(summary: dict, stats: dict, out: Path) -> None:
    console = Console(stderr=True)
    table = Table(title=f"annotations -> {out}", show_header=False)
    for k, v in (("rows", summary["n_rows"]), ("labelled", summary["n_labelled"]),
                 ("without label", f"{summary['n_missing']} {summary['missing_reasons'] or ''}"),
                 ("answers from cache", stats["n_cached"]), ("examples judged now", stats["n_called"]),
                 ("calls made", stats["n_calls"]),
                 ("prompt tokens / label", f"{summary['prompt_tokens_per_label']:.1f}"),
                 ("price / 1000 labels", f"${summary['price_per_1000_labels']:.3f}"),
                 ("seconds / 1000 labels", f"{summary['seconds_per_1000_labels']:.1f}"),
                 ("wall seconds", f"{stats['wall_seconds']:.1f}")):
        table.add_row(k, str(v))
    console.print(table)


def _fmt(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def add_commands(app: typer.Typer) -> None:
    """Add this area's sub-commands to the `prefgym` app."""

    @app.command("annotate")
    def annotate(
        pairs: Path = typer.Argument(..., help="JSON/JSONL pairs: instruction, input, output_1, output_2."),
        annotators: str = typer.Option("world_pool_noisy", help="Pool YAML file or built-in name "
                                       "(world_pool_noisy, world_pool, world_greedy, world_humans, gpt4_b1, ...)."),
        out: Path = typer.Option(None, help="Output JSON (default: <pairs>.annotated.json)."),
        seed: int = typer.Option(0, help="Seed of every random choice (judge, order, flips, batches)."),
        cache_dir: Path = typer.Option(None, help="Cache folder (default: $PREFGYM_HOME/cache or ~/.cache/prefgym)."),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    ):
        """Label pairs of outputs with a pool of judges; adds preference, annotator, price and time."""
        from prefgym.annotators.annotate import annotate_pairs, summarize

        rows = read_records(pairs)
        stats: dict = {}
        annotated = annotate_pairs(rows, annotators, seed=seed, cache_dir=cache_dir,
                                   progress=not no_progress, stats=stats)
        out = out or pairs.with_name(pairs.stem + ".annotated.json")
        write_json(out, annotated)
        _print_summary(summarize(annotated), stats, out)

    @app.command("make-pairs")
    def make_pairs_cmd(
        records: Path = typer.Argument(..., help="JSON/JSONL records with `outputs`: n samples per instruction."),
        out: Path = typer.Option(..., help="Output JSON of pairs."),
        seed: int = typer.Option(0),
        pairs_per_instruction: int = typer.Option(1),
    ):
        """Pair distinct samples per instruction (AlpacaFarm style) into pairs to annotate."""
        from prefgym.annotators.pairs import make_pairs

        pairs = make_pairs(read_records(records), seed=seed, pairs_per_instruction=pairs_per_instruction)
        write_json(out, pairs)
        typer.echo(f"{len(pairs)} pairs -> {out}")

    @app.command("analyze-annotators")
    def analyze(
        annotators: list[str] = typer.Option(["world_pool", "world_greedy"], "--annotators",
                                             help="Pools to analyse (repeat the option)."),
        human_annotations: Path = typer.Option(None, help="Cross-annotation file (AlpacaEval format: "
                                               "instruction, output_1, output_2, preference, annotator_index). "
                                               "Default: the world's simulated humans."),
        pairs: Path = typer.Option(None, help="Pairs for the world's cross-annotation set (output_1/output_2, "
                                   "or records with `outputs`, paired as make-pairs does). Default: "
                                   "the world's policy-like pairs."),
        n_pairs: int = typer.Option(500, help="Pairs of the world's cross-annotation set."),
        n_humans: int = typer.Option(4, help="Simulated humans per pair."),
        n_samples: int = typer.Option(4, help="Seeded runs of each annotator (for bias and variance)."),
        seed: int = typer.Option(0),
        cache_dir: Path = typer.Option(None),
        out: Path = typer.Option(None, help="Write the table as JSON."),
    ):
        """Agreement with humans, bias, variance, P(longer), price and time per 1000 (AlpacaEval's columns)."""
        from prefgym.annotators.analysis import analyze_annotators, load_cross_annotations, make_world_cross_annotations

        if human_annotations is not None:
            cross, price, secs = load_cross_annotations(human_annotations), math.nan, math.nan
        else:
            given = None
            if pairs is not None:
                from prefgym.annotators.pairs import make_pairs

                given = read_records(pairs)
                if given and "output_1" not in given[0]:
                    given = make_pairs(given, seed=seed)
                given = given[:n_pairs]
            cross = make_world_cross_annotations(n_pairs=n_pairs, n_humans=n_humans, seed=seed, pairs=given)
            price, secs = 300.0, 36800.0  # the world_humans config's crowdworker figures
        rows = analyze_annotators(cross, annotators, seed=seed, n_samples=n_samples, cache_dir=cache_dir,
                                  human_price_per_1000=price, human_seconds_per_1000=secs)
        table = Table(title=f"annotators vs humans ({rows[0]['n_pairs']} pairs)")
        for col in ("annotator", "human agreement", "bias", "variance", "P(longer)", "$/1000", "s/1000"):
            table.add_column(col)
        for r in rows:
            ci = r["human_agreement_ci"]
            table.add_row(r["annotator"], f"{_fmt(r['human_agreement'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]",
                          _fmt(r["bias"]), _fmt(r["variance"]), _fmt(r["proba_prefer_longer"]),
                          _fmt(r["price_per_1000"], 2), _fmt(r["seconds_per_1000"], 1))
        Console(width=max(Console().width, 110)).print(table)
        if out:
            write_json(out, rows)
