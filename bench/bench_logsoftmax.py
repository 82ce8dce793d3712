"""Peak memory of per-token log-probs over a 128k vocabulary: full fp32 log-softmax vs chunked.

    python bench/bench_logsoftmax.py [--batch 4] [--seq 128] [--vocab 128256] [--threads 1]

A tiny random Llama (hidden 64, 2 layers) with a Llama-3-sized vocabulary (128,256 tokens), made
from a local config: its logits dominate the memory, as they do for real models with large
vocabularies. Each variant runs one forward + backward pass of a log-prob loss (mean
log-probability of the sequence) in a fresh process:

- `full`: `log_softmax(logits.float() / T).gather(...)`, the expression prefgym used before;
- `chunked`: `prefgym.methods.common.token_logprobs` (fp32 a time-slice at a time, recomputed in
  backward).

Memory is the process's peak resident set size during the pass (ru_maxrss) minus its RSS just
before it (model built, inputs made): what the pass itself needs. Both variants' losses and
gradients are checked equal. Writes bench/results/logsoftmax.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "logsoftmax.json"


def full_logprobs(logits, ids, temperature):
    import torch

    logps = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return torch.nn.functional.pad(logps.gather(2, ids[:, 1:, None]).squeeze(-1), (1, 0))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(variant: str, dtype: str, batch: int, seq: int, vocab: int, threads: int) -> dict:
    """One forward + backward in this process; returns its memory, time and a loss/grad fingerprint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefgym.methods import common

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    ids = torch.randint(0, vocab, (batch, seq))
    fn = full_logprobs if variant == "full" else common.token_logprobs
    before_rss, before_peak = rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    logits = model(input_ids=ids).logits  # (B, T, V) in the model's dtype
    loss = -fn(logits, ids, 0.7)[:, 1:].mean()
    loss.backward()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad = model.lm_head.weight.grad.float()
    return {"variant": variant, "dtype": dtype, "peak_mib": peak - before_rss, "wall_s": wall,
            "setup_peak_below_pass_peak": before_peak < peak, "logits_mib": logits.numel() * logits.element_size() / 2**20,
            "loss": loss.item(), "grad_norm": grad.norm().item(), "grad_sum_abs": grad.abs().sum().item()}


def run_variant(args, variant: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--dtype", dtype, "--batch", str(args.batch),
           "--seq", str(args.seq), "--vocab", str(args.vocab), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["full", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, args.batch, args.seq, args.vocab, args.threads)))
        return
    import torch
    import transformers

    results = {}
    for dtype in args.dtypes.split(","):
        full, chunked = run_variant(args, "full", dtype), run_variant(args, "chunked", dtype)
        for key in ("loss", "grad_norm", "grad_sum_abs"):  # the same computation
            assert abs(full[key] - chunked[key]) <= 1e-4 * max(1.0, abs(full[key])), (dtype, key, full, chunked)
        results[dtype] = {"full": full, "chunked": chunked, "peak_ratio_full_over_chunked": full["peak_mib"] / chunked["peak_mib"]}
        print(f"{dtype:9s} logits {full['logits_mib']:7.1f} MiB | peak during forward+backward: full "
              f"{full['peak_mib']:7.1f} MiB, chunked {chunked['peak_mib']:7.1f} MiB "
              f"({results[dtype]['peak_ratio_full_over_chunked']:.2f}x less) | time full {full['wall_s']:.2f} s, "
              f"chunked {chunked['wall_s']:.2f} s")
    report = {"command": "python " + " ".join(["bench/bench_logsoftmax.py", *sys.argv[1:]]),
              "settings": {"batch": args.batch, "seq": args.seq, "vocab": args.vocab, "threads": args.threads,
                           "temperature": 0.7},
              "model": "random Llama, hidden 64, 2 layers, untied LM head",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "results": results}
    from prefgym.io import write_json

    write_json(args.out, report)


if __name__ == "__main__":
    main()
