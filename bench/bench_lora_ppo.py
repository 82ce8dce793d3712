"""Peak memory and speed of PPO with LoRA against full PPO on the same model.

    python bench/bench_lora_ppo.py [--hidden 576 --layers 30 --vocab 49152] [--steps 3] [--threads 1]

The model is a random Llama shaped like SmolLM2-135M by default (hidden 576, 30 layers, 9 heads
with 3 key-value heads, MLP 1536, a 49,152-token vocabulary, tied embeddings; 135M parameters),
made from a local config with prefgym's tiny tokenizer (its token ids are a subset of the model's
vocabulary). The reward model is a sequence-classification model of the same shape. Each variant
runs `prefgym.methods.ppo.train` in a fresh process:

- `full`: every weight trained. In memory: policy, frozen reference, value model (a copy of the
  reward model), reward model, plus the gradients and AdamW moments of policy and value model.
- `lora`: `use_lora=true` (rank 16 on all linear layers). Two frozen trunks: the policy's (the
  reference is the policy with its adapters off) and the reward model's (the value model is it
  with adapters and its own head); gradients and AdamW moments only for adapters and the value
  head.

`--variants lora` runs one variant alone (e.g. with another prefgym checkout on PYTHONPATH, to
compare versions).

Memory is the peak resident set size of the process (ru_maxrss), and that peak minus the RSS
once the libraries are imported (what the run adds). Throughput is episodes per second of the
training loop (from the end of model loading to the last PPO step). Writes
bench/results/lora_ppo.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_trl import _mark_ppo_loop, now, peak_rss_mb, rss_mb  # noqa: E402

RESULTS = HERE / "results" / "lora_ppo.json"
VARIANTS = ("full", "lora")


def make_models(work: Path, args) -> tuple[Path, Path]:
    """A random Llama policy and a reward model of the same shape (one label), each with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from prefgym.models.tiny import make_tiny_tokenizer

    policy, reward = work / "policy", work / "reward_model"
    tokenizer = make_tiny_tokenizer(policy)
    tokenizer.save_pretrained(str(reward))
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_labels=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(policy))
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(str(reward))
    return policy, reward


def worker(variant: str, spec: dict) -> dict:
    """One PPO run in this process; returns its memory and throughput."""
    import torch

    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import rich.progress  # noqa: F401
    from prefgym.methods import ppo

    torch.set_num_threads(spec["threads"])
    import_rss = rss_mb()
    marks: list = []
    _mark_ppo_loop(ppo, marks)
    B, steps = spec["batch"], spec["steps"]
    prompts = [{"instruction": f"List {2 + i % 4} colors and say which one you like best, for person {i}.",
                "input": ""} for i in range(steps * B)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ppo.PPOConfig(policy_model=spec["policy"], reward_model=spec["reward_model"], output_dir=tmp,
                            steps=steps, per_device_rollout_batch_size=B, num_mini_batches=1, ppo_epochs=1,
                            max_new_tokens=spec["max_new_tokens"], use_lora=variant == "lora",
                            save_steps=10 ** 9, sample_log_steps=0, resume=False)
        ppo.train(cfg, prompts)
    step_ends = [v for k, v in marks if k == "step"]
    start = dict(marks)["loop_start"]
    loop_s = step_ends[-1][0] - start[0]
    peak = peak_rss_mb()
    return {"variant": variant, "episodes": steps * B, "loop_s": loop_s, "episodes_per_s": steps * B / loop_s,
            "step_s": [b[0] - a[0] for a, b in zip([start] + step_ends[:-1], step_ends)],
            "rss_libraries_mb": import_rss, "peak_rss_mb": peak, "peak_rss_above_libraries_mb": peak - import_rss}


def run_variant(variant: str, spec_file: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--spec", str(spec_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{variant} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=3, help="PPO steps per variant")
    parser.add_argument("--batch", type=int, default=4, help="rollout batch (one minibatch, one PPO epoch)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: full, lora")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec.read_text()))))
        return

    import torch
    import transformers

    from prefgym.io import write_json

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy, reward = make_models(work, args)
        spec = {"policy": str(policy), "reward_model": str(reward), "steps": args.steps, "batch": args.batch,
                "max_new_tokens": args.max_new_tokens, "threads": args.threads}
        (work / "spec.json").write_text(json.dumps(spec))
        results = {v: run_variant(v, work / "spec.json") for v in args.variants.split(",")}
    for v, r in results.items():
        print(f"{v:5s} peak RSS {r['peak_rss_mb']:7.0f} MiB ({r['peak_rss_above_libraries_mb']:.0f} above libraries)  "
              f"{r['episodes_per_s']:.3f} episodes/s")
    ratios = None
    if set(VARIANTS) <= results.keys():
        full, lora = results["full"], results["lora"]
        ratios = {"peak_rss": lora["peak_rss_mb"] / full["peak_rss_mb"],
                  "peak_rss_above_libraries": lora["peak_rss_above_libraries_mb"] / full["peak_rss_above_libraries_mb"],
                  "episodes_per_s": lora["episodes_per_s"] / full["episodes_per_s"]}
        print(f"lora / full: peak RSS {ratios['peak_rss']:.2f}x ({ratios['peak_rss_above_libraries']:.2f}x above "
              f"libraries), episodes/s {ratios['episodes_per_s']:.2f}x")
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "spec", "out", "variants")}
    write_json(args.out, {"command": "python " + " ".join(["bench/bench_lora_ppo.py", *sys.argv[1:]]),
                          "settings": settings,
                          "model": f"random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}",
                          "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                          "results": results, "ratios_lora_over_full": ratios})


if __name__ == "__main__":
    main()
