"""Where prefgym's DPO peak memory goes on glibc, and what returning the allocator's free heap costs.

    python bench/bench_dpo_heap.py [--hidden 256] [--layers 4] [--steps 30] [--repeats 2]
                                   [--allocators default,trim,mmap:1048576,mmap:262144]

Runs `bench/bench_trl.py`'s prefgym DPO child (same model, data, warm-up and timed run, one torch
thread) once per allocator setting, each in its own process, while a thread samples the process's
RSS every millisecond. At the highest RSS it reads glibc's `mallinfo2()`: bytes in use in the heap
(`uordblks`), free bytes the heap keeps (`fordblks`) and bytes in mmapped chunks (`hblkhd`). It
also records the CPU seconds of the timed run and the RSS after each optimizer step.

Allocator settings (all glibc's own; prefgym's code is the same in every one):
- `default`: glibc as it comes.
- `trim`: `malloc_trim(0)` after the reference pass, after the warm-up and after every optimizer
  step (hooked into the loop's checkpoint schedule, which runs once per step).
- `mmap:N`: `mallopt(M_MMAP_THRESHOLD, N)` at start, as `MALLOC_MMAP_THRESHOLD_=N` would: blocks of
  N bytes or more are mmapped and go back to the kernel when freed (and glibc stops raising the
  threshold as it does by default).

Writes bench/results/dpo_heap.json (each setting's best CPU time and lowest peak over the repeats,
and the default setting's heap breakdown at the peak). Linux with glibc ≥ 2.33 only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).resolve().parent / "results" / "dpo_heap.json"
MIB = 2 ** 20
M_MMAP_THRESHOLD = -3


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def heap(libc, rss_bytes: int) -> dict:
    info = libc.mallinfo2()
    return {"rss_mb": rss_bytes / MIB, "heap_mb": info.arena / MIB, "in_use_mb": info.uordblks / MIB,
            "free_kept_mb": info.fordblks / MIB, "mmapped_mb": info.hblkhd / MIB}


def child(args) -> dict:
    """One measurement in this process under `args.allocator`."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    allocator = args.allocator
    if allocator.startswith("mmap:"):
        if libc.mallopt(M_MMAP_THRESHOLD, int(allocator.split(":", 1)[1])) != 1:
            raise SystemExit(f"mallopt(M_MMAP_THRESHOLD, {allocator}) refused")
    elif allocator not in ("default", "trim"):
        raise SystemExit(f"unknown allocator setting '{allocator}' (default, trim, mmap:N)")
    trim = allocator == "trim"

    import psutil
    import torch

    import bench_trl

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy, _ = bench_trl.make_models(work, args.hidden, args.layers)
        pairs, _ = bench_trl.make_data(args.steps // 2 * 8, 0)
        (work / "dpo.json").write_text(json.dumps(pairs))
        spec = {"model": str(policy), "dpo_data": str(work / "dpo.json"), "dpo_batch_size": 8,
                "dpo_max_length": 128, "dpo_lr": 1e-6, "dpo_beta": 0.1}
        # The libraries, as bench_trl's child loads them before its baseline.
        import accelerate  # noqa: F401
        import peft  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prefgym.methods import common, dpo, ppo, reward_model as rm  # noqa: F401
        AutoTokenizer.from_pretrained(policy)
        AutoModelForCausalLM.from_pretrained(policy)
        process = psutil.Process()
        libraries = heap(libc, process.memory_info().rss)
        peak: dict = {"rss_mb": 0.0}
        after_step: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss = process.memory_info().rss
                if rss / MIB > peak["rss_mb"]:
                    peak.update(heap(libc, rss))
                time.sleep(0.001)

        due = common.CheckpointSchedule.due

        def due_after_step(self, step, total):  # runs once after each optimizer step
            if trim:
                libc.malloc_trim(0)
            after_step.append(process.memory_info().rss / MIB)
            return due(self, step, total)

        reference_pass = dpo.reference_pass

        def reference_pass_then_trim(*a, **kw):
            out = reference_pass(*a, **kw)
            if trim:
                libc.malloc_trim(0)
            return out

        common.CheckpointSchedule.due = due_after_step
        dpo.reference_pass = reference_pass_then_trim
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        bench_trl._mark_metrics_rows = lambda module, marks: None
        bench_trl.child_prefgym_dpo(spec, work / "warmup", 2, 1, [])
        if trim:
            libc.malloc_trim(0)
        del after_step[:]
        cpu0 = time.process_time()
        bench_trl.child_prefgym_dpo(spec, work / "timed", args.steps, 2, [])
        cpu_s = time.process_time() - cpu0
        done.set()
        sampler.join()
    return {"allocator": allocator, "libraries": libraries, "peak": peak, "timed_cpu_s": cpu_s,
            "rss_after_step_mb": [round(r, 1) for r in after_step],
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed DPO optimizer steps (2 epochs)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per allocator setting, taking turns")
    parser.add_argument("--allocators", default="default,trim,mmap:1048576,mmap:262144")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--allocator", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.allocator:
        print(json.dumps(child(args)))
        return

    settings = args.allocators.split(",")
    runs: dict[str, list[dict]] = {a: [] for a in settings}
    for r in range(args.repeats):
        for allocator in settings:
            cmd = [sys.executable, __file__, "--allocator", allocator, "--hidden", str(args.hidden),
                   "--layers", str(args.layers), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{allocator}: child failed:\n{proc.stderr[-3000:]}")
            runs[allocator].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"repeat {r + 1}/{args.repeats} {allocator:<14} peak RSS "
                  f"{runs[allocator][-1]['peak']['rss_mb']:6.0f} MiB, {runs[allocator][-1]['timed_cpu_s']:6.2f} CPU-s",
                  flush=True)
    best = {allocator: min(rs, key=lambda x: x["peak"]["rss_mb"]) for allocator, rs in runs.items()}
    summary = {}
    for allocator, rs in runs.items():
        summary[allocator] = {"peak_rss_mb": best[allocator]["peak"]["rss_mb"], "peak": best[allocator]["peak"],
                              "timed_cpu_s": min(x["timed_cpu_s"] for x in rs),
                              "peak_rss_mb_all": [x["peak"]["rss_mb"] for x in rs],
                              "timed_cpu_s_all": [x["timed_cpu_s"] for x in rs],
                              "rss_after_step_mb": best[allocator]["rss_after_step_mb"]}
    base = summary.get("default")
    if base:
        for s in summary.values():
            s["cpu_vs_default"] = s["timed_cpu_s"] / base["timed_cpu_s"]
    default_run = best.get("default")
    report = {"command": "python bench/bench_dpo_heap.py " + " ".join(sys.argv[1:]),
              "settings": {k: v for k, v in vars(args).items() if k != "allocator"} | {"out": str(args.out)},
              "libraries": default_run["libraries"] if default_run else None,
              "peak": default_run["peak"] if default_run else None, "allocators": summary}
    print(f"\n{'allocator':<16}{'peak RSS':>9}{'in use':>8}{'free kept':>11}{'mmapped':>9}{'CPU-s':>8}{'vs default':>11}")
    for allocator, s in summary.items():
        p = s["peak"]
        print(f"{allocator:<16}{p['rss_mb']:>9.0f}{p['in_use_mb']:>8.0f}{p['free_kept_mb']:>11.0f}"
              f"{p['mmapped_mb']:>9.0f}{s['timed_cpu_s']:>8.2f}{s.get('cpu_vs_default', float('nan')):>10.2f}×")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
