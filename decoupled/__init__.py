"""decoupled: asynchronous training with decoupled neural interfaces.

``decoupled.train(config, overrides, out=...)`` runs what ``decoupled train`` runs
(``decoupled/api.py``); the CLI is a thin layer over it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazily: importing the package (as every Ray worker does) should not import the trainers.
    if name in ("train", "load"):
        from decoupled import api

        return getattr(api, name)
    raise AttributeError(f"module 'decoupled' has no attribute {name!r}")
