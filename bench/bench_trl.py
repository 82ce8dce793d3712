"""prefgym's DPO and PPO against TRL 1.9.0 (DPOTrainer; the last PPO trainer, trl.experimental.ppo).

The same tiny Llama, data and batch settings are used for both libraries. Each run happens in its
own process, so peak memory (ru_maxrss) is that run's alone. TRL goes into its own virtual
environment (created on first use with torch==2.13.0 and trl==1.9.0). The script prints
throughput (DPO pairs/s, PPO episodes/s), peak RSS and RSS growth during training, side by side
with the ratios.

    python bench/bench_trl.py                     # both methods
    python bench/bench_trl.py --only dpo --pairs 512 --threads 2

Timing: prefgym's time is its whole `train()` call (including the one pass of reference
log-probs); TRL's is `trainer.train()` (its dataset preprocessing is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

TRL_VENV = Path(os.environ.get("PREFGYM_TRL_VENV", "/tmp/prefgym-trl-venv"))
WORDS = "good bad fine the a cat dog runs sits very small large red blue one two three".split()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------- setup


def setup(work: Path, args) -> None:
    """Tiny Llama + tokenizer (policy), a reward model from it, pairs and prompts."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from prefgym.data.prompts import format_prompt
    from prefgym.io import write_json
    from prefgym.models.tiny import make_tiny_checkpoint

    policy = make_tiny_checkpoint(work / "policy", hidden_size=args.hidden, num_layers=args.layers)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    rm.config.pad_token_id = rm.config.pad_token_id or 0
    rm.save_pretrained(work / "rm")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(policy).save_pretrained(work / "rm")
    write_json(work / "rm" / "reward_normalization.json", {"mean": 0.0, "std": 1.0, "max_length": args.max_length})
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    pairs = [{"instruction": f"Describe {text(3)}.", "input": "", "output_1": text(rng.randint(8, 24)),
              "output_2": text(rng.randint(8, 24)), "preference": rng.choice([1, 2])} for _ in range(args.pairs)]
    write_json(work / "pairs.json", pairs)
    write_json(work / "trl_pairs.json", [
        {"prompt": format_prompt(p["instruction"]),
         "chosen": p["output_1"] if p["preference"] == 1 else p["output_2"],
         "rejected": p["output_2"] if p["preference"] == 1 else p["output_1"]} for p in pairs])
    prompts = [{"instruction": f"Describe {text(3)}.", "input": ""} for _ in range(args.episodes)]
    write_json(work / "prompts.json", prompts)
    write_json(work / "trl_prompts.json", [format_prompt(p["instruction"]) for p in prompts])


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "import trl, torch; assert trl.__version__ == '1.9.0' and torch.__version__.startswith('2.13.0')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    # torch pinned (a CPU build, from the PyTorch CPU index); never an unpinned torch.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0",
                    "--index-url", "https://download.pytorch.org/whl/cpu"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "trl==1.9.0"], check=True)
    subprocess.run(check, check=True)
    return python


# ----------------------------------------------------------------------------------- runs (child processes)


def run_prefgym_dpo(work: Path, args) -> dict:
    from prefgym.io import read_records
    from prefgym.methods import dpo

    records = read_records(work / "pairs.json")
    cfg = dpo.DPOConfig(model_name_or_path=str(work / "policy"), output_dir=str(work / "out_prefgym_dpo"),
                        beta=0.1, lr=1e-4, epochs=1, per_device_batch_size=args.batch, max_length=args.max_length,
                        resume=False, save_steps=10**9)
    base = rss_mb()
    t = time.perf_counter()
    dpo.train(cfg, records=records)
    return {"seconds": time.perf_counter() - t, "items": len(records) // args.batch * args.batch, "rss_base_mb": base}


def run_trl_dpo(work: Path, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = json.loads((work / "trl_pairs.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(work / "policy")
    model = AutoModelForCausalLM.from_pretrained(work / "policy")
    cfg = DPOConfig(output_dir=str(work / "out_trl_dpo"), per_device_train_batch_size=args.batch, num_train_epochs=1,
                    learning_rate=1e-4, beta=0.1, max_length=args.max_length, report_to="none", save_strategy="no",
                    logging_steps=10**6, use_cpu=True, dataloader_num_workers=0, lr_scheduler_type="constant")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    base = rss_mb()
    t = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - t, "items": len(rows) // args.batch * args.batch, "rss_base_mb": base}


def run_prefgym_ppo(work: Path, args) -> dict:
    from prefgym.io import read_records
    from prefgym.methods import ppo

    prompts = read_records(work / "prompts.json")
    cfg = ppo.PPOConfig(policy_model=str(work / "policy"), reward_model=str(work / "rm"),
                        output_dir=str(work / "out_prefgym_ppo"), steps=args.episodes // args.batch,
                        per_device_rollout_batch_size=args.batch, num_mini_batches=1, ppo_epochs=args.ppo_epochs,
                        lr=1e-5, max_new_tokens=args.response_length, max_prompt_length=args.max_length,
                        kl_coef=0.05, temperature=1.0, resume=False, save_steps=10**9, sample_log_steps=0)
    base = rss_mb()
    t = time.perf_counter()
    ppo.train(cfg, prompts=prompts)
    return {"seconds": time.perf_counter() - t, "items": cfg.steps * args.batch, "rss_base_mb": base}


def run_trl_ppo(work: Path, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    prompts = json.loads((work / "trl_prompts.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    ds = Dataset.from_list([{"input_ids": tokenizer(p)["input_ids"]} for p in prompts])
    policy = AutoModelForCausalLM.from_pretrained(work / "policy")
    ref = AutoModelForCausalLM.from_pretrained(work / "policy")
    rm = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1)
    episodes = args.episodes // args.batch * args.batch
    cfg = PPOConfig(output_dir=str(work / "out_trl_ppo"), per_device_train_batch_size=args.batch,
                    gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=args.ppo_epochs,
                    total_episodes=episodes, response_length=args.response_length, stop_token="eos",
                    temperature=1.0, kl_coef=0.05, learning_rate=1e-5, local_rollout_forward_batch_size=args.batch,
                    num_sample_generations=0, report_to="none", save_strategy="no", use_cpu=True,
                    missing_eos_penalty=-1.0, logging_steps=10**6)
    trainer = PPOTrainer(args=cfg, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=ds, value_model=value)
    base = rss_mb()
    t = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - t, "items": episodes, "rss_base_mb": base}


RUNS = {"prefgym-dpo": run_prefgym_dpo, "trl-dpo": run_trl_dpo, "prefgym-ppo": run_prefgym_ppo, "trl-ppo": run_trl_ppo}


def child(name: str, work: Path, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = RUNS[name](work, args)
    result.update(peak_rss_mb=rss_mb(), per_s=result["items"] / result["seconds"])
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------- driver


def launch(name: str, python: str, work: Path, argv: list[str], args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true"}
    proc = subprocess.run([python, __file__, "--child", name, "--work", str(work), *argv], env=env,
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["dpo", "ppo"], help="Benchmark one method only.")
    p.add_argument("--work", type=Path, default=Path("/tmp/prefgym-bench-trl"), help="Scratch folder.")
    p.add_argument("--hidden", type=int, default=128, help="Hidden size of the tiny Llama.")
    p.add_argument("--layers", type=int, default=2, help="Layers of the tiny Llama.")
    p.add_argument("--pairs", type=int, default=256, help="DPO pairs (one epoch).")
    p.add_argument("--episodes", type=int, default=64, help="PPO episodes.")
    p.add_argument("--batch", type=int, default=8, help="DPO pairs / PPO rollouts per step.")
    p.add_argument("--max-length", type=int, default=128, help="Max prompt+response tokens (DPO), prompt tokens (PPO).")
    p.add_argument("--response-length", type=int, default=24, help="PPO tokens sampled per response.")
    p.add_argument("--ppo-epochs", type=int, default=2, help="PPO epochs per rollout batch.")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.child:
        return child(args.child, args.work, args)

    argv = [a for a in sys.argv[1:]]
    args.work.mkdir(parents=True, exist_ok=True)
    setup(args.work, args)
    trl_python = str(ensure_trl_venv())
    import trl  # noqa: F401  (only for the version line below when installed here too)

    methods = [args.only] if args.only else ["dpo", "ppo"]
    unit = {"dpo": "pairs/s", "ppo": "episodes/s"}
    print(f"tiny llama hidden={args.hidden} layers={args.layers} batch={args.batch} threads={args.threads}")
    print(f"{'method':6} {'library':8} {'throughput':>16} {'peak RSS MB':>12} {'RSS growth MB':>14}")
    for m in methods:
        ours = launch(f"prefgym-{m}", sys.executable, args.work, argv, args)
        theirs = launch(f"trl-{m}", trl_python, args.work, argv, args)
        for lib, r in (("prefgym", ours), ("trl", theirs)):
            print(f"{m:6} {lib:8} {r['per_s']:>10.2f} {unit[m]:>5} {r['peak_rss_mb']:>12.0f} "
                  f"{r['peak_rss_mb'] - r['rss_base_mb']:>14.0f}")
        growth = (ours["peak_rss_mb"] - ours["rss_base_mb"]) / max(1e-9, theirs["peak_rss_mb"] - theirs["rss_base_mb"])
        print(f"{m:6} ratio    throughput x{ours['per_s'] / theirs['per_s']:.2f}   peak RSS x{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}"
              f"   RSS growth x{growth:.2f}   (prefgym / TRL)")


if __name__ == "__main__":
    main()
