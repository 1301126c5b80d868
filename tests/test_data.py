"""Dataset readers against the real files (data_dir fixture) and small synthetic files in tmp_path."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from ntkfast import data

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_train(data_dir):
    return data.load_mnist(data_dir)


@pytest.fixture(scope="module")
def mnist_test(data_dir):
    return data.load_mnist(data_dir, train=False)


@pytest.fixture(scope="module")
def cifar_train(data_dir):
    return data.load_cifar10(data_dir)


def write_idx(path, array: np.ndarray, magic=None, compress=False):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    payload = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def tiny_mnist(root, n=5, compress=False, prefix="t10k"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    ext = ".gz" if compress else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, compress=compress)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, compress=compress)
    return images, labels


# -- MNIST / Fashion-MNIST -----------------------------------------------------------------------

def test_mnist_train(mnist_train):
    d = mnist_train
    assert len(d) == 60000 and d.images.shape == (60000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.targets.dtype == torch.int64
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and d.classes[3] == "3"
    assert d.class_counts() == MNIST_TRAIN_COUNTS
    assert d.mean == (0.1307,) and d.std == (0.3081,)


def test_mnist_test(mnist_test):
    assert len(mnist_test) == 10000 and mnist_test.class_counts() == MNIST_TEST_COUNTS
    assert not mnist_test.train


def test_mnist_pixel_statistics(mnist_train):
    x = mnist_train.images.to(torch.float64) / 255
    assert x.mean().item() == pytest.approx(0.1307, abs=5e-4)
    assert x.std().item() == pytest.approx(0.3081, abs=5e-4)


def test_normalised_items_and_batches(mnist_train):
    sub = mnist_train.subset(4000)
    xs = torch.cat([x for x, _ in sub.batches(1000)])
    assert xs.dtype == torch.float32 and xs.shape == (4000, 1, 28, 28)
    assert abs(xs.mean().item()) < 0.05 and xs.std().item() == pytest.approx(1.0, abs=0.05)
    x, y = mnist_train[7]
    expected = (mnist_train.images[7].float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x, expected) and y == mnist_train.targets[7]


def test_unnormalised_items(data_dir):
    d = data.load_dataset("mnist", data_dir, train=False, normalize=False)
    x, _ = d[0]
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, d.images[0].float() / 255)


def test_fashion_mnist_and_aliases(data_dir):
    d = data.load_dataset("fashion-mnist", data_dir, train=False)
    assert len(d) == 10000 and d.class_counts() == [1000] * 10
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"
    assert d.mean == (0.2860,) and d.std == (0.3530,)
    for alias in ("fashion_mnist", "fmnist", "FashionMNIST"):
        assert torch.equal(data.load_dataset(alias, data_dir, train=False).targets, d.targets)
    train = data.load_fashion_mnist(data_dir)
    assert len(train) == 60000 and train.class_counts() == [6000] * 10


# -- CIFAR-10 ------------------------------------------------------------------------------------

def test_cifar10_train(cifar_train):
    d = cifar_train
    assert d.images.shape == (50000, 3, 32, 32) and d.input_shape == (3, 32, 32)
    assert d.class_counts() == [5000] * 10
    assert d.classes == data.CIFAR10_CLASSES
    # original batch order: data_batch_1 first
    assert d.subset(10000).class_counts() == [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]
    m = data.mean_input(d)
    assert m.shape == (3, 32, 32)
    assert torch.allclose(m.mean((1, 2)), torch.tensor([0.4914, 0.4822, 0.4465]), atol=5e-4)


def test_cifar10_test_and_alias(data_dir):
    d = data.load_dataset("cifar-10", data_dir, train=False)
    assert len(d) == 10000 and d.class_counts() == [1000] * 10
    assert d.mean == (0.4914, 0.4822, 0.4465) and d.std == (0.2470, 0.2435, 0.2616)
    x, _ = d[0]
    expected = (d.images[0].float() / 255 - torch.tensor(d.mean).view(3, 1, 1)) / torch.tensor(d.std).view(3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)


def test_cifar10_flat_layout(data_dir, tmp_path):
    src = data_dir / "cifar-10-batches-py"
    for name in ("test_batch", "batches.meta"):
        os.symlink(src / name, tmp_path / name)
    d = data.load_cifar10(tmp_path, train=False)
    ref = data.load_cifar10(data_dir, train=False)
    assert torch.equal(d.images, ref.images) and torch.equal(d.targets, ref.targets)


def test_cifar10_corrupt_and_unsafe_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="test_batch"):
        data.load_cifar10(tmp_path, train=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (root / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="not allowed"):
        data.load_cifar10(tmp_path, train=False)

    bad = {b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (root / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match="3072"):
        data.load_cifar10(tmp_path, train=False)

    good = {b"data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072), b"labels": [4, 9]}
    for protocol in (2, 3, 4, 5):  # batches re-saved by Python 3 tools load too
        (root / "test_batch").write_bytes(pickle.dumps(good, protocol=protocol))
        d = data.load_cifar10(tmp_path, train=False)
        assert d.targets.tolist() == [4, 9] and d.images[0, 1, 0, 0] == 1024 % 256
        assert d.classes == data.CIFAR10_CLASSES  # no batches.meta: default names


def test_cifar10_damaged_pickles_are_named_whatever_they_raise(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    good = pickle.dumps({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [4, 9]}, protocol=2)
    frame = bytearray(pickle.dumps({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [4, 9]}, protocol=4))
    frame[3:11] = struct.pack("<Q", 1 << 62)  # a frame length no machine can hold: MemoryError
    damaged = [good.replace(b"latin1", b"lain1 ", 1),  # an unknown encoding: LookupError
               bytes(frame)]
    for blob in damaged:
        (root / "test_batch").write_bytes(blob)
        with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch"):
            data.load_cifar10(tmp_path, train=False)


def test_a_partial_folder_is_not_completed_from_another(tmp_path):
    # cifar-10-batches-py/ lacks data_batch_3; a stray copy beside it must not fill the gap
    batch = pickle.dumps({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [1, 2]}, protocol=2)
    (tmp_path / "cifar-10-batches-py").mkdir()
    for i in (1, 2, 4, 5):
        (tmp_path / "cifar-10-batches-py" / f"data_batch_{i}").write_bytes(batch)
    (tmp_path / "data_batch_3").write_bytes(batch)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py' holds .* but not 'data_batch_3'"):
        data.load_cifar10(tmp_path, train=True)
    # MNIST's images in mnist/, its labels only at the root: refused the same way
    images, labels = tiny_mnist(tmp_path / "m" / "mnist", n=3)
    (tmp_path / "m" / "mnist" / "t10k-labels-idx1-ubyte").rename(tmp_path / "m" / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="but not 't10k-labels-idx1-ubyte'"):
        data.load_mnist(tmp_path / "m", train=False)


def test_a_data_dir_that_is_a_file_is_called_one(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    for load in (data.load_cifar10, data.load_mnist):
        with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
            load(archive, train=False)


# -- layouts, raw files, errors ------------------------------------------------------------------

def test_torchvision_layout_raw_idx(data_dir, mnist_test, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(data_dir / "mnist" / (name + ".gz"), "rb") as f:
            (raw / name).write_bytes(f.read())
    d = data.load_mnist(tmp_path, train=False)
    assert torch.equal(d.images, mnist_test.images) and torch.equal(d.targets, mnist_test.targets)


def test_torchvision_layout_fashion(data_dir, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        os.symlink(data_dir / "fashion-mnist" / name, raw / name)
    d = data.load_fashion_mnist(tmp_path, train=False)
    assert len(d) == 10000 and d.class_counts() == [1000] * 10


@pytest.mark.parametrize("compress", [False, True])
def test_synthetic_idx_flat_layout(tmp_path, compress):
    images, labels = tiny_mnist(tmp_path, compress=compress)
    d = data.load_mnist(tmp_path, train=False)
    assert d.images.shape == (5, 1, 28, 28)
    assert np.array_equal(d.images[:, 0].numpy(), images) and d.targets.tolist() == labels.tolist()


def test_uncompressed_preferred_and_subdir_first(tmp_path):
    tiny_mnist(tmp_path, n=3)                    # root/<file>
    tiny_mnist(tmp_path / "mnist", n=4, compress=True)  # root/mnist/<file>.gz wins
    assert len(data.load_mnist(tmp_path, train=False)) == 4


def test_missing_file_names_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_mnist(tmp_path, train=True)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.load_cifar10(tmp_path / "nowhere")


def test_idx_images_of_another_size_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, size=(3, 32, 32), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 3], np.uint8))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: mnist images are 28x28, the IDX header says 32x32"):
        data.load_mnist(tmp_path, train=False)
    with pytest.raises(ValueError, match="fashion-mnist images are 28x28"):
        data.load_dataset("fashion-mnist", tmp_path, train=False)


def test_corrupt_idx(tmp_path):
    images, labels = tiny_mnist(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(bad, images, magic=0x00000801 + 0x1000)
    with pytest.raises(ValueError, match="magic") as e:
        data.load_mnist(tmp_path, train=False)
    assert str(bad) in str(e.value)
    write_idx(bad, labels)  # a labels file where images are expected
    with pytest.raises(ValueError, match="magic"):
        data.load_mnist(tmp_path, train=False)
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(ValueError, match=str(bad)):
        data.read_idx(bad)
    write_idx(bad, images)
    bad.write_bytes(bad.read_bytes()[:-1])  # truncated pixel data
    with pytest.raises(ValueError, match="bytes of data"):
        data.load_mnist(tmp_path, train=False)
    write_idx(bad, images[:4])  # 4 images, 5 labels
    with pytest.raises(ValueError, match="labels"):
        data.load_mnist(tmp_path, train=False)
    gz = tmp_path / "x" / "t10k-images-idx3-ubyte.gz"
    gz.parent.mkdir()
    gz.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(ValueError, match="gzip"):
        data.read_idx(gz)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset") as e:
        data.load_dataset("coco", "/tmp")
    assert "mnist" in str(e.value)


# -- batches, subsets, mean input ----------------------------------------------------------------

def test_batches(mnist_test):
    d = mnist_test.subset(1000)
    b = list(d.batches(300))
    assert [len(x) for x, _ in b] == [300, 300, 300, 100]
    assert torch.equal(b[1][0][5], d[305][0])
    assert [len(x) for x, _ in d.batches(300, drop_last=True)] == [300] * 3
    assert d.num_batches(300) == 4 and d.num_batches(300, drop_last=True) == 3
    s1 = torch.cat([y for _, y in d.batches(128, shuffle=True, seed=1)])
    s1b = torch.cat([y for _, y in d.batches(128, shuffle=True, seed=1)])
    s2 = torch.cat([y for _, y in d.batches(128, shuffle=True, seed=2)])
    assert torch.equal(s1, s1b) and not torch.equal(s1, s2)
    assert torch.equal(s1.sort().values, d.targets.sort().values)
    x, y = next(iter(d.batches(10, shuffle=True, seed=3)))
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:10]
    assert torch.equal(x, torch.stack([d[int(i)][0] for i in perm])) and torch.equal(y, d.targets[perm])
    with pytest.raises(ValueError, match="batch_size"):
        next(d.batches(0))


def test_subset(mnist_test):
    s = mnist_test.subset([3, 1, 4])
    assert torch.equal(s.images, mnist_test.images[[3, 1, 4]]) and s.num_classes == 10 and s.name == "mnist"
    mask = mnist_test.targets == 7
    assert mnist_test.subset(mask).class_counts()[7] == 1028 and len(mnist_test.subset(mask)) == 1028
    assert len(mnist_test.subset(torch.tensor([-1]))) == 1
    with pytest.raises(ValueError):
        mnist_test.subset(10001)
    with pytest.raises(ValueError):
        mnist_test.subset([10000])


def test_mean_input(mnist_test):
    m = data.mean_input(mnist_test)
    assert m.shape == (1, 28, 28) and m.dtype == torch.float32
    assert m.min() >= 0 and m.max() <= 1
    assert torch.allclose(m, mnist_test.images.double().mean(0).float() / 255, atol=1e-6)


# -- Gaussian noise ------------------------------------------------------------------------------

def test_gaussian_noise():
    g = data.GaussianNoise((3, 8, 8), 500, num_classes=7, seed=1)
    assert len(g) == 500 and g.input_shape == (3, 8, 8) and g.num_classes == 7
    x, y = g[0]
    assert x.shape == (3, 8, 8) and 0 <= int(y) < 7
    assert abs(g.inputs.mean().item()) < 0.02 and g.inputs.std().item() == pytest.approx(1, abs=0.02)
    assert set(g.targets.tolist()) == set(range(7))
    assert torch.equal(g.inputs, data.GaussianNoise((3, 8, 8), 500, 7, seed=1).inputs)
    assert not torch.equal(g.inputs, data.GaussianNoise((3, 8, 8), 500, 7, seed=2).inputs)
    sizes = [len(xb) for xb, _ in g.batches(200, shuffle=True)]
    assert sizes == [200, 200, 100]
    assert len(g.subset(10)) == 10 and g.subset(10).input_shape == (3, 8, 8)
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        data.GaussianNoise((3, 8, 8), 0)
    with pytest.raises(ValueError, match="input_shape"):
        data.GaussianNoise((3, -1), 5)
