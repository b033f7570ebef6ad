"""Which tensors are layers, their eigenvalue spectra (ESDs), power-law fits and per-layer metrics."""

from tbdiag._lazy import exports

__all__, __getattr__ = exports(__name__, {
    "plan_layers": "tbdiag.esd.layers",
    "FITS": "tbdiag.esd.powerlaw",
    "PowerLawFit": "tbdiag.esd.powerlaw",
    "LayerResult": "tbdiag.esd.metrics",
    "layer_result": "tbdiag.esd.metrics",
    "summarize": "tbdiag.esd.metrics",
})
