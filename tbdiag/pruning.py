"""``prune(source, out, sparsity=S)``: unstructured magnitude pruning with per-layer sparsities from alpha
(AlphaPruning, Lu et al., NeurIPS 2024), written as a new safetensors checkpoint one tensor at a time.

**Which layers** (`tbdiag.tempbalance.tuned`, the one rule of `recommend` and `TempBalance`): Linear and Conv
weights, embeddings never; the input and output layers are left dense unless ``prune_first_last`` — in a model
of numbered blocks every layer outside the blocks, as AlphaPruning prunes the linear layers of the transformer
blocks and neither the embeddings nor the LM head; otherwise the first and the last layer — and so are layers
with fewer than ``min_evals`` eigenvalues. **Unit** ``layer`` (a sparsity per weight tensor) or ``block`` (the
block's mean alpha, one sparsity per block, its layers' sizes summed; AlphaPruning's ``block_wise``).

**Alphas**: the ``peak`` fit by default, AlphaPruning's ``alpha_peak`` (its ``xmin_peak`` "fix fingers": the
KS search restricted to xmin within 0.95–1.5× the mode of the log-spectrum); ``peak_lower_bound_quirk``
reproduces the reference code's lower bound (log10 of the bound compared with linear eigenvalues).

**Allocation**: ``alpha`` — `tbdiag.tempbalance.allocate.sparsity`, ratios linear in alpha over [1 − ε, 1 + ε]
rescaled so that the parameter-weighted mean sparsity is exactly S (higher alpha, i.e. less heavy-tailed,
more pruned, as in the paper's code); ``uniform`` — S for every layer.

**Pruning**: each tensor loses exactly round(s·n) entries, those of smallest |w| (ties broken by lowest flat
index; NaN counts as the largest magnitude), so the realised mean is within half an entry per layer of S.

**Output**: safetensors, never over the input, written to temporaries and renamed all at once (the weights
and the ``tbdiag.allocation/v1`` JSON). A safetensors input keeps its layout byte for byte (same header
entries and data offsets, every other tensor copied in chunks); a sharded input gives a folder of shards
mirroring it, with its index. PyTorch inputs (read with ``weights_only=True``) become safetensors with the
state-dict names, ordered by dtype size in the file and by model order in ``tbdiag_order``. At most one
input tensor is held at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from tbdiag import __version__
from tbdiag.analysis import AnalyzeOptions, measure_layers
from tbdiag.checkpoint import _folder_shards, _index_shards, _order_key  # the reader's own rules, not copies
from tbdiag.checkpoint import clean_name, open_checkpoint, order_metadata
from tbdiag.errors import TbdiagError
from tbdiag.export import _fill, _replace_all, _temporary  # write_outputs' machinery, for a binary output
from tbdiag.export import READ_SUFFIXES, check_outputs, jsonable
from tbdiag.layers import FP8, layer_name, plan_layers
from tbdiag.powerlaw import FITS
from tbdiag.st_reader import DTYPES, read_header, tensor_loader
from tbdiag.tempbalance.allocate import SCHEMA
from tbdiag.tempbalance.allocate import sparsity as alpha_sparsities
from tbdiag.tempbalance.maps import unit_means
from tbdiag.tempbalance.tuned import UNITS, TuneOptions, tuned_layers
from tbdiag.tensors import Checkpoint, TensorRef, numel

log = logging.getLogger(__name__)

ALLOCATIONS = ("alpha", "uniform")
ST_INDEX, TORCH_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
COPY_CHUNK = 16 << 20  # bytes copied at a time for the tensors that are kept as they are
ST_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class PruneOptions:
    """What decides the allocation (written into the allocation JSON as ``parameters``)."""

    sparsity: float
    allocation: str = "alpha"
    epsilon: float = 0.3
    max_sparsity: float = 0.99
    unit: str = "layer"
    prune_first_last: bool = False
    min_evals: int = 50
    fit: str = "peak"
    peak_lower_bound_quirk: bool = False

    def __post_init__(self) -> None:
        alpha_sparsities([], [], self.sparsity, self.epsilon, self.max_sparsity)  # the allocator's checks, early
        for what, value, known in (("allocation", self.allocation, ALLOCATIONS), ("unit", self.unit, UNITS),
                                   ("fit", self.fit, tuple(FITS))):
            if value not in known:
                raise TbdiagError(f"{what} {value!r}: unknown; use one of {', '.join(known)}")
        if self.min_evals < 2:
            raise TbdiagError(f"min_evals {self.min_evals}: must be at least 2")


@dataclass(frozen=True)
class PrunedLayer:
    """One pruned weight tensor: its allocated sparsity and the entries set to zero."""

    name: str  # layer name: the tensor name without ``.weight``
    tensor: str
    unit: str  # the layer itself, or its block with unit ``block``
    alpha: float  # the layer's own alpha (mean over the experts of a stacked tensor); nan for ``uniform``
    unit_alpha: float  # the alpha the allocation read: the unit's mean
    sparsity: float  # allocated
    n_params: int
    n_pruned: int  # round(sparsity · n_params)

    @property
    def realised(self) -> float:
        """The fraction of entries set to zero."""
        return self.n_pruned / self.n_params


@dataclass(frozen=True)
class PruneResult:
    """What `prune` allocated and wrote; ``realised_mean`` is the parameter-weighted mean of the layers."""

    source: str
    out: str | None
    options: PruneOptions
    layers: tuple[PrunedLayer, ...]
    n_params: int
    n_pruned: int
    realised_mean: float

    def to_dict(self) -> dict:
        """The ``tbdiag.allocation/v1`` document of `recommend --target sparsity` (per unit its alpha, layers,
        ``n_params`` and ``sparsity``), plus what was pruned: ``n_pruned`` per unit and in all, and the realised
        mean. Non-finite alphas stay ``nan`` (`tbdiag.export.jsonable` makes them ``null``)."""
        o = self.options
        alpha = o.allocation == "alpha"
        units: dict[str, dict] = {}
        for x in self.layers:
            unit = units.setdefault(x.unit, {"alpha": x.unit_alpha, "layers": [], "n_params": 0, "sparsity": x.sparsity,
                                             "n_pruned": 0})
            unit["layers"].append(x.name)
            unit["n_params"] += x.n_params
            unit["n_pruned"] += x.n_pruned
        parameters = {"sparsity": o.sparsity, "epsilon": o.epsilon if alpha else 0.0, "max_sparsity": o.max_sparsity,
                      "allocation": o.allocation, "prune_first_last": o.prune_first_last, "min_evals": o.min_evals,
                      "peak_lower_bound_quirk": o.peak_lower_bound_quirk}
        return {"schema": SCHEMA, "tbdiag_version": __version__, "source": self.source, "target": "sparsity",
                "unit": o.unit, "fit": o.fit if alpha else None, "parameters": parameters, "layers": units,
                "n_params": self.n_params, "n_pruned": self.n_pruned, "realised_mean": self.realised_mean}

    def to_json(self) -> str:
        """The allocation document as JSON text (``null`` for what could not be computed)."""
        return json.dumps(jsonable(self.to_dict()), indent=1) + "\n"


@dataclass(frozen=True)
class _Layout:
    """The input's files: its shards (one for a single file), and the folder and index of a sharded one."""

    shards: tuple[Path, ...]
    folder: Path | None = None
    index: Path | None = None

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1


def prune(source: str | Path, out: str | Path | None = None, *, sparsity: float, allocation: str = "alpha",
          epsilon: float = 0.3, max_sparsity: float = 0.99, unit: str = "layer", prune_first_last: bool = False,
          min_evals: int = 50, fit: str = "peak", peak_lower_bound_quirk: bool = False,
          allocation_json: str | Path | None = None, key: str | None = None, trust_pickle: bool = False,
          device: str = "auto") -> PruneResult:
    """Prune a checkpoint's layers by magnitude, each to its allocated sparsity, into a new checkpoint.

    Args:
        source: a checkpoint file or folder (safetensors, sharded, PyTorch).
        out: where the pruned checkpoint goes: a file, or for a sharded input a new (or empty) folder; None
            writes no weights (the allocation alone).
        sparsity: the mean sparsity S over the pruned layers, weighted by their sizes (0 ≤ S < 1).
        allocation: ``alpha`` (AlphaPruning) or ``uniform``.
        epsilon, max_sparsity: the spread ε of the ratios (0 ≤ ε < 1) and the largest sparsity of a layer.
        unit, prune_first_last, min_evals: which layers and units (see the module's description).
        fit, peak_lower_bound_quirk: the power-law fit of the alphas.
        allocation_json: also write the ``tbdiag.allocation/v1`` JSON here.
        key, trust_pickle, device: as for `tbdiag.analyze`.

    Raises:
        TbdiagError: bad numbers or choices, an output that is an input (or inside an input folder), an
            unreadable checkpoint, one without prunable layers; all before anything is written.
    """
    options = PruneOptions(sparsity, allocation, epsilon, max_sparsity, unit, prune_first_last, min_evals, fit,
                           peak_lower_bound_quirk)
    layout = input_layout(source)
    out_path, json_path = _check_targets(source, layout, out, allocation_json)
    ckpt = open_checkpoint(source, key=key, trust_pickle=trust_pickle)
    if out_path is not None and not ckpt.format.startswith("safetensors"):
        _check_dtypes(ckpt)
    layers = allocate(ckpt, options, device=device)
    n_params, n_pruned = sum(x.n_params for x in layers), sum(x.n_pruned for x in layers)
    result = PruneResult(ckpt.source, None if out is None else str(out), options, layers, n_params, n_pruned,
                         n_pruned / n_params)
    log.info("%s: %d layers, realised mean sparsity %.6f (target %g)", ckpt.source, len(layers),
             result.realised_mean, sparsity)
    _commit(result, ckpt, layout, out_path, json_path, key=key, trust_pickle=trust_pickle)
    return result


def input_layout(source: str | Path) -> _Layout:
    """The files of a checkpoint path, found as `tbdiag.checkpoint.open_checkpoint` finds them."""
    path = Path(source)
    if not path.is_dir():
        return _Layout((path,))
    for name in (ST_INDEX, TORCH_INDEX):
        if (path / name).is_file():
            return _Layout(tuple(_index_shards(path, path / name)), path, path / name)
    shards, _ = _folder_shards(path)
    return _Layout(tuple(shards), path)


def _check_targets(source: str | Path, layout: _Layout, out: str | Path | None,
                   allocation_json: str | Path | None) -> tuple[Path | None, Path | None]:
    """The resolved weights output (a file, or a folder for a sharded input) and JSON output, checked before
    any work: never an input nor inside an input folder (`tbdiag.export.check_outputs`)."""
    files = [t for t in ((out if not layout.sharded else None), allocation_json) if t is not None]
    checked = dict(zip(map(str, files), check_outputs(files, [source]))) if files else {}
    json_path = checked.get(str(allocation_json)) if allocation_json is not None else None
    if out is None or not layout.sharded:
        return (checked[str(out)] if out is not None else None), json_path
    folder = _check_folder(Path(out), Path(source))
    if json_path is not None and json_path.is_relative_to(folder):
        raise TbdiagError(f"{allocation_json}: is inside the output folder {out}; write the allocation elsewhere")
    return folder, json_path


def _check_folder(out: Path, source: Path) -> Path:
    """A new or empty folder for the pruned shards, outside the input folder."""
    folder, src = out.resolve(), source.resolve()
    if folder == src:
        raise TbdiagError(f"{out}: is the input {source}; write the pruned shards to a new folder")
    if folder.is_relative_to(src) or src.is_relative_to(folder):
        raise TbdiagError(f"{out}: is inside the input folder {source} (or holds it); write the pruned shards to a "
                          "new folder outside it")
    if out.suffix in READ_SUFFIXES:
        raise TbdiagError(f"{out}: a sharded input is written as a folder of shards, not a {out.suffix} file; name a "
                          "new folder (e.g. pruned/)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise TbdiagError(f"{out}: exists and is not an empty folder; a sharded input is written as a folder of "
                          "shards: name a new folder")
    if not folder.parent.is_dir():
        raise TbdiagError(f"{out}: folder {out.parent} does not exist; create it or choose another path")
    if not os.access(folder.parent, os.W_OK | os.X_OK):
        raise TbdiagError(f"{out}: folder {out.parent} is not writable; choose another path")
    return folder


def _check_dtypes(ckpt: Checkpoint) -> None:
    """Every tensor of a PyTorch checkpoint has a safetensors dtype (checked before any work)."""
    for ref in ckpt.tensors:
        if ref.dtype not in ST_DTYPE_NAMES:
            raise TbdiagError(f"{ckpt.source}: tensor {ref.name} is {ref.dtype}, which a safetensors file cannot "
                              "hold; convert or drop it before pruning")


def allocate(ckpt: Checkpoint, options: PruneOptions, *, device: str = "auto") -> tuple[PrunedLayer, ...]:
    """The pruned layers of an opened checkpoint with their sparsities (reads weights only to fit alphas).

    Raises:
        TbdiagError: no prunable layer, or an FP8 one (its magnitudes need its scales).
    """
    specs, _ = plan_layers(ckpt)
    tune = TuneOptions(unit=options.unit, exclude_first_last=not options.prune_first_last,
                       min_evals=options.min_evals)
    tuned = tuned_layers(specs, tune)
    if not tuned:
        raise TbdiagError(f"{ckpt.source}: no layer to prune (Linear/Conv weights with ≥ {options.min_evals} "
                          "eigenvalues, input and output layers left dense); prune the first and last layers "
                          "too, lower the eigenvalue minimum, or pass a model checkpoint")
    refs = {r.name: r for r in ckpt.tensors}
    for t in tuned:
        if refs[t.tensor].dtype in FP8:
            raise TbdiagError(f"{ckpt.source}: {t.tensor} is {refs[t.tensor].dtype}; pruning FP8 weights is not "
                              "supported: dequantise the checkpoint first")
    chosen = {t.name for t in tuned}
    alphas = _alphas([s for s in specs if s.name in chosen], options, device)
    values = [alphas.get(t.name, math.nan) for t in tuned]
    unit_alpha = unit_means([t.unit for t in tuned], values)
    tensor_alpha = unit_means([t.tensor for t in tuned], values)
    tensor_unit = {t.tensor: t.unit for t in tuned}
    sizes = {u: 0 for u in unit_alpha}
    for tensor, u in tensor_unit.items():
        sizes[u] += numel(refs[tensor].shape)
    shares = _sparsities(list(unit_alpha.values()), list(sizes.values()), options)
    share = dict(zip(unit_alpha, shares))
    out = []
    for tensor, u in tensor_unit.items():
        n = numel(refs[tensor].shape)
        k = min(n, max(0, math.floor(share[u] * n + 0.5)))
        out.append(PrunedLayer(layer_name(tensor), tensor, u, tensor_alpha[tensor], unit_alpha[u], share[u], n, k))
    return tuple(out)


def _alphas(specs: list, options: PruneOptions, device: str) -> dict[str, float]:
    """Each layer's alpha, fitted as `tbdiag.analyze` fits it (``uniform``: none, nothing is read)."""
    if options.allocation != "alpha":
        return {}
    analysis = AnalyzeOptions(fit=options.fit, peak_lower_bound_quirk=options.peak_lower_bound_quirk, device=device)
    return {row.name: row.alpha for row in measure_layers(specs, analysis)}


def _sparsities(alphas: Sequence[float], sizes: Sequence[int], options: PruneOptions) -> list[float]:
    if options.allocation == "uniform":
        return [options.sparsity] * len(alphas)
    return alpha_sparsities(alphas, sizes, options.sparsity, options.epsilon, options.max_sparsity)


def prune_smallest_(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Zero, in place, the ``k`` entries of smallest magnitude of a contiguous tensor; ties go by lowest flat
    index and NaN counts as the largest magnitude. Returns ``weight``."""
    flat = weight.view(-1)
    if k <= 0:
        return weight
    if k >= flat.numel():
        return weight.zero_()
    score = flat.abs() if flat.dtype in (torch.float32, torch.float64) else flat.float().abs()
    score.masked_fill_(score.isnan(), math.inf)
    bits = score.view(torch.int32 if score.dtype == torch.float32 else torch.int64)  # ordered as the magnitudes
    threshold = _kth_smallest(bits, k)
    below = bits < threshold
    ties = torch.nonzero(bits == threshold).view(-1)[: k - int(torch.count_nonzero(below))]
    flat.masked_fill_(below, 0)
    flat[ties] = 0
    return weight


def _kth_smallest(bits: torch.Tensor, k: int) -> int:
    """The k-th smallest (1-based) of non-negative integers: bisection narrows (lo, hi] to a few candidates and
    an exact selection among them finishes, so the memory is a mask, not a sorted copy and its indices."""
    lo, hi = -1, int(bits.max())
    below_lo, upto_hi = 0, bits.numel()  # how many are ≤ lo (fewer than k) and ≤ hi (at least k)
    while hi - lo > 1 and upto_hi - below_lo > max(1 << 16, bits.numel() >> 6):
        mid = (lo + hi) // 2
        count = int(torch.count_nonzero(bits <= mid))
        if count >= k:
            hi, upto_hi = mid, count
        else:
            lo, below_lo = mid, count
    return int(torch.kthvalue(bits[(bits > lo) & (bits <= hi)], k - below_lo).values)


def _commit(result: PruneResult, ckpt: Checkpoint, layout: _Layout, out: Path | None, json_path: Path | None, *,
            key: str | None, trust_pickle: bool) -> None:
    """Write the weights and the allocation JSON to temporaries beside them, then rename them all (or none)."""
    pruned = {x.tensor: x.n_pruned for x in result.layers}
    temps: list[tuple[Path, Path]] = []
    try:
        if json_path is not None:
            temps.append((json_path, _temporary(json_path)))
            _fill(temps[-1][1], lambda tmp: tmp.write_text(result.to_json(), encoding="utf-8"))
        if out is not None and layout.sharded:
            temps.append((out, _temporary_folder(out)))
            _write_folder(temps[-1][1], ckpt, layout, pruned, key=key, trust_pickle=trust_pickle)
            if out.is_dir():
                out.rmdir()  # the empty folder checked before: the new one takes its place
        elif out is not None:
            temps.append((out, _temporary(out)))
            _fill(temps[-1][1], lambda tmp: _write_file(tmp, ckpt, layout.shards[0], ckpt.tensors, pruned))
        _replace_all(temps)  # the folder, when there is one, last: it is never rolled back
    except OSError as exc:
        where = next((str(p) for p, t in temps if str(exc.filename or "").startswith(str(t))), str(out or json_path))
        raise TbdiagError(f"{where}: cannot write ({exc.strerror or exc}); nothing was written; check the disk and "
                          "the folder's permissions") from None
    finally:
        for _, tmp in temps:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _temporary_folder(path: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _write_folder(tmp: Path, ckpt: Checkpoint, layout: _Layout, pruned: dict[str, int], *, key: str | None,
                  trust_pickle: bool) -> None:
    """Every shard of a sharded input into ``tmp``, under the names it has (safetensors) or their safetensors
    names (``pytorch_model-00001-of-00002.bin`` → ``model-00001-of-00002.safetensors``), and the index."""
    assert layout.folder is not None
    st = ckpt.format.startswith("safetensors")
    weight_map: dict[str, str] = {}
    for shard in layout.shards:
        rel = shard.relative_to(layout.folder)
        if not st:
            rel = rel.with_name(rel.name.replace("pytorch_model", "model", 1)).with_suffix(".safetensors")
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        part = open_checkpoint(shard, key=key, trust_pickle=trust_pickle)
        _fill(tmp / rel, lambda dst, part=part, shard=shard: _write_file(dst, part, shard, part.tensors, pruned))
        weight_map.update({t.name: rel.as_posix() for t in part.tensors})
    if layout.index is None:
        return
    if st:
        index = json.loads(layout.index.read_text(encoding="utf-8"))
    else:
        size = sum(f.stat().st_size for f in tmp.rglob("*.safetensors"))
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    _fill(tmp / ST_INDEX, lambda dst: dst.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8"))


def _write_file(dst: Path, ckpt: Checkpoint, src: Path, refs: Sequence[TensorRef], pruned: dict[str, int]) -> None:
    if ckpt.format.startswith("safetensors"):
        _copy_safetensors(src, dst, pruned)
    else:
        _write_refs(dst, refs, pruned)


def _header_bytes(header: dict) -> bytes:
    """A safetensors header: its length (8 bytes, little-endian), then the JSON padded with spaces to 8 bytes."""
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _copy_safetensors(src: Path, dst: Path, pruned: dict[str, int]) -> None:
    """``src`` with the same tensor entries and data offsets; the tensors in ``pruned`` (clean names → entries
    to zero) pruned, every other one's bytes copied; the reader's order recorded in ``tbdiag_order``."""
    header, metadata, start = read_header(src)
    order = sorted(header, key=_order_key(metadata))
    physical = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    new_header = {"__metadata__": {**metadata, **order_metadata(order)}, **{k: header[k] for k in physical}}
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(_header_bytes(new_header))
        for k in physical:
            begin, end = header[k]["data_offsets"]
            name = clean_name(k)
            if name in pruned:
                load, _ = tensor_loader(src, header[k], start)
                _write_tensor(fout, prune_smallest_(load(), pruned[name]))
                log.debug("%s: %s pruned", dst, name)
            else:
                _copy_bytes(fin, fout, start + begin, end - begin, src)


def _copy_bytes(fin: BinaryIO, fout: BinaryIO, offset: int, length: int, src: Path) -> None:
    fin.seek(offset)
    while length > 0:
        chunk = fin.read(min(COPY_CHUNK, length))
        if not chunk:
            raise TbdiagError(f"{src}: file ended inside a tensor (truncated while pruning); re-download it")
        fout.write(chunk)
        length -= len(chunk)


def _write_refs(dst: Path, refs: Sequence[TensorRef], pruned: dict[str, int]) -> None:
    """A safetensors file of the tensors of a PyTorch checkpoint: larger dtypes first in the file (each tensor
    stays aligned, as the safetensors library writes), model order in ``tbdiag_order``."""
    physical = sorted(refs, key=lambda r: (-r.dtype.itemsize, r.name))
    header: dict = {"__metadata__": order_metadata([r.name for r in refs])}
    offset = 0
    for r in physical:
        size = numel(r.shape) * r.dtype.itemsize
        header[r.name] = {"dtype": ST_DTYPE_NAMES[r.dtype], "shape": list(r.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    with open(dst, "wb") as fout:
        fout.write(_header_bytes(header))
        for r in physical:
            tensor = r.load().detach()
            if r.name in pruned:  # a copy: never change the tensors of a loaded file or a caller's state dict
                tensor = prune_smallest_(tensor.clone(memory_format=torch.contiguous_format), pruned[r.name])
            _write_tensor(fout, tensor)


def _write_tensor(fout: BinaryIO, tensor: torch.Tensor) -> None:
    fout.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
