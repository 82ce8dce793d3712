"""`prefgym` sub-commands of this area: evaluate, leaderboard, compare, elo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def _compare_name(rows: list[dict], path: Path) -> str:
    """`generator_2` when the file has exactly one, plus the path."""
    generators = {str(r["generator_2"]) for r in rows if r.get("generator_2")}
    return f"{generators.pop()} ({path})" if len(generators) == 1 else str(path)


def add_commands(app: typer.Typer) -> None:
    """Add this area's sub-commands to the `prefgym` app."""

    @app.command("evaluate")
    def evaluate_command(
        model_outputs: Optional[Path] = typer.Argument(None, help="AlpacaEval model_outputs.json (instruction, input?, output, generator)."),
        reference: Path = typer.Option(..., "--reference", "-r", help="Evaluation set with reference outputs (output, generator)."),
        model: Optional[Path] = typer.Option(None, "--model", help="A model folder to generate the outputs with (instead of MODEL_OUTPUTS)."),
        annotators: str = typer.Option("world_pool_noisy", "--annotators", help="Annotator config name or YAML path."),
        output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Write model_outputs.json, annotations.json, leaderboard.csv here."),
        generator: Optional[str] = typer.Option(None, "--generator", help="Name of the evaluated model (default: from the outputs)."),
        seed: int = typer.Option(0, "--seed"),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Durable cache of annotations."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="With --model: generation length."),
        engine: str = typer.Option("hf", "--engine", help="With --model: hf (transformers), vllm (in-process "
                                   "vLLM, `pip install 'prefgym\\[vllm]'`) or auto (vllm when installed with a GPU)."),
        gold: bool = typer.Option(False, "--gold", help="Also report the built-in world's gold win-rate."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="With --model: weights dtype, float32, bfloat16, "
                                            "float16 or auto (default: float32)."),
        attn_implementation: Optional[str] = typer.Option(
            None, "--attn-implementation", help="With --model: attention kernel (eager, sdpa, flash_attention_2, "
                                                "...; default: transformers')."),
        prompt_format: Optional[str] = typer.Option(
            None, "--prompt-format", help="With --model: auto (default: the format the model was trained with, else "
                                          "chat when its tokenizer has a template), alpaca or chat."),
    ):
        """Win-rate of a model against the reference outputs, judged by the evaluation annotators.

        Reads MODEL_OUTPUTS (or generates them with --model) and --reference. Prints the result;
        writes model_outputs.json, annotations.json and leaderboard.csv (one row added or
        replaced) to --output-dir when given, and the judges' answers to the annotation cache.
        """
        from prefgym.errors import ConfigError, DataError
        from prefgym.evaluation.winrate import evaluate

        if model_outputs is None and model is None:
            raise DataError("give MODEL_OUTPUTS (a model_outputs.json) or --model to generate them")
        sampling = None
        model_fields = {k: v for k, v in (("dtype", dtype), ("attn_implementation", attn_implementation),
                                          ("prompt_format", prompt_format)) if v is not None}
        if model_fields and (model is None or model_outputs is not None):
            raise ConfigError(f"--{next(iter(model_fields)).replace('_', '-')} applies to generating with --model; "
                              "MODEL_OUTPUTS are judged as they are")
        if model is not None and model_outputs is None:
            from prefgym.io import read_records
            from prefgym.models.generation import SamplingConfig, generate_outputs, is_main_process, world_size

            sampling = SamplingConfig(max_new_tokens=max_new_tokens, seed=seed, engine=engine, **model_fields)
            if world_size() > 1:  # several processes share the generation; the main one judges and writes
                model_outputs = generate_outputs(model, read_records(reference), sampling,
                                                 generator=generator or model.name)
                if not is_main_process():
                    return
        row = evaluate(model_outputs, reference, model_path=model, out_dir=output_dir, annotators=annotators,
                       seed=seed, cache_dir=cache_dir, sampling=sampling, generator=generator, gold=gold)
        typer.echo(f"{row['generator']}: win-rate {row['win_rate']:.2f} ± {row['standard_error']:.2f} "
                   f"(wins {row['n_wins']}, losses {row['n_wins_base']}, draws {row['n_draws']}, n {row['n_total']}); "
                   f"LC win-rate {row['length_controlled_winrate']:.2f}; avg length {row['avg_length']}")
        if gold:
            typer.echo(f"gold win-rate {row['gold_win_rate']:.2f} ± {row['gold_standard_error']:.2f}")

    @app.command("leaderboard")
    def leaderboard_command(
        annotations: List[Path] = typer.Argument(..., help="AlpacaEval annotation files (output_1 = reference, output_2 = model, instruction, preference)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the leaderboard here."),
        fmt: Optional[str] = typer.Option(None, "--format", "-f", help="md, csv or html (default: from --output's suffix, else md on screen)."),
        no_lc: bool = typer.Option(False, "--no-lc", help="Skip the length-controlled win-rate."),
        instruction_difficulty: Optional[Path] = typer.Option(
            None, "--instruction-difficulty",
            help="AlpacaEval 2's per-instruction difficulty (.json records: instruction, difficulty): the GLM's instruction term."),
        baseline_annotations: Optional[List[Path]] = typer.Option(
            None, "--baseline-annotations",
            help="Annotations of the baseline against its verbose / concise variants (repeat the option); they "
                 "regularise the GLM's length weight as in AlpacaEval (weight 0.1 each)."),
        lc_bootstrap: int = typer.Option(200, "--lc-bootstrap", help="Resamples for lc_ci_low / lc_ci_high (0: none)."),
        seed: int = typer.Option(0, "--seed"),
    ):
        """One row per generator: win-rate ± SE, LC win-rate, counts, average length (AlpacaEval's columns).

        Reads annotation files (one generator per generator_2, else per folder; several files of one generator are pooled); writes the table to the screen or to --output (csv, md or html).

        LC win-rate: AlpacaEval 2's GLM (L1 logistic regression, C by 5-fold CV), with --instruction-difficulty for its instruction term and --baseline-annotations for its length regularisation. lc_standard_error is AlpacaEval's (the standard error of the per-instruction GLM predictions); lc_ci_low / lc_ci_high is a 95% bootstrap interval over instructions.

        avg_length is, as in AlpacaEval, the mean length of the rows a generator has (not padded to the eval set); a generator with missing instructions, or instructions repeated across files, is named in a warning.
        """
        from prefgym.errors import DataError
        from prefgym.evaluation.leaderboard import FORMATS, leaderboard_from_annotations, to_markdown, write_leaderboard

        if fmt is not None and fmt not in FORMATS:
            raise DataError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
        df = leaderboard_from_annotations(annotations, length_controlled=not no_lc,
                                          instruction_difficulty=instruction_difficulty,
                                          baseline_annotations=baseline_annotations or (),
                                          lc_bootstrap=lc_bootstrap, seed=seed)
        if output is not None:
            write_leaderboard(df, output, fmt=fmt)
            typer.echo(f"wrote {output}")
        if output is None or fmt == "md":
            typer.echo(df.to_csv() if fmt == "csv" else to_markdown(df), nl=False)

    @app.command("compare")
    def compare_command(
        annotations_a: Path = typer.Argument(..., help="A: AlpacaEval annotations of model A against the reference."),
        annotations_b: Path = typer.Argument(..., help="B: annotations of model B against the same reference."),
        n_bootstrap: int = typer.Option(2000, "--n-bootstrap"),
        seed: int = typer.Option(0, "--seed"),
        as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON instead of one line."),
    ):
        """Paired comparison of A and B on the instructions both were judged on.

        Reads two annotation files against the same reference (instruction, output_1 = reference, output_2 = model, preference); writes no file. Prints which of A and B is better by how many win-rate points, with a 95% paired-bootstrap interval and p-value, the sign test and the Wilcoxon signed-rank test; --json prints every number.
        """
        from prefgym.evaluation.stats import format_comparison, paired_comparison
        from prefgym.evaluation.winrate import load_annotations

        rows_a, rows_b = load_annotations(annotations_a), load_annotations(annotations_b)
        r = paired_comparison(rows_a, rows_b, n_bootstrap=n_bootstrap, seed=seed, path_a=annotations_a,
                              path_b=annotations_b)
        r["a"], r["b"] = _compare_name(rows_a, annotations_a), _compare_name(rows_b, annotations_b)
        typer.echo(json.dumps(r, indent=2) if as_json else format_comparison(r))

    @app.command("elo")
    def elo_command(
        battles: Path = typer.Argument(..., help="Battles (.json/.jsonl): model_a, model_b, winner."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the ratings CSV here."),
        n_bootstrap: int = typer.Option(100, "--n-bootstrap"),
        k: float = typer.Option(4.0, "--k", help="Online Elo K-factor."),
        seed: int = typer.Option(0, "--seed"),
        anchor: Optional[str] = typer.Option(None, "--anchor", help="MODEL=RATING to pin one Bradley–Terry rating."),
    ):
        """Bradley–Terry and online Elo ratings with bootstrap intervals from pairwise battles.

        Reads BATTLES (model_a, model_b, winner). Prints the ratings; writes the ratings CSV
        to --output when given, else writes nothing.
        """
        from prefgym.errors import DataError
        from prefgym.evaluation.ratings import load_battles, ratings_table
        from prefgym.io import write_text_atomic

        pinned = None
        if anchor is not None:
            name, _, value = anchor.rpartition("=")
            try:
                pinned = (name, float(value))
            except ValueError:
                raise DataError(f"--anchor must be MODEL=RATING, got {anchor!r}") from None
        table = ratings_table(load_battles(battles), n_bootstrap=n_bootstrap, k=k, seed=seed, anchor=pinned)
        if output is not None:
            write_text_atomic(output, table.to_csv())
            typer.echo(f"wrote {output}")
        typer.echo(table.round(1).to_string())
