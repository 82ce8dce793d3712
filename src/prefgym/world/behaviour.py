"""A fingerprint of how the built-in world's people behave: the code of its judges, humans and gold.

Answers of the world's simulated judges and humans are cached (the annotation cache), keyed by the
judge's config. Those configs name a judge ("world-judge-06") but not its weights, which live in
code: `behaviour_hash()` covers that code, so a cache filled before the world's people changed is
not read as if they had not.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_MODULES = ("judges.py", "humans.py", "gold.py", "families.py")
"""The files whose code decides what a world judge or human answers."""


@functools.lru_cache(maxsize=1)
def behaviour_hash() -> str:
    """16 hex digits of the SHA-256 of the world modules that decide judges' and humans' answers."""
    h = hashlib.sha256()
    for name in _MODULES:
        h.update(name.encode())
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]
