"""The stand-in of `vllm.distributed`: the process groups vLLM's external launcher makes and its
cleanup, which destroys them. As vLLM, the engine joins torch.distributed from the launcher's
variables (env://; RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT must be set: a world of one made if
none exists) and makes its own subgroup (vLLM: one per GroupCoordinator, _WORLD, _TP, ...);
`cleanup_dist_env_and_memory` destroys the subgroups, then the world, then collects the garbage,
and counts its calls. A cleanup after someone else destroyed the world fails as vLLM's does
(torch: "Invalid process group specified")."""

from __future__ import annotations

import gc
import os

import torch.distributed as dist

calls = 0
_groups: list = []


def _join_process_group() -> None:
    if not dist.is_initialized():
        for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise KeyError(f"fake vllm: external_launcher needs {key} in the environment")
        dist.init_process_group("gloo", init_method="env://", world_size=1, rank=int(os.environ["RANK"]))
    _groups.append(dist.new_group([0], backend="gloo"))


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    global calls
    calls += 1
    while _groups:
        dist.destroy_process_group(_groups.pop())
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
