"""tbdiag: per-layer heavy-tailed spectral diagnostics (HT-SR alpha) and TempBalance training.

The public API is imported lazily so that ``tbdiag analyze`` does not pay for what it does not use.
"""

from __future__ import annotations

from tbdiag._lazy import exports

__version__ = "0.1.0"

_EXPORTS = {
    "analyze": "tbdiag.analysis.core",
    "Analysis": "tbdiag.analysis.core",
    "AnalyzeOptions": "tbdiag.analysis.options",
    "LayerResult": "tbdiag.esd.metrics",
    "PowerLawFit": "tbdiag.esd.powerlaw",
    "open_checkpoint": "tbdiag.io.checkpoint",
    "TbdiagError": "tbdiag.errors",
    "TempBalance": "tbdiag.tempbalance.balancer",
    "param_groups": "tbdiag.tempbalance.optim",
    "load_multipliers": "tbdiag.allocation.recommend",
    "prune": "tbdiag.pruning.core",
}

__all__, __getattr__ = exports(__name__, _EXPORTS)
__all__ = ["__version__", *__all__]
