"""``AnalyzeOptions``: everything that decides an analysis' numbers, checked where it is made (the one
place its ranges are stated: the CLI passes numbers through and reports these checks with its flags)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tbdiag.errors import TbdiagError
from tbdiag.esd.powerlaw import FITS
from tbdiag.esd.spectrum import resolve_device

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
# Options that are the user's, never a document's: a permission to run code from checkpoints, and where to
# compute. A saved analysis never carries them into another run (`tbdiag.analysis.export`).
USER_ONLY = ("trust_pickle", "device")
MAX_PEAK_BINS = 1_000_000  # a histogram of the log-spectrum: more bins than eigenvalues only empties them
FEWEST_EVALS = 2  # a power-law fit needs at least this many eigenvalues: every min_evals is checked against it
FEWEST_EVALS_RULE = f"must be at least {FEWEST_EVALS} (a fit needs {FEWEST_EVALS} eigenvalues)"


@dataclass(frozen=True)
class AnalyzeOptions:
    """Everything that decides an analysis' numbers. Written into the JSON as ``options``.

    Attributes:
        fit: power-law estimator: ``median`` (reference default), ``ks`` or ``peak``.
        xmin_pos: for ``median``, xmin is the eigenvalue at index ⌊N / xmin_pos⌋.
        conv_norm: convolution slices are scaled by √conv_norm (eigenvalues by conv_norm).
        min_evals: layers with fewer eigenvalues are measured but not fitted (status ``too_few_evals``).
        include: glob patterns of layer names to keep (all when empty).
        exclude: glob patterns of layer names to drop.
        include_embeddings: analyse embedding matrices too.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: compute dtype of the Gram matrix and eigensolver, ``float64`` or ``float32``.
        peak_bins: histogram bins of the ``peak`` estimator.
        peak_lower_bound_quirk: reproduce the reference ``peak`` implementation's lower bound.
        key: dotted entry of a nested checkpoint that holds the weights (found automatically when None).
        trust_pickle: allow arbitrary unpickling / TorchScript (trusted files only).
        split_qkv: analyse fused query/key/value matrices as three parts.
        estimator: ``full`` (the whole matrix's ESD) or ``farms`` (pooled ESD of fixed-aspect-ratio windows).
        farms_window: FARMS window rows (0: half the smaller side).
        farms_per_dim: FARMS windows along each side.
        farms_ratio: FARMS window columns per row (1: square).
        randomize: also the ESD of each layer with its entries permuted, ``rand_distance`` and the
            correlation traps (`tbdiag.esd.randomize`; the full estimator only).
        seed: seed of the permutations (with the layer name).
    """

    fit: str = "ks"
    xmin_pos: float = 2.0
    conv_norm: float = 0.5
    min_evals: int = 10
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_embeddings: bool = False
    device: str = "auto"
    precision: str = "float64"
    peak_bins: int = 100
    peak_lower_bound_quirk: bool = False
    key: str | None = None
    trust_pickle: bool = False
    split_qkv: bool = False
    estimator: str = "full"
    farms_window: int = 0
    farms_per_dim: int = 4
    farms_ratio: float = 1.0
    randomize: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        finite = {name: math.isfinite(getattr(self, name)) for name in ("xmin_pos", "conv_norm", "farms_ratio")}
        checks = [  # in order: the first that fails is reported
            ("fit", self.fit in FITS, f"unknown estimator; use one of {', '.join(FITS)}"),
            ("xmin_pos", finite["xmin_pos"] and self.xmin_pos >= 1,
             "must be a finite number of at least 1 (2 puts xmin at the median)"),
            ("conv_norm", finite["conv_norm"], "must be a finite positive number (the reference uses 0.5)"),
            ("conv_norm", self.conv_norm > 0, "must be positive (the reference uses 0.5)"),
            ("min_evals", self.min_evals >= FEWEST_EVALS, FEWEST_EVALS_RULE),
            ("peak_bins", 1 <= self.peak_bins <= MAX_PEAK_BINS,
             f"needs 1 to {MAX_PEAK_BINS:,} bins (the default is 100)"),
            ("precision", self.precision in PRECISIONS, "use float64 or float32"),
            ("estimator", self.estimator in ("full", "farms"), "use full or farms"),
            ("farms_window", self.farms_window >= 0, "must be 0 (half the smaller side) or more"),
            ("farms_per_dim", self.farms_per_dim >= 1, "must be at least 1"),
            ("farms_ratio", finite["farms_ratio"] and self.farms_ratio > 0,
             "must be a finite positive number (1: square windows)"),
        ]
        resolve_device(self.device)  # an unknown or absent device is refused before any work
        for name, ok, why in checks:
            if not ok:
                flag = {"farms_per_dim": "--farms-windows"}.get(name, "--" + name.replace("_", "-"))
                raise TbdiagError(f"{name} {getattr(self, name)}: {why}", cli={f"{name} ": f"{flag} "})
        if self.randomize and self.estimator != "full":
            raise TbdiagError("randomize compares the full ESD with its shuffled twin; it does not apply to the "
                              f"{self.estimator} estimator: use the full estimator",
                              cli={"randomize": "--randomize", "the full estimator": "--estimator full"})
        if not 0 <= self.seed < 2 ** 32:  # the permutations' generator reads 32 bits (`tbdiag.esd.randomize`)
            raise TbdiagError(f"seed {self.seed}: must be a whole number from 0 to 2^32 − 1", cli={"seed ": "--seed "})

    def fit_kwargs(self) -> dict[str, Any]:
        """Arguments of the chosen estimator."""
        if self.fit == "median":
            return {"xmin_pos": self.xmin_pos}
        if self.fit == "peak":
            return {"bins": self.peak_bins, "lower_bound_quirk": self.peak_lower_bound_quirk}
        return {}
