"""CIFAR-10 and CIFAR-100 from either official distribution (binary or Python pickles).

Binary version: fixed-size records (label byte(s) + 3072 pixel bytes), checked against the
file size. Python version: pickled dicts of numpy arrays, read with a restricted unpickler
that resolves only the few numpy globals those files contain, so a tampered or foreign
pickle is refused before any of its code can run.
"""

from __future__ import annotations

import codecs
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightnets.data.base import ImageTensorDataset, check_split
from lightnets.data.registry import register_dataset, require_root
from lightnets.errors import UserError

PIXELS = 3 * 32 * 32
#: Per-channel mean and std of the training images, on the [0, 1] scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class _Layout:
    """Where one distribution keeps its files."""

    folder: str
    files: dict[str, tuple[str, ...]]  # split -> data files
    meta: str


@dataclass(frozen=True)
class _Cifar:
    name: str
    num_classes: int
    binary: _Layout
    python: _Layout
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10 = _Cifar(
    "cifar10",
    10,
    binary=_Layout(
        "cifar-10-batches-bin",
        {
            "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            "test": ("test_batch.bin",),
        },
        "batches.meta.txt",
    ),
    python=_Layout(
        "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        "batches.meta",
    ),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
CIFAR100 = _Cifar(
    "cifar100",
    100,
    binary=_Layout(
        "cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)}, "fine_label_names.txt"
    ),
    python=_Layout("cifar-100-python", {"train": ("train",), "test": ("test",)}, "meta"),
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
)
_ARCHIVES = {
    "cifar10": ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-binary.tar.gz", "cifar-100-python.tar.gz"),
}


@register_dataset("cifar10", info={"num_classes": 10, "in_chans": 3, "train_size": 50000})
def cifar10(root: str | None = None, split: str = "train") -> ImageTensorDataset:
    """CIFAR-10 (50000 train / 10000 test, 3x32x32) from `root`: the directory holding
    `cifar-10-batches-bin` or `cifar-10-batches-py`, or either of those folders itself."""
    return _load(CIFAR10, root, split, label="fine")


@register_dataset("cifar100", info={"num_classes": 100, "in_chans": 3, "train_size": 50000})
def cifar100(
    root: str | None = None, split: str = "train", labels: str = "fine"
) -> ImageTensorDataset:
    """CIFAR-100 from `root` (holding `cifar-100-binary` or `cifar-100-python`, or either
    folder itself). `labels="fine"` gives the 100 classes, `"coarse"` the 20 superclasses."""
    if labels not in ("fine", "coarse"):
        raise UserError(f"dataset 'cifar100': labels={labels!r}: expected 'fine' or 'coarse'")
    return _load(CIFAR100, root, split, label=labels)


def _load(spec: _Cifar, root: str | None, split: str, label: str) -> ImageTensorDataset:
    expected = f"a directory holding {spec.binary.folder} or {spec.python.folder}"
    base = require_root(spec.name, root, expected)
    check_split(spec.name, split, ("train", "test"))
    kind, folder = _find_folder(spec, base, split)
    layout = spec.binary if kind == "binary" else spec.python
    meta = folder / _meta_name(spec, kind, label)
    images, labels = [], []
    for name in layout.files[split]:
        path = folder / name
        if kind == "binary":
            x, y = read_cifar_binary(path, label_bytes=1 if spec is CIFAR10 else 2)
            y = y[:, 0] if spec is CIFAR10 or label == "coarse" else y[:, 1]
        else:
            x, y = _python_batch(path, "labels" if spec is CIFAR10 else f"{label}_labels")
        images.append(x)
        labels.append(y.astype(np.int64))
    classes = _class_names(meta, kind, spec, label)
    targets = np.concatenate(labels)
    for name, y in zip(layout.files[split], labels):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise UserError(
                f"{folder / name}: label {int(y.max())} found: expected labels 0-{len(classes) - 1}"
            )
    return ImageTensorDataset(
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(targets),
        classes,
        spec.mean,
        spec.std,
        name=spec.name,
    )


def _find_folder(spec: _Cifar, base: Path, split: str) -> tuple[str, Path]:
    """('binary' | 'python', folder) for the first distribution whose split files exist."""
    partial = None
    for kind, layout in (("binary", spec.binary), ("python", spec.python)):
        for folder in (base / layout.folder, base):
            present = [(folder / f).is_file() for f in layout.files[split]]
            if all(present):
                return kind, folder
            if any(present) and partial is None:
                missing = [str(folder / f) for f, ok in zip(layout.files[split], present) if not ok]
                partial = f"{spec.name} files missing: {', '.join(missing)}"
    if partial:
        raise UserError(f"{partial}: expected all {split} files of the dataset")
    looked = [str(base / lay.folder / lay.files[split][0]) for lay in (spec.binary, spec.python)]
    hint = ""
    archives = [a for a in _ARCHIVES[spec.name] if (base / a).is_file()]
    if archives:
        hint = f" ({base / archives[0]} is there: extract it first)"
    raise UserError(
        f"no {spec.name} {split} files under {base}: looked for {' and '.join(looked)}{hint}"
    )


def _meta_name(spec: _Cifar, kind: str, label: str) -> str:
    if kind == "binary" and spec is CIFAR100 and label == "coarse":
        return "coarse_label_names.txt"
    return (spec.binary if kind == "binary" else spec.python).meta


def _class_names(path: Path, kind: str, spec: _Cifar, label: str) -> list[str]:
    expected = 20 if label == "coarse" and spec is CIFAR100 else spec.num_classes
    if not path.is_file():
        raise UserError(f"{path}: file not found: expected the {spec.name} class names")
    if kind == "binary":
        names = [s.strip() for s in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        names = [s for s in names if s]
    else:
        meta = read_cifar_pickle(path)
        key = "label_names" if spec is CIFAR10 else f"{label}_label_names"
        raw = _get(meta, key, path)
        if not isinstance(raw, (list, tuple)):
            raise UserError(f"{path}: {key!r} is {type(raw).__name__}: expected a list of names")
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw]
    if len(names) != expected:
        raise UserError(f"{path}: {len(names)} class names: expected {expected}")
    return names


def read_cifar_binary(path: str | Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of `label_bytes` label bytes + 3072 pixel bytes (R, G, B planes, row-major).

    Returns (images uint8 (N, 3, 32, 32), labels uint8 (N, label_bytes)).
    """
    path = Path(path)
    record = label_bytes + PIXELS
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise UserError(
            f"{path}: {raw.size} bytes is not a whole number of {record}-byte records "
            f"({label_bytes} label byte(s) + {PIXELS} pixels): truncated, or not a CIFAR binary "
            "batch"
        )
    table = raw.reshape(-1, record)
    return table[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), table[:, :label_bytes].copy()


def _python_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_pickle(path)
    data = _get(batch, "data", path)
    labels = _get(batch, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' is {what}: expected a uint8 array (N, {PIXELS})")
    if data.shape[1] != PIXELS:
        raise UserError(f"{path}: 'data' has shape {data.shape}: expected (N, {PIXELS})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {label_key!r} is not a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise UserError(
            f"{path}: {labels.size} labels for {data.shape[0]} images: expected one label each"
        )
    return data.reshape(-1, 3, 32, 32).copy(), labels


def _get(batch: Any, key: str, path: Path) -> Any:
    """`batch[b'key']` (Python 2 pickles) or `batch['key']` (re-pickled by Python 3)."""
    if not isinstance(batch, dict):
        raise UserError(f"{path}: holds a {type(batch).__name__}: expected a dict (a CIFAR batch)")
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise UserError(f"{path}: no {key!r} entry: expected a CIFAR batch with {key!r}")


# ------------------------------------------------------------------ restricted unpickling
def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as Python 3 protocol-2 pickles use it for bytes: latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode(..., {encoding!r})")
    return text.encode("latin-1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals numpy arrays, dtypes and scalars pickle to, under both module spellings."""
    try:
        from numpy._core import multiarray, numeric  # noqa: PLC0415 (numpy >= 2)
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # noqa: PLC0415
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals found in CIFAR's Python batches.

    Any other global (os.system, builtins.eval, a class of some module, ...) is refused in
    `find_class`, i.e. before the pickle can call it.
    """

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path
        self.allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UserError(
                f"refusing to unpickle {module}.{name} from {self.path}: CIFAR batches contain "
                "only numpy arrays, lists and strings"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(
            f"refusing to unpickle a persistent id from {self.path}: CIFAR batches contain "
            "only numpy arrays, lists and strings"
        )


def read_cifar_pickle(path: str | Path) -> Any:
    """Load one CIFAR Python batch (or meta file) with the restricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return CifarUnpickler(f, path).load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: file not found: expected a CIFAR Python batch") from None
    except Exception as e:  # corrupt pickles raise many types (EOFError, KeyError, ...)
        raise UserError(
            f"{path}: cannot be unpickled ({type(e).__name__}: {e}): expected a CIFAR Python batch"
        ) from None
