"""Writing and running ONNX and TorchScript files (what lightnets.deploy.export uses).

Which ONNX exporter: `exporter="auto"` uses torch's torch.export-based exporter (`dynamo=True`,
torch's default and its maintained path) and falls back to the legacy TorchScript-based one
only when that fails; see lightnets.deploy.export. Packed binary models keep their weights
as bits: constant folding is turned off for them and the exporter's per-node debug metadata
dropped. onnx and onnxruntime are the `onnx` extra, imported here when used.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lightnets.errors import ExportCheckError
from lightnets.nn.packed import is_packed_layer
from lightnets.optional import require

__all__ = [
    "EXPORTERS",
    "export_onnx",
    "export_torchscript",
    "onnx_dynamic_axes",
    "other_size_hint",
    "run_file",
]

EXPORTERS = ("auto", "legacy", "dynamo")


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """Silence torch's deprecation notices for the legacy ONNX exporter and torch.jit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export internals
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=r".*feature will be removed.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """Hide the exporter's per-call log lines (e.g. "torchvision is not installed. Skipping")."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(
    model: nn.Module,
    x: torch.Tensor,
    path: Path,
    opset: int | None,
    dynamic: dict[int, str],
    exporter: str,
) -> tuple[str, int | None]:
    errors = []
    order = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    for name in order:
        try:
            if name == "legacy":
                _onnx_legacy(model, x, path, opset, dynamic)
            else:
                _onnx_dynamo(model, x, path, opset, dynamic)
        except Exception as err:  # try the next exporter, report all if none works
            errors.append(f"{name}: {type(err).__name__}: {str(err).strip()[:500]}")
            continue
        return name, _onnx_opset(path)
    raise RuntimeError(
        f"ONNX export of {type(model).__name__} failed with every exporter tried:\n"
        + "\n".join(errors)
    )


def onnx_dynamic_axes(ndim: int, batch: bool, spatial: bool) -> dict[int, str]:
    """Input axes left symbolic in the file: {axis: name}."""
    axes = {0: "batch"} if batch else {}
    if spatial:
        names = ("height", "width") if ndim == 4 else tuple(f"dim{i}" for i in range(2, ndim))
        axes.update(zip(range(2, ndim), names))
    return axes


def _onnx_legacy(
    model: nn.Module, x: torch.Tensor, path: Path, opset: int | None, dynamic: dict[int, str]
) -> None:
    axes = None
    if dynamic:
        with torch.no_grad():
            out_ndim = model(x).ndim  # (N, classes) or a map (N, classes, H, W)
        # the output's sizes get their own names: a strided model's map is not the input's size
        out = {a: n if a == 0 else f"out_{n}" for a, n in dynamic.items() if a < out_ndim}
        axes = {"input": dynamic, "output": out}
    with _quiet_deprecations(), torch.no_grad():
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            opset_version=opset,
            dynamic_axes=axes,
            # folding would store the unpacked +1/-1 weights of packed layers as float32
            do_constant_folding=not _has_packed(model),
        )


def _has_packed(model: nn.Module) -> bool:
    return any(is_packed_layer(m) for m in model.modules())


def _onnx_dynamo(
    model: nn.Module, x: torch.Tensor, path: Path, opset: int | None, dynamic: dict[int, str]
) -> None:
    if 0 in dynamic and x.shape[0] == 1:
        x = x.expand(2, *x.shape[1:]).contiguous()  # torch.export specializes a size of 1
    dims = {axis: torch.export.Dim(name) for axis, name in dynamic.items()}
    shapes = (dims,) if dims else None
    with _quiet_deprecations(), _quiet_loggers(), torch.no_grad():
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            verbose=False,
            input_names=["input"],
            output_names=["output"],
            opset_version=opset,
            dynamic_shapes=shapes,
            # the optimizer's constant folding would store packed weights as float32
            optimize=not _has_packed(model),
        )
        program.save(str(path), external_data=False)
    if _has_packed(model):
        _strip_node_metadata(path)


def _strip_node_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, module paths): most of a
    packed model's file otherwise (a 1-bit bnn_mnist: 350 kB of it, 39 kB without)."""
    onnx = require("onnx", "onnx", "ONNX export")
    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.save(proto, str(path))


def _onnx_opset(path: Path) -> int | None:
    onnx = require("onnx", "onnx", "ONNX export")
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def export_torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    with _quiet_deprecations(), torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, str(path))
    return "trace"


def run_file(path: Path, fmt: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    if fmt == "torchscript":
        with _quiet_deprecations(), torch.no_grad():
            loaded = torch.jit.load(str(path), map_location="cpu")
            return _run_each(loaded, inputs, path, fmt)
    ort = require("onnxruntime", "onnx", "checking an ONNX export (or check=False)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return _run_each(run, inputs, path, fmt)


def _run_each(run, inputs: list[torch.Tensor], path: Path, fmt: str) -> list[torch.Tensor]:
    """Run every check input through the file; one that fails is an ExportCheckError."""
    outs = []
    for x in inputs:
        try:
            outs.append(run(x))
        except Exception as err:  # onnxruntime's reason is its message's last line
            reason = (str(err).strip().splitlines() or [""])[-1][:300]
            raise ExportCheckError(
                f"{fmt} export {path.name} fails on input {'x'.join(map(str, x.shape))}"
                f"{other_size_hint(x, inputs[0])}: {type(err).__name__}: {reason}"
            ) from None
    return outs


def other_size_hint(x: torch.Tensor, first: torch.Tensor) -> str:
    """Why a second check input may fail: the model fixes a size the file was told to free."""
    if x.shape[0] != first.shape[0]:
        return (
            " (a batch size other than the traced one: if the model fixes its batch size, "
            "export with dynamic_batch=False)"
        )
    if x.shape != first.shape:
        return (
            " (a height/width other than the traced one: the model fixes its input size "
            "somewhere, e.g. a flatten or adaptive pooling to more than 1x1, which ONNX stores "
            "with a fixed kernel; export without dynamic_size)"
        )
    return ""
