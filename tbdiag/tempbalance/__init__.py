"""TempBalance: layer-wise learning rates from each layer's heavy-tail exponent alpha."""

from tbdiag.tempbalance.balancer import METRICS, TempBalance
from tbdiag.tempbalance.maps import MAPS, multipliers
from tbdiag.tempbalance.optim import param_groups
from tbdiag.tempbalance.tuned import DEFAULT_GROUP, TuneOptions, Tuned, block_of, tuned_layers

__all__ = ["TempBalance", "METRICS", "MAPS", "DEFAULT_GROUP", "TuneOptions", "Tuned", "block_of", "multipliers",
           "param_groups", "tuned_layers"]
