"""The tensors of one pruned file: a safetensors input copied with its layout, or a PyTorch input written as
safetensors with every name it had (tied ones included), each pruned tensor counted as it is written.

**Cuts** (tensor name → {slice: k}): ``None`` prunes a whole tensor to k zeros, ``e`` the matrix ``[e]`` of a
stacked expert tensor (E × out × in), each expert to its own k (`tbdiag.pruning.magnitude.prune_slices_`).

**Tied tensors**: a PyTorch state dict may hold two names of one storage (GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``). The reader lists such a tensor once, under its first name; safetensors cannot
store shared tensors, so each later name is written as a tensor of its own, a copy of the first one as it is
written (pruned when the first one is, equal to the input otherwise): the output loads back strictly.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from tbdiag.io.checkpoint import _order_key, order_metadata, safetensors_entries, sniff
from tbdiag.errors import TbdiagError
from tbdiag.pruning.magnitude import Counts, prune_slices_
from tbdiag.io.st_reader import DTYPES, read_header, tensor_loader
from tbdiag.io.state_dicts import _flatten, select_state_dict, torch_load
from tbdiag.io.tensors import TensorRef, clean_name, numel

log = logging.getLogger(__name__)

COPY_CHUNK = 16 << 20  # bytes copied at a time for the tensors that are kept as they are
ST_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
Cuts = Mapping[str, Mapping[int | None, int]]


def header_bytes(header: dict) -> bytes:
    """A safetensors header: its length (8 bytes, little-endian), then the JSON padded with spaces to 8 bytes."""
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def copy_safetensors(src: Path, dst: Path, cuts: Cuts, key: str | None = None) -> dict[str, Counts]:
    """``src`` with the same tensor entries and data offsets; the tensors in ``cuts`` (by the names the reader
    gave them: ``module.`` prefixes stripped, below ``key`` when given, `safetensors_entries`) pruned, every other one's
    bytes copied; the reader's order recorded in ``tbdiag_order``. Returns the zero counts of the pruned tensors."""
    header, metadata, start = read_header(src)
    order = sorted(header, key=_order_key(metadata))
    pruned = {k: name for name, k in safetensors_entries(header, metadata, key).items() if name in cuts}
    physical = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    new_header = {"__metadata__": {**metadata, **order_metadata(order)}, **{k: header[k] for k in physical}}
    counts: dict[str, Counts] = {}
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(header_bytes(new_header))
        for k in physical:
            begin, end = header[k]["data_offsets"]
            name = pruned.get(k)
            if name is not None:
                load, _ = tensor_loader(src, header[k], start)
                tensor = load()
                counts[name] = prune_slices_(tensor, cuts[name])
                write_tensor(fout, tensor)
                log.debug("%s: %s pruned", dst, name)
            else:
                _copy_bytes(fin, fout, start + begin, end - begin, src)
    return counts


def _copy_bytes(fin: BinaryIO, fout: BinaryIO, offset: int, length: int, src: Path) -> None:
    fin.seek(offset)
    while length > 0:
        chunk = fin.read(min(COPY_CHUNK, length))
        if not chunk:
            raise TbdiagError(f"{src}: file ended inside a tensor (truncated while pruning); re-download it")
        fout.write(chunk)
        length -= len(chunk)


def tied_names(path: Path, refs: Sequence[TensorRef], *, key: str | None, trust_pickle: bool) -> list[tuple[str, str]]:
    """Every tensor name of a PyTorch file in model order, each with the name the reader kept for its storage
    (itself, or the first name of a tied tensor), found by the reader's rule (`tbdiag.io.state_dicts`)."""
    fmt = sniff(path)
    if fmt == "torchscript":  # read only when trusted, as the reader did
        obj = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    else:
        obj = torch_load(path, mmap=fmt == "torch-zip", trust_pickle=trust_pickle)
    views: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for raw, t in _flatten(select_state_dict(obj, key, str(path))):
        name = clean_name(raw)
        if name in out:  # a name twice: the reader keeps the first
            continue
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        tied = t.numel() > 0 and t.device.type != "meta" and view in views
        if not tied:
            views.setdefault(view, name)
        out[name] = views[view] if tied else name
    if {n for n, source in out.items() if n == source} != {r.name for r in refs}:
        raise TbdiagError(f"{path}: changed while it was being pruned; nothing was written; prune a checkpoint "
                          "that is not being rewritten")
    return list(out.items())


def write_refs(dst: Path, refs: Sequence[TensorRef], cuts: Cuts, names: Sequence[tuple[str, str]]) -> dict[str, Counts]:
    """A safetensors file of the tensors of a PyTorch checkpoint under every name in ``names`` (name, the
    reader's tensor it is): larger dtypes first in the file (each tensor stays aligned, as the safetensors
    library writes), model order in ``tbdiag_order``. Returns the zero counts of the pruned tensors."""
    by_name = {r.name: r for r in refs}
    physical = sorted(names, key=lambda n: (-by_name[n[1]].dtype.itemsize, n[0]))
    header: dict = {"__metadata__": order_metadata([name for name, _ in names])}
    offset = 0
    for name, source in physical:
        r = by_name[source]
        size = numel(r.shape) * r.dtype.itemsize
        header[name] = {"dtype": ST_DTYPE_NAMES[r.dtype], "shape": list(r.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    counts: dict[str, Counts] = {}
    with open(dst, "wb") as fout:
        fout.write(header_bytes(header))
        for name, source in physical:
            tensor = by_name[source].load().detach()
            if source in cuts:  # a copy: never change the tensors of a loaded file
                tensor = tensor.clone(memory_format=torch.contiguous_format)
                got = prune_slices_(tensor, cuts[source])
                counts.setdefault(source, got)
            write_tensor(fout, tensor)
    return counts


def write_tensor(fout: BinaryIO, tensor: torch.Tensor) -> None:
    fout.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
