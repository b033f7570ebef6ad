"""Data sets from the user's local files in their standard distributed formats (nothing is downloaded).

``cifar10``/``cifar100``: the python pickle batches (read by an unpickler that admits only numpy arrays,
so no code runs) or the binary version; ``mnist``: the four IDX files, gzip-compressed or not; ``svhn``:
``train_32x32.mat``/``test_32x32.mat`` (needs scipy); ``folder``: ``train/<class>/*.png`` and
``test/<class>/*.png``; ``npz``: one file with ``x_train y_train x_test y_test``; ``synthetic``: seeded
class-conditional noise for smoke tests. Images are kept as uint8 (N, C, H, W) tensors.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tbdiag.errors import TbdiagError
from tbdiag.train.idx import load_mnist

DATASETS = ("cifar10", "cifar100", "mnist", "svhn", "folder", "npz", "synthetic")


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 ``(N, C, H, W)``, labels as int64; ``augment`` turns on crop + flip (32×32 colour)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("copy_reg", "_reconstructor"),
               ("copyreg", "_reconstructor"), ("__builtin__", "object"), ("builtins", "object"),
               ("_codecs", "encode")}  # how Python 3 pickles bytes for protocol 2

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            doc = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise TbdiagError(f"{path}: not a CIFAR python batch ({exc}); pass the cifar-*-python folder") from exc
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in doc.items()}


def _cifar(folder: Path, classes: int) -> tuple[np.ndarray, ...]:
    label_key = "labels" if classes == 10 else "fine_labels"
    train_py = [folder / f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else [folder / "train"]
    test_py = folder / ("test_batch" if classes == 10 else "test")
    if all(p.is_file() for p in train_py) and test_py.is_file():
        parts = [_unpickle(p) for p in train_py]
        test = _unpickle(test_py)
        x = np.concatenate([np.asarray(p["data"]) for p in parts])
        y = np.concatenate([np.asarray(p[label_key]) for p in parts])
        return x, y, np.asarray(test["data"]), np.asarray(test[label_key])
    train_bin = [folder / f"data_batch_{i}.bin" for i in range(1, 6)] if classes == 10 else [folder / "train.bin"]
    test_bin = folder / ("test_batch.bin" if classes == 10 else "test.bin")
    if all(p.is_file() for p in train_bin) and test_bin.is_file():
        head = 1 if classes == 10 else 2
        def read(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
            raw = np.concatenate([np.fromfile(p, dtype=np.uint8) for p in paths])
            if raw.size % (head + 3072):
                raise TbdiagError(f"{paths[0]}: size is not a whole number of CIFAR records; re-download it")
            rec = raw.reshape(-1, head + 3072)
            return rec[:, head:], rec[:, head - 1].astype(np.int64)
        return (*read(train_bin), *read([test_bin]))
    raise TbdiagError(f"{folder}: no CIFAR-{classes} files (python batches or binary version); "
                      f"point --data-dir at the extracted cifar-{classes}-python folder")


def _images(x: np.ndarray, where: str) -> torch.Tensor:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise TbdiagError(f"{where}: images must be N×H×W, N×H×W×C or N×C×H×W, got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.clip(x * (255.0 if x.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.array(x, copy=True, order="C"))


def _synthetic(classes: int, shape: tuple[int, int, int], n_train: int, n_test: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand((classes, *shape), generator=g) * 255  # one mean image per class
    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        x = (templates[y] + torch.randn((n, *shape), generator=g) * 60).clamp(0, 255).to(torch.uint8)
        return x, y
    return (*draw(n_train), *draw(n_test))


def load_dataset(name: str, data_dir: str | Path | None, *, image_shape: tuple[int, int, int] = (3, 32, 32),
                 num_classes: int = 10, synthetic_size: int = 512, seed: int = 0) -> Dataset:
    """Load a data set by name from ``data_dir``.

    Args:
        name: one of `DATASETS`.
        data_dir: folder (or ``.npz`` file) of the data; unused for ``synthetic``.
        image_shape: (C, H, W) of ``synthetic`` images.
        num_classes: classes of ``synthetic``.
        synthetic_size: training images of ``synthetic`` (test: a quarter of it).
        seed: seed of ``synthetic``.

    Raises:
        TbdiagError: unknown name, missing folder, or files in the wrong format.
    """
    if name not in DATASETS:
        raise TbdiagError(f"--data {name}: unknown data set; use one of {', '.join(DATASETS)}")
    if name == "synthetic":
        xtr, ytr, xte, yte = _synthetic(num_classes, image_shape, synthetic_size, max(synthetic_size // 4, 16), seed)
        return Dataset(name, xtr, ytr, xte, yte, num_classes, augment=image_shape[1:] == (32, 32))
    if data_dir is None:
        raise TbdiagError(f"--data {name}: needs --data-dir pointing at the data set's files")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise TbdiagError(f"--data-dir {path}: no such file or folder; check the path")
    if name in ("cifar10", "cifar100"):
        classes = 10 if name == "cifar10" else 100
        xtr, ytr, xte, yte = _cifar(path, classes)
        xtr, xte = xtr.reshape(-1, 3, 32, 32), xte.reshape(-1, 3, 32, 32)
    elif name == "mnist":
        xtr, ytr, xte, yte = load_mnist(path)
    elif name == "svhn":
        xtr, ytr, xte, yte = _svhn(path)
    elif name == "folder":
        xtr, ytr, xte, yte = _image_folder(path)
    else:
        xtr, ytr, xte, yte = _npz(path)
    ytr, yte = torch.from_numpy(np.array(ytr, dtype=np.int64)), torch.from_numpy(np.array(yte, dtype=np.int64))
    xtr, xte = _images(xtr, str(path)), _images(xte, str(path))
    if len(xtr) != len(ytr) or len(xte) != len(yte) or xtr.shape[1:] != xte.shape[1:]:
        raise TbdiagError(f"{path}: images and labels do not match in count or shape; check the files")
    classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    color32 = tuple(xtr.shape[1:]) == (3, 32, 32)
    return Dataset(name, xtr, ytr, xte, yte, classes, augment=color32)


def _npz(path: Path) -> tuple:
    try:
        with np.load(path, allow_pickle=False) as z:
            return tuple(z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except KeyError as exc:
        raise TbdiagError(f"{path}: .npz lacks {exc}; it needs x_train, y_train, x_test, y_test") from None
    except (OSError, ValueError) as exc:
        raise TbdiagError(f"{path}: not a readable .npz ({exc}); pass a numpy .npz file") from None


def _svhn(folder: Path) -> tuple:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise TbdiagError("--data svhn: reading .mat files needs scipy; pip install scipy") from None
    out = []
    for split in ("train", "test"):
        p = folder / f"{split}_32x32.mat"
        if not p.is_file():
            raise TbdiagError(f"{folder}: no {p.name}; point --data-dir at the SVHN .mat files")
        mat = loadmat(p)
        out += [mat["X"].transpose(3, 2, 0, 1), mat["y"].flatten() % 10]  # label 10 means digit 0
    return tuple(out)


def _image_folder(root: Path) -> tuple:
    from PIL import Image

    splits = []
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else []
    if not classes or not (root / "test").is_dir():
        raise TbdiagError(f"{root}: an image folder needs train/<class>/ and test/<class>/ subfolders")
    for split in ("train", "test"):
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for f in sorted((root / split / cls).glob("*")):
                if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                    with Image.open(f) as im:
                        xs.append(np.asarray(im.convert("RGB")))
                    ys.append(label)
        if not xs or len({x.shape for x in xs}) != 1:
            raise TbdiagError(f"{root / split}: needs images, all of one size")
        splits += [np.stack(xs), np.array(ys)]
    return tuple(splits)
