"""prefgym's DPO and PPO side by side with TRL 1.9.0 (DPOTrainer, trl.experimental.ppo.PPOTrainer).

    python bench/bench_trl.py [--methods dpo,ppo] [--repeats 2] [--threads 1] [--trl-venv DIR]

Both sides train the same tiny random Llama (hidden 64, 2 layers, a locally trained 512-token
BPE tokenizer) on the same synthetic data with the same batch settings, each in its own
process: prefgym with this interpreter, TRL with the python of a separate virtual environment
(default /tmp/prefgym-bench-trl-venv, created on first use with trl==1.9.0 and torch,
transformers, accelerate, datasets, tokenizers pinned to the versions prefgym is run with).

Each process first runs a short untimed warm-up training, then the timed one. "Training loop"
time runs from the end of model loading / data preparation to the end of the last optimizer
step: for prefgym's DPO it includes the pass that computes the reference log-probs, for TRL's
DPO the reference forward passes inside every step. "End to end" adds model loading, data
preparation and saving. Memory is the peak resident set size of the process (ru_maxrss), and
that peak minus the RSS once every library the run uses is imported (and has lazily loaded
what a first tokenizer / model load pulls in): the training's own memory. Throughput is also
given per CPU-second of the training loop (one torch thread: equal to wall time on an idle
machine, and much steadier on a busy one). With --repeats > 1 the sides alternate; each measure
keeps its best value (and the median wall-time throughput).

--trl-precompute-ref runs TRL's DPO with precompute_ref_log_probs=True (prefgym's design);
--trl-no-gc makes gc.collect() a no-op on the TRL side, a diagnostic (its PPO loop calls it
twice a step).

Prints both sides and the ratios (prefgym / TRL) and writes bench/results/trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "trl.json"
DEFAULT_TRL_VENV = Path("/tmp/prefgym-bench-trl-venv")
# torch is pinned exactly (an unpinned torch pulls a multi-GB CUDA build); the others are the
# versions prefgym is run with, so that both sides run the same transformers/accelerate code.
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==1.9.0", "transformers==5.24.0", "accelerate==1.15.0",
                    "datasets==5.2.0", "tokenizers==0.23.3"]


# ---------------------------------------------------------------------------------------------
# Child processes: one side, one method; warm-up run, timed run, times and memory as JSON.


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is what a busy shared machine blurs least."""
    return time.perf_counter(), time.process_time()


def _trl_marks(marks: list):
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(("loop_start", now()))

        def on_step_end(self, args, state, control, **kw):
            marks.append(("step", now()))

    return Marks()


def child_trl_dpo(spec: dict, work: Path, steps: int, epochs: int, marks: list) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    marks.append(("start", now()))
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    pairs = json.loads(Path(spec["dpo_data"]).read_text())[: steps // epochs * spec["dpo_batch_size"]]
    dataset = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                 for p in pairs])
    args = DPOConfig(output_dir=str(work), per_device_train_batch_size=spec["dpo_batch_size"],
                     gradient_accumulation_steps=1, num_train_epochs=epochs, max_steps=steps,
                     learning_rate=spec["dpo_lr"], lr_scheduler_type="constant", beta=spec["dpo_beta"],
                     max_length=spec["dpo_max_length"], gradient_checkpointing=False, bf16=False,
                     use_cpu=True, logging_steps=10 ** 6, save_strategy="no", report_to="none",
                     disable_tqdm=True, dataloader_num_workers=0, seed=0,
                     precompute_ref_log_probs=spec["trl_precompute_ref"])
    # ref_model=None: TRL loads its own reference copy of the model (its default); with
    # precompute_ref_log_probs it computes the reference log-probs in one pass (timed as part of
    # the training loop, as prefgym's) when the trainer is made.
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        marks.append(("loop_start", now()))
        return precompute(self, *a, **kw)

    DPOTrainer._precompute_ref_logps = timed_precompute
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[_trl_marks(marks)])
    trainer.train()
    trainer.save_model(str(work / "final"))
    marks.append(("end", now()))


def child_trl_ppo(spec: dict, work: Path, steps: int, epochs: int, marks: list) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    marks.append(("start", now()))
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], dtype=torch.float32)
    B = spec["ppo_rollout_batch_size"]
    prompts = json.loads(Path(spec["ppo_prompts"]).read_text())[: steps * B]
    dataset = Dataset.from_list([{"input_ids": tokenizer(p, padding=False)["input_ids"]} for p in prompts])
    # per_device_train_batch_size = the rollout batch, split into num_mini_batches minibatches,
    # one optimizer step per minibatch (gradient_accumulation_steps=1): prefgym's layout.
    args = PPOConfig(output_dir=str(work), per_device_train_batch_size=B, gradient_accumulation_steps=1,
                     num_mini_batches=spec["ppo_mini_batches"], num_ppo_epochs=spec["ppo_epochs"],
                     total_episodes=steps * B, local_rollout_forward_batch_size=B,
                     response_length=spec["ppo_response_length"], temperature=spec["ppo_temperature"],
                     kl_coef=spec["ppo_kl_coef"], whiten_rewards=True, stop_token="eos",
                     missing_eos_penalty=1.0, num_sample_generations=0, learning_rate=spec["ppo_lr"],
                     lr_scheduler_type="constant", gradient_checkpointing=False, bf16=False, use_cpu=True,
                     logging_steps=10 ** 6, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                         eval_dataset=dataset.select(range(B)), callbacks=[_trl_marks(marks)])
    trainer.train()
    trainer.save_model(str(work / "final"))
    marks.append(("end", now()))


def _mark_metrics_rows(module, marks: list) -> None:
    """Time-stamp each metrics row a prefgym method appends (one per optimizer step / PPO step)."""
    append = module.append_jsonl

    def timed_append(path, row):
        if Path(path).name == "metrics.jsonl":
            marks.append(("step", now()))
        return append(path, row)

    module.append_jsonl = timed_append


def _mark_ppo_loop(ppo, marks: list) -> None:
    """Time-stamp PPO's steps and the end of its model loading (where its loop starts)."""
    _mark_metrics_rows(ppo, marks)
    load_models = ppo._load_models

    def timed_load_models(*a, **kw):
        out = load_models(*a, **kw)
        marks.append(("loop_start", now()))
        return out

    ppo._load_models = timed_load_models


def child_prefgym_dpo(spec: dict, work: Path, steps: int, epochs: int, marks: list) -> None:
    from prefgym.methods import dpo

    _mark_metrics_rows(dpo, marks)
    reference_logps = dpo._reference_logps

    def timed_reference_logps(*a, **kw):  # the first thing after model loading
        marks.append(("loop_start", now()))
        return reference_logps(*a, **kw)

    dpo._reference_logps = timed_reference_logps
    pairs = json.loads(Path(spec["dpo_data"]).read_text())[: steps // epochs * spec["dpo_batch_size"]]
    records = [{"instruction": p["instruction"], "input": "", "output_1": p["chosen"], "output_2": p["rejected"],
                "preference": 1} for p in pairs]
    cfg = dpo.DPOConfig(model_name_or_path=spec["model"], output_dir=str(work / "final"), epochs=epochs,
                        lr=spec["dpo_lr"], beta=spec["dpo_beta"], per_device_batch_size=spec["dpo_batch_size"],
                        max_length=spec["dpo_max_length"], save_steps=10 ** 9, resume=False)
    marks.append(("start", now()))
    dpo.train(cfg, records)
    marks.append(("end", now()))


def child_prefgym_ppo(spec: dict, work: Path, steps: int, epochs: int, marks: list) -> None:
    from prefgym.methods import ppo

    _mark_ppo_loop(ppo, marks)
    B = spec["ppo_rollout_batch_size"]
    prompts = [{"instruction": i, "input": ""} for i in json.loads(Path(spec["ppo_instructions"]).read_text())]
    cfg = ppo.PPOConfig(policy_model=spec["model"], reward_model=spec["reward_model"], output_dir=str(work / "final"),
                        steps=steps, per_device_rollout_batch_size=B, num_mini_batches=spec["ppo_mini_batches"],
                        ppo_epochs=spec["ppo_epochs"], lr=spec["ppo_lr"], max_grad_norm=0.0,  # TRL does not clip
                        temperature=spec["ppo_temperature"], max_new_tokens=spec["ppo_response_length"],
                        kl_coef=spec["ppo_kl_coef"], whiten_rewards=True, missing_eos_penalty=-1.0,
                        save_steps=10 ** 9, sample_log_steps=0, resume=False)
    marks.append(("start", now()))
    ppo.train(cfg, prompts[: steps * B])
    marks.append(("end", now()))


CHILDREN = {"trl-dpo": child_trl_dpo, "trl-ppo": child_trl_ppo,
            "prefgym-dpo": child_prefgym_dpo, "prefgym-ppo": child_prefgym_ppo}


def run_child(name: str, spec_file: Path, out_file: Path) -> None:
    """Warm-up run (untimed), then the timed run; writes times and memory to out_file."""
    import torch

    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    side, method = name.split("-")
    if side == "trl" and spec["trl_no_gc"]:
        import gc

        gc.collect = lambda *a, **kw: 0
    # Baseline RSS: every library the run imports, including what transformers imports lazily
    # on the first tokenizer / model load (one throwaway load of each).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if side == "trl":
        import datasets  # noqa: F401
        from trl import DPOTrainer  # noqa: F401
        from trl.experimental.ppo import PPOTrainer  # noqa: F401
    else:
        import accelerate  # noqa: F401
        import peft  # noqa: F401  (prefgym's save_model imports it)
        import rich.progress  # noqa: F401

        from prefgym.methods import dpo, ppo, reward_model  # noqa: F401
    AutoTokenizer.from_pretrained(spec["model"])
    AutoModelForCausalLM.from_pretrained(spec["model"])
    import_rss = rss_mb()
    steps = spec[f"{method}_steps"]
    with tempfile.TemporaryDirectory() as tmp:
        CHILDREN[name](spec, Path(tmp) / "warmup", spec["warmup_steps"], 1, [])
        marks: list = []
        CHILDREN[name](spec, Path(tmp) / "timed", steps, spec["dpo_epochs"] if method == "dpo" else 1, marks)
    t = {}
    for k, v in marks:
        t.setdefault(k, v)  # the first loop_start: a reference pass comes before the trainer's own
    step_ends = [v for k, v in marks if k == "step"]
    if len(step_ends) != steps:
        raise RuntimeError(f"{name}: expected {steps} step marks, got {len(step_ends)}")
    samples = steps * (spec["dpo_batch_size"] if method == "dpo" else spec["ppo_rollout_batch_size"])
    # training loop: from the end of loading / data preparation to the end of the last step
    loop_s, loop_cpu_s = (step_ends[-1][i] - t["loop_start"][i] for i in (0, 1))
    e2e_s = t["end"][0] - t["start"][0]
    result = {"name": name, "steps": steps, "samples": samples, "loop_s": loop_s, "loop_cpu_s": loop_cpu_s,
              "end_to_end_s": e2e_s, "samples_per_s": samples / loop_s, "samples_per_cpu_s": samples / loop_cpu_s,
              "samples_per_s_end_to_end": samples / e2e_s,
              "step_s": [b[0] - a[0] for a, b in zip([t["loop_start"]] + step_ends[:-1], step_ends)],
              "rss_libraries_mb": import_rss, "peak_rss_mb": peak_rss_mb(), "python": sys.executable}
    result["peak_rss_above_libraries_mb"] = result["peak_rss_mb"] - import_rss
    out_file.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Parent: the TRL environment, the shared model / data, the runs and the table.


def trl_python(venv: Path) -> Path:
    """The python of a virtual environment with TRL 1.9.0, created (pinned) if missing."""
    python = venv / "bin" / "python"
    # TRL 1.9.0 importable, and nothing of prefgym's environment visible from it.
    check = [str(python), "-c", "import importlib.util, trl; assert trl.__version__ == '1.9.0', trl.__version__; "
             "assert importlib.util.find_spec('prefgym') is None, 'prefgym is importable'"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if python.exists() and subprocess.run(check, capture_output=True, env=env).returncode == 0:
        return python
    print(f"creating the TRL environment in {venv} ({' '.join(TRL_REQUIREMENTS)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], check=True)
    subprocess.run(check, check=True, env=env)
    return python


def make_data(n_pairs: int, n_prompts: int) -> tuple[list[dict], list[str]]:
    """Synthetic preference pairs (instruction, prompt, chosen, rejected) and PPO instructions."""
    from prefgym.data.prompts import format_prompt

    pairs = []
    for i in range(n_pairs):
        a, b = i % 97, (7 * i) % 89
        instruction = f"Add {a} and {b}, then explain the sum in one sentence."
        chosen = f"The sum of {a} and {b} is {a + b}; adding them gives {a + b}."
        rejected = f"{a} plus {b} is {a + b + 1 + i % 5}." + (" I think so." if i % 2 else "")
        pairs.append({"instruction": instruction, "prompt": format_prompt(instruction), "chosen": chosen,
                      "rejected": rejected})
    instructions = [f"List {2 + i % 4} colors and say which one you like best, for person {i}."
                    for i in range(n_prompts)]
    return pairs, instructions


def make_models(work: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """The tiny policy (random Llama) and a reward model of the same shape (score head, 1 label)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from prefgym.models.tiny import make_tiny_checkpoint

    policy = make_tiny_checkpoint(work / "policy", "llama", hidden_size=hidden, num_layers=layers)
    config = AutoConfig.from_pretrained(policy, num_labels=1)
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.save_pretrained(work / "reward_model")
    AutoTokenizer.from_pretrained(policy).save_pretrained(work / "reward_model")
    return policy, work / "reward_model"


def run_side(python: Path, name: str, spec_file: Path, work: Path) -> dict:
    out = work / f"{name}.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if python != Path(sys.executable):
        env.pop("PYTHONPATH", None)  # TRL's side sees nothing of prefgym's; prefgym's side the parent's prefgym
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--child", name, "--spec", str(spec_file),
                           "--child-out", str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    print(f"  {name:<12} loop {result['loop_s']:6.2f} s ({result['loop_cpu_s']:.2f} CPU-s)  "
          f"{result['samples_per_s']:6.1f}/s  "
          f"peak RSS {result['peak_rss_mb']:5.0f} MiB ({result['peak_rss_above_libraries_mb']:.0f} above libraries)",
          flush=True)
    return result


def best(runs: list[dict]) -> dict:
    """Each measure's best over the repeats (highest throughput, lowest memory), and all values."""
    out = dict(min(runs, key=lambda r: r["loop_s"]))
    for k in ("samples_per_s", "samples_per_cpu_s", "samples_per_s_end_to_end"):
        out[k] = max(r[k] for r in runs)
    out["samples_per_s_median"] = statistics.median(r["samples_per_s"] for r in runs)
    for k in ("peak_rss_mb", "peak_rss_above_libraries_mb"):
        out[k] = min(r[k] for r in runs)
    for k in ("loop_s", "loop_cpu_s", "end_to_end_s", "peak_rss_mb"):
        out[k + "_all"] = [r[k] for r in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--methods", default="dpo,ppo", help="comma-separated: dpo, ppo")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each process")
    parser.add_argument("--trl-venv", type=Path, default=DEFAULT_TRL_VENV, help="TRL's virtual environment")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny Llama")
    parser.add_argument("--layers", type=int, default=2, help="layers of the tiny Llama")
    parser.add_argument("--dpo-steps", type=int, default=30, help="DPO optimizer steps")
    parser.add_argument("--dpo-epochs", type=int, default=2,
                        help="passes over the pairs (dpo-steps / dpo-epochs batches of pairs); 2 is prefgym's default")
    parser.add_argument("--dpo-batch-size", type=int, default=8, help="DPO pairs per step")
    parser.add_argument("--dpo-max-length", type=int, default=128, help="DPO prompt + response tokens kept")
    parser.add_argument("--ppo-steps", type=int, default=8, help="PPO steps (rollout batches)")
    parser.add_argument("--ppo-rollout-batch-size", type=int, default=16, help="PPO episodes per step")
    parser.add_argument("--ppo-mini-batches", type=int, default=2, help="PPO minibatches per rollout batch")
    parser.add_argument("--ppo-epochs", type=int, default=2, help="PPO epochs per rollout batch")
    parser.add_argument("--ppo-response-length", type=int, default=32, help="PPO tokens sampled per response")
    parser.add_argument("--trl-precompute-ref", action="store_true",
                        help="TRL DPO with precompute_ref_log_probs=True (off: TRL's default)")
    parser.add_argument("--trl-no-gc", action="store_true",
                        help="diagnostic: TRL with gc.collect() made a no-op (its PPO calls it twice a step)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.spec, args.child_out)
        return

    from prefgym.data.prompts import format_prompt

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    trl = trl_python(args.trl_venv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy, reward_model = make_models(work, args.hidden, args.layers)
        if args.dpo_steps % args.dpo_epochs:
            parser.error("--dpo-steps must be a multiple of --dpo-epochs")
        pairs, instructions = make_data(max(args.dpo_steps // args.dpo_epochs, args.warmup_steps) * args.dpo_batch_size,
                                        max(args.ppo_steps, args.warmup_steps) * args.ppo_rollout_batch_size)
        (work / "dpo.json").write_text(json.dumps(pairs))
        (work / "ppo_instructions.json").write_text(json.dumps(instructions))
        (work / "ppo_prompts.json").write_text(json.dumps([format_prompt(i) for i in instructions]))
        spec = {"model": str(policy), "reward_model": str(reward_model), "threads": args.threads,
                "warmup_steps": args.warmup_steps, "dpo_data": str(work / "dpo.json"),
                "dpo_steps": args.dpo_steps, "dpo_epochs": args.dpo_epochs, "dpo_batch_size": args.dpo_batch_size,
                "dpo_max_length": args.dpo_max_length, "dpo_lr": 1e-6, "dpo_beta": 0.1,
                "trl_precompute_ref": args.trl_precompute_ref, "trl_no_gc": args.trl_no_gc,
                "ppo_prompts": str(work / "ppo_prompts.json"),
                "ppo_instructions": str(work / "ppo_instructions.json"), "ppo_steps": args.ppo_steps,
                "ppo_rollout_batch_size": args.ppo_rollout_batch_size, "ppo_mini_batches": args.ppo_mini_batches,
                "ppo_epochs": args.ppo_epochs, "ppo_response_length": args.ppo_response_length,
                "ppo_temperature": 1.0, "ppo_kl_coef": 0.05, "ppo_lr": 1e-5}
        spec_file = work / "spec.json"
        spec_file.write_text(json.dumps(spec))
        results = {}
        for method in methods:
            runs = {"prefgym": [], "trl": []}
            for r in range(args.repeats):
                print(f"{method} repeat {r + 1}/{args.repeats}", flush=True)
                for side, python in (("prefgym", Path(sys.executable)), ("trl", trl)):
                    runs[side].append(run_side(python, f"{side}-{method}", spec_file, work))
            results[method] = {side: best(rs) for side, rs in runs.items()}

    import torch
    import transformers

    settings = {k: v for k, v in vars(args).items() if k not in ("child", "spec", "child_out", "out", "trl_venv")}
    report = {"command": "python bench/bench_trl.py " + " ".join(sys.argv[1:]), "settings": settings,
              "model": f"random Llama, hidden {args.hidden}, {args.layers} layers, 512-token BPE tokenizer",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": "1.9.0"},
              "results": results, "ratios": {}}
    print(f"\n{'prefgym / TRL 1.9.0':<40}{'prefgym':>10}{'TRL':>10}{'ratio':>8}   aim")
    for method, r in results.items():
        p, t = r["prefgym"], r["trl"]
        unit = "pairs/s" if method == "dpo" else "episodes/s"
        ratios = {"throughput": p["samples_per_s"] / t["samples_per_s"],
                  "throughput_median": p["samples_per_s_median"] / t["samples_per_s_median"],
                  "throughput_cpu": p["samples_per_cpu_s"] / t["samples_per_cpu_s"],
                  "throughput_end_to_end": p["samples_per_s_end_to_end"] / t["samples_per_s_end_to_end"],
                  "peak_rss": p["peak_rss_mb"] / t["peak_rss_mb"],
                  "peak_rss_above_libraries": p["peak_rss_above_libraries_mb"] / t["peak_rss_above_libraries_mb"]}
        report["ratios"][method] = ratios
        aim = "≥ 1.5"  # both methods, on equal terms (--trl-no-gc) at --hidden 256 --layers 4
        rows = [(f"{unit} (training loop, best)", "samples_per_s", "throughput", aim),
                (f"{unit} (training loop, median)", "samples_per_s_median", "throughput_median", aim),
                (f"{unit} per CPU-second (loop)", "samples_per_cpu_s", "throughput_cpu", aim),
                (f"{unit} (end to end)", "samples_per_s_end_to_end", "throughput_end_to_end", ""),
                ("peak RSS MiB", "peak_rss_mb", "peak_rss", "≤ 0.8" if method == "dpo" else ""),
                ("peak RSS above libraries MiB", "peak_rss_above_libraries_mb", "peak_rss_above_libraries", "")]
        for label, key, ratio, aim in rows:
            print(f"{method.upper() + ' ' + label:<40}{p[key]:>10.1f}{t[key]:>10.1f}{ratios[ratio]:>8.2f}   {aim}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.replace(args.out)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
