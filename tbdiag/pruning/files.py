"""A pruned checkpoint on disk: where it may go (checked before any work) and how it is written.

A file input gives a safetensors file. A folder input (sharded or not) gives a new folder that mirrors it: its
shards under their names (PyTorch shards as safetensors), the index, and the folder's other files — config,
tokenizer, model card — so that the pruned model loads as the original did; weights in other formats
(``tf_model.h5``, ``*.onnx``) are left out, as they would not be pruned. A single-file folder may also be
written to a ``.safetensors`` file (the weights alone). Everything goes to temporaries first and is renamed
at the end, all or nothing; at most one input tensor is held at a time. The tensors of each file are written
by `tbdiag.pruning.tensors` (its layout kept, tied names kept), which counts the zeros each pruned one holds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tbdiag.io.checkpoint import _folder_shards, _index_shards  # the reader's own rules, not copies
from tbdiag.io.checkpoint import ST_INDEX, TORCH_INDEX, open_shard
from tbdiag.errors import TbdiagError
from tbdiag.io.outputs import READ_SUFFIXES, check_outputs, fill, replace_all, temporary_beside, usual_mode
from tbdiag.pruning.magnitude import Counts, expected_counts
from tbdiag.io.model_folder import copy_companions, companions
from tbdiag.pruning.tensors import ST_DTYPE_NAMES, Cuts, copy_safetensors, tied_names, write_refs
from tbdiag.io.tensors import Checkpoint, numel

Written = dict[str, Counts]  # tensor name → (zeros before, zeros after) of each pruned slice


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
    """The files of a checkpoint path, found as `tbdiag.io.checkpoint.open_checkpoint` finds them."""
    path = Path(source)
    if not path.is_dir():
        return Layout((path,))
    for name in (ST_INDEX, TORCH_INDEX):
        if (path / name).is_file():
            return Layout(tuple(_index_shards(path, path / name)), path, path / name)
    shards, _ = _folder_shards(path)
    return Layout(tuple(shards), path)


def refuse_empty(source: str | Path, out: str | Path | None, allocation_json: str | Path | None) -> None:
    """An empty path names no file (``Path("")`` would be the working folder)."""
    for what, value, cli, name in (("source", source, "PATH", "a checkpoint file or folder"),
                                   ("out", out, "--out", "a new file or folder for the pruned weights"),
                                   ("allocation_json", allocation_json, "--allocation-json", "a .json file")):
        if value is not None and not str(value).strip():
            raise TbdiagError(f"{what} path is empty; name {name}", cli={f"{what} path": cli})


def check_targets(source: str | Path, layout: Layout, out: str | Path | None,
                  allocation_json: str | Path | None, *, overwrite: bool = False) -> Target:
    """The outputs, checked before any work: never an input nor inside an input folder
    (`tbdiag.io.outputs.check_outputs`). A folder input is written as a folder unless it holds a single file
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


def commit(target: Target, ckpt: Checkpoint, layout: Layout, cuts: Cuts,
           allocation_json: Callable[[Written], str], *, key: str | None, trust_pickle: bool) -> Written:
    """Write the weights (``cuts``: tensor name → {slice: zeros to reach}, see `tbdiag.pruning.tensors`), then
    the allocation JSON text made from the zeros the weights hold, to temporaries first, then put them all in
    place (or none). Returns the zero counts (of the weights written; without weights, of the input pruned
    as it would be)."""
    out, json_path = target.out, target.allocation_json
    temps: list[tuple[Path, Path]] = []
    staged: Path | None = None
    written: Written = {}
    try:
        if out is not None and target.folder:
            staged = _staging_folder(out)
            _write_folder(staged, ckpt, layout, cuts, written, key=key, trust_pickle=trust_pickle)
            assert layout.folder is not None
            copy_companions(layout.folder, target.companions, staged)
        elif out is not None:
            temps.append((out, temporary_beside(out)))
            fill(temps[-1][1], lambda tmp: written.update(_write_file(tmp, ckpt, layout.shards[0], cuts, key=key,
                                                                      trust_pickle=trust_pickle)))
        else:
            written = zero_counts(ckpt, cuts)
        if json_path is not None:
            text = allocation_json(written)
            temps.append((json_path, temporary_beside(json_path)))
            fill(temps[-1][1], lambda tmp: tmp.write_text(text, encoding="utf-8"))
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
    return written


def zero_counts(ckpt: Checkpoint, cuts: Cuts) -> Written:
    """The zeros each pruned slice holds now and would hold pruned, reading one tensor at a time."""
    return {r.name: expected_counts(r.load(), cuts[r.name]) for r in ckpt.tensors if r.name in cuts}


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


def _write_folder(tmp: Path, ckpt: Checkpoint, layout: Layout, cuts: Cuts, written: Written, *,
                  key: str | None, trust_pickle: bool) -> None:
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
        part = open_shard(shard, key=key, trust_pickle=trust_pickle)
        names = None if st else tied_names(shard, part.tensors, key=key, trust_pickle=trust_pickle)
        fill(tmp / rel, lambda dst, part=part, shard=shard, names=names:
             written.update(_write_file(dst, part, shard, cuts, names=names, key=key)))
        refs = {t.name: t for t in part.tensors}
        for name, source in names or [(t.name, t.name) for t in part.tensors]:
            weight_map[name] = rel.as_posix()
            size += numel(refs[source].shape) * refs[source].dtype.itemsize
    if layout.index is None:
        return
    if st:
        index = json.loads(layout.index.read_text(encoding="utf-8"))
    else:  # total_size: the bytes of the tensors, as Hugging Face counts them
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    fill(tmp / ST_INDEX, lambda dst: dst.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8"))


def _write_file(dst: Path, ckpt: Checkpoint, src: Path, cuts: Cuts, *, names: list[tuple[str, str]] | None = None,
                key: str | None = None, trust_pickle: bool = False) -> Written:
    """One file of pruned weights: a safetensors input copied with its layout, a PyTorch one under every
    name it holds (``names``: found here unless given)."""
    if ckpt.format.startswith("safetensors"):
        return copy_safetensors(src, dst, cuts, key)
    if names is None:
        names = tied_names(src, ckpt.tensors, key=key, trust_pickle=trust_pickle)
    return write_refs(dst, ckpt.tensors, cuts, names)
