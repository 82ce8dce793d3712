"""Sub-commands whose module is imported only when the command runs or shows its own help.

The learning methods' modules import torch and transformers at the top (seconds). So that
`prefgym --help` stays fast, each method command is registered as a stand-in that carries the
command's name and docstring, read from the module's source without running it, and that hands
its arguments to the real command (importing the module) when invoked.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import typer

_FORWARD = {"ignore_unknown_options": True, "allow_extra_args": True}  # all arguments go to the real command


def declared_commands(module: str) -> list[tuple[str, str]]:
    """(name, docstring) of each `@app.command(...)` inside `add_commands` in `module`'s source."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return []
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    adders = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "add_commands"]
    found = []
    for node in ast.walk(adders[0]) if adders else ():
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "command":
                    name = deco.args[0].value if deco.args and isinstance(deco.args[0], ast.Constant) \
                        else node.name.replace("_", "-")
                    found.append((name, ast.get_docstring(node) or ""))
    return found


def add_lazy_commands(app: typer.Typer, modules: list[str]) -> None:
    """Register every command of `modules` on `app` without importing them.

    A module whose commands cannot be read from its source is imported and registered as usual.
    """
    for module in modules:
        commands = declared_commands(module)
        if not commands:
            importlib.import_module(module).add_commands(app)
            continue
        for name, doc in commands:
            app.command(name, help=doc, context_settings=_FORWARD, add_help_option=False)(_forwarder(module, name))


def real_command(module: str, name: str):
    """The click command `name` that `module.add_commands` registers (imports the module)."""
    sub = typer.Typer(add_completion=False)
    importlib.import_module(module).add_commands(sub)
    command = typer.main.get_command(sub)
    if hasattr(command, "get_command"):  # several commands: a group
        command = command.get_command(None, name)
    return command


def _forwarder(module: str, name: str):
    def forward(ctx: typer.Context):
        command = real_command(module, name)
        with command.make_context(name, list(ctx.args), parent=ctx.parent) as sub_ctx:
            return command.invoke(sub_ctx)

    forward.__name__ = f"{name.replace('-', '_')}_command"
    return forward
