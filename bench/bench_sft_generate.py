"""Throughput of SFT and of generation (batched with left padding vs one prompt at a time).

    python bench/bench_sft_generate.py [--model DIR] [--threads 1]

Without --model, a tiny random Llama (hidden 64, 2 layers) is made in a temporary folder.
Prints a table: SFT tokens/s; generation new tokens/s batched vs one-by-one, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from prefgym.data import format_prompt
from prefgym.methods.sft import SFTConfig, train_sft
from prefgym.models import load_model_and_tokenizer
from prefgym.models.generation import SamplingConfig, generate
from prefgym.models.tiny import make_tiny_checkpoint


def demonstrations(n: int) -> list[dict]:
    return [{"instruction": f"Add {i} and {3 * i + 1}, then explain the sum in one sentence.", "input": "",
             "output": f"The sum of {i} and {3 * i + 1} is {4 * i + 1}; adding them gives {4 * i + 1}."}
            for i in range(n)]


def bench_sft(model_path: Path, work: Path, n_records: int, batch_size: int) -> dict:
    cfg = SFTConfig(model_name_or_path=str(model_path), output_dir=str(work / "sft"), epochs=1, lr=1e-4,
                    per_device_batch_size=batch_size, save_steps=0, progress=False, resume=False)
    load_model_and_tokenizer(model_path)  # pay the one-off imports before timing
    start = time.perf_counter()
    out = train_sft(cfg, demonstrations(n_records))
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first step pays one-off warm-up costs
    return {"steps": len(rows), "tokens": rows[-1]["tokens"],
            "tokens_per_s_steps": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "tokens_per_s_wall": rows[-1]["tokens"] / wall, "wall_s": wall}


def bench_generate(model_path: Path, n_prompts: int, new_tokens: int, batch_size: int) -> dict:
    model, tokenizer = load_model_and_tokenizer(model_path)
    prompts = [format_prompt(r["instruction"]) for r in demonstrations(n_prompts)]
    # Count the new tokens actually made (re-tokenised): a row may stop early at EOS.
    results = {}
    for name, bs in (("batched", batch_size), ("one_by_one", 1)):
        cfg = SamplingConfig(temperature=0, max_new_tokens=new_tokens, batch_size=bs)
        generate(model, tokenizer, prompts[:2], cfg)  # warm-up
        start = time.perf_counter()
        outputs = generate(model, tokenizer, prompts, cfg)
        wall = time.perf_counter() - start
        made = sum(len(tokenizer(o[0], add_special_tokens=False).input_ids) for o in outputs)
        results[name] = {"new_tokens": made, "wall_s": wall, "tokens_per_s": made / wall, "outputs": outputs}
    assert results["batched"]["outputs"] == results["one_by_one"]["outputs"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: a tiny random Llama)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sft-records", type=int, default=128)
    parser.add_argument("--sft-batch-size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--gen-batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_path = args.model or make_tiny_checkpoint(work / "tiny", "llama", hidden_size=64, num_layers=2)
        sft = bench_sft(model_path, work, args.sft_records, args.sft_batch_size)
        gen = bench_generate(model_path, args.prompts, args.new_tokens, args.gen_batch_size)

    b, o = gen["batched"], gen["one_by_one"]
    print(f"\nmodel: {args.model or 'tiny random llama (hidden 64, 2 layers)'}; torch threads: {args.threads}")
    print(f"{'measure':<44}{'value':>12}")
    print(f"{'SFT tokens/s (steady steps)':<44}{sft['tokens_per_s_steps']:>12.0f}")
    print(f"{'SFT tokens/s (wall, incl. load + save)':<44}{sft['tokens_per_s_wall']:>12.0f}")
    print(f"{'SFT steps x batch, tokens':<44}{str(sft['steps']) + ' x ' + str(args.sft_batch_size) + ', ' + str(sft['tokens']):>12}")
    print()
    print(f"{'generation (greedy, ' + str(args.prompts) + ' prompts)':<30}{'batched':>12}{'one-by-one':>12}{'ratio':>8}")
    print(f"{'new tokens/s':<30}{b['tokens_per_s']:>12.0f}{o['tokens_per_s']:>12.0f}"
          f"{b['tokens_per_s'] / o['tokens_per_s']:>8.1f}")
    print(f"{'wall s':<30}{b['wall_s']:>12.2f}{o['wall_s']:>12.2f}{o['wall_s'] / b['wall_s']:>8.1f}")
    print(f"{'batch size':<30}{args.gen_batch_size:>12}{1:>12}")
    print("batched outputs == one-by-one outputs: True")


if __name__ == "__main__":
    main()
