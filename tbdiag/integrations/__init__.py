"""Integrations with training frameworks; each is an optional extra, never imported by tbdiag's core.

- `tbdiag.integrations.hf`: a Hugging Face ``transformers.TrainerCallback`` (extra ``hf``).
- `tbdiag.integrations.lightning`: a Lightning ``Callback`` (extra ``lightning``).
- timm needs no module: its param groups carry ``lr_scale`` and its schedulers apply it, so pass
  ``apply_scale=False`` to `tbdiag.TempBalance` (README, "timm").
"""
