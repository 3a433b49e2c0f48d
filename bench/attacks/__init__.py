"""The attacks of issue #25 as rerunnable phases, beside ``bench.soak`` (on 127.0.0.1 only).

Each module in this package is one phase: it defines ``NAME`` (the phase's name), ``HELP`` (one line) and
``run(ctx: Context) -> dict`` (what it measured, JSON-serialisable; ``"ok": bool`` says whether the issue's
target held). ``python -m bench.attacks --phases a,b`` runs them one after another, each against its own
``refinedet serve`` (``bench.soak.ServerProcess``) on its own port, prints a table and writes JSON.

    python -m bench.attacks --list
    python -m bench.attacks --phases benchmark,oip --out /tmp/attacks/attacks.json
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType


@dataclass
class Context:
    """What a phase gets: a port range of its own, a folder for logs, the server's extra environment."""

    port: int
    work_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    quick: bool = False  # fewer requests/shorter holds: a smoke run of the phase, not the measurement


def phases() -> dict[str, ModuleType]:
    """Every phase module in this package, by its ``NAME``."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found[module.NAME] = module
    return dict(sorted(found.items()))
