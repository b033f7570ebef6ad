"""What fine-tuning did: weight deltas against a base, LoRA adapters, and diffs of two analyses."""

from tbdiag._lazy import exports

__all__, __getattr__ = exports(__name__, {
    "diff": "tbdiag.finetune.diff",
    "open_adapter": "tbdiag.finetune.lora",
    "adapter_folder": "tbdiag.io.checkpoint",
})
