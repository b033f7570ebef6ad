"""The TempBalance multipliers a report shows: those ``tbdiag recommend FILE`` gives with its defaults.

``tbdiag recommend`` analyses with the ``median`` fit (TempBalance's) and maps alpha linearly onto 0.5–1.5,
one unit per layer, first and last layer and layers under 50 eigenvalues left out (`recommend`'s defaults).
A report's page usually holds ``ks`` alphas (the fit the HT-SR bands are calibrated on): with the layers'
eigenvalues at hand they are refitted with ``median`` for the multipliers; without them (a saved analysis
JSON) the page shows its own fit's multipliers and says plainly that they are not those numbers. Any other
option of the page's analysis that changes alpha is named too.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from tbdiag.allocation.recommend import DEFAULT_FITS, recommend
from tbdiag.analysis.core import Analysis
from tbdiag.analysis.export import jsonable
from tbdiag.analysis.options import PRECISIONS, AnalyzeOptions
from tbdiag.errors import TbdiagError
from tbdiag.esd.metrics import layer_result, summarize

log = logging.getLogger(__name__)

FIT = DEFAULT_FITS["lr"]  # median
# Options of an analysis that change the alphas recommend reads (device, key, seeds … do not).
ALPHA_OPTIONS = ("xmin_pos", "conv_norm", "min_evals", "include", "exclude", "precision", "split_qkv", "estimator",
                 "farms_window", "farms_per_dim", "farms_ratio")


def refit(a: Analysis, fit: str) -> Analysis | None:
    """The analysis with every layer refitted with ``fit`` from its kept eigenvalues, as `analyze` would have
    fitted it; None when some layer's eigenvalues are not kept (a saved analysis)."""
    if any(r.name not in a.spectra for r in a.layers):
        return None
    options = dataclasses.replace(a.options, fit=fit)
    dtype = PRECISIONS[options.precision]
    rows = []
    for r in a.layers:
        evals = torch.from_numpy(a.spectra[r.name]).to(dtype)  # stored as float64: exact for float32 too
        zero_rtol = max(r.shape[0], r.shape[1]) * torch.finfo(dtype).eps  # as `measure_layers`
        new = layer_result(r.name, r.kind, r.shape, evals, fit=fit, fit_kwargs=options.fit_kwargs(),
                           min_evals=options.min_evals, zero_rtol=zero_rtol)
        rows.append(dataclasses.replace(new, warning=r.warning))
    summary = dict(summarize(rows, fit), skipped=a.summary["skipped"])  # every analysis has it
    return dataclasses.replace(a, options=options, layers=tuple(rows), summary=summary)


def differences(a: Analysis) -> list[str]:
    """The options of ``a`` (other than the fit) that ``tbdiag recommend`` with its defaults would not use."""
    ours, theirs = a.options, AnalyzeOptions(fit=FIT)
    return [f"{name} {getattr(ours, name)!r} (recommend: {getattr(theirs, name)!r})" for name in ALPHA_OPTIONS
            if getattr(ours, name) != getattr(theirs, name)]


def multipliers_view(a: Analysis) -> dict:
    """``multipliers`` (the ``tbdiag.multipliers/v1`` document or None), ``same`` (whether they are the numbers
    ``tbdiag recommend`` gives for the file), and ``note`` (how they were made, or why there are none)."""
    basis, how = a, f"from this analysis' {FIT} fit"
    if a.options.fit != FIT:
        basis = refit(a, FIT)
        how = f"refitted with {FIT} from the eigenvalues of this page (its alphas are {a.options.fit})"
    if basis is None:
        basis = a
        how = (f"from this analysis' {a.options.fit} fit, NOT the numbers tbdiag recommend gives: it fits {FIT}, and "
               "a saved analysis keeps no eigenvalues to refit; run tbdiag recommend on the checkpoint for those")
    other = differences(a)
    if other:
        how += "; this analysis also used " + ", ".join(other) + ", so tbdiag recommend's numbers differ"
    try:
        doc = jsonable(recommend(basis))
    except TbdiagError as exc:
        return {"multipliers": None, "same": False, "note": str(exc)}
    same = basis.options.fit == FIT and not other
    return {"multipliers": doc, "same": same, "note": how}
