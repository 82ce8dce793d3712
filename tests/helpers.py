"""Child processes for the tests: each runs in its own process group, under a deadline, and the
whole group (launcher and workers) is killed when the test fails or the deadline passes, so that
a hang (e.g. at gloo shutdown) fails the test instead of leaving orphan processes behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

DEADLINE_S = 300


def start_process(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """Popen in a new process group, text pipes for stdout and stderr."""
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s descendants and every process of its group still alive (nothing when all
    have exited). Descendants first: torchrun starts its workers in sessions of their own, out
    of reach of the group's kill, and a worker left behind would hold the output pipes open."""
    import psutil  # an Accelerate dependency

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_process(cmd: list[str], env: dict | None = None, timeout: float = DEADLINE_S,
                check: bool = False) -> subprocess.CompletedProcess:
    """Run `cmd` to completion within `timeout` seconds; the group is killed whatever happens.

    Past the deadline: the group is killed and the test fails with the tail of stderr.
    With `check`, a non-zero exit fails the test the same way.
    """
    import pytest

    proc = start_process(cmd, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process outside the group still holds the pipes
            out, err = "", "(no output: the pipes were still held open after the kill)"
        pytest.fail(f"{' '.join(cmd[:6])} ... still running after {timeout} s (killed)\n{err[-3000:]}")
    finally:
        stop_process_group(proc)  # workers left behind by a launcher that exited
    if check and proc.returncode != 0:
        pytest.fail(f"exit status {proc.returncode}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch_two_cpu_processes(script, *args) -> list[str]:
    """`accelerate launch` of 2 CPU processes (gloo). `--cpu --num_processes 2` alone starts one
    process in Accelerate 1.x (multi-CPU needs mpirun); ACCELERATE_USE_CPU=1 + the torchrun
    launcher gives real data parallelism on CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(script), *args]
