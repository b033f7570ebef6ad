"""Spectral-norm regularisation (SNR): add strength·σ₁·u₁v₁ᵀ to each weight's gradient.

σ₁, u₁, v₁ of W viewed as out × rest come from power iteration whose vectors persist between steps
(one iteration a step, as in Yoshida & Miyato 2017), so the state is small and saved with checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from tbdiag.allocation.selection import unwrap

TUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose spectral norm SNR regularises


class SpectralNormRegularizer:
    """Call `apply` after ``loss.backward()`` and before ``optimizer.step()``."""

    def __init__(self, model: nn.Module, strength: float = 0.01, seed: int = 0, iterations: int = 1) -> None:
        self.strength, self.iterations = strength, iterations
        self.modules = [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, TUNABLE)]
        g = torch.Generator().manual_seed(seed)
        self.u = {name: nn.functional.normalize(torch.randn(m.weight.shape[0], generator=g, dtype=torch.float64), dim=0)
                  for name, m in self.modules}

    @torch.no_grad()
    def apply(self) -> None:
        """Add the regularisation term to the gradients of every Conv/Linear weight."""
        for name, m in self.modules:
            if m.weight.grad is None:
                continue
            w = m.weight.detach().flatten(1).double()  # (out, rest)
            u = self.u[name].to(w.device)
            for _ in range(self.iterations):
                v = nn.functional.normalize(w.T @ u, dim=0)  # (rest,)
                u = nn.functional.normalize(w @ v, dim=0)  # (out,)
            self.u[name] = u
            sigma = u @ w @ v
            m.weight.grad.add_((self.strength * sigma * torch.outer(u, v)).view_as(m.weight).to(m.weight.grad.dtype))

    def state_dict(self) -> dict:
        """The power-iteration vectors."""
        return {name: u.clone() for name, u in self.u.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` output."""
        self.u = {name: u.clone() for name, u in state.items()}
