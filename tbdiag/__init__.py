"""tbdiag: per-layer heavy-tailed spectral diagnostics (HT-SR alpha) and TempBalance training.

The public API is imported lazily so that ``tbdiag analyze`` does not pay for what it does not use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "analyze": "tbdiag.analysis",
    "Analysis": "tbdiag.analysis",
    "AnalyzeOptions": "tbdiag.options",
    "LayerResult": "tbdiag.metrics",
    "PowerLawFit": "tbdiag.powerlaw",
    "open_checkpoint": "tbdiag.checkpoint",
    "TbdiagError": "tbdiag.errors",
    "TempBalance": "tbdiag.tempbalance",
    "param_groups": "tbdiag.tempbalance.optim",
    "load_multipliers": "tbdiag.tempbalance.recommend",
    "prune": "tbdiag.pruning",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tbdiag' has no attribute {name!r}")
