"""TempBalance: layer-wise learning rates from each layer's heavy-tail exponent alpha."""

from tbdiag.tempbalance.balancer import METRICS, TempBalance
from tbdiag.tempbalance.groups import DEFAULT_GROUP, block_of, param_groups, select_layers
from tbdiag.tempbalance.maps import MAPS, multipliers

__all__ = ["TempBalance", "METRICS", "MAPS", "DEFAULT_GROUP", "block_of", "multipliers", "param_groups",
           "select_layers"]
