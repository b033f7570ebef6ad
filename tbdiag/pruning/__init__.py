"""Magnitude pruning with per-layer sparsities from alpha (AlphaPruning), written as a new checkpoint."""

from tbdiag._lazy import exports

__all__, __getattr__ = exports(__name__, {
    "prune": "tbdiag.pruning.core",
    "allocate": "tbdiag.pruning.core",
    "PruneOptions": "tbdiag.pruning.results",
    "PruneResult": "tbdiag.pruning.results",
    "PrunedLayer": "tbdiag.pruning.results",
})
