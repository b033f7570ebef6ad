"""Lazy re-exports for package ``__init__`` modules: ``tbdiag.analysis.analyze`` imports its module on first
use, so importing a package (or the CLI) does not pay for what it does not use, and packages never import
each other at import time (no cycles through ``__init__``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, names: Mapping[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for a package whose public ``names`` live in the given submodules."""

    def getattr_(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return list(names), getattr_
