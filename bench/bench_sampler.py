"""Decoding tokens/s: prefgym's seeded rollout sampler vs `model.generate(do_sample=True)`.

    python bench/bench_sampler.py [--batch 64] [--new-tokens 32] [--vocabs 128256,512] [--threads 1]

A tiny random Llama (hidden 64, 2 layers), made from a local config for each vocabulary size (a
Llama-3-sized 128,256 and a small 512), decodes `--new-tokens` tokens for a batch of `--batch`
prompts at temperature 1 three ways:

- `prefgym`: `common.sample_responses` (`SeededSampler`: one counter-based uniform per row and
  step, inverse-transform sampling vectorised over the batch on the logits' device, plus the
  check that the scores are the model's own logits);
- `per_row_gumbel`: the same call with the sampler prefgym used before (per-row seeded CPU
  generators drawing V Gumbel noises per row and step, in a Python loop over the rows);
- `generate`: `model.generate(do_sample=True)` (softmax + `torch.multinomial`, one global RNG: its
  samples depend on the batch and the process split, which is why prefgym does not use it).

Tokens/s counts every decoded position of every row (batch x steps). Each variant first runs an
untimed 2-token warm-up. Writes bench/results/sampler.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from prefgym.errors import ConfigError
from prefgym.methods import common

RESULTS = Path(__file__).parent / "results" / "sampler.json"


class PerRowGumbelSampler(common.SeededSampler):
    """The sampler prefgym used before: argmax(logits / T + Gumbel noise), one CPU generator per row."""

    def __init__(self, seeds, temperature, max_steps=0):
        super().__init__(seeds, temperature)
        self.generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]

    def __call__(self, input_ids, scores):
        if self.raw_logits is not None and not torch.equal(scores.float(), self.raw_logits):
            raise ConfigError("sampling: the scores are not the model's logits")
        V = scores.shape[-1]
        u = torch.stack([torch.rand(V, generator=g) for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return scores.float() / self.temperature + gumbel


def tiny_model(vocab: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def decode(variant: str, model, tokenizer, prompts: list[str], new_tokens: int) -> int:
    """Decode with one variant; returns the number of decoding steps taken."""
    if variant == "generate":
        from transformers import GenerationConfig

        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=cfg)
        return out.shape[1] - enc["input_ids"].shape[1]
    sampler = common.SeededSampler
    if variant == "per_row_gumbel":
        common.SeededSampler = PerRowGumbelSampler  # what sample_responses constructs
    try:
        _, _, response = common.sample_responses(model, tokenizer, prompts, seeds=range(len(prompts)), temperature=1.0,
                                                 max_new_tokens=new_tokens, max_prompt_length=64)
    finally:
        common.SeededSampler = sampler
    return response.shape[1]


def bench(vocab: int, tokenizer, prompts: list[str], new_tokens: int) -> dict:
    model = tiny_model(vocab, tokenizer)
    tokenizer.padding_side = "left"
    results = {}
    for variant in ("prefgym", "per_row_gumbel", "generate"):
        decode(variant, model, tokenizer, prompts, 2)  # warm-up
        start = time.perf_counter()
        steps = decode(variant, model, tokenizer, prompts, new_tokens)
        wall = time.perf_counter() - start
        results[variant] = {"steps": steps, "wall_s": wall, "step_s": wall / steps,
                            "tokens_per_s": len(prompts) * steps / wall}
    for variant in ("per_row_gumbel", "generate"):
        results[f"prefgym_over_{variant}"] = results["prefgym"]["tokens_per_s"] / results[variant]["tokens_per_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--vocabs", default="128256,512")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import transformers

    from prefgym.io import write_json
    from prefgym.models.tiny import make_tiny_tokenizer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tiny_tokenizer(tmp)
    prompts = [f"Question {i}: add {i} and {3 * i + 1}, then explain the sum." for i in range(args.batch)]
    results = {}
    for vocab in (int(v) for v in args.vocabs.split(",")):
        results[str(vocab)] = r = bench(vocab, tokenizer, prompts, args.new_tokens)
        print(f"vocab {vocab:6d}: tokens/s prefgym {r['prefgym']['tokens_per_s']:8.1f} | per-row Gumbel (before) "
              f"{r['per_row_gumbel']['tokens_per_s']:8.1f} | generate(do_sample) {r['generate']['tokens_per_s']:8.1f} "
              f"| prefgym / generate {r['prefgym_over_generate']:.2f}x, prefgym / before "
              f"{r['prefgym_over_per_row_gumbel']:.2f}x")
    write_json(args.out, {
        "command": "python " + " ".join(["bench/bench_sampler.py", *sys.argv[1:]]),
        "settings": {"batch": args.batch, "new_tokens": args.new_tokens, "threads": args.threads, "temperature": 1.0},
        "model": "random Llama, hidden 64, 2 layers; 512-token BPE tokenizer for the prompts",
        "device": "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "results": results})


if __name__ == "__main__":
    main()
