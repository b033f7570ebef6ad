"""Open a checkpoint (file, folder, state dict or live module) as an ordered list of lazy named tensors.

Nothing here executes code from a checkpoint: PyTorch files are read with ``torch.load(weights_only=True)``;
arbitrary unpickling (and TorchScript) happens only when the caller passes ``trust_pickle=True``.
Safetensors headers are checked as strictly as the safetensors library checks them (`st_reader`), and a
tensor is read only when its ``TensorRef.load()`` is called. Bad input of any kind is a one-line
`CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import re
import stat
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tbdiag.errors import CheckpointError
from tbdiag.io.st_reader import DTYPES, read_header, tensor_loader, unreadable
from tbdiag.io.state_dicts import mapping_refs, module_refs, torch_load
from tbdiag.io.tensors import Checkpoint, TensorRef, name_under

log = logging.getLogger(__name__)

ST_INDEX, TORCH_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"  # shard indexes, in this order
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".th", ".pkl", ".tar")
def natural_key(name: str) -> list:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_folder(source: object) -> Path | None:
    """The PEFT adapter folder ``source`` names (the folder, or its ``adapter_model.*`` file), or None: the one
    rule for what is an adapter (its factors are no layers of their own; `tbdiag.finetune.lora` reads it)."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    folder = path if path.is_dir() else path.parent if path.name in ADAPTER_WEIGHTS else None
    if folder is None or not (folder / ADAPTER_CONFIG).is_file():
        return None
    return folder if any((folder / w).is_file() for w in ADAPTER_WEIGHTS) else None


def open_checkpoint(source: Any, *, key: str | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Open a path, a state dict or an ``nn.Module`` as a `Checkpoint`.

    Args:
        source: a file or folder path, a mapping of tensors (possibly nested), or a ``torch.nn.Module``.
        key: dotted path of the entry that holds the weights in a nested checkpoint (e.g. ``ema``), or the
            name prefix of the tensors to read in a safetensors file (``ema`` → ``ema.*``, read without it);
            found automatically when omitted (a safetensors file: every tensor).
        trust_pickle: allow arbitrary unpickling and TorchScript. Only for files from a trusted origin.

    Raises:
        CheckpointError: the source is missing, unrecognised, corrupt, or needs code to load.
    """
    if isinstance(source, torch.nn.Module):
        return Checkpoint(type(source).__name__, "module", tuple(module_refs(source)))
    if isinstance(source, Mapping):
        return Checkpoint("<state dict>", "state-dict", tuple(mapping_refs(source, key, "<state dict>")))
    if not str(source).strip():  # Path("") would be the working folder
        raise CheckpointError("the checkpoint path is empty; name a checkpoint file or folder")
    path = Path(source)
    if not path.exists():
        if path.is_symlink():
            raise CheckpointError(f"{path}: a broken or looping symbolic link; point it at the checkpoint")
        raise CheckpointError(f"{path}: no such file or folder; check the path")
    if adapter_folder(path) is not None:  # the folder, or its adapter_model.* file
        raise CheckpointError(f"{path}: a PEFT adapter, not a model checkpoint; only an analysis reads it (each "
                              "layer's update ΔW = s·B·A, no plan), or pass the base model's checkpoint")
    if path.is_dir():
        return _open_folder(path, key, trust_pickle)
    return open_file(path, key, trust_pickle)


def _open_folder(folder: Path, key: str | None, trust_pickle: bool) -> Checkpoint:
    for index_name, fmt in ((ST_INDEX, "safetensors-sharded"), (TORCH_INDEX, "torch-sharded")):
        index = folder / index_name
        if index.is_file():
            files = _index_shards(folder, index)
            return _check_key(_merge(str(folder), fmt, [open_shard(f, key, trust_pickle) for f in files]), key)
    try:
        shards, fmt = _folder_shards(folder)
    except OSError as exc:
        raise unreadable(folder, exc) from None
    if len(shards) == 1:
        return open_file(shards[0], key, trust_pickle)
    return _check_key(_merge(str(folder), fmt, [open_shard(f, key, trust_pickle) for f in shards]), key)


def _index_shards(folder: Path, index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each checked to be a file inside ``folder``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except OSError as exc:
        raise unreadable(index, exc) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({exc}); fix or remove it") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid shard index (weight_map is not a non-empty map of tensor names "
                              "to file names); fix or remove it")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        rel = Path(name)
        if not name or rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{index}: shard {name!r} lies outside the folder; name shards by their file "
                                  "names in the folder")
        f = folder / rel
        if f.is_dir():
            raise CheckpointError(f"{index}: shard {name!r} is a folder, not a file; fix the index or download "
                                  "the shard")
        if f.is_symlink() and not f.exists():
            raise CheckpointError(f"{index}: shard {name!r} is a broken or looping symbolic link; download the shard "
                                  "again")
        if not f.is_file():
            raise CheckpointError(f"{index}: shard {name} is missing; download all shards")
        files.append(f)
    return files


def _folder_shards(folder: Path) -> tuple[list[Path], str]:
    """The checkpoint files of a folder without a shard index, and the folder's format.

    Safetensors files first, else ``pytorch_model*.bin``, else the one PyTorch file. A folder (or a pipe …)
    that merely has such a name is passed over; a broken link is kept, so that opening it says what is wrong.
    """
    others = []
    for fmt, found in (("safetensors-folder", folder.glob("*.safetensors")),
                       ("torch-folder", folder.glob("pytorch_model*.bin")),
                       ("", (p for p in folder.iterdir() if p.suffix in TORCH_SUFFIXES))):
        found = sorted(found)
        shards = [p for p in found if p.is_file() or (p.is_symlink() and not p.exists())]
        others += [p for p in found if p not in shards]
        if shards:
            break
    if not shards and others:
        raise CheckpointError(f"{others[0]}: not a file, and {folder} holds no checkpoint file; pass the "
                              "checkpoint file or folder itself")
    if not shards:
        raise CheckpointError(f"{folder}: no checkpoint found (.safetensors, .bin, .pt …); pass a checkpoint file")
    if not fmt and len(shards) > 1:
        names = ", ".join(p.name for p in shards[:3])
        raise CheckpointError(f"{folder}: holds several checkpoints ({names} …); name one file")
    return shards, fmt


def _merge(source: str, fmt: str, parts: list[Checkpoint]) -> Checkpoint:
    owner: dict[str, str] = {}
    for part in parts:
        for t in part.tensors:
            if owner.setdefault(t.name, part.source) != part.source:
                raise CheckpointError(f"{source}: tensor {t.name!r} is in two files ({Path(owner[t.name]).name} and "
                                      f"{Path(part.source).name}), but a folder is read as the shards of one model; "
                                      "pass one checkpoint file, or remove the stale shard")
    if all(p.format == "safetensors" for p in parts):
        refs = sorted((t for p in parts for t in p.tensors), key=lambda t: natural_key(t.name))
    else:  # state dicts keep model order within each shard; shards are in order
        refs = [t for p in parts for t in p.tensors]
    return Checkpoint(source, fmt, tuple(refs))


def sniff(path: Path) -> str:
    """Recognise a file by its content: ``safetensors``, ``torch-zip``, ``torchscript`` or ``torch-legacy``."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a folder, a pipe or a device: opening a pipe could wait forever
            raise CheckpointError(f"{path}: not a regular file; pass a checkpoint file")
        size = info.st_size
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise unreadable(path, exc) from None
    if size == 0:
        raise CheckpointError(f"{path}: empty file; re-save or re-download the checkpoint")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{path}: truncated or corrupt zip archive; re-save or re-download it") from exc
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        raise CheckpointError(f"{path}: a zip archive but not a PyTorch checkpoint; pass a checkpoint file")
    # A header length of 128 + 256·k starts with the byte of a pickle protocol (0x80); a pickle's first bytes
    # read as a length are far beyond its file, so a length that fits the file decides.
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) == 9 and head[8:9] == b"{" else None
    if header_len is not None and 8 + header_len <= size:
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if header_len is not None:
        raise CheckpointError(f"{path}: truncated safetensors file (header says {header_len} bytes, file has "
                              f"{size}); re-download it")
    raise CheckpointError(f"{path}: not a checkpoint (no safetensors header, zip or pickle signature); "
                          "pass a .safetensors, .pt or .bin file")


def open_file(path: Path, key: str | None = None, trust_pickle: bool = False) -> Checkpoint:
    """One checkpoint file read as it is, by its content (no folder or adapter rules: `open_checkpoint` applies
    those); for readers that know what the file is, such as an adapter's factors."""
    return _check_key(open_shard(path, key, trust_pickle), key)


def open_shard(path: Path, key: str | None = None, trust_pickle: bool = False) -> Checkpoint:
    """`open_file` for one file of a sharded checkpoint: a safetensors shard may hold nothing below ``key``."""
    fmt = sniff(path)
    if fmt == "safetensors":
        return Checkpoint(str(path), fmt, tuple(_safetensors_refs(path, key)))
    if fmt == "torchscript":
        if not trust_pickle:
            raise CheckpointError(f"{path}: a TorchScript archive, which loads by running its code; re-run with "
                                  "trust_pickle=True if you trust its origin, or save model.state_dict() instead",
                                  cli={"trust_pickle=True": "--trust-pickle"})
        module = torch.jit.load(str(path), map_location="cpu")
        refs = mapping_refs(dict(module.state_dict()), key, str(path))
        return Checkpoint(str(path), fmt, tuple(refs))
    obj = torch_load(path, mmap=fmt == "torch-zip", trust_pickle=trust_pickle)
    return Checkpoint(str(path), fmt, tuple(mapping_refs(obj, key, str(path))))


def _safetensors_refs(path: Path, key: str | None = None) -> list[TensorRef]:
    """The tensors of a safetensors file, those below ``key`` only when it is given (`safetensors_entries`)."""
    header, metadata, start = read_header(path)
    refs = []
    for name, k in safetensors_entries(header, metadata, key, where=path).items():
        info = header[k]
        if info.get("dtype") not in DTYPES:
            log.info("%s: skipping %s of unsupported dtype %s", path, k, info.get("dtype"))
            continue
        load, load_rows = tensor_loader(path, info, start)
        refs.append(TensorRef(name, tuple(info["shape"]), DTYPES[info["dtype"]], load=load, load_rows=load_rows))
    return refs


def safetensors_entries(header: dict, metadata: dict | None, key: str | None,
                        where: Path | None = None) -> dict[str, str]:
    """The reader's names of a safetensors file's entries (`name_under` ``key``), in its order, each with the entry
    it reads: the first of entries whose names clean alike (``fc.weight``, ``_orig_mod.fc.weight``), as for state
    dicts; the others are reported when ``where`` is given."""
    kept: dict[str, str] = {}
    for k in sorted(header, key=_order_key(metadata)):
        name = name_under(k, key)
        if name is None:
            continue
        if name in kept:
            if where is not None:
                log.warning("%s: tensor %s appears twice (also as %s); keeping the first", where, name, k)
            continue
        kept[name] = k
    return kept


def _check_key(ckpt: Checkpoint, key: str | None) -> Checkpoint:
    """A safetensors file or folder read below ``key`` must hold some tensor there (in one of its shards)."""
    if key and ckpt.format.startswith("safetensors") and not ckpt.tensors:
        raise CheckpointError(f"{ckpt.source}: no tensor named '{key}.…'; check the key",
                              cli={"check the key": "check --key"})
    return ckpt


ORDER_METADATA = "tbdiag_order"  # safetensors metadata: JSON list of tensor names in model order


def order_metadata(names: list[str]) -> dict[str, str]:
    """Safetensors metadata recording model order (safetensors itself stores tensors sorted by dtype)."""
    return {ORDER_METADATA: json.dumps(list(names))}


def _order_key(metadata: dict | None) -> Callable[[str], tuple]:
    try:
        order = {n: i for i, n in enumerate(json.loads((metadata or {})[ORDER_METADATA]))}
    except (KeyError, ValueError, TypeError):
        order = {}
    return lambda name: (order.get(name, len(order)), natural_key(name))


