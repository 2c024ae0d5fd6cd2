"""CIFAR-10/100 from both official distributions, written here in the exact formats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from lightnets.data import load_dataset, read_cifar_pickle
from lightnets.errors import UserError


def _check(ds, images, labels, classes):
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(images), 3, 32, 32)
    np.testing.assert_array_equal(ds.images.numpy(), images)
    np.testing.assert_array_equal(ds.targets.numpy(), labels)
    assert ds.targets.dtype == torch.long
    assert ds.classes == classes and ds.num_classes == len(classes)
    assert ds.in_chans == 3 and ds.image_size == (32, 32)
    assert len(ds.mean) == len(ds.std) == 3
    image, label = ds[len(ds) - 1]
    assert torch.equal(image, torch.from_numpy(images[-1])) and label == int(labels[-1])


@pytest.mark.parametrize("kind", ["bin", "py"])
def test_cifar10_round_trip(files, tmp_path, kind):
    ref = files.write_cifar10(tmp_path, kind)
    train = load_dataset("cifar10", root=str(tmp_path), split="train")
    test = load_dataset("cifar10", root=str(tmp_path), split="test")
    _check(train, ref.train_x, ref.train_y, files.CIFAR10_NAMES)
    _check(test, ref.test_x, ref.test_y, files.CIFAR10_NAMES)
    # root may also be the extracted folder itself
    again = load_dataset("cifar10", root=ref.folder, split="test")
    assert torch.equal(again.images, test.images)


def test_pixel_layout_is_rgb_planes(files, tmp_path):
    """Record bytes 1..1024 are the red plane in row-major order, then green, then blue."""
    ref = files.write_cifar10(tmp_path, "bin")
    raw = (ref.folder / "test_batch.bin").read_bytes()
    ds = load_dataset("cifar10", root=tmp_path, split="test")
    assert ds.targets[0] == raw[0]
    assert ds.images[0, 0, 0, 1] == raw[1 + 1]  # red, row 0, column 1
    assert ds.images[0, 1, 2, 0] == raw[1 + 1024 + 2 * 32]  # green, row 2, column 0
    assert ds.images[0, 2, 31, 31] == raw[3072]  # blue, last pixel


@pytest.mark.parametrize("style", ["py3-2", "py3-5"])
def test_cifar10_python_pickled_by_python3(files, tmp_path, style):
    ref = files.write_cifar10(tmp_path, "py", style=style)
    ds = load_dataset("cifar10", root=tmp_path, split="train")
    _check(ds, ref.train_x, ref.train_y, files.CIFAR10_NAMES)


@pytest.mark.parametrize("kind", ["bin", "py"])
def test_cifar100_fine_and_coarse(files, tmp_path, kind):
    ref = files.write_cifar100(tmp_path, kind)
    for split in ("train", "test"):
        fine = load_dataset("cifar100", root=tmp_path, split=split)
        x = getattr(ref, f"{split}_x")
        _check(fine, x, getattr(ref, f"{split}_fine"), ref.fine_names)
        coarse = load_dataset("cifar100", root=ref.folder, split=split, labels="coarse")
        _check(coarse, x, getattr(ref, f"{split}_coarse"), ref.coarse_names)
    with pytest.raises(UserError, match="labels='superclass'"):
        load_dataset("cifar100", root=tmp_path, labels="superclass")


def test_truncated_binary_names_the_file(files, tmp_path):
    ref = files.write_cifar10(tmp_path, "bin")
    path = ref.folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", root=tmp_path, split="train")
    assert str(path) in str(err.value) and "3073-byte records" in str(err.value)
    load_dataset("cifar10", root=tmp_path, split="test")  # the test split is unaffected


def test_cifar100_binary_record_size(files, tmp_path):
    ref = files.write_cifar100(tmp_path, "bin")
    path = ref.folder / "test.bin"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(UserError, match="3074-byte records"):
        load_dataset("cifar100", root=tmp_path, split="test")


def test_missing_files_are_listed(files, tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", root=tmp_path)
    msg = str(err.value)
    assert "cifar-10-batches-bin" in msg and "cifar-10-batches-py" in msg
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(UserError, match="extract it first"):
        load_dataset("cifar10", root=tmp_path)
    ref = files.write_cifar10(tmp_path, "py")
    (ref.folder / "data_batch_4").unlink()
    with pytest.raises(UserError, match="data_batch_4"):
        load_dataset("cifar10", root=tmp_path, split="train")
    (ref.folder / "batches.meta").unlink()
    with pytest.raises(UserError, match="batches.meta"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_label_out_of_range(files, tmp_path):
    ref = files.write_cifar10(tmp_path, "bin")
    path = ref.folder / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[0] = 10
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="test_batch.bin: label 10"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_wrong_meta_count(files, tmp_path):
    ref = files.write_cifar10(tmp_path, "bin")
    (ref.folder / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(UserError, match="batches.meta.txt: 2 class names: expected 10"):
        load_dataset("cifar10", root=tmp_path, split="test")


# ------------------------------------------------------------------ restricted unpickling
class _WritesMarker:
    """A pickle payload: unpickling it would run os.system and create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Harmless:
    pass


def test_malicious_pickle_is_refused_and_never_runs(files, tmp_path):
    ref = files.write_cifar10(tmp_path, "py")
    marker = tmp_path / "pwned"
    batch = {b"data": _WritesMarker(marker), b"labels": [0]}
    path = ref.folder / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_WritesMarker(control), protocol=2))
    assert control.exists()  # the payload does run under a plain unpickler
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", root=tmp_path, split="test")
    msg = str(err.value)
    assert msg.startswith(f"refusing to unpickle {os.system.__module__}.system from {path}")
    assert "only numpy arrays, lists and strings" in msg
    assert not marker.exists()


def test_other_globals_are_refused(files, tmp_path):
    cases = [
        (_Harmless(), r"\S*test_cifar\._Harmless"),
        (eval, r"__builtin__\.eval"),  # protocol 2 writes Python 2 module names
        (np.load, r"numpy\S*\.load"),
        (np.array, r"numpy\S*\.array"),  # numpy's array() function is not needed either
    ]
    for obj, name in cases:
        path = tmp_path / "batch"
        files.dump_pickle({b"data": obj}, path, "py3-2")
        with pytest.raises(UserError, match=f"refusing to unpickle {name} from {path}"):
            read_cifar_pickle(path)


def test_codecs_encode_only_latin1(tmp_path):
    # _codecs.encode is allowed because Python 3 writes bytes that way; only for latin-1
    path = tmp_path / "batch"
    payload = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlibq\x00\x86R."
    path.write_bytes(payload)
    with pytest.raises(UserError, match="cannot be unpickled"):
        read_cifar_pickle(path)


def test_garbage_pickle(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(UserError) as err:
        read_cifar_pickle(path)
    assert str(path) in str(err.value)


def test_python_batch_with_wrong_content(files, tmp_path):
    ref = files.write_cifar10(tmp_path, "py")
    path = ref.folder / "test_batch"
    files.dump_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, path)
    with pytest.raises(UserError, match="test_batch: 'data' has shape"):
        load_dataset("cifar10", root=tmp_path, split="test")
    files.dump_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, path)
    with pytest.raises(UserError, match="1 labels for 2 images"):
        load_dataset("cifar10", root=tmp_path, split="test")
    files.dump_pickle([1, 2, 3], path)
    with pytest.raises(UserError, match="holds a list: expected a dict"):
        load_dataset("cifar10", root=tmp_path, split="test")
