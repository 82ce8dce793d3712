"""Where prefgym's DPO peak memory goes on glibc: tensors in use vs free heap the allocator keeps.

    python bench/bench_dpo_heap.py [--hidden 256] [--layers 4] [--steps 30]

Runs `bench/bench_trl.py`'s prefgym DPO child (same model, data, warm-up and timed run, one torch
thread) while a thread samples the process's RSS every millisecond, and at the highest RSS reads
glibc's `mallinfo2()`: bytes in use in the heap (`uordblks`), free bytes the heap keeps
(`fordblks`) and bytes in mmapped chunks (`hblkhd`). Prints those at the peak and once the
libraries are loaded, and writes bench/results/dpo_heap.json. Linux with glibc ≥ 2.33 only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).resolve().parent / "results" / "dpo_heap.json"
MIB = 2 ** 20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def heap(libc, rss_bytes: int) -> dict:
    info = libc.mallinfo2()
    return {"rss_mb": rss_bytes / MIB, "heap_mb": info.arena / MIB, "in_use_mb": info.uordblks / MIB,
            "free_kept_mb": info.fordblks / MIB, "mmapped_mb": info.hblkhd / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed DPO optimizer steps (2 epochs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import psutil
    import torch

    import bench_trl

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy, reward_model = bench_trl.make_models(work, args.hidden, args.layers)
        pairs, _ = bench_trl.make_data(args.steps // 2 * 8, 0)
        (work / "dpo.json").write_text(json.dumps(pairs))
        spec = {"model": str(policy), "dpo_data": str(work / "dpo.json"), "dpo_batch_size": 8,
                "dpo_max_length": 128, "dpo_lr": 1e-6, "dpo_beta": 0.1}
        # The libraries, as bench_trl's child loads them before its baseline.
        import accelerate  # noqa: F401
        import peft  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prefgym.methods import dpo, ppo, reward_model as rm  # noqa: F401
        AutoTokenizer.from_pretrained(policy)
        AutoModelForCausalLM.from_pretrained(policy)
        process = psutil.Process()
        libraries = heap(libc, process.memory_info().rss)
        peak: dict = {"rss_mb": 0.0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss = process.memory_info().rss
                if rss / MIB > peak["rss_mb"]:
                    peak.update(heap(libc, rss))
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        bench_trl._mark_metrics_rows = lambda module, marks: None
        bench_trl.child_prefgym_dpo(spec, work / "warmup", 2, 1, [])
        bench_trl.child_prefgym_dpo(spec, work / "timed", args.steps, 2, [])
        done.set()
        sampler.join()
    report = {"command": "python bench/bench_dpo_heap.py " + " ".join(sys.argv[1:]), "settings": vars(args) | {
        "out": str(args.out)}, "libraries": libraries, "peak": peak,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"{'':<22}{'RSS':>8}{'heap':>8}{'in use':>8}{'free kept':>11}{'mmapped':>9}  (MiB)")
    for label, row in (("libraries loaded", libraries), ("at the peak RSS", peak)):
        print(f"{label:<22}{row['rss_mb']:>8.0f}{row['heap_mb']:>8.0f}{row['in_use_mb']:>8.0f}"
              f"{row['free_kept_mb']:>11.0f}{row['mmapped_mb']:>9.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
