import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from tbdiag.errors import TbdiagError
from tbdiag.train.data import load_dataset


def write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 255, (20, 28, 28)), gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", rng.integers(0, 10, 20), gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 255, (8, 28, 28)), gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(8) % 10, gz)
    d = load_dataset("mnist", tmp_path)
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.dtype == torch.uint8 and not d.augment
    assert d.y_test.tolist() == list(range(8))


def fake_cifar_python(folder, classes):
    rng = np.random.default_rng(1)
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    for name in [*names, "test_batch" if classes == 10 else "test"]:
        doc = {b"data": rng.integers(0, 255, (6, 3072)).astype(np.uint8), key: list(rng.integers(0, classes, 6))}
        with open(folder / name, "wb") as f:
            pickle.dump(doc, f, protocol=2)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_python_batches(tmp_path, classes):
    fake_cifar_python(tmp_path, classes)
    d = load_dataset(f"cifar{classes}", tmp_path)
    assert d.x_train.shape == ((30 if classes == 10 else 6), 3, 32, 32) and d.augment


def test_cifar_pickle_with_code_is_refused(tmp_path):
    fake_cifar_python(tmp_path, 10)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": pytest.approx}, f)
    with pytest.raises(TbdiagError, match="refusing to load"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_binary(tmp_path):
    rng = np.random.default_rng(2)
    for name, n in (("train.bin", 7), ("test.bin", 3)):
        rec = np.concatenate([rng.integers(0, 20, (n, 1)), rng.integers(0, 100, (n, 1)),
                              rng.integers(0, 255, (n, 3072))], axis=1).astype(np.uint8)
        rec.tofile(tmp_path / name)
    d = load_dataset("cifar100", tmp_path)
    assert d.x_train.shape == (7, 3, 32, 32) and len(d.y_test) == 3


def test_npz_and_image_folder(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", x_train=rng.random((10, 32, 32, 3)), y_train=np.arange(10) % 2,
             x_test=rng.random((4, 32, 32, 3)), y_test=np.arange(4) % 2)
    d = load_dataset("npz", tmp_path / "d.npz")
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_train.dtype == torch.uint8 and d.num_classes == 2
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(tmp_path / "imgs" / split / cls / f"{i}.png")
    d = load_dataset("folder", tmp_path / "imgs")
    assert d.x_train.shape == (4, 3, 32, 32) and d.y_train.tolist() == [0, 0, 1, 1]


def test_bad_data(tmp_path):
    with pytest.raises(TbdiagError, match="unknown data set"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(TbdiagError, match="no such file"):
        load_dataset("mnist", tmp_path / "missing")
    with pytest.raises(TbdiagError, match="data_dir missing: data set mnist is read from local files"):
        load_dataset("mnist", None)
    with pytest.raises(TbdiagError, match="no train-images"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(TbdiagError, match="no CIFAR-10 files"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "x.npz").write_bytes(b"junk")
    with pytest.raises(TbdiagError, match="not a readable .npz"):
        load_dataset("npz", tmp_path / "x.npz")
    (tmp_path / "m").mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / "m" / stem).write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x09")
    with pytest.raises(TbdiagError, match="IDX"):
        load_dataset("mnist", tmp_path / "m")


def test_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy (optional)")
    rng = np.random.default_rng(4)
    for split, n in (("train", 6), ("test", 3)):
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 255, (32, 32, 3, n)).astype(np.uint8),
                                                           "y": np.array([[10], [1], [2], [3], [4], [5]][:n])})
    d = load_dataset("svhn", tmp_path)
    assert d.x_train.shape == (6, 3, 32, 32) and d.y_train.tolist()[:2] == [0, 1] and d.augment


def image_folder(root, sizes, shape=(8, 8)):
    """``train/c<k>/`` with sizes[k] images (sorted by class, as every image folder is) and a small test split."""
    from PIL import Image

    rng = np.random.default_rng(5)
    for split, counts in (("train", sizes), ("test", [1] * len(sizes))):
        for k, n in enumerate(counts):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (*shape, 3)).astype(np.uint8)).save(root / split / f"c{k}" / f"{i:03d}.png")
    return root


def test_train_subset_is_a_seeded_stratified_sample(tmp_path):
    from tbdiag.runs.config import TrainConfig
    from tbdiag.train.batches import training_set

    folder = image_folder(tmp_path / "imgs", [20, 20, 20, 20])
    data = load_dataset("folder", folder)
    assert data.y_train.tolist() == sorted(data.y_train.tolist())  # the first N would be one class only
    config = TrainConfig(data="folder", data_dir=str(folder), train_subset=8, seed=1)
    x, y = training_set(data, config)
    assert torch.bincount(y).tolist() == [2, 2, 2, 2] and x.shape == (8, 3, 8, 8)
    again, _ = training_set(data, config)
    other, y2 = training_set(data, TrainConfig(data="folder", data_dir=str(folder), train_subset=8, seed=2))
    assert torch.equal(x, again) and not torch.equal(x, other) and torch.bincount(y2).tolist() == [2, 2, 2, 2]
    assert training_set(data, TrainConfig(data="folder", data_dir=str(folder)))[0] is data.x_train  # 0: all


def test_stratified_subset_shares_out_the_remainder():
    from tbdiag.train.data import stratified_subset

    y = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    for n, expected in ((10, [5, 3, 2]), (7, [4, 2, 1]), (1, [1, 0, 0]), (999, [499, 300, 200])):
        idx = stratified_subset(y, n, seed=0)
        assert len(set(idx.tolist())) == n and torch.bincount(y[idx], minlength=3).tolist() == expected, n


@pytest.mark.parametrize("y_train, y_test, message", [
    ([0, 1, -1, 1], [0, 1], "label -1 (image 2) is outside the classes 0 or more"),
    ([0, 1, 0, 1], [0, 2], "label 2 (image 1) is outside the classes 0–1"),
    ([0, 1, 0.5, 1], [0, 1], "label 0.5 (image 2) is not a whole class number"),
    ([0, 1, np.nan, 1], [0, 1], "is not a whole class number"),
    ([[0, 1], [1, 0], [0, 1], [1, 0]], [0, 1], "one label per image"),
])
def test_bad_npz_labels(tmp_path, y_train, y_test, message):
    x = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array(y_train), x_test=x[:2], y_test=np.array(y_test))
    with pytest.raises(TbdiagError) as err:
        load_dataset("npz", tmp_path / "d.npz")
    assert message in str(err.value) and str(tmp_path / "d.npz") in str(err.value)


def test_whole_float_labels_and_known_class_counts(tmp_path):
    x = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0.0, 1.0, 2.0, 1.0]), x_test=x[:2], y_test=np.array([0, 2]))
    d = load_dataset("npz", tmp_path / "d.npz")
    assert d.y_train.tolist() == [0, 1, 2, 1] and d.num_classes == 3
    rec = np.zeros((2, 3074), np.uint8)
    rec[:, 1] = [5, 150]  # CIFAR-100 binary: the fine label is the second byte
    rec.tofile(tmp_path / "train.bin")
    rec[:, 1] = [5, 6]
    rec.tofile(tmp_path / "test.bin")
    with pytest.raises(TbdiagError, match="label 150 .image 1. is outside the classes 0–99"):
        load_dataset("cifar100", tmp_path)


def test_unreadable_images_are_named(tmp_path):
    folder = image_folder(tmp_path / "imgs", [2, 2])
    good = folder / "train" / "c1" / "001.png"
    good.write_bytes(good.read_bytes()[:60])  # truncated
    with pytest.raises(TbdiagError, match=f"{good}: not a readable image"):
        load_dataset("folder", folder)
    good.write_bytes(b"not a png at all")
    with pytest.raises(TbdiagError, match=f"{good}: not a readable image"):
        load_dataset("folder", folder)
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good)
    with pytest.raises(TbdiagError, match=f"{good}: 4×4 pixels, but .*000.png has 8×8"):
        load_dataset("folder", folder)


def test_synthetic_needs_an_image_per_class():
    from tbdiag.runs.config import ConfigError

    with pytest.raises(ConfigError, match="synthetic_size 5: fewer images than its 10 classes"):
        load_dataset("synthetic", None, synthetic_size=5)
