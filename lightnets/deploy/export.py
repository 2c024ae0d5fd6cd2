"""Export a model, with its normalization folded away, to ONNX or TorchScript, and check it.

`export(model, "model.onnx")` fuses the model (`lightnets.deploy.folding.fuse`: an eval copy in
which every BN / FBN is folded into the conv or linear before it), writes it, and checks the
written file: the same random input goes through the fused PyTorch model, the original model
in eval mode and the exported file (onnxruntime on CPU for ONNX, `torch.jit.load` for
TorchScript). Both maximum absolute differences are reported; one beyond tolerance raises
`ExportCheckError` (a bug, not a user error) and nothing is written.

Which ONNX exporter: `exporter="auto"` (the default) uses torch's torch.export-based exporter
(`dynamo=True`, torch's default and its maintained path) and falls back to the legacy
TorchScript-based one only when that fails. For the convolutional networks here (depthwise
convs, adaptive pooling, SE gates, dropout in eval) both give the same graph; the legacy one is
about ten times faster (well under a second against 2-5 s) but is deprecated, refuses adaptive
pooling to sizes that do not divide the input (7x7 -> 4x4) and prints the whole graph to stdout
when it fails. `exporter="legacy"` / `"dynamo"` force one. Their deprecation warnings and
registration log lines are silenced locally.

Binary models (lightnets.nn.BinaryConv2d / BinaryLinear): their binary layers are packed
first (`lightnets.deploy.pack.pack_binary`, with BatchNorm folded into the packed layers as a
per-channel scale and shift when fuse=True), and the packed model is exported: the file holds
the weights as uint8 bits and the ops that unpack them to +1/-1 (constant subgraphs that
onnxruntime folds when it loads the file), so it is about 1/30 of a float32 export. Models
already packed are exported the same way.

Files are written atomically (a temporary file in the target directory, checked, then moved
into place with os.replace); an existing file is refused unless `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightnets.deploy import lce
from lightnets.deploy.folding import fuse as fuse_model
from lightnets.deploy.onnx_export import (
    EXPORTERS,
    export_onnx,
    export_torchscript,
    onnx_dynamic_axes,
    other_size_hint,
    run_file,
)
from lightnets.deploy.pack import pack_binary
from lightnets.errors import ExportCheckError, UserError
from lightnets.files import atomic_path, fsync_file
from lightnets.nn.binary import is_binary_layer
from lightnets.nn.packed import is_packed_layer, packed_weight_count
from lightnets.optional import require

__all__ = ["FORMATS", "SUFFIXES", "ExportCheckError", "ExportResult", "export", "format_for_path"]

FORMATS = ("onnx", "torchscript", "lce")
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".tflite": "lce"}
#: Check inputs of an LCE export: a batch this large, free of near-ties (lightnets.deploy.lce).
LCE_CHECK_BATCH = 16


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote and how closely the file reproduces the model."""

    path: str
    format: str
    input_size: tuple[int, ...]
    file_size: int  # bytes
    params: int  # parameters of the exported (fused) model
    params_unfused: int  # parameters of the model as given
    fused: bool
    opset: int | None  # ONNX opset of the default domain; None for TorchScript
    exporter: str  # "legacy" / "dynamo" (ONNX) or "trace" (TorchScript)
    dynamic_batch: bool
    dynamic_size: bool
    checked: bool
    max_abs_diff_fused: float | None  # file vs the fused PyTorch model
    max_abs_diff_unfused: float | None  # file vs the original model in eval mode
    binary_weights: int = 0  # weights stored as bits (packed binary layers)
    ops: dict[str, int] | None = None  # LCE: operators in the flatbuffer, by name
    near_ties_skipped: int = 0  # LCE: check inputs drawn and left out as near-ties
    near_ties_in_check: int = 0  # LCE: checked inputs with near-ties (when too few were clear)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d


def format_for_path(path: str | Path) -> str:
    """ "onnx" for .onnx, "torchscript" for .pt / .ts; anything else is a UserError."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(
            f"cannot tell the export format of {str(path)!r} from its suffix {suffix!r}: "
            "expected .onnx (ONNX), .pt / .ts (TorchScript) or .tflite (LCE), or pass format="
        )
    return SUFFIXES[suffix]


def export(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int] = (1, 3, 224, 224),
    format: str | None = None,
    *,
    fuse: bool = True,
    check: bool = True,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    overwrite: bool = False,
    exporter: str = "auto",
    seed: int = 0,
) -> ExportResult:
    """Write `model` (fused unless fuse=False) to `path` as ONNX, TorchScript or, for binary
    networks, an LCE flatbuffer (format="lce", .tflite), and check it.

    input_size: the example input (N, C, H, W, or whatever the model takes). The batch axis
    stays dynamic in the file when dynamic_batch; the spatial axes (all after C) when
    dynamic_size, for fully convolutional models such as the U-Nets that predict on any image
    size (the check then also runs a second, odd size through the file). format: "onnx" /
    "torchscript", or None to take it from the suffix. The check runs a seeded random input
    through the file and through PyTorch; a difference beyond atol + rtol * max|reference|
    raises ExportCheckError. The model itself is not modified (its train/eval flags are
    restored). Float32 on CPU is what gets exported.

    format="lce" (needs ``pip install "lightnets[lce]"``): the model is translated to larq /
    Keras and converted by LCE's converter (lightnets.deploy.lce), which folds BatchNorm itself
    (`fuse` does not apply) and keeps the batch axis free; height and width are fixed. The
    check runs LCE_CHECK_BATCH seeded random inputs whose binarized values are all clear of
    near-ties (inputs that are not are drawn again and counted in near_ties_skipped) through
    LCE's interpreter and the PyTorch model: the same argmax per sample and logits within atol +
    rtol * max|logit|, else ExportCheckError naming the largest difference.
    """
    path = Path(path)
    fmt = _resolve_format(path, format)
    size = _check_size(input_size)
    if exporter not in EXPORTERS:
        raise UserError(f"exporter={exporter!r}: expected one of {', '.join(EXPORTERS)}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise UserError(f"opset={opset!r}: expected an int >= 7 or None (torch's default)")
    if dynamic_size and len(size) < 3:
        raise UserError(
            f"dynamic_size=True needs spatial axes after (N, C): input_size {_fmt_size(size)}"
        )
    dynamic = onnx_dynamic_axes(len(size), dynamic_batch, dynamic_size)
    if fmt == "lce" and dynamic_size:
        raise UserError(
            "format 'lce' writes a fixed height and width (a flatten's weights depend on them): "
            "expected dynamic_size=False"
        )
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists: expected a new path, or pass overwrite=True")
    if path.is_dir():
        raise UserError(f"{path} is a directory: expected a file path ending in .onnx/.pt/.ts")

    reference = _cpu_float_eval_copy(model)
    if fmt == "lce":
        return _export_lce(reference, path, size, check, atol, rtol, overwrite, seed)
    if fmt == "onnx":
        require("onnx", "onnx", "ONNX export")
        if check:
            require("onnxruntime", "onnx", "checking an ONNX export (or check=False)")
    with _eval_mode(reference):
        exported = _prepare(reference, fuse)
        x = _random_input(size, seed)
        with torch.no_grad():
            try:
                ref_out = reference(x)
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise UserError(
                    f"input_size {_fmt_size(size)} does not fit the model "
                    f"{type(model).__name__} ({first[:200]}): expected the input it takes, "
                    "e.g. (1, in_chans, H, W)"
                ) from None
            fused_out = exported(x)
        _check_tensor_output(ref_out, model)
        params_unfused = _count_params(reference)
        params = _count_params(exported)
        binary_weights = packed_weight_count(exported)

    with atomic_path(path, replace=False) as tmp:
        if fmt == "onnx":
            used, file_opset = export_onnx(exported, x, tmp, opset, dynamic, exporter)
        else:
            used, file_opset = export_torchscript(exported, x, tmp), None
        diff_fused = diff_unfused = None
        if check:
            inputs = [x]
            if dynamic_batch:
                inputs.append(_random_input((size[0] + 1, *size[1:]), seed + 1))
            if dynamic_size:  # another size, odd on purpose: nothing may assume divisibility
                other = (*size[:2], *((n + n // 2) | 1 for n in size[2:]))
                inputs.append(_random_input(other, seed + 2))
            diff_fused, diff_unfused = _check_file(
                tmp, fmt, inputs, exported, reference, (fused_out, ref_out), atol, rtol
            )
        if path.exists() and not overwrite:  # appeared while we were exporting
            raise UserError(f"{path} already exists: expected a new path, or pass overwrite=True")
        fsync_file(tmp)
        os.replace(tmp, path)

    return ExportResult(
        path=str(path),
        format=fmt,
        input_size=size,
        file_size=path.stat().st_size,
        params=params,
        params_unfused=params_unfused,
        fused=fuse,
        opset=file_opset,
        exporter=used,
        dynamic_batch=dynamic_batch,
        dynamic_size=dynamic_size,
        checked=check,
        max_abs_diff_fused=diff_fused,
        max_abs_diff_unfused=diff_unfused,
        binary_weights=binary_weights,
    )


# --- internals ---------------------------------------------------------------------------


def _reference_output(reference: nn.Module, x: torch.Tensor, size: tuple[int, ...]) -> Any:
    """The model's eval output on the example input; a size that does not fit is a UserError."""
    with torch.no_grad():
        try:
            return reference(x)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(
                f"input_size {_fmt_size(size)} does not fit the model "
                f"{type(reference).__name__} ({first[:200]}): expected the input it takes, "
                "e.g. (1, in_chans, H, W)"
            ) from None


def _export_lce(
    reference: nn.Module,
    path: Path,
    size: tuple[int, ...],
    check: bool,
    atol: float,
    rtol: float,
    overwrite: bool,
    seed: int,
) -> ExportResult:
    """format="lce": translate, convert with LCE's converter, check in LCE's interpreter."""

    with _eval_mode(reference):
        _check_tensor_output(
            _reference_output(reference, _random_input(size, seed), size), reference
        )
        flatbuffer = lce.convert(reference, size)
        ops = lce.op_counts(flatbuffer)
        diff, skipped, tied = None, 0, 0
        if check:
            x, skipped, tied = _clear_inputs(reference, size, seed)
            with torch.no_grad():
                expected = reference(x)
            try:
                got = lce.LceModel(flatbuffer)(x)
            except Exception as err:  # the interpreter's reason is its message's last line
                reason = (str(err).strip().splitlines() or [""])[-1][:300]
                raise ExportCheckError(
                    f"lce export {path.name} fails in LCE's interpreter: {reason}"
                ) from None
            diff = _compare_lce(got, expected, atol, rtol, skipped, tied)
        params = _count_params(reference)
        binary = sum(m.weight.numel() for m in reference.modules() if is_binary_layer(m))
    with atomic_path(path, replace=False) as tmp:
        tmp.write_bytes(flatbuffer)
        if path.exists() and not overwrite:  # appeared while we were converting
            raise UserError(f"{path} already exists: expected a new path, or pass overwrite=True")
        fsync_file(tmp)
        os.replace(tmp, path)
    return ExportResult(
        path=str(path),
        format="lce",
        input_size=size,
        file_size=path.stat().st_size,
        params=params,
        params_unfused=params,
        fused=True,  # LCE's converter folds BatchNorm into the convolutions' output transform
        opset=None,
        exporter="lce-converter",
        dynamic_batch=True,
        dynamic_size=False,
        checked=check,
        max_abs_diff_fused=diff,
        max_abs_diff_unfused=diff,
        binary_weights=binary,
        ops=ops,
        near_ties_skipped=skipped,
        near_ties_in_check=tied,
    )


def _clear_inputs(
    model: nn.Module, size: tuple[int, ...], seed: int
) -> tuple[torch.Tensor, int, int]:
    """LCE_CHECK_BATCH seeded random inputs with no near-tie (lightnets.deploy.lce), how many
    drawn inputs were left out, and how many of those returned still have near-ties (after 40
    batches without enough clear ones: the clearest drawn fill the batch)."""

    shape = (LCE_CHECK_BATCH, *size[1:])
    drawn, margins = [], []
    for i in range(40):
        x = _random_input(shape, seed + i)
        drawn.append(x)
        margins.append(lce.tie_margins(model, x))
        clear = torch.cat(margins) > lce.NEAR_TIE
        if int(clear.sum()) >= LCE_CHECK_BATCH:
            break
    inputs, margin = torch.cat(drawn), torch.cat(margins)
    order = torch.argsort(-margin, stable=True)[:LCE_CHECK_BATCH]
    chosen = torch.sort(order).values  # the clearest, in the order they were drawn
    tied = int((margin[chosen] <= lce.NEAR_TIE).sum())
    skipped = int((margin <= lce.NEAR_TIE).sum()) - tied
    return inputs[chosen], skipped, tied


def _compare_lce(
    got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, skipped: int, tied: int
) -> float:
    """Max |diff| of the LCE outputs; an ExportCheckError beyond tolerance or on another argmax."""
    if got.shape != expected.shape:
        raise ExportCheckError(
            f"lce export: output shape {tuple(got.shape)} differs from PyTorch's "
            f"{tuple(expected.shape)}"
        )
    diff = _max_abs_diff(got, expected)
    per_sample = (got.double() - expected.double()).flatten(1).abs().max(1).values
    worst = int(per_sample.argmax())
    argmax_differs = expected.dim() == 2 and not torch.equal(got.argmax(1), expected.argmax(1))
    if argmax_differs or not _within(diff, expected, atol, rtol):
        raise ExportCheckError(
            f"lce export does not match the PyTorch model: max |diff| {diff:.3g} (sample {worst} "
            f"of {got.shape[0]}) against atol {atol:g} + rtol {rtol:g} * max|output| "
            f"{float(expected.abs().max()):.3g}"
            + ("; the predicted classes differ" if argmax_differs else "")
            + f" (inputs with near-ties left out: {skipped}"
            + (
                f"; {tied} of the checked inputs still have one, where rounding may pick either "
                "sign: a difference there need not be a bug"
                if tied
                else ""
            )
            + ")"
        )
    return diff


def _resolve_format(path: Path, format: str | None) -> str:
    if format is None:
        return format_for_path(path)
    if format not in FORMATS:
        raise UserError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    return format


def _check_size(input_size: Sequence[int]) -> tuple[int, ...]:
    ok = isinstance(input_size, Sequence) and len(input_size) > 0
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_size)
    if not ok:
        raise UserError(
            f"input_size must be positive ints like (1, 3, 224, 224), got {input_size!r}"
        )
    return tuple(input_size)


def _fmt_size(size: Sequence[int]) -> str:
    return "x".join(map(str, size))


def _prepare(model: nn.Module, fuse: bool) -> nn.Module:
    """The eval copy to export: binary layers packed, normalization folded when `fuse`."""

    if any(is_binary_layer(m) for m in model.modules()):
        model = pack_binary(model, fold_bn=fuse)
    return fuse_model(model) if fuse else copy.deepcopy(model).eval()


def _cpu_float_eval_copy(model: nn.Module) -> nn.Module:
    """The model itself when it already is float32 on CPU, else a float32 CPU copy."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
        for t in tensors
    ):
        return model
    return copy.deepcopy(model).to("cpu").float()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _random_input(size: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=gen)


def _count_params(model: nn.Module) -> int:
    """Parameters, counting each binary weight a packed layer holds as a bit (and its
    per-channel bias / scale / shift buffers) as one."""

    count = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if is_packed_layer(m):
            count += m.num_weights() + sum(
                t.numel() for t in (m.bias, m.scale, m.shift) if t is not None
            )
    return count


def _check_tensor_output(out: Any, model: nn.Module) -> None:
    if not isinstance(out, torch.Tensor):
        raise UserError(
            f"model {type(model).__name__} returns {type(out).__name__}: export expects a "
            "model that returns one tensor"
        )


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _within(diff: float, reference: torch.Tensor, atol: float, rtol: float) -> bool:
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return diff <= atol + rtol * scale


def _check_file(
    path: Path,
    fmt: str,
    inputs: list[torch.Tensor],
    fused: nn.Module,
    reference: nn.Module,
    first_outputs: tuple[torch.Tensor, torch.Tensor],
    atol: float,
    rtol: float,
) -> tuple[float, float]:
    """Max abs differences of the file vs the fused and the unfused model; raise if too big."""
    outs = run_file(path, fmt, inputs)
    diff_fused = diff_unfused = 0.0
    for i, (x, out) in enumerate(zip(inputs, outs)):
        if i == 0:
            fused_out, ref_out = first_outputs
        else:
            with torch.no_grad(), _eval_mode(reference):
                fused_out, ref_out = fused(x), reference(x)
        what = f"input {_fmt_size(x.shape)}"
        if out.shape != fused_out.shape:
            raise ExportCheckError(
                f"{fmt} export {path.name}: output shape {tuple(out.shape)} for {what}"
                f"{other_size_hint(x, inputs[0])} differs from PyTorch's "
                f"{tuple(fused_out.shape)}"
            )
        d_fused, d_ref = _max_abs_diff(out, fused_out), _max_abs_diff(out, ref_out)
        if not _within(d_fused, fused_out, atol, rtol):
            raise ExportCheckError(
                f"{fmt} export does not match the PyTorch model it was exported from: "
                f"max |diff| {d_fused:.3g} for {what} exceeds atol {atol:g} + rtol {rtol:g} * "
                f"max|output| {float(fused_out.abs().max()):.3g}"
            )
        if not _within(d_ref, ref_out, atol, rtol):
            raise ExportCheckError(
                f"{fmt} export does not match the original (unfused) model in eval mode: "
                f"max |diff| {d_ref:.3g} for {what} exceeds atol {atol:g} + rtol {rtol:g} * "
                f"max|output| {float(ref_out.abs().max()):.3g} (vs the fused model: "
                f"{d_fused:.3g}); folding the normalization changed the outputs"
            )
        diff_fused, diff_unfused = max(diff_fused, d_fused), max(diff_unfused, d_ref)
    return diff_fused, diff_unfused
