"""Reading safetensors files one tensor at a time, with ``pread`` rather than a memory map.

``safe_open`` maps the whole file, and every page a computation touches stays resident in the process
(clean page cache, but counted in its RSS) until the handle closes: analysing a 10 GB checkpoint that
way shows 10 GB of RSS. Reading each tensor's byte range into its own buffer keeps the process at one
tensor. The format is simple: an 8-byte little-endian header length, a JSON header of
``name: {dtype, shape, data_offsets}`` (plus ``__metadata__``), then the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from tbdiag.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensors, metadata, offset of the data) of a safetensors file.

    Raises:
        CheckpointError: a header that is not valid JSON, or offsets beyond the end of the file.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); re-save or re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-save or re-download it")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            ok = 0 <= begin <= end and start + end <= size
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: tensor {name} lies beyond the end of the file (truncated or corrupt); "
                                  "re-download it")
    return header, metadata, start


def tensor_loader(path: Path, info: dict, data_start: int) -> tuple[Callable[[], torch.Tensor],
                                                                       Callable[[int, int], torch.Tensor]]:
    """Functions reading the whole tensor, and rows ``start:stop`` of dim 0, from disk."""
    dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
    begin, end = info["data_offsets"]
    row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0

    def read(offset: int, length: int, rows_shape: tuple[int, ...]) -> torch.Tensor:
        if length == 0:
            return torch.empty(rows_shape, dtype=dtype)
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = bytearray(length)
            view, done = memoryview(buf), 0
            while done < length:
                got = os.preadv(fd, [view[done:]], data_start + offset + done)
                if got == 0:
                    raise CheckpointError(f"{path}: file ended inside a tensor (truncated); re-download it")
                done += got
        finally:
            os.close(fd)
        return torch.frombuffer(buf, dtype=dtype).reshape(rows_shape)

    def load() -> torch.Tensor:
        return read(begin, end - begin, shape)

    def load_rows(a: int, b: int) -> torch.Tensor:
        a, b = max(0, a), min(shape[0], b)
        return read(begin + a * row_bytes, (b - a) * row_bytes, (b - a, *shape[1:]))

    return load, load_rows
