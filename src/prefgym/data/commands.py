"""`prefgym data validate` and `prefgym generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def add_commands(app: typer.Typer) -> None:
    """Add `prefgym data ...` and `prefgym generate` to the `prefgym` app."""
    data_app = typer.Typer(help="Check and inspect AlpacaFarm-format data.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("validate")
    def validate_command(
        source: str = typer.Argument(..., help="A .json/.jsonl file, a datasets save_to_disk folder, or a Hub dataset name[:config]."),
        split: Optional[str] = typer.Option(None, help="Split to read (folders with several splits, Hub datasets)."),
        require: str = typer.Option("instruction,output", help="Comma-separated fields every record must have."),
    ) -> None:
        """Check that every record is well formed; exit 2 naming the file, row and field if not.

        Checks: valid UTF-8 and JSON, each row an object, required fields present, text
        fields strings, preference 1, 2, in between (1 + P(output_2 better)), 1.5 or 0 (tie) or
        null (see prefgym.data.preferences), outputs a list of strings, no empty instruction.

        Reads SOURCE; writes nothing.
        """
        from prefgym.data import load_records

        required = tuple(f.strip() for f in require.split(",") if f.strip())
        records = load_records(source, split=split, required=required)
        fields = sorted({k for r in records for k in r})
        typer.echo(f"ok: {len(records)} records in {source}; fields: {', '.join(fields)}")

    @app.command("generate")
    def generate_command(
        model: Optional[str] = typer.Option(None, "--model", help="Model folder (save_pretrained) or Hub name; with "
                                            "--backend openai, the served model's folder, read for its prompt format."),
        data: str = typer.Option(..., "--data", help="Instructions: .json/.jsonl, datasets folder or Hub name."),
        out: Path = typer.Option(..., "--out", help="Where to write the outputs (model_outputs.json)."),
        split: Optional[str] = typer.Option(None, help="Split of --data when it is a folder or Hub dataset."),
        generator: Optional[str] = typer.Option(None, help="Name written in `generator` (default: the model folder's name)."),
        temperature: float = typer.Option(0.7, help="Sampling temperature; 0 for greedy."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling probability mass."),
        max_new_tokens: int = typer.Option(300, help="Most tokens per response."),
        num_samples: int = typer.Option(1, help="Responses per instruction (then `outputs` holds them all)."),
        batch_size: int = typer.Option(16, help="Instructions per generate call."),
        seed: int = typer.Option(0, help="Sampling seed."),
        max_instances: Optional[int] = typer.Option(None, help="Only the first N instructions."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
        backend: str = typer.Option("hf", help="hf: load --model here; vllm: sample --model on an in-process vLLM "
                                    "engine (pip install 'prefgym\\[vllm]'); openai: ask an OpenAI-compatible server "
                                    "(vllm serve, llama.cpp, sglang) at --base-url."),
        base_url: Optional[str] = typer.Option(None, help="--backend openai: the server's API root, e.g. http://localhost:8000/v1."),
        served_model: Optional[str] = typer.Option(None, help="--backend openai: the model name the server serves."),
        api_key_env: str = typer.Option("OPENAI_API_KEY", help="--backend openai: environment variable with the API key."),
        max_concurrency: int = typer.Option(8, help="--backend openai: requests in flight at once."),
        dtype: Optional[str] = typer.Option(None, help="Weights dtype: float32, bfloat16, float16, auto (default: float32)."),
        attn_implementation: Optional[str] = typer.Option(
            None, help="--backend hf: attention kernel (eager, sdpa, flash_attention_2, ...; default: transformers')."),
        prompt_format: Optional[str] = typer.Option(
            None, help="auto (default: the format --model was trained with, else chat when its tokenizer has a "
                       "template, else alpaca), alpaca or chat."),
    ) -> None:
        """Sample responses to instructions and write them in AlpacaEval format.

        Reads: --model (save_pretrained folder or Hub name), or with --backend openai the server
        at --base-url, and --data (records with instruction and optional input).

        --dtype, --attn-implementation and --prompt-format are SamplingConfig's fields (as in a run
        config's stages.evaluate); with --backend openai the server sets its dtype and kernels.

        Writes --out atomically: a JSON list of records with instruction, input, output,
        generator (and outputs, the list, when --num-samples > 1). Finished batches are kept
        in OUT.partial.jsonl until the end: rerun the same command to resume.
        """
        from prefgym.data import load_records
        from prefgym.io import write_json
        from prefgym.models.generation import SamplingConfig, generate_outputs, is_main_process, main_process_only

        from prefgym.errors import ConfigError

        needed = {"hf": {"--model": model}, "vllm": {"--model": model},
                  "openai": {"--base-url": base_url, "--served-model": served_model}}
        if backend not in needed:
            raise ConfigError(f"--backend should be hf, vllm or openai, got {backend!r}")
        missing = [name for name, value in needed[backend].items() if not value]
        if missing:
            raise ConfigError(f"--backend {backend} needs {' and '.join(missing)}")
        not_here = {"openai": {"--dtype": dtype, "--attn-implementation": attn_implementation},
                    "vllm": {"--attn-implementation": attn_implementation}}.get(backend, {})
        given = [name for name, value in not_here.items() if value is not None]
        if given:
            chooser = "the server sets its dtype and attention kernel" if backend == "openai" else \
                "vLLM chooses its attention kernel"
            raise ConfigError(f"--backend {backend} takes no {' or '.join(given)} ({chooser}); leave it out")
        records = load_records(data, split=split, required=("instruction",))[:max_instances]
        model_fields = {k: v for k, v in (("dtype", dtype), ("attn_implementation", attn_implementation),
                                          ("prompt_format", prompt_format)) if v is not None}
        cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             num_samples=num_samples, batch_size=batch_size, seed=seed,
                             engine="vllm" if backend == "vllm" else "hf", **model_fields)
        partial = out.with_name(out.name + ".partial.jsonl")  # finished batches, for resuming

        def write(outputs):
            write_json(out, outputs)
            partial.unlink(missing_ok=True)
            typer.echo(f"wrote {len(outputs)} outputs to {out}")

        if backend == "openai":
            from prefgym.models.openai_generation import ServerConfig, generate_outputs_openai

            server = ServerConfig(base_url=base_url, served_model=served_model, api_key_env=api_key_env,
                                  max_concurrency=max_concurrency, prompt_format=cfg.prompt_format, model_folder=model)

            def ask_the_server():  # the server batches: one process asks (each would pay for every request)
                outputs = generate_outputs_openai(server, records, cfg, generator=generator, progress=progress,
                                                  partial_file=partial)
                write(outputs)

            main_process_only("generation through the server", ask_the_server)
            return

        outputs = generate_outputs(model, records, cfg, generator=generator, progress=progress, partial_file=partial)
        if is_main_process():  # several processes (accelerate launch): each holds all outputs, one writes
            write(outputs)
