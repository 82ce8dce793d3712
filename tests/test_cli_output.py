"""The command line as a tool in a pipe: fast help, help that says what each command writes,
results on stdout and progress on stderr."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import typer

from prefgym.cli import _build_app
from prefgym.lazy_commands import declared_commands, real_command
from prefgym.methods.commands import METHOD_MODULES

HEAVY = ("torch", "transformers", "pandas", "matplotlib", "scipy", "fastapi")


PREFGYM = str(Path(sys.executable).with_name("prefgym"))  # the installed command, as users run it


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def _prefgym(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PREFGYM, *args], capture_output=True, text=True, timeout=120)


def test_building_the_app_and_help_import_no_heavy_library():
    code = ("import sys\nfrom prefgym.cli import _build_app, main\n_build_app()\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert main(['--help']) == 0\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert "sft" in result.stdout and "dpo" in result.stdout and "Commands" in result.stdout


def _leaf_commands(group, path=()):
    for name in group.list_commands(None):
        command = group.get_command(None, name)
        if hasattr(command, "list_commands"):
            yield from _leaf_commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_command_says_what_it_writes():
    commands = dict(_leaf_commands(typer.main.get_command(_build_app())))
    assert {"run", "sft", "ppo", "dpo", "annotate", "leaderboard", "world build", "world info"} <= set(commands)
    silent = [name for name, command in commands.items() if "writes" not in (command.help or "").lower()]
    assert not silent, f"help of {silent} does not say what the command writes (or 'writes nothing')"


RICH_TAG = re.compile(r"(?<!\\)\[[a-z#/@][^\[]*?\]")
"""What rich's markup takes for a style tag and drops from the help (`pip install 'prefgym[vllm]'`
shows as `pip install 'prefgym'`): a bracket not escaped as `\\[`."""


def test_no_help_text_loses_a_bracket_to_rich_markup():
    commands = dict(_leaf_commands(typer.main.get_command(_build_app())))
    for module in METHOD_MODULES:  # the real commands behind the lazy stand-ins
        commands.update({name: real_command(module, name) for name, _ in declared_commands(module)})
    eaten = [(name, match) for name, command in commands.items()
             for text in [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
             for match in RICH_TAG.findall(text)]
    assert not eaten, f"help text rich would render without these brackets (escape them as \\[): {eaten}"
    assert RICH_TAG.findall("pip install 'prefgym[vllm]'") and not RICH_TAG.findall("pip install 'prefgym\\[vllm]'")


def test_lazy_method_commands_match_the_modules():
    """The stand-ins listed by `prefgym --help` carry each real command's name and help."""
    for module in METHOD_MODULES:
        sub = typer.Typer()
        __import__(module, fromlist=["add_commands"]).add_commands(sub)
        real = {info.name: info.callback.__doc__ for info in sub.registered_commands}
        declared = dict(declared_commands(module))
        assert set(declared) == set(real), module
        for name, doc in declared.items():
            assert real_command(module, name).help.strip() == doc.strip()


def test_a_method_command_gets_its_arguments_and_help(tmp_path):
    result = _prefgym("feedme", "--help")
    assert result.returncode == 0 and "Usage: prefgym feedme" in result.stdout and "--preferences" in result.stdout
    missing = tmp_path / "missing.json"
    result = _prefgym("feedme", "--model", str(tmp_path), "--preferences", str(missing),
                  "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and str(missing) in result.stderr  # the real command read its options
    result = _prefgym("feedme", "--no-such-option")
    assert result.returncode == 2 and "--no-such-option" in result.stderr and "prefgym feedme --help" in result.stderr


def test_progress_goes_to_stderr_and_results_to_stdout(tmp_path):
    pairs = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output_1": str(2 * i + 1),
              "output_2": f"I think it is {i}"} for i in range(6)]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    annotated = tmp_path / "annotated.json"
    result = _prefgym("annotate", str(tmp_path / "pairs.json"), "--annotators", "world_pool",
                  "--cache-dir", str(tmp_path / "cache"), "--out", str(annotated))
    assert result.returncode == 0, result.stderr
    assert "annotating" in result.stderr and "6/6" in result.stderr  # the progress bar
    assert "annotating" not in result.stdout
    # stdout of `leaderboard --format csv` is the CSV and nothing else: it parses, one row, and
    # the progress/notice text is not in it
    result = _prefgym("leaderboard", str(annotated), "--format", "csv", "--no-lc")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(io.StringIO(result.stdout), index_col=0)
    assert len(table) == 1 and 0 <= table["win_rate"].iloc[0] <= 100
    assert table["n_total"].iloc[0] == 6


def test_training_progress_bars_draw_on_stderr():
    from prefgym.methods.common import make_progress
    from prefgym.progress import stderr_console

    progress = make_progress()
    assert progress.console is stderr_console() and progress.console.file is sys.stderr


@pytest.mark.parametrize("argv", [["--help"], ["world", "--help"]])
def test_help_is_plain_stdout(argv):
    result = _prefgym(*argv)
    assert result.returncode == 0 and result.stderr == "" and "Usage: prefgym" in result.stdout
