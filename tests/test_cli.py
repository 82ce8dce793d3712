"""The `prefgym` command's exit statuses: usage errors, Ctrl-C, outputs that cannot be written."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from helpers import run_process, start_process, stop_process_group

from prefgym import io
from prefgym.cli import main
from prefgym.errors import ConfigError, DataError, OutputError, PrefgymError

SAMPLES = [{"instruction": f"q{i}", "outputs": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(4)]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["sft", "--bogus"], "No such option: --bogus"),
    (["make-pairs"], "Missing argument"),
    (["run", "--seed", "abc"], "Invalid value for '--seed'"),
    (["sft", "--epochs", "1", "extra"], "unexpected extra argument"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line and "--help" in line


def test_ctrl_c_inside_a_command_exits_130_with_a_message(tmp_path, monkeypatch, capsys):
    import prefgym.pipeline

    def interrupted(cfg, overwrite=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(prefgym.pipeline, "run", interrupted)
    assert main(["run", "--scale", "quick", "--out", str(tmp_path / "run")]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "interrupted; rerun to resume"
    assert "leaderboard" not in captured.out


SLOW_COMMAND = textwrap.dedent("""
    import signal, sys, time
    import prefgym.pipeline
    # as under an interactive shell: a job started in the background (`cmd &`, e.g. CI under nohup)
    # inherits SIGINT ignored, and Python then leaves it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from prefgym.cli import main

    def slow_stage(cfg, overwrite=False):
        print("stage started", flush=True)
        time.sleep(60)

    prefgym.pipeline.run = slow_stage
    sys.exit(main(["run", "--scale", "quick", "--out", sys.argv[1]]))
""")


def test_sigint_to_a_real_process_exits_130(tmp_path):
    """`prefgym run && next` must not carry on after Ctrl-C: the shell sees 130."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_COMMAND)
    proc = start_process([sys.executable, str(script), str(tmp_path / "run")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "stage started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        stop_process_group(proc)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted; rerun to resume"


def test_a_failed_write_is_one_line_naming_the_path(tmp_path, capsys):
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps(SAMPLES))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be\n")
    target = blocker / "pairs.json"
    assert main(["make-pairs", str(samples), "--out", str(target)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(target) in line and "cannot write" in line


def test_disk_full_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    io.write_json(path, {"old": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", disk_full)
    with pytest.raises(OutputError, match="results.json: cannot write .No space left on device"):
        io.write_json(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    # appending a metrics row to a folder that cannot exist fails the same way
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="metrics.jsonl: cannot write"):
        io.append_jsonl(tmp_path / "file" / "metrics.jsonl", {"step": 1})


def test_disk_full_from_the_command_line(tmp_path, monkeypatch, capsys):
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps(SAMPLES))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", disk_full)
    assert main(["make-pairs", str(samples), "--out", str(tmp_path / "pairs.json")]) == 2
    assert "No space left on device" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "pairs.json").exists()


def test_a_top_level_json_object_is_not_a_list_of_records(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"instruction": "hi", "output": "there"}))
    with pytest.raises(DataError, match=r"one.json: expected a list of records .* got a JSON object"):
        io.read_records(path)


def test_secrets_in_environment_are_never_printed(tmp_path, monkeypatch, capsys):
    import prefgym.pipeline

    secret = "sk-live-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)

    def fails(cfg, overwrite=False):
        raise ConfigError(f"judge rejected the request with key {secret}")

    monkeypatch.setattr(prefgym.pipeline, "run", fails)
    assert main(["run", "--scale", "quick", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert secret not in err and "with key ***" in err


def test_help_still_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_a_hung_child_and_its_own_children_are_killed_at_the_deadline(tmp_path):
    """The tests' launcher: past the deadline the whole process group goes (no orphans)."""
    import time

    pid_file = tmp_path / "grandchild.pid"
    hang = ("import pathlib, subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid)); "
            "sys.stderr.write('hanging at shutdown'); sys.stderr.flush(); time.sleep(120)")
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"still running after 5 s \(killed\)\n.*hanging at shutdown"):
        run_process([sys.executable, "-c", hang], timeout=5)
    assert time.monotonic() - t0 < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed: gone, or a zombie waiting for its new parent to reap it
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("command", ["sft", "preference-data", "reward-model", "ppo", "best-of-n", "expert-iteration",
                                     "quark", "feedme", "reward-conditioning", "dpo", "rloo", "grpo", "kto", "simpo",
                                     "online-dpo"])
def test_set_survives_an_unset_named_option(command, monkeypatch):
    """`--set key=value` reaches the config even when the command has a named option for that key
    which the user left unset (an unset option is None and must not cancel the --set)."""
    from prefgym.methods import common

    seen = {}

    class Stop(PrefgymError):
        pass

    def capture(cls, path=None, overrides=None, **kwargs):
        seen.update(overrides or {})
        raise Stop("captured")

    monkeypatch.setattr(common, "load_config", capture)
    named = {"sft": "lr", "preference-data": "num_samples", "reward-model": "epochs", "ppo": "kl_coef",
             "best-of-n": "n", "expert-iteration": "n", "quark": "num_quantiles", "feedme": "lr",
             "reward-conditioning": "lr", "dpo": "beta", "rloo": "k", "grpo": "k", "kto": "beta", "simpo": "beta",
             "online-dpo": "beta"}[command]
    assert main([command, "--set", f"{named}=3", "--set", "seed=7"]) == 2
    assert seen.get(named) == 3 and seen.get("seed") == 7, seen
