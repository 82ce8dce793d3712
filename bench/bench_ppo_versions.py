"""CPU time of prefgym's PPO, one source tree against another, runs interleaved.

    python bench/bench_ppo_versions.py NAME=SRC_DIR [NAME=SRC_DIR ...] [--rounds 3]

Each SRC_DIR holds a `prefgym` package (e.g. `src`, or `git archive <commit> src | tar -x -C DIR`
then `DIR/src`); each run puts it first on PYTHONPATH in a fresh process, which trains PPO on the
settings of `bench_trl.py --hidden 256 --layers 4` (8 steps of 16 episodes, 2 minibatches, 2 PPO
epochs, 32 sampled tokens, one thread) after a 2-step warm-up, and reports the process's CPU
seconds for the timed `ppo.train` (model loading and saving included). The trees take turns,
round after round, so that a machine shared with other work weighs on all of them alike; CPU
time is steadier than wall time there. Prints each tree's times and median, and the metrics of
the trees' runs compared with the first tree's (largest relative difference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(work: Path, out: Path) -> None:
    import time

    import torch

    from prefgym.methods import ppo

    torch.set_num_threads(1)
    prompts = [{"instruction": i, "input": ""} for i in json.loads((work / "instructions.json").read_text())]

    def run(steps: int, folder: Path) -> None:
        cfg = ppo.PPOConfig(policy_model=str(work / "policy"), reward_model=str(work / "reward_model"),
                            output_dir=str(folder), steps=steps, per_device_rollout_batch_size=16,
                            num_mini_batches=2, ppo_epochs=2, lr=1e-5, max_grad_norm=0.0, temperature=1.0,
                            max_new_tokens=32, kl_coef=0.05, missing_eos_penalty=-1.0, save_steps=10 ** 9,
                            sample_log_steps=0, resume=False)
        ppo.train(cfg, prompts[: steps * 16])

    run(2, out / "warmup")
    start = time.process_time()
    run(8, out / "timed")
    print(json.dumps({"cpu_s": time.process_time() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", help="NAME=SRC_DIR")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_out)
        return
    sys.path.insert(0, str(HERE))
    from bench_trl import make_data, make_models

    trees = dict(t.split("=", 1) for t in args.trees)
    times: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_models(work, 256, 4)
        (work / "instructions.json").write_text(json.dumps(make_data(0, 8 * 16)[1]))
        for r in range(args.rounds):
            for name, src in trees.items():
                out = work / f"{name}-{r}"
                env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1",
                       "TOKENIZERS_PARALLELISM": "false"}
                proc = subprocess.run([sys.executable, __file__, "--child", str(work), "--child-out", str(out)],
                                      env=env, capture_output=True, text=True, check=True)
                times[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["cpu_s"])
                print(f"round {r + 1} {name:12s} {times[name][-1]:6.2f} CPU-s", flush=True)
        rows = {name: [json.loads(line) for line in (work / f"{name}-0" / "timed" / "metrics.jsonl").read_text().splitlines()]
                for name in trees}
    first = next(iter(trees))
    for name in trees:
        worst = max((abs(a[k] - b[k]) / max(abs(a[k]), 1e-6), k) for a, b in zip(rows[first], rows[name])
                    for k in a if k != "elapsed_s")
        print(f"{name:12s} median {statistics.median(times[name]):6.2f} CPU-s  "
              f"({statistics.median(times[first]) / statistics.median(times[name]):.3f}x {first}'s speed); "
              f"metrics vs {first}: largest relative difference {worst[0]:.1e} ({worst[1]})")


if __name__ == "__main__":
    main()
