"""Writers for small files in the exact official dataset formats (IDX, CIFAR bin/python)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official CIFAR batches: native strings as
    BINSTRING opcodes and numpy globals under `numpy.core.multiarray`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        name = name or obj.__qualname__
        self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(obj)

    dispatch[type] = save_global


def dump_pickle(obj, path: Path, style: str = "py2") -> None:
    """style: 'py2' (as the official files), or 'py3-2' / 'py3-5' (Python 3, protocol 2 / 5)."""
    buf = io.BytesIO()
    if style == "py2":
        Py2Pickler(buf, protocol=2).dump(obj)
    else:
        pickle.dump(obj, buf, protocol=int(style[-1]))
    path.write_bytes(buf.getvalue())


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """IDX file: 0, 0, type byte, ndim, big-endian dims, big-endian data."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
    code = codes[array.dtype.type]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def random_cifar(rng: np.random.Generator, n: int, num_classes: int):
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return images, rng.integers(0, num_classes, size=n).astype(np.int64)


def write_cifar10(
    root: Path, kind: str, per_batch: int = 3, n_test: int = 4, seed: int = 0, style: str = "py2"
):
    """Write a small CIFAR-10 in the binary ('bin') or python ('py') layout under root.

    Returns the expected (train images, train labels, test images, test labels).
    """
    rng = np.random.default_rng(seed)
    batches = [random_cifar(rng, per_batch, 10) for _ in range(5)]
    test = random_cifar(rng, n_test, 10)
    if kind == "bin":
        folder = root / "cifar-10-batches-bin"
        folder.mkdir(parents=True)
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for name, (x, y) in zip(names, [*batches, test]):
            records = np.concatenate([y[:, None].astype(np.uint8), x.reshape(len(x), -1)], axis=1)
            (folder / name).write_bytes(records.tobytes())
        (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name, (x, y) in zip(names, [*batches, test]):
            batch = {
                b"batch_label": b"testing batch",
                b"labels": [int(v) for v in y],
                b"data": x.reshape(len(x), -1),
                b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
            }
            dump_pickle(batch, folder / name, style)
        meta = {
            b"num_cases_per_batch": per_batch,
            b"label_names": [n.encode() for n in CIFAR10_NAMES],
            b"num_vis": 3072,
        }
        dump_pickle(meta, folder / "batches.meta", style)
    train_x = np.concatenate([b[0] for b in batches])
    train_y = np.concatenate([b[1] for b in batches])
    return SimpleNamespace(
        folder=folder, train_x=train_x, train_y=train_y, test_x=test[0], test_y=test[1]
    )


def write_cifar100(
    root: Path, kind: str, n_train: int = 6, n_test: int = 3, seed: int = 1, style: str = "py2"
):
    """Small CIFAR-100 (fine and coarse labels) in the binary or python layout under root."""
    rng = np.random.default_rng(seed)
    fine_names = [f"fine{i:02d}" for i in range(100)]
    coarse_names = [f"coarse{i:02d}" for i in range(20)]
    out = SimpleNamespace(fine_names=fine_names, coarse_names=coarse_names)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, fine = random_cifar(rng, n, 100)
        coarse = fine // 5
        splits[split] = (x, fine, coarse)
        setattr(out, f"{split}_x", x)
        setattr(out, f"{split}_fine", fine)
        setattr(out, f"{split}_coarse", coarse)
    if kind == "bin":
        folder = root / "cifar-100-binary"
        folder.mkdir(parents=True)
        for split, (x, fine, coarse) in splits.items():
            labels = np.stack([coarse, fine], axis=1).astype(np.uint8)
            records = np.concatenate([labels, x.reshape(len(x), -1)], axis=1)
            (folder / f"{split}.bin").write_bytes(records.tobytes())
        (folder / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
        (folder / "coarse_label_names.txt").write_text("\n".join(coarse_names) + "\n")
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split, (x, fine, coarse) in splits.items():
            batch = {
                b"filenames": [b"a.png"] * len(x),
                b"batch_label": f"{split} batch".encode(),
                b"fine_labels": [int(v) for v in fine],
                b"coarse_labels": [int(v) for v in coarse],
                b"data": x.reshape(len(x), -1),
            }
            dump_pickle(batch, folder / split, style)
        meta = {
            b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [n.encode() for n in coarse_names],
        }
        dump_pickle(meta, folder / "meta", style)
    out.folder = folder
    return out


@pytest.fixture
def files():
    """The writers above, for tests in this folder."""
    return SimpleNamespace(
        write_idx=write_idx,
        write_cifar10=write_cifar10,
        write_cifar100=write_cifar100,
        dump_pickle=dump_pickle,
        CIFAR10_NAMES=CIFAR10_NAMES,
    )


def crop_offsets(out, x, pad: int, flips: bool = False) -> set[tuple[int, int]]:
    """The (dy, dx) offsets at which each augmented image of `out` is a window of its uint8
    image in `x` zero-padded by `pad` pixels (or of its mirror image with `flips`); fails
    naming the first image that is no such window. Independent of the augmentation code."""
    padded = F.pad(x.float() / 255, (pad,) * 4)
    h, w = out.shape[-2:]
    offsets: set[tuple[int, int]] = set()
    for i in range(len(x)):
        images = (padded[i], padded[i].flip(-1)) if flips else (padded[i],)
        found = {
            (dy, dx)
            for dy in range(padded.shape[-2] - h + 1)
            for dx in range(padded.shape[-1] - w + 1)
            for img in images
            if torch.equal(out[i], img[:, dy : dy + h, dx : dx + w])
        }
        assert found, f"image {i} is not a window of the {pad}-pixel zero-padded image"
        offsets |= found
    return offsets
