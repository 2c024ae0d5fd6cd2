"""Skip fusion for U-Nets: weighted concatenation (the weight mechanism) and its baselines.

Qi & Zhao, *Weight mechanism: adding a constant in concatenation of series connect*. Every
module here fuses an encoder feature (the skip, `skip`, N x C_s x H x W) with the deeper
decoder feature (`up`, N x C_u x h x w) and returns the concatenation, N x (C_s + C_u) x H x W,
skip channels first:

- `WeightedConcat(alpha, beta)`: concat(alpha * skip, beta * up), eq. (4). alpha scales the
  series connection (Fig. 1a: the decoder feature is computed from the skip, so alpha cannot be
  absorbed by a convolution weight); beta the parallel position (Fig. 1b), which the paper shows
  to be the wrong one. Both are constant buffers: saved in the state_dict, never trained, not
  parameters. alpha = beta = 1 is the plain concatenation of the baseline.
- `DynamicWeight(channels)`: concat(w * skip, up) with a learnable per-channel w, initialised
  to 1 ("dynamic weight", Table I: +480 parameters for skip widths 32 + 64 + 128 + 256).
- `GatedFusion(skip_channels, up_channels)`: the gating of eq. (2)-(3) with L = 1 (Fig. 3).

`up` is first resized to the skip's exact (H, W) by bilinear interpolation (`resize_to`), so any
input size works: a 125 crop gives 125 -> 63 -> 32 -> 16 -> 8 through stride-2 convs, and each
decoder feature is brought back to its skip's size, not doubled. `make_fusion(kind, ...)`
builds one by name (`FUSION_KINDS`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightnets.checks import check_int, check_positive
from lightnets.errors import UserError, did_you_mean

__all__ = [
    "FUSION_KINDS",
    "GATE_KINDS",
    "DynamicWeight",
    "GatedFusion",
    "WeightedConcat",
    "make_fusion",
    "resize_to",
]

FUSION_KINDS = ("concat", "alpha", "beta", "dynamic", "gate")
GATE_KINDS = ("channel", "spatial")
# the paper's settings (Table I): alpha_i = 0.5 (its best) and beta_i = 0.1
DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 0.1


def resize_to(x: Tensor, ref: Tensor) -> Tensor:
    """`x` resized to the spatial size of `ref` by bilinear interpolation (align_corners=False).

    The target size is read from `ref` at run time (F.interpolate(size=ref.shape[-2:])), so
    odd sizes need no padding or cropping and an export keeps the size symbolic. Resizing to
    the same size returns the values unchanged.
    """
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def _check_skip(skip: Tensor, channels: int, name: str) -> None:
    if skip.dim() != 4 or skip.shape[1] != channels:
        raise ValueError(
            f"{name} expects a skip of shape (N, {channels}, H, W), got {tuple(skip.shape)}"
        )


class WeightedConcat(nn.Module):
    """concat(alpha * skip, beta * up): the weight mechanism, eq. (4) and Fig. 1(a)/(b).

    alpha multiplies the encoder skip (the series connection: the decoder feature was computed
    from it); beta multiplies the decoder feature (the parallel position, Fig. 1(b)). Both are
    0-dim float buffers: they are saved in and restored from the state_dict (a checkpoint brings
    its own constants), get no gradient, and are not parameters. forward(skip, up) resizes `up`
    to the skip's size first. Adds no parameters and no multiply-accumulates.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        where = "WeightedConcat"
        self.register_buffer("alpha", torch.tensor(check_positive(alpha, "alpha", where)))
        self.register_buffer("beta", torch.tensor(check_positive(beta, "beta", where)))

    def forward(self, skip: Tensor, up: Tensor) -> Tensor:
        up = resize_to(up, skip)
        return torch.cat([skip * self.alpha.to(skip.dtype), up * self.beta.to(up.dtype)], 1)

    def extra_repr(self) -> str:
        if self.alpha.is_meta:
            return ""
        return f"alpha={float(self.alpha):g}, beta={float(self.beta):g}"


class DynamicWeight(nn.Module):
    """concat(w * skip, up) with a learnable weight w per skip channel, initialised to 1.

    The paper's "dynamic weight": the constant alpha made trainable and per channel, i.e. the
    gate without its activation. Parameter ``weight`` of shape (channels,).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", "DynamicWeight")
        self.weight = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, skip: Tensor, up: Tensor) -> Tensor:
        _check_skip(skip, self.channels, type(self).__name__)
        up = resize_to(up, skip)
        w = self.weight.to(skip.dtype).view(1, -1, 1, 1)
        return torch.cat([skip * w, up], 1)

    def extra_repr(self) -> str:
        return f"{self.channels}"


class GatedFusion(nn.Module):
    """Gated skip fusion, eq. (2)-(3) of the paper with L = 1 (Fig. 3), then concatenation.

    Reading of the equations. Fig. 3 fuses two feature maps, i in {1, 2}; eq. (3) for level
    l = 1 is X~_1 = (1 + G_1) X_1 + (1 - G_1) G_2 X_2. X_1 is the encoder skip: it is the map
    that the constant alpha multiplies in eq. (4)-(7) and that the gate replaces in the
    concatenation; X_2 is the decoder feature (resized to the skip's size). The output is
    concat(X~_1, up), so the layer after it sees the baseline's widths. G_i = sigmoid(w_i * X_i)
    where `*` is a 1x1 convolution (with bias), as in GFF [3] which eq. (2)-(3) quote.

    Eq. (3) adds X_1 and X_2 element-wise, so they need one width; the decoder feature of a
    U-Net is wider (C_u = 2 C_s in `res_unet`), so X_2 is its 1x1 projection (with bias) to C_s
    channels (no projection when C_u = C_s), the same embedding GFF applies to its levels
    before gating. The skip and decoder parts of the concatenation are otherwise unchanged.

    Gate width (`gate`): "channel" (default) gives each gate C_s output channels, a gate value
    per channel and pixel; "spatial" one output channel (w_i in R^{1x1xC_i} read as a single
    filter, GFF's spatial gate) broadcast over the channels. With `res_unet`'s skips (32, 64,
    128, 256 channels, decoder features twice as wide) "channel" adds
    sum(2C*C + C + 2*(C*C + C)) = 349,600 parameters, the paper's "+0.34M" (Table I) within 3%;
    "spatial" adds sum(2C*C + C + 2*(C + 1)) = 175,528 (almost all of it the projections), about
    half. So "channel" is the gating the paper measured, and the default.
    """

    def __init__(self, skip_channels: int, up_channels: int, gate: str = "channel") -> None:
        super().__init__()
        where = "GatedFusion"
        self.skip_channels = check_int(skip_channels, "skip_channels", where)
        self.up_channels = check_int(up_channels, "up_channels", where)
        if gate not in GATE_KINDS:
            raise UserError(
                f"{where}: gate={gate!r} is unknown: expected one of {', '.join(GATE_KINDS)}"
                + did_you_mean(str(gate), GATE_KINDS)
            )
        self.gate = gate
        width = skip_channels if gate == "channel" else 1
        if up_channels == skip_channels:
            self.proj: nn.Module = nn.Identity()
        else:
            self.proj = nn.Conv2d(up_channels, skip_channels, 1)
        self.gate1 = nn.Conv2d(skip_channels, width, 1)  # w_1, on the skip X_1
        self.gate2 = nn.Conv2d(skip_channels, width, 1)  # w_2, on the decoder feature X_2

    def forward(self, skip: Tensor, up: Tensor) -> Tensor:
        _check_skip(skip, self.skip_channels, type(self).__name__)
        up = resize_to(up, skip)
        x2 = self.proj(up)
        g1 = torch.sigmoid(self.gate1(skip))
        g2 = torch.sigmoid(self.gate2(x2))
        fused = (1 + g1) * skip + (1 - g1) * g2 * x2
        return torch.cat([fused, up], 1)

    def extra_repr(self) -> str:
        return (
            f"skip_channels={self.skip_channels}, up_channels={self.up_channels}, gate={self.gate}"
        )


def make_fusion(
    kind: str,
    skip_channels: int,
    up_channels: int,
    *,
    alpha: float | None = None,
    beta: float | None = None,
    gate: str = "channel",
) -> nn.Module:
    """The skip fusion `kind` (see `FUSION_KINDS`) for a skip of `skip_channels` channels and a
    decoder feature of `up_channels`; every kind returns skip_channels + up_channels channels.

    "concat": plain concatenation (`WeightedConcat` with alpha = beta = 1, so its state_dict
    has the same keys as the weighted kinds); "alpha": `WeightedConcat(alpha)` (default 0.5),
    "beta": `WeightedConcat(beta=beta)` (default 0.1); "dynamic": `DynamicWeight`; "gate":
    `GatedFusion` with `gate` "channel" | "spatial". "alpha" and "beta" take both constants
    (None means the kind's default: 0.5 / 0.1 for its own constant, 1 for the other), so
    fusion="alpha", alpha=0.5, beta=0.1 weights both inputs; the other kinds take neither.
    """
    if not isinstance(kind, str) or kind not in FUSION_KINDS:
        raise UserError(
            f"fusion {kind!r} is unknown: expected one of {', '.join(FUSION_KINDS)}"
            + did_you_mean(str(kind), FUSION_KINDS)
        )
    where = f"fusion {kind!r}"
    skip_channels = check_int(skip_channels, "skip_channels", where)
    up_channels = check_int(up_channels, "up_channels", where)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is not None and kind not in ("alpha", "beta"):
            raise UserError(
                f"{where} takes no {name} (got {name}={value!r}): {name} is a constant of the "
                "weighted concatenation; expected fusion='alpha' or 'beta', or no "
                f"{name}"
            )
    if kind != "gate" and gate != "channel":
        raise UserError(f"{where} takes no gate (got gate={gate!r}): expected fusion='gate'")
    if kind == "concat":
        return WeightedConcat(1.0, 1.0)
    if kind in ("alpha", "beta"):  # both constants may be set; the kind picks the defaults
        alpha = (DEFAULT_ALPHA if kind == "alpha" else 1.0) if alpha is None else alpha
        beta = (DEFAULT_BETA if kind == "beta" else 1.0) if beta is None else beta
        return WeightedConcat(
            alpha=check_positive(alpha, "alpha", where), beta=check_positive(beta, "beta", where)
        )
    if kind == "dynamic":
        return DynamicWeight(skip_channels)
    return GatedFusion(skip_channels, up_channels, gate=gate)
