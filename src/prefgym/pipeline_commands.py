"""`prefgym run`: the whole pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def add_commands(app: typer.Typer) -> None:
    @app.command("run")
    def run_command(
        scale: Optional[str] = typer.Option(None, help="quick (a smoke run) or default (≈10 min on 2 CPU cores)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default prefgym-runs/<scale>; with "
                                                                "--seeds prefgym-runs/<scale>-seeds)."),
        config: Optional[Path] = typer.Option(None, "--config", help="Run config YAML (real models, data, judges)."),
        seed: Optional[int] = typer.Option(None, help="Seed of the world and every stage."),
        seeds: Optional[str] = typer.Option(
            None, help="Several seeds instead of --seed, e.g. 0,1,2: one run folder each (OUT/seed-<s>); with "
                       "--validate also OUT/validation_seeds.json/.md (per-seed and mean rank correlations with "
                       "a bootstrap interval) and OUT/figures/sim_vs_human_seeds.png."),
        validate: bool = typer.Option(False, "--validate",
                                      help="Also train on the simulated humans' preferences and report the "
                                           "rank correlation of methods between simulated and human feedback."),
        methods: Optional[str] = typer.Option(
            None, help="Comma-separated methods and groups: classic (the default: AlpacaFarm's six and DPO), "
                       "new (rloo, grpo, kto, simpo, online_dpo), all; e.g. classic,online_dpo."),
        method_file: Optional[Path] = typer.Option(
            None, "--method-file", help="Your own method: a Python file defining train(ctx) (README: 'Your own "
                                        "method'), trained and evaluated beside the others."),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Redo the stages of the run folder made with other settings "
                                            "(and those that depend on them) instead of stopping."),
    ) -> None:
        """Run the whole AlpacaFarm loop: world → SFT → pairs → reward model → every method → evaluation.

        Reads: the built-in world (built on demand) or the data/models/judges of --config.
        Writes into the run folder: one sub-folder per stage, leaderboard.csv, leaderboard.md
        (with the preference labels each method used), report.html; prints each stage's time.
        Rerunning the same command resumes at the first unfinished stage; each stage records a
        fingerprint of its settings, and a stage done with other settings (seed, scale, config)
        stops the run before anything runs, naming the stage and the settings (--overwrite
        redoes it). Adding methods or --validate adds stages to the folder. With --seeds, one such
        folder per seed (OUT/seed-<s>), then the correlations across seeds (--validate).
        """
        from prefgym.pipeline import load_run_config, parse_seeds, run, run_seeds

        cfg = load_run_config(config, scale=scale, seed=seed, out_dir=str(out) if out else None,
                              validate=validate or None, seeds=parse_seeds(seeds) if seeds is not None else None,
                              methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
                              method_file=str(method_file) if method_file else None)
        if cfg.seeds is not None:
            folder = run_seeds(cfg, overwrite=overwrite)
            validated = cfg.validate and cfg.human_annotators
            typer.echo((folder / "validation_seeds.md").read_text() if validated else "")
            files = [folder / f"seed-{s}" for s in cfg.seeds]
            files += [folder / "validation_seeds.json", folder / "validation_seeds.md"] if validated else []
            typer.echo(f"wrote {', '.join(map(str, files))}")
            return
        folder = run(cfg, overwrite=overwrite)
        typer.echo((folder / "leaderboard.md").read_text())
        typer.echo(f"wrote {folder / 'leaderboard.csv'}, {folder / 'leaderboard.md'}, {folder / 'report.html'}")
