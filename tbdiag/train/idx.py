"""Reader of the IDX format of the MNIST distribution (gzip-compressed or not)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from tbdiag.errors import TbdiagError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into an array.

    Raises:
        TbdiagError: the file is missing, truncated or not IDX.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise TbdiagError(f"{path}: cannot read IDX file ({exc}); check the data folder") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise TbdiagError(f"{path}: not an IDX file (bad magic number); pass MNIST-format files")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise TbdiagError(f"{path}: truncated IDX header; re-download it")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    count = int(np.prod(dims))
    body = data[4 + 4 * ndim:]
    if len(body) < count * dtype.itemsize:
        raise TbdiagError(f"{path}: truncated IDX file ({len(body)} of {count * dtype.itemsize} bytes); re-download it")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(dims)


def find_idx(folder: Path, stem: str) -> Path:
    """The file ``stem`` in ``folder``, raw or ``.gz`` (also the ``stem`` with ``.`` for ``-``)."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise TbdiagError(f"{folder}: no {stem}[.gz]; give a folder with the four MNIST IDX files")


def load_mnist(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels of an MNIST folder (uint8 images N×28×28)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TbdiagError(f"{folder}: no such folder; give the folder of the MNIST files")
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return tuple(read_idx(find_idx(folder, s)) for s in stems)  # type: ignore[return-value]
