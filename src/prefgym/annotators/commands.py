"""`prefgym annotate`, `prefgym make-pairs` and `prefgym analyze-annotators`."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from prefgym.errors import PrefgymError
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


def _check_missing(summary: dict, out: Path, allow_missing: bool) -> None:
    """A PrefgymError (exit 2), or a warning with --allow-missing, when rows got no label."""
    if not summary["n_missing"]:
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["missing_reasons"].items())
    message = (f"{summary['n_missing']} of {summary['n_rows']} rows have no label ({reasons}); they are in "
               f"{out} with preference null and their error. Rerun the same command to ask again for "
               "failed calls (stored answers are not asked again)")
    if not allow_missing:
        raise PrefgymError(message + ", or pass --allow-missing")
    Console(stderr=True).print(f"warning: {message}", style="yellow", highlight=False, soft_wrap=True)


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
        allow_missing: bool = typer.Option(False, "--allow-missing",
                                           help="Exit 0 (with a warning) even if some rows got no label."),
    ):
        """Label pairs of outputs with a pool of judges; writes OUT with preference, annotator, price
        and time per row (a row without a label has preference null and `error`). Exits 2 if any
        row got no label (after writing OUT); a rerun asks only for those."""
        from prefgym.annotators.annotate import annotate_pairs, summarize

        rows = read_records(pairs)
        stats: dict = {}
        annotated = annotate_pairs(rows, annotators, seed=seed, cache_dir=cache_dir,
                                   progress=not no_progress, stats=stats, source=pairs)
        out = out or pairs.with_name(pairs.stem + ".annotated.json")
        write_json(out, annotated)
        summary = summarize(annotated)
        _print_summary(summary, stats, out)
        _check_missing(summary, out, allow_missing)

    @app.command("make-pairs")
    def make_pairs_cmd(
        records: Path = typer.Argument(..., help="JSON/JSONL records with `outputs`: n samples per instruction."),
        out: Path = typer.Option(..., help="Output JSON of pairs."),
        seed: int = typer.Option(0),
        pairs_per_instruction: int = typer.Option(1),
    ):
        """Pair distinct samples per instruction (AlpacaFarm style) into pairs to annotate.

        Reads RECORDS (instruction, input, outputs: the samples). Writes --out: a JSON list of
        pairs (instruction, input, output_1, output_2), ready for `prefgym annotate`.
        """
        from prefgym.annotators.pairs import make_pairs

        pairs = make_pairs(read_records(records), seed=seed, pairs_per_instruction=pairs_per_instruction,
                           source=records)
        write_json(out, pairs)
        typer.echo(f"{len(pairs)} pairs -> {out}")

    @app.command("analyze-annotators")
    def analyze(
        annotators: list[str] = typer.Option(["world_pool", "world_greedy", "longer"], "--annotators",
                                             help="Pools to analyse (repeat the option); `longer` is the "
                                             "pseudo-annotator that always picks the longer output."),
        human_annotations: Path = typer.Option(None, help="Cross-annotation file (AlpacaEval format: "
                                               "instruction, output_1, output_2, preference, annotator_index, "
                                               "optional generator). Default: the world's simulated humans."),
        pairs: Path = typer.Option(None, help="Pairs for the world's cross-annotation set (output_1/output_2, "
                                   "or records with `outputs`, paired as make-pairs does). Default: "
                                   "the world's policy-like pairs."),
        n_pairs: int = typer.Option(500, help="Pairs of the world's cross-annotation set."),
        n_humans: int = typer.Option(4, help="Simulated humans per pair."),
        n_samples: int = typer.Option(4, help="Seeded runs of each annotator (for bias and variance)."),
        min_length_delta: int = typer.Option(30, help="Characters by which two outputs must differ to count "
                                             "for `prefer longer` (AlpacaEval: 30)."),
        seed: int = typer.Option(0),
        cache_dir: Path = typer.Option(None),
        out: Path = typer.Option(None, help="Write the table as JSON."),
    ):
        """AlpacaEval's annotator table: agreement with humans, price and time per 1000, Spearman and
        Pearson of generator rankings, bias, variance, P(prefer longer / lists / output 1).

        Reads --human-annotations (or builds the world's cross-annotation set) and the pools'
        configs. Prints the table in AlpacaEval's units (agreement, bias, variance in %); writes
        --out (the table as JSON, fractions) when given, and the annotators' answers to the
        annotation cache (--cache-dir).
        """
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
                                  human_price_per_1000=price, human_seconds_per_1000=secs,
                                  significant_delta_length=min_length_delta)
        Console(width=max(Console().width, 150)).print(_annotator_table(rows))
        if out:
            write_json(out, rows)


def _annotator_table(rows: list[dict]) -> Table:
    """AlpacaEval's annotator table (its units) from `analyze_annotators` rows."""
    table = Table(title=f"annotators vs humans ({rows[0]['n_pairs']} pairs)")
    for col in ("annotator", "agreement % [95% CI]", "$/1000", "s/1000", "spearman", "pearson", "bias %",
                "variance %", "P(longer)", "P(lists)", "P(1)"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        lo, hi = r["human_agreement_ci"]
        agreement = f"{_fmt(100 * r['human_agreement'], 1)} [{_fmt(100 * lo, 1)}, {_fmt(100 * hi, 1)}]"
        table.add_row(r["annotator"], agreement, _fmt(r["price_per_1000"], 2), _fmt(r["seconds_per_1000"], 1),
                      _fmt(r["spearman"], 2), _fmt(r["pearson"], 2), _fmt(100 * r["bias"], 1),
                      _fmt(100 * r["variance"], 1), _fmt(r["proba_prefer_longer"], 2),
                      _fmt(r["proba_prefer_lists"], 2), _fmt(r["proba_prefer_1"], 2))
    return table
