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
from tbdiag.runs.config import CHOICES, ConfigError
from tbdiag.train.idx import load_mnist

DATASETS = CHOICES["data"]
CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "svhn": 10}  # folder: its class folders; npz: its labels


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
                      f"give the extracted cifar-{classes}-python folder")


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
        synthetic_size: training images of ``synthetic`` (test: a quarter of it, at least 16).
        seed: seed of ``synthetic``.

    Raises:
        TbdiagError: unknown name, missing folder, files in the wrong format, an unreadable image, or labels
            that are not whole numbers from 0 to the number of classes − 1.
    """
    if name not in DATASETS:
        raise TbdiagError(f"{name}: unknown data set; use one of {', '.join(DATASETS)}")
    if name == "synthetic":
        if synthetic_size < num_classes:
            raise ConfigError("synthetic_size", synthetic_size, f"fewer images than its {num_classes} classes; "
                                                                f"use at least {num_classes}")
        xtr, ytr, xte, yte = _synthetic(num_classes, image_shape, synthetic_size, max(synthetic_size // 4, 16), seed)
        return Dataset(name, xtr, ytr, xte, yte, num_classes, augment=image_shape[1:] == (32, 32))
    if data_dir is None:
        raise ConfigError("data_dir", "missing", f"data set {name} is read from local files; "
                                                 "give their folder (or .npz file)")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise TbdiagError(f"{path}: no such file or folder; check the data set's path")
    xtr, ytr, xte, yte, classes = _read(name, path)
    ytr = _labels(ytr, f"{path}: training labels", classes)
    if classes is None:  # npz: the training labels decide
        classes = int(ytr.max()) + 1
    yte = _labels(yte, f"{path}: test labels", classes)
    xtr, xte = _images(xtr, str(path)), _images(xte, str(path))
    if len(xtr) != len(ytr) or len(xte) != len(yte) or xtr.shape[1:] != xte.shape[1:]:
        raise TbdiagError(f"{path}: images and labels do not match in count or shape; check the files")
    color32 = tuple(xtr.shape[1:]) == (3, 32, 32)
    return Dataset(name, xtr, ytr, xte, yte, classes, augment=color32)


def _read(name: str, path: Path) -> tuple:
    """(train images, train labels, test images, test labels, classes or None) as arrays from the files."""
    if name in ("cifar10", "cifar100"):
        xtr, ytr, xte, yte = _cifar(path, CLASSES[name])
        return xtr.reshape(-1, 3, 32, 32), ytr, xte.reshape(-1, 3, 32, 32), yte, CLASSES[name]
    if name == "mnist":
        return (*load_mnist(path), CLASSES[name])
    if name == "svhn":
        return (*_svhn(path), CLASSES[name])
    if name == "folder":
        return _image_folder(path)
    return (*_npz(path), None)


def _labels(y: np.ndarray, where: str, classes: int | None) -> torch.Tensor:
    """Labels as int64, checked: one whole number ≥ 0 (and < ``classes``) per image.

    Raises:
        TbdiagError: another shape, a fraction, a negative label or one beyond the classes (the first named).
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.size == 0:
        raise TbdiagError(f"{where}: need one label per image, got an array of shape {y.shape}; fix the labels")
    if y.dtype.kind not in "iub":
        whole = np.isfinite(y) & (y == np.round(y)) if y.dtype.kind == "f" else np.zeros(y.shape, bool)
        if not whole.all():
            i = int(np.argmin(whole))
            raise TbdiagError(f"{where}: label {y[i].item()!r} (image {i}) is not a whole class number; fix the labels")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= classes) if classes is not None else y < 0
    if bad.any():
        i = int(np.argmax(bad))
        span = f"0–{classes - 1}" if classes is not None else "0 or more"
        raise TbdiagError(f"{where}: label {y[i]} (image {i}) is outside the classes {span}; fix the labels")
    return torch.from_numpy(np.ascontiguousarray(y))


def stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices (ascending) of a seeded sample of ``n`` < len(y) images with every class in proportion.

    Each class gets ⌊n · its share⌋ images; the few left over go one each to the classes with the largest
    remainders (ties: the lower class). Within a class the images are a seeded random choice, so the
    sample depends on the seed only, not on how the data set is ordered (an image folder is sorted by class).
    """
    classes, counts = torch.unique(y, return_counts=True)
    base, rest = (counts * n) // len(y), (counts * n) % len(y)
    take = base.clone()
    for i in sorted(range(len(classes)), key=lambda i: (-int(rest[i]), i))[:n - int(base.sum())]:
        take[i] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(y == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(chosen).sort().values


def _npz(path: Path) -> tuple:
    if not path.is_file():  # a pipe or a device would wait forever
        raise TbdiagError(f"{path}: not a regular file; pass a numpy .npz file")
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
        raise TbdiagError("data set svhn: reading its .mat files needs scipy; pip install scipy") from None
    out = []
    for split in ("train", "test"):
        p = folder / f"{split}_32x32.mat"
        if not p.is_file():
            raise TbdiagError(f"{folder}: no {p.name}; give the folder of the SVHN .mat files")
        mat = loadmat(p)
        out += [mat["X"].transpose(3, 2, 0, 1), mat["y"].flatten() % 10]  # label 10 means digit 0
    return tuple(out)


def _image_folder(root: Path) -> tuple:
    """(train images, labels, test images, labels, classes) of ``train/<class>/*`` and ``test/<class>/*``."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else []
    if not classes or not (root / "test").is_dir():
        raise TbdiagError(f"{root}: an image folder needs train/<class>/ and test/<class>/ subfolders")
    splits = []
    for split in ("train", "test"):
        xs, ys, first = [], [], None
        for label, cls in enumerate(classes):
            for f in sorted((root / split / cls).glob("*")):
                if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                    xs.append(_read_image(f))
                    ys.append(label)
                    first = first or f
                    if xs[-1].shape != xs[0].shape:
                        raise TbdiagError(f"{f}: {xs[-1].shape[1]}×{xs[-1].shape[0]} pixels, but {first} has "
                                          f"{xs[0].shape[1]}×{xs[0].shape[0]}; make every image one size")
        if not xs:
            raise TbdiagError(f"{root / split}: no images (.png, .jpg, .jpeg, .bmp) in its class folders; add some")
        splits += [np.stack(xs), np.array(ys)]
    return (*splits, len(classes))


def _read_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8.

    Raises:
        TbdiagError: the file is not a readable image (corrupt, truncated, another format).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise TbdiagError(f"{path}: not a readable image ({exc}); replace or remove it") from None
