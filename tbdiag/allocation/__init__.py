"""The rules every action shares: which layers are tuned or pruned and in which units (selection), maps from
alpha to multipliers, allocators of weight decay, sparsity and LoRA ranks, and `recommend` documents."""

from tbdiag._lazy import exports

__all__, __getattr__ = exports(__name__, {
    "TuneOptions": "tbdiag.allocation.selection",
    "tuned_layers": "tbdiag.allocation.selection",
    "block_of": "tbdiag.allocation.selection",
    "multipliers": "tbdiag.allocation.maps",
    "MAPS": "tbdiag.allocation.maps",
    "sparsity": "tbdiag.allocation.allocators",
    "lora_ranks": "tbdiag.allocation.allocators",
    "peft_patterns": "tbdiag.allocation.allocators",
    "recommend": "tbdiag.allocation.recommend",
    "load_multipliers": "tbdiag.allocation.recommend",
})
