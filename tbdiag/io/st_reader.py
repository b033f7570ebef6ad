"""Reading safetensors files one tensor at a time, with ``pread`` rather than a memory map.

``safe_open`` maps the whole file, and every page a computation touches stays resident in the process
(clean page cache, but counted in its RSS) until the handle closes: analysing a 10 GB checkpoint that
way shows 10 GB of RSS. Reading each tensor's byte range into its own buffer keeps the process at one
tensor. The format is simple: an 8-byte little-endian header length, a JSON header of
``name: {dtype, shape, data_offsets}`` (plus ``__metadata__``), then the data.

The header is checked as strictly as the safetensors library checks it, because a header that lies
gives wrong numbers rather than an error: every tensor's byte count is its shape × dtype size, and the
tensors' byte ranges tile the data region exactly, from the end of the header to the end of the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from tbdiag.errors import CheckpointError

# The dtypes tbdiag reads; tensors of other safetensors dtypes are skipped.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
# Bits per element of every dtype of the safetensors format (read or skipped).
DTYPE_BITS = {**{name: dtype.itemsize * 8 for name, dtype in DTYPES.items()},
              "U16": 16, "U32": 32, "U64": 64, "C64": 64, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too
REDO = "re-save or re-download it"


def unreadable(path: Path, exc: OSError) -> CheckpointError:
    """The one-line error for a file or folder the operating system will not read."""
    if path.is_symlink() and not path.exists():
        return CheckpointError(f"{path}: a broken or looping symbolic link ({exc.strerror or exc}); "
                               "point it at the checkpoint")
    return CheckpointError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__}); "
                           "check that it is a file you may read")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key!r} appears twice")
        out[key] = value
    return out


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensors, metadata, offset of the data) of a safetensors file, after checking the header.

    Raises:
        CheckpointError: a header length beyond the file or above 100 MB, a header that is not a JSON
            object without repeated names, a tensor whose dtype, shape or data_offsets are invalid or
            disagree (bytes ≠ elements × dtype size), or byte ranges that overlap, leave a gap, or do not
            end exactly at the end of the file.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, less than its 8-byte "
                                      "header length); re-download it")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length says {n} "
                                      f"bytes, file has {size}); re-download it")
            raw = f.read(n)
    except OSError as exc:
        raise unreadable(path, exc) from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); {REDO}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); {REDO}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings); {REDO}")
    start = 8 + n
    spans = sorted((*_byte_range(path, name, info), name) for name, info in header.items())
    _check_tiling(path, spans, size - start)
    return header, metadata, start


def _byte_range(path: Path, name: str, info: object) -> tuple[int, int]:
    """A tensor's ``data_offsets``, after checking them and its dtype and shape against each other."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} {what} in the safetensors header; {REDO}")

    if not isinstance(info, dict):
        raise bad("is not a {dtype, shape, data_offsets} entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise bad(f"has dtype {dtype!r}, not a safetensors dtype")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end] with 0 ≤ begin ≤ end")
    bits = DTYPE_BITS[dtype]
    for s in shape:
        bits *= s
    begin, end = offsets
    size = f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits"
    if bits != 8 * (end - begin):
        raise bad(f"is {dtype} {shape}, {size}, but its data_offsets span {end - begin} bytes "
                  "(the header does not match the data)")
    return begin, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The sorted ``(begin, end, name)`` ranges cover ``[0, data_size)`` exactly once."""
    if spans and max(spans, key=lambda s: s[1])[1] > data_size:
        name = max(spans, key=lambda s: s[1])[2]
        raise CheckpointError(f"{path}: tensor {name!r} lies beyond the end of the file (truncated or corrupt); "
                              "re-download it")
    done, last = 0, None
    for begin, end, name in spans:
        if begin < done:
            raise CheckpointError(f"{path}: tensors {last!r} and {name!r} overlap in the file (corrupt header); "
                                  f"{REDO}")
        if begin > done:
            raise CheckpointError(f"{path}: bytes {done}–{begin} of the data belong to no tensor (before {name!r}; "
                                  f"corrupt header); {REDO}")
        done, last = end, name
    if done != data_size:
        raise CheckpointError(f"{path}: the last {data_size - done} bytes of the file belong to no tensor (a wrong "
                              f"header length or data_offsets); {REDO}")


def tensor_loader(path: Path, info: dict, data_start: int) -> tuple[Callable[[], torch.Tensor],
                                                                       Callable[[int, int], torch.Tensor]]:
    """Functions reading the whole tensor, and rows ``start:stop`` of dim 0, from disk."""
    dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
    begin, end = info["data_offsets"]
    row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0

    def read(offset: int, length: int, rows_shape: tuple[int, ...]) -> torch.Tensor:
        if length == 0:
            return torch.empty(rows_shape, dtype=dtype)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise unreadable(path, exc) from None
        try:
            buf = bytearray(length)
            view, done = memoryview(buf), 0
            while done < length:
                got = os.preadv(fd, [view[done:]], data_start + offset + done)
                if got == 0:
                    raise CheckpointError(f"{path}: file ended inside a tensor (truncated); re-download it")
                done += got
        except OSError as exc:
            raise unreadable(path, exc) from None
        finally:
            os.close(fd)
        return torch.frombuffer(buf, dtype=dtype).reshape(rows_shape)

    def load() -> torch.Tensor:
        return read(begin, end - begin, shape)

    def load_rows(a: int, b: int) -> torch.Tensor:
        a, b = max(0, a), min(shape[0], b)
        return read(begin + a * row_bytes, (b - a) * row_bytes, (b - a, *shape[1:]))

    return load, load_rows
