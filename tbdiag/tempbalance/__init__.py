"""TempBalance: layer-wise learning rates (or weight decay) from each layer's heavy-tail exponent alpha, inside
any optimizer. Which layers are tuned and the maps from alpha live in `tbdiag.allocation`; they are
re-exported here for convenience."""

from tbdiag._lazy import exports

__all__, __getattr__ = exports(__name__, {
    "TempBalance": "tbdiag.tempbalance.balancer",
    "param_groups": "tbdiag.tempbalance.optim",
    "MAPS": "tbdiag.allocation.maps",
    "multipliers": "tbdiag.allocation.maps",
    "METRIC_FIELDS": "tbdiag.allocation.maps",
    "DEFAULT_GROUP": "tbdiag.allocation.selection",
    "TuneOptions": "tbdiag.allocation.selection",
    "Tuned": "tbdiag.allocation.selection",
    "block_of": "tbdiag.allocation.selection",
    "tuned_layers": "tbdiag.allocation.selection",
})
