"""The CIFAR-100, SVHN, Tiny-ImageNet and ImageFolder/ImageNet readers, on small files each test
writes in the dataset's own layout (nothing is downloaded), and their refusals of missing,
partial, mixed-up or corrupt input."""
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from ntkfast import data
from ntkfast.data import tiny_imagenet as tiny_mod

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from testing import internal  # noqa: E402

scipy_io = pytest.importorskip("scipy.io")


def tree(root):
    """Every file under root with its size and modification time: what a reader must not change."""
    return sorted((os.path.relpath(os.path.join(d, f), root), os.stat(os.path.join(d, f)).st_size,
                   os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, fs in os.walk(root) for f in fs)


def colour(label, i):
    """A solid colour per (class, image), far enough apart to survive JPEG compression."""
    return (40 + 60 * label, 30 + 50 * i, 200 - 40 * label)


def save_image(path, rgb, size=(64, 64), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, rgb)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG"), quality=95)
    return path


def assert_colour(img, rgb, tol=6):
    """img: uint8 [3, H, W] of one solid colour."""
    got = img.to(torch.int64).flatten(1).float().mean(1)
    assert torch.allclose(got, torch.tensor(rgb, dtype=torch.float32), atol=tol), (got.tolist(), rgb)


# =============================================================================================
# CIFAR-100
# =============================================================================================

FINE = {"train": [3, 99, 0, 57, 12, 3], "test": [98, 1, 64, 7]}
COARSE = {"train": [19, 0, 4, 11, 2, 19], "test": [0, 1, 19, 5]}


def write_cifar100(root, protocol=2, **override):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    content = {}
    for split in ("train", "test"):
        n = len(FINE[split])
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(FINE[split]),
             b"coarse_labels": list(COARSE[split]), b"filenames": [f"img_{i}.png".encode() for i in range(n)],
             b"batch_label": f"{split} batch 1 of 1".encode()}
        d.update(override.get(split, {}))
        (folder / split).write_bytes(pickle.dumps(d, protocol=protocol))
        content[split] = d
    meta = {b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder, content


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar100_fine_labels(tmp_path, protocol):
    _, content = write_cifar100(tmp_path, protocol)
    for train, split in ((True, "train"), (False, "test")):
        d = data.load_dataset("cifar100", tmp_path, train=train)
        raw = content[split][b"data"]
        assert isinstance(d, data.ImageDataset) and d.images.shape == (len(FINE[split]), 3, 32, 32)
        assert d.targets.tolist() == FINE[split] and d.train is train
        # each row: 1024 red, 1024 green, 1024 blue values, row-major
        assert torch.equal(d.images[1], torch.from_numpy(raw[1].reshape(3, 32, 32)))
        assert d.images[2, 1, 0, 5] == raw[2, 1024 + 5]
        assert d.num_classes == 100 and d.classes[57] == "fine_57" and d.input_shape == (3, 32, 32)
        assert (d.mean, d.std) == data.STATS["cifar100"] == ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))


def test_cifar100_coarse_labels_and_aliases(tmp_path):
    write_cifar100(tmp_path)
    d = data.load_dataset("cifar-100", tmp_path / "cifar-100-python", train=False, labels="coarse")
    assert d.targets.tolist() == COARSE["test"] and d.num_classes == 20 and d.classes[19] == "coarse_19"
    fine = data.load_cifar100(tmp_path, train=False, labels="fine")
    assert torch.equal(fine.images, d.images) and fine.targets.tolist() == FINE["test"]
    with pytest.raises(ValueError, match="^labels: expected one of 'fine', 'coarse'"):
        data.load_cifar100(tmp_path, labels="superclass")
    with pytest.raises(ValueError, match="^labels: not an option of the cifar10 reader"):
        data.load_dataset("cifar10", tmp_path, labels="coarse")


def test_cifar100_missing_partial_and_mixed_up(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar100.*does not exist"):
        data.load_dataset("cifar100", tmp_path / "nowhere")
    folder, _ = write_cifar100(tmp_path / "a")
    (folder / "meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"cifar100: the 'meta' file .*meta"):
        data.load_cifar100(tmp_path / "a")
    folder, _ = write_cifar100(tmp_path / "b")
    (folder / "test").unlink()  # a partial copy fails for the train split too, before it is read
    with pytest.raises(FileNotFoundError, match=r"cifar100: the 'test' file"):
        data.load_cifar100(tmp_path / "b", train=True)
    # a CIFAR-10 folder given as CIFAR-100, and the other way round
    c10 = tmp_path / "c" / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    (c10 / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]}))
    with pytest.raises(FileNotFoundError, match="looks like the folder of cifar10, not cifar100"):
        data.load_cifar100(tmp_path / "c", train=False)
    with pytest.raises(FileNotFoundError, match="looks like the folder of cifar100, not cifar10"):
        data.load_cifar10(tmp_path / "a", train=False)
    # the datasets' own folders given for the other name: their files, not a subfolder, tell them apart
    whole, _ = write_cifar100(tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="looks like the folder of cifar100, not cifar10"):
        data.load_cifar10(whole, train=False)
    (c10 / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="looks like the folder of cifar10, not cifar100"):
        data.load_cifar100(c10, train=False)
    # CIFAR-10 batches renamed into a CIFAR-100 folder
    folder, _ = write_cifar100(tmp_path / "d")
    (folder / "test").write_bytes((c10 / "test_batch").read_bytes())
    with pytest.raises(ValueError, match=r"test: not a CIFAR-100 python file .*a CIFAR-10 batch\?"):
        data.load_cifar100(tmp_path / "d", train=False)


@pytest.mark.parametrize("labels,key,bad,match", [
    ("fine", b"fine_labels", [0, 1, 100, 2], r"'fine_labels' out of range 0\.\.99"),
    ("fine", b"fine_labels", [0, -1, 5, 2], r"'fine_labels' out of range 0\.\.99"),
    ("coarse", b"coarse_labels", [0, 20, 5, 2], r"'coarse_labels' out of range 0\.\.19"),
    ("fine", b"fine_labels", [0, 1, 2], r"'fine_labels' must be a list of 4 ints"),
    ("fine", b"fine_labels", [0, 1.5, 2, 3], r"'fine_labels' must be ints"),
])
def test_cifar100_labels_refused(tmp_path, labels, key, bad, match):
    folder, _ = write_cifar100(tmp_path, test={key: bad})
    with pytest.raises(ValueError, match=match) as e:
        data.load_cifar100(tmp_path, train=False, labels=labels)
    assert str(folder / "test") in str(e.value)


def test_cifar100_hostile_pickles_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder, _ = write_cifar100(tmp_path, test={b"data": Evil()})
    with pytest.raises(ValueError, match="not allowed") as e:
        data.load_cifar100(tmp_path, train=False)
    assert str(folder / "test") in str(e.value) and not marker.exists()
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="meta: not a CIFAR-100 meta file .*not allowed"):
        data.load_cifar100(tmp_path, train=True)
    assert not marker.exists()
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 99}, protocol=2))
    with pytest.raises(ValueError, match="'fine_label_names' must be a list of 100 names"):
        data.load_cifar100(tmp_path, train=True)
    write_cifar100(tmp_path)
    (folder / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="test: not a CIFAR-100 python file"):
        data.load_cifar100(tmp_path, train=False)


# =============================================================================================
# SVHN
# =============================================================================================

def write_svhn(root, labels=(10, 1, 5, 10, 9), x=None, split="train"):
    root.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    rng = np.random.default_rng(n)
    if x is None:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.asarray(labels, dtype=np.uint8).reshape(-1, 1)
    scipy_io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x


def test_svhn_layout_labels_and_pixels(tmp_path):
    x = write_svhn(tmp_path / "svhn")
    write_svhn(tmp_path / "svhn", labels=(3, 10), split="test")
    d = data.load_dataset("svhn", tmp_path)
    assert d.images.shape == (5, 3, 32, 32) and d.images.dtype == torch.uint8
    assert d.targets.tolist() == [0, 1, 5, 0, 9]  # the files' 10 is the digit 0
    # X is [height, width, channel, image]
    assert torch.equal(d.images[2], torch.from_numpy(x[:, :, :, 2].transpose(2, 0, 1).copy()))
    assert d.images[4, 1, 7, 3] == x[7, 3, 1, 4]
    assert d.classes == [str(i) for i in range(10)] and (d.mean, d.std) == data.STATS["svhn"]
    t = data.load_svhn(tmp_path / "svhn", train=False)
    assert t.targets.tolist() == [3, 0] and not t.train


def test_svhn_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="svhn.*does not exist"):
        data.load_svhn(tmp_path / "nowhere")
    write_svhn(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"svhn: the other split's file .*test_32x32\.mat"):
        data.load_svhn(tmp_path)  # a partial copy
    write_svhn(tmp_path, labels=(1, 11, 2), split="test")
    with pytest.raises(ValueError, match=r"test_32x32\.mat: SVHN labels out of range 1\.\.10"):
        data.load_svhn(tmp_path, train=False)
    write_svhn(tmp_path, labels=(1, 0, 2), split="test")
    with pytest.raises(ValueError, match="out of range"):
        data.load_svhn(tmp_path, train=False)
    write_svhn(tmp_path, labels=(1, 2), x=np.zeros((32, 32, 1, 2), np.uint8), split="test")
    with pytest.raises(ValueError, match=r"SVHN 'X' must be uint8 \[32, 32, 3, N\]"):
        data.load_svhn(tmp_path, train=False)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 20)
    with pytest.raises(ValueError, match=r"test_32x32\.mat: not an SVHN \.mat file"):
        data.load_svhn(tmp_path, train=False)
    # a CIFAR-100 folder given as SVHN
    write_cifar100(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="looks like the folder of cifar100, not svhn"):
        data.load_svhn(tmp_path / "c")


def test_missing_optional_dependencies_named(tmp_path, monkeypatch):
    write_svhn(tmp_path)
    write_svhn(tmp_path, split="test")
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        data.load_svhn(tmp_path)
    write_tiny(tmp_path / "t")
    write_folder(tmp_path / "f" / "train", {"a": 1})
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        data.load_tiny_imagenet(tmp_path / "t")
    with pytest.raises(ImportError, match="pip install pillow"):
        data.load_imagefolder(tmp_path / "f")


# =============================================================================================
# Tiny-ImageNet
# =============================================================================================

WNIDS = ["n0300", "n0100", "n0200"]  # wnids.txt order; classes are indexed in sorted order


def write_tiny(root, per_class=2, val=(("n0200", 0), ("n0100", 0), ("n0300", 1), ("n0100", 1)), sorted_val=False):
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    classes = sorted(WNIDS)
    for w in WNIDS:
        for i in range(per_class):
            save_image(base / "train" / w / "images" / f"{w}_{i}.JPEG", colour(classes.index(w), i))
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
    lines = []
    for k, (w, i) in enumerate(val):
        name = f"val_{k}.JPEG"
        if sorted_val:  # NTK-SAP's loader moves the images into val/<wnid>/ on its first run
            save_image(base / "val" / w / name, colour(classes.index(w), i))
        else:
            save_image(base / "val" / "images" / name, colour(classes.index(w), i))
        lines.append(f"{name}\t{w}\t0\t0\t63\t63\n")
    if not sorted_val:
        (base / "val" / "val_annotations.txt").write_text("".join(lines))
    save_image(base / "test" / "images" / "test_0.JPEG", (1, 2, 3))
    return base


def test_tiny_imagenet_train_split(tmp_path):
    write_tiny(tmp_path)
    d = data.load_dataset("tiny-imagenet", tmp_path)
    assert isinstance(d, data.ImageDataset) and d.images.shape == (6, 3, 64, 64) and d.images.dtype == torch.uint8
    assert d.classes == ["n0100", "n0200", "n0300"] and d.num_classes == 3 and d.input_shape == (3, 64, 64)
    assert d.targets.tolist() == [0, 0, 1, 1, 2, 2]
    for j, (label, i) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]):
        assert_colour(d.images[j], colour(label, i))
    assert (d.mean, d.std) == data.STATS["tiny-imagenet"] == ((0.480, 0.448, 0.397), (0.276, 0.269, 0.282))


def test_tiny_imagenet_val_split_both_layouts(tmp_path):
    write_tiny(tmp_path / "a")
    write_tiny(tmp_path / "b", sorted_val=True)
    for root in (tmp_path / "a", tmp_path / "b" / "tiny-imagenet-200"):
        d = data.load_tiny_imagenet(root, train=False)
        # ordered by class, then file name: val_1 (n0100), val_3 (n0100), val_0 (n0200), val_2 (n0300)
        assert d.targets.tolist() == [0, 0, 1, 2] and not d.train and d.images.shape == (4, 3, 64, 64)
        for j, rgb in enumerate([colour(0, 0), colour(0, 1), colour(1, 0), colour(2, 1)]):
            assert_colour(d.images[j], rgb)


def test_tiny_imagenet_sorted_val_missing_a_class_is_refused(tmp_path, monkeypatch):
    base = write_tiny(tmp_path / "a", val=(("n0200", 0), ("n0100", 0)), sorted_val=True)  # n0300 never sorted
    calls = _no_decoding(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 classes have no images there \(n0300\): a partial copy"):
        data.load_tiny_imagenet(base, train=False)
    base = write_tiny(tmp_path / "b", sorted_val=True)
    for f in (base / "val" / "n0100").iterdir():  # a class folder left empty counts the same
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 classes have no images there \(n0100\)"):
        data.load_tiny_imagenet(base, train=False)
    assert calls == []


def test_tiny_imagenet_greyscale_and_rgba_become_rgb(tmp_path):
    base = write_tiny(tmp_path)
    grey = save_image(base / "train" / "n0100" / "images" / "n0100_0.JPEG", (90, 90, 90), mode="L")
    rgba = save_image(base / "train" / "n0200" / "images" / "n0200_1.png", (10, 200, 30), mode="RGBA")
    assert Image.open(grey).mode == "L" and Image.open(rgba).mode == "RGBA"
    d = data.load_tiny_imagenet(tmp_path)
    assert d.images.shape == (7, 3, 64, 64)
    assert_colour(d.images[0], (90, 90, 90), tol=2)
    assert torch.equal(d.images[0, 0], d.images[0, 1]) and torch.equal(d.images[0, 0], d.images[0, 2])
    names = [p.name for p, _ in tiny_mod._train_samples(base, sorted(WNIDS))]
    assert torch.equal(d.images[names.index("n0200_1.png")], torch.tensor([10, 200, 30], dtype=torch.uint8)
                       .view(3, 1, 1).expand(3, 64, 64))


def _no_decoding(monkeypatch):
    calls = []
    monkeypatch.setattr(tiny_mod, "decode_array", lambda *a, **k: calls.append(a) or pytest.fail("decoded"))
    return calls


@pytest.mark.parametrize("damage,error,match", [
    (lambda b: (b / "wnids.txt").unlink(), FileNotFoundError, r"tiny-imagenet: 'wnids.txt' not found"),
    (lambda b: (b / "wnids.txt").write_text("n0100\nn0200\nn0100\n"), ValueError, "lists 'n0100' twice"),
    (lambda b: os.rename(b / "val", b / "valx"), FileNotFoundError, r"tiny-imagenet: the validation folder .*val'"),
    (lambda b: (b / "val" / "val_annotations.txt").unlink(), FileNotFoundError,
     r"tiny-imagenet: the validation labels file .*val_annotations\.txt"),
    (lambda b: (b / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn0999\t0\t0\t1\t1\n"), ValueError,
     r"val_annotations\.txt' line 1: class 'n0999' is not in wnids\.txt"),
    (lambda b: (b / "val" / "images" / "val_2.JPEG").unlink(), FileNotFoundError,
     r"1 image\(s\) named in .*val_annotations\.txt' are not in .*images' \(first: 'val_2\.JPEG'\)"),
    (lambda b: (b / "val" / "val_annotations.txt").write_text("val_0.JPEG n0100\n"), ValueError,
     r"line 1: expected '<file>\\t<wnid>"),
    (lambda b: save_image(b / "val" / "images" / "val_9.JPEG", (0, 0, 0)), ValueError,
     r"1 image\(s\) in .*have no line in .*val_annotations\.txt"),
    (lambda b: save_image(b / "train" / "n0400" / "images" / "x.JPEG", (0, 0, 0)), ValueError,
     r"class folders not in wnids\.txt \(n0400\): a mixed-up dataset folder"),
    (lambda b: [p.unlink() for p in (b / "train" / "n0200" / "images").iterdir()], ValueError,
     r"n0200/images' holds no images"),
    (lambda b: os.rename(b / "train" / "n0300" / "images", b / "train" / "n0300" / "imgs"), FileNotFoundError,
     r"the class 'n0300' train folder .*n0300/images"),
])
def test_tiny_imagenet_bad_layout_refused_before_decoding(tmp_path, monkeypatch, damage, error, match):
    base = write_tiny(tmp_path)
    damage(base)
    calls = _no_decoding(monkeypatch)
    for train in (True, False):  # both splits are checked whichever is asked for
        with pytest.raises(error, match=match):
            data.load_tiny_imagenet(tmp_path, train=train)
    assert calls == []


def test_tiny_imagenet_bad_images_named(tmp_path):
    base = write_tiny(tmp_path)
    target = base / "train" / "n0200" / "images" / "n0200_1.JPEG"
    good = target.read_bytes()
    for content, match in ((b"\xff\xd8\xff\xe0 not really a jpeg", "not a readable image"),
                           (good[: len(good) // 2], "not a readable image"),  # truncated
                           (b"", "not a readable image")):
        target.write_bytes(content)
        with pytest.raises(ValueError, match=match) as e:
            data.load_tiny_imagenet(tmp_path)
        assert "tiny-imagenet" in str(e.value) and str(target) in str(e.value)
    save_image(target, (1, 2, 3), size=(32, 32))
    with pytest.raises(ValueError, match=r"n0200_1\.JPEG: a 32x32 image; Tiny-ImageNet's are 64x64"):
        data.load_tiny_imagenet(tmp_path)
    data.load_tiny_imagenet(tmp_path, train=False)  # the damage is in the other split


def test_tiny_imagenet_cache(tmp_path, monkeypatch):
    write_tiny(tmp_path / "d")
    before = tree(tmp_path / "d")
    cache = tmp_path / "cache"
    first = data.load_tiny_imagenet(tmp_path / "d", cache_dir=cache)
    assert sorted(os.listdir(cache)) == ["tiny-imagenet-200-train.npz"]
    assert tree(tmp_path / "d") == before  # nothing written beside the data
    calls = _no_decoding(monkeypatch)
    again = data.load_dataset("tiny-imagenet", tmp_path / "d", cache_dir=cache)
    assert calls == [] and torch.equal(again.images, first.images) and torch.equal(again.targets, first.targets)
    monkeypatch.undo()
    # an image changed since: decoded again, and the cache rewritten
    img = tmp_path / "d" / "tiny-imagenet-200" / "train" / "n0300" / "images" / "n0300_0.JPEG"
    save_image(img, (250, 250, 250))
    os.utime(img, ns=(1, 1))
    changed = data.load_tiny_imagenet(tmp_path / "d", cache_dir=cache)
    assert_colour(changed.images[4], (250, 250, 250))
    calls = _no_decoding(monkeypatch)
    assert torch.equal(data.load_tiny_imagenet(tmp_path / "d", cache_dir=cache).images, changed.images)
    monkeypatch.undo()
    (cache / "tiny-imagenet-200-train.npz").write_bytes(b"garbage")  # unreadable: decoded and rewritten
    assert torch.equal(data.load_tiny_imagenet(tmp_path / "d", cache_dir=cache).images, changed.images)
    assert np.load(cache / "tiny-imagenet-200-train.npz")["images"].shape == (6, 3, 64, 64)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="^cache_dir: .* is a file"):
        data.load_tiny_imagenet(tmp_path / "d", cache_dir=tmp_path / "file")


# =============================================================================================
# ImageFolder and ImageNet
# =============================================================================================

def write_folder(split_dir, counts, size=(20, 14), ext=".JPEG"):
    """``counts``: {class: images}; image i of the k-th class (sorted) has colour(k, i)."""
    for k, cls in enumerate(sorted(counts)):
        for i in range(counts[cls]):
            save_image(split_dir / cls / f"img_{i}{ext}", colour(k, i), size=size)
    return split_dir


def test_imagefolder_classes_order_and_items(tmp_path):
    write_folder(tmp_path / "train", {"dog": 2, "ant": 1, "cat": 3})
    save_image(tmp_path / "train" / "cat" / "nested" / "deeper" / "z.png", colour(1, 3), size=(20, 14))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    write_folder(tmp_path / "val", {"ant": 1, "cat": 1, "dog": 1})
    d = data.load_dataset("imagefolder", tmp_path, size=10, crop=8, num_workers=0)
    assert isinstance(d, data.ImageFolder) and d.classes == ["ant", "cat", "dog"] and d.num_classes == 3
    assert len(d) == 7 and d.targets.tolist() == [0, 1, 1, 1, 1, 2, 2] and d.input_shape == (3, 8, 8)
    assert [os.path.relpath(p, tmp_path / "train") for p, _ in d.samples][1:5] == [
        "cat/img_0.JPEG", "cat/img_1.JPEG", "cat/img_2.JPEG", "cat/nested/deeper/z.png"]
    raw, y = d.raw[4]
    assert raw.dtype == torch.uint8 and raw.shape == (3, 8, 8) and int(y) == 1
    assert_colour(raw, colour(1, 3))
    x, y = d[4]
    assert x.dtype == torch.float32 and torch.allclose(x, d.transform(raw)) and int(y) == 1
    mean = torch.tensor(data.STATS["imagenet"][0]).view(3, 1, 1)
    std = torch.tensor(data.STATS["imagenet"][1]).view(3, 1, 1)
    assert torch.allclose(x, (raw.float() / 255 - mean) / std, atol=1e-6)
    assert d.class_counts() == [1, 4, 2]


def test_imagefolder_batches_match_the_in_memory_order(tmp_path):
    write_folder(tmp_path / "train", {"a": 3, "b": 2, "c": 2})
    write_folder(tmp_path / "val", {"a": 1})
    d = data.load_imagefolder(tmp_path, size=6, num_workers=0)
    batches = list(d.batches(3, shuffle=True, seed=5))
    order = torch.cat([idx for _, idx in data._batch_slices(len(d), 3, True, 5, False)])
    assert torch.equal(torch.cat([y for _, y in batches]), d.targets[order])
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 6, 6), (3, 3, 6, 6), (1, 3, 6, 6)]
    assert torch.allclose(batches[0][0][1], d[int(order[1])][0])
    assert d.num_batches(3) == 3 and len(list(d.batches(3, drop_last=True))) == 2
    # worker processes decode the same items
    par = data.load_imagefolder(tmp_path, size=6, num_workers=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(par.batches(3, shuffle=True, seed=5), batches))
    loader = torch.utils.data.DataLoader(d.raw, batch_size=4, num_workers=2)
    assert [x.dtype for x, _ in loader] == [torch.uint8, torch.uint8]
    sub = d.subset([6, 0])
    assert sub.targets.tolist() == [2, 0] and len(sub) == 2 and len(d) == 7
    assert torch.allclose(data.mean_input(sub), (sub.raw[0][0].double() + sub.raw[1][0].double()).float() / 510)
    # SynFlow-Dist's mean input is the un-normalised mean image, as for an in-memory dataset
    assert torch.allclose(internal("synflow").mean_input(sub), data.mean_input(sub).double())


def test_imagefolder_eval_split_indexed_by_train_classes(tmp_path):
    write_folder(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    write_folder(tmp_path / "test", {"a": 1, "b": 1, "c": 1})
    (tmp_path / "test" / "a" / "img_0.JPEG").unlink()
    (tmp_path / "test" / "a").rmdir()  # an evaluation split without class a keeps b = 1, c = 2
    d = data.load_imagefolder(tmp_path, train=False, size=4, num_workers=0)
    assert d.classes == ["a", "b", "c"] and d.targets.tolist() == [1, 2] and not d.train
    write_folder(tmp_path / "test", {"zebra": 1})
    with pytest.raises(ValueError, match=r"imagefolder: .*test' has class folders the training split lacks \(zebra\)"):
        data.load_imagefolder(tmp_path, train=False, size=4)


def test_imagefolder_resize_keeps_aspect_and_crops_the_centre(tmp_path):
    split = tmp_path / "train" / "only"
    split.mkdir(parents=True)
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    img.save(split / "x.png")
    d = data.ImageFolder(tmp_path / "train", size=10, num_workers=0)
    x = d.read(0)  # 40x20 -> 20x10 -> the centre 10x10: columns 5..14 of the resized image
    assert x.shape == (3, 10, 10)
    assert x[:, 5, 0].tolist() == [255, 0, 0] and x[:, 5, 9].tolist() == [0, 0, 255]
    with pytest.raises(ValueError, match=r"^crop: expected a square no larger than size \(10\), got 12"):
        data.ImageFolder(tmp_path / "train", size=10, crop=12)


def test_imagefolder_images_of_mixed_sizes_need_size(tmp_path):
    write_folder(tmp_path / "train", {"a": 1}, size=(16, 16))
    save_image(tmp_path / "train" / "a" / "wide.JPEG", (1, 2, 3), size=(32, 16))
    d = data.ImageFolder(tmp_path / "train", num_workers=0)
    assert d.input_shape == (3, 16, 16)  # the first image's
    with pytest.raises(ValueError, match=r"wide\.JPEG: a 32x16 image where the folder's are 16x16; give size="):
        d.read(1)
    assert tuple(data.ImageFolder(tmp_path / "train", size=8).read(1).shape) == (3, 8, 8)


def test_imagefolder_corrupt_and_non_rgb_images(tmp_path):
    write_folder(tmp_path / "train", {"a": 2, "b": 1})
    save_image(tmp_path / "train" / "a" / "grey.jpg", (77, 77, 77), size=(20, 14), mode="L")
    save_image(tmp_path / "train" / "b" / "rgba.png", (9, 8, 7), size=(20, 14), mode="RGBA")
    bad = tmp_path / "train" / "b" / "broken.jpeg"
    bad.write_bytes((tmp_path / "train" / "a" / "img_0.JPEG").read_bytes()[:100])
    d = data.ImageFolder(tmp_path / "train", size=6, num_workers=0)
    names = [os.path.basename(p) for p, _ in d.samples]
    assert names == ["grey.jpg", "img_0.JPEG", "img_1.JPEG", "broken.jpeg", "img_0.JPEG", "rgba.png"]
    assert_colour(d.read(0), (77, 77, 77), tol=2)
    assert d.read(5)[:, 0, 0].tolist() == [9, 8, 7]
    with pytest.raises(ValueError, match=r"imagefolder: .*broken\.jpeg: not a readable image"):
        d[3]
    with pytest.raises(ValueError, match=r"broken\.jpeg: not a readable image"):
        list(d.batches(2))


def test_imagenet_layout_and_refusals(tmp_path):
    root = tmp_path / "imagenet"
    write_folder(root / "train", {"n01440764": 2, "n01443537": 1})
    with pytest.raises(FileNotFoundError, match=r"imagenet: the evaluation folder .*val' not found"):
        data.load_imagenet(root)  # a partial copy: refused for the train split too
    for i in range(2):  # the validation images as they come, not yet sorted into class folders
        save_image(root / "val" / f"ILSVRC2012_val_0000000{i}.JPEG", (1, 2, 3))
    with pytest.raises(FileNotFoundError, match="no class folders .*sort them into one folder per class"):
        data.load_dataset("imagenet", root, train=False)
    for i in range(2):
        os.unlink(root / "val" / f"ILSVRC2012_val_0000000{i}.JPEG")
    write_folder(root / "val", {"n01440764": 1, "n01443537": 2})
    d = data.load_dataset("imagenet", root, size=32, crop=28, num_workers=0)
    assert d.input_shape == (3, 28, 28) and d.targets.tolist() == [0, 0, 1] and d.name == "imagenet"
    assert (d.mean, d.std) == data.STATS["imagenet"]
    v = data.load_imagenet(root, train=False, num_workers=0)
    assert v.input_shape == (3, 224, 224) and tuple(v[2][0].shape) == (3, 224, 224) and v.targets.tolist() == [0, 1, 1]
    (root / "train" / "n01443537" / "img_0.JPEG").unlink()
    with pytest.raises(ValueError, match=r"imagenet: class folder .*n01443537' holds no images"):
        data.load_imagenet(root)
    with pytest.raises(FileNotFoundError, match="imagenet.*does not exist"):
        data.load_imagenet(tmp_path / "nowhere")
    write_cifar100(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="looks like the folder of cifar100, not imagenet"):
        data.load_imagenet(tmp_path / "c")


def test_imagefolder_trains_through_the_trainer(tmp_path):
    from ntkfast.training import evaluate

    write_folder(tmp_path / "train", {"a": 2, "b": 2})
    write_folder(tmp_path / "val", {"a": 1, "b": 1})
    d = data.load_imagefolder(tmp_path, train=False, size=8, num_workers=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    loss, acc = evaluate(model, d, batch_size=2)
    assert np.isfinite(loss) and 0 <= acc <= 100


def test_load_dataset_names_and_options():
    assert data.available() == ["mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "tiny-imagenet",
                                "imagenet", "imagefolder"]
    with pytest.raises(ValueError, match="^cache_dir: not an option of the svhn reader"):
        data.load_dataset("svhn", "/nonexistent", cache_dir="/tmp")
    with pytest.raises(ValueError, match="^dataset must be one of .*tiny-imagenet"):
        data.load_dataset("tiny", "/tmp")
    assert set(data.available()) <= set(data.STATS) | {"imagefolder"}


def test_high_bit_depth_images_are_refused_not_clipped(tmp_path):
    # Pillow's convert("RGB") clips a 16-bit 30000 to 255 (white): refused, naming the file
    write_folder(tmp_path / "train", {"a": 1})
    Image.fromarray(np.full((14, 20), 30000, dtype=np.uint16)).save(tmp_path / "train" / "a" / "deep.png")
    d = data.ImageFolder(tmp_path / "train", size=6, num_workers=0)
    i = [os.path.basename(p) for p, _ in d.samples].index("deep.png")
    with pytest.raises(ValueError, match=r"deep\.png: not a readable image .*16-bit"):
        d.read(i)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_a_link_loop_in_an_image_folder_lists_each_image_once(tmp_path):
    write_folder(tmp_path / "train", {"a": 2, "b": 1})
    os.symlink("..", tmp_path / "train" / "a" / "loop")  # train/a/loop -> train
    d = data.ImageFolder(tmp_path / "train", size=6, num_workers=0)
    assert len(d.samples) == 3


def test_tiny_imagenet_wnids_with_a_byte_order_mark(tmp_path):
    base = write_tiny(tmp_path)
    (base / "wnids.txt").write_text("\ufeff" + "\n".join(WNIDS) + "\n", encoding="utf-8")
    assert data.load_dataset("tiny-imagenet", tmp_path).classes == ["n0100", "n0200", "n0300"]


def test_an_empty_data_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^root: empty"):
        data.load_dataset("mnist", "")
