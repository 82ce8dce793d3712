"""The stand-in of `vllm.distributed`'s cleanup: collects the garbage (the real one also destroys
vLLM's process groups and empties the CUDA cache) and counts its calls."""

from __future__ import annotations

import gc

calls = 0


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    global calls
    calls += 1
    gc.collect()
