"""Reading checkpoints (safetensors, PyTorch, model folders) as named lazy tensors, and writing outputs safely."""

from tbdiag._lazy import exports

__all__, __getattr__ = exports(__name__, {
    "open_checkpoint": "tbdiag.io.checkpoint",
    "check_outputs": "tbdiag.io.outputs",
    "write_outputs": "tbdiag.io.outputs",
    "atomic_save": "tbdiag.io.outputs",
})
