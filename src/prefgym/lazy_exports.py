"""Package names that load their module on first use (PEP 562), so that importing a package's
`commands` module for `prefgym --help` does not import numpy, pandas, torch or FastAPI."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, where: dict[str, list[str]]) -> tuple[list[str], Callable[[str], object]]:
    """`(__all__, __getattr__)` for `package`: each name in `where[module]` comes from `package.module`."""
    module_of = {name: module for module, names in where.items() for name in names}

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)

    return sorted(module_of), __getattr__
