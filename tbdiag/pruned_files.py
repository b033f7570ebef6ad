"""A pruned checkpoint on disk: where it may go (checked before any work) and how it is written.

A file input gives a safetensors file. A folder input (sharded or not) gives a new folder that mirrors it: its
shards under their names (PyTorch shards as safetensors), the index, and the folder's other files — config,
tokenizer, model card — so that the pruned model loads as the original did; weights in other formats
(``tf_model.h5``, ``*.onnx``) are left out, as they would not be pruned. A single-file folder may also be
written to a ``.safetensors`` file (the weights alone). Everything goes to temporaries first and is renamed
at the end, all or nothing; at most one input tensor is held at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from tbdiag.checkpoint import _folder_shards, _index_shards, _order_key  # the reader's own rules, not copies
from tbdiag.checkpoint import ST_INDEX, TORCH_INDEX, clean_name, open_checkpoint, order_metadata
from tbdiag.errors import TbdiagError
from tbdiag.outputs import READ_SUFFIXES, check_outputs, fill, replace_all, temporary_beside, usual_mode
from tbdiag.magnitude import prune_smallest_
from tbdiag.model_folder import copy_companions, companions
from tbdiag.st_reader import DTYPES, read_header, tensor_loader
from tbdiag.tensors import Checkpoint, TensorRef, numel

log = logging.getLogger(__name__)

COPY_CHUNK = 16 << 20  # bytes copied at a time for the tensors that are kept as they are
ST_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Layout:
    """The input's files: its shards (one for a single file), and the folder and index of a folder input."""

    shards: tuple[Path, ...]
    folder: Path | None = None
    index: Path | None = None

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1


@dataclass(frozen=True)
class Target:
    """Where the outputs go, checked: the weights (a file, or a folder when ``folder``), the allocation JSON,
    and for a folder the input folder's other files, (copied, left out)."""

    out: Path | None
    allocation_json: Path | None
    folder: bool = False
    companions: tuple[str, ...] = ()
    left_out: tuple[tuple[str, str], ...] = ()  # (path, why)


def input_layout(source: str | Path) -> Layout:
    """The files of a checkpoint path, found as `tbdiag.checkpoint.open_checkpoint` finds them."""
    path = Path(source)
    if not path.is_dir():
        return Layout((path,))
    for name in (ST_INDEX, TORCH_INDEX):
        if (path / name).is_file():
            return Layout(tuple(_index_shards(path, path / name)), path, path / name)
    shards, _ = _folder_shards(path)
    return Layout(tuple(shards), path)


def check_targets(source: str | Path, layout: Layout, out: str | Path | None,
                  allocation_json: str | Path | None, *, overwrite: bool = False) -> Target:
    """The outputs, checked before any work: never an input nor inside an input folder
    (`tbdiag.outputs.check_outputs`). A folder input is written as a folder unless it holds a single file
    and ``out`` names a file (``.safetensors``)."""
    folder = out is not None and layout.folder is not None and (layout.sharded or Path(out).suffix not in READ_SUFFIXES)
    if out is not None and not folder and Path(out).suffix != ".safetensors":
        name = Path(out).with_suffix(".safetensors").name if str(out) != "-" else "pruned.safetensors"
        raise TbdiagError(f"{out}: the pruned weights are a safetensors file; name it {name}")
    if folder and allocation_json is not None and Path(allocation_json).resolve().is_relative_to(Path(out).resolve()):
        raise TbdiagError(f"{allocation_json}: is inside the output folder {out}; write the allocation elsewhere")
    files = [t for t in ((None if folder else out), allocation_json) if t is not None]
    weights = [out] if out is not None and not folder else []
    checked = dict(zip(map(str, files), check_outputs(files, [source], overwrite=overwrite, weights=weights))) \
        if files else {}
    json_path = checked.get(str(allocation_json)) if allocation_json is not None else None
    if out is None or not folder:
        return Target(checked[str(out)] if out is not None else None, json_path)
    out_folder = _check_folder(Path(out), Path(source))
    assert layout.folder is not None
    own = [*layout.shards, *((layout.index,) if layout.index else ())]
    return Target(out_folder, json_path, True, *companions(layout.folder, own))


def _check_folder(out: Path, source: Path) -> Path:
    """A new or empty folder for the pruned model, outside the input folder."""
    folder, src = out.resolve(), source.resolve()
    if folder == src:
        raise TbdiagError(f"{out}: is the input {source}; write the pruned model to a new folder")
    if folder.is_relative_to(src) or src.is_relative_to(folder):
        raise TbdiagError(f"{out}: is inside the input folder {source} (or holds it); write the pruned model to a "
                          "new folder outside it")
    if out.suffix in READ_SUFFIXES:
        raise TbdiagError(f"{out}: a sharded input is written as a folder of shards, not a {out.suffix} file; name a "
                          "new folder (e.g. pruned/)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise TbdiagError(f"{out}: exists and is not an empty folder; a folder input is written as a new folder: "
                          "name a new (or empty) folder")
    if not folder.parent.is_dir():
        raise TbdiagError(f"{out}: folder {out.parent} does not exist; create it or choose another path")
    if not os.access(folder.parent, os.W_OK | os.X_OK):
        raise TbdiagError(f"{out}: folder {out.parent} is not writable; choose another path")
    return folder


def check_dtypes(ckpt: Checkpoint) -> None:
    """Every tensor of a PyTorch checkpoint has a safetensors dtype (checked before any work)."""
    for ref in ckpt.tensors:
        if ref.dtype not in ST_DTYPE_NAMES:
            raise TbdiagError(f"{ckpt.source}: tensor {ref.name} is {ref.dtype}, which a safetensors file cannot "
                              "hold; convert or drop it before pruning")


def commit(target: Target, ckpt: Checkpoint, layout: Layout, pruned: dict[str, int], allocation_json: str | None,
           *, key: str | None, trust_pickle: bool) -> None:
    """Write the weights (``pruned``: tensor name → entries to zero) and the allocation JSON text to
    temporaries first, then put them all in place (or none)."""
    out, json_path = target.out, target.allocation_json
    temps: list[tuple[Path, Path]] = []
    staged: Path | None = None
    try:
        if json_path is not None and allocation_json is not None:
            temps.append((json_path, temporary_beside(json_path)))
            fill(temps[-1][1], lambda tmp: tmp.write_text(allocation_json, encoding="utf-8"))
        if out is not None and target.folder:
            staged = _staging_folder(out)
            _write_folder(staged, ckpt, layout, pruned, key=key, trust_pickle=trust_pickle)
            assert layout.folder is not None
            copy_companions(layout.folder, target.companions, staged)
        elif out is not None:
            temps.append((out, temporary_beside(out)))
            fill(temps[-1][1], lambda tmp: _write_file(tmp, ckpt, layout.shards[0], ckpt.tensors, pruned))
        undo = _place(staged, out) if staged is not None and out is not None else None
        try:
            replace_all(temps)
        except BaseException:
            if undo is not None:
                undo()
            raise
    except OSError as exc:
        where = next((str(p) for p, t in temps if str(exc.filename or "").startswith(str(t))), str(out or json_path))
        raise TbdiagError(f"{where}: cannot write ({exc.strerror or exc}); nothing was written; check the disk and "
                          "the folder's permissions") from None
    finally:
        for tmp in [t for _, t in temps] + ([staged] if staged is not None else []):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _staging_folder(out: Path) -> Path:
    """Where a folder output is written first: inside ``out`` when it exists (an empty folder, which keeps its
    owner, permissions and identity: it may be the working folder), else beside it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out if out.is_dir() else out.parent))
    os.chmod(tmp, usual_mode(0o777))
    return tmp


def _place(staged: Path, out: Path) -> Callable[[], None]:
    """Move a staged folder output into place (renames only); returns how to take it back out."""
    if staged.parent != out:
        os.rename(staged, out)
        return lambda: os.rename(out, staged)
    moved: list[Path] = []

    def take_back() -> None:
        for path in moved:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    try:
        for entry in sorted(staged.iterdir()):
            os.rename(entry, out / entry.name)
            moved.append(out / entry.name)
    except BaseException:
        take_back()
        raise
    staged.rmdir()
    return take_back


def _write_folder(tmp: Path, ckpt: Checkpoint, layout: Layout, pruned: dict[str, int], *, key: str | None,
                  trust_pickle: bool) -> None:
    """Every shard of a folder input into ``tmp``, under the names it has (safetensors) or their safetensors
    names (``pytorch_model-00001-of-00002.bin`` → ``model-00001-of-00002.safetensors``), and the index."""
    assert layout.folder is not None
    st = ckpt.format.startswith("safetensors")
    weight_map: dict[str, str] = {}
    size = 0
    for shard in layout.shards:
        rel = shard.relative_to(layout.folder)
        if not st:
            rel = rel.with_name(rel.name.replace("pytorch_model", "model", 1)).with_suffix(".safetensors")
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        part = open_checkpoint(shard, key=key, trust_pickle=trust_pickle)
        fill(tmp / rel, lambda dst, part=part, shard=shard: _write_file(dst, part, shard, part.tensors, pruned))
        weight_map.update({t.name: rel.as_posix() for t in part.tensors})
        size += sum(numel(t.shape) * t.dtype.itemsize for t in part.tensors)
    if layout.index is None:
        return
    if st:
        index = json.loads(layout.index.read_text(encoding="utf-8"))
    else:  # total_size: the bytes of the tensors, as Hugging Face counts them
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    fill(tmp / ST_INDEX, lambda dst: dst.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8"))


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
