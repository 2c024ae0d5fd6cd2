"""Binary networks of the [Re] Bop paper (Vaessen et al., "Latent Weights Do Not Exist"):
`bnn_mnist` (Sec. 3.1.1) and `binarynet_cifar` (Sec. 3.3, Courbariaux et al.'s BinaryNet).

Every conv / linear is a `lightnets.nn.BinaryConv2d` / `BinaryLinear` with the ``ste_sign``
kernel quantizer and no bias, followed by BatchNorm; every layer's input is binarized with
``ste_sign`` except the first, which takes the real image. The sign of the previous layer's
BatchNorm output is the activation (applied as the next layer's input quantizer); the last
BatchNorm's output is the logits (softmax is in the loss).

`mode`: ``"latent"`` (real latent weights, binarized in the forward pass; for Adam/SGD) or
``"bop"`` (weights stored as +1/-1, the sign of He-normal, trained by `lightnets.optim.Bop`).
Latent weights start from `latent_init` times `init_scale` (the initializations of Sec.
3.1.2): ``"glorot_uniform"`` (Keras' default, the paper's "Glorot"), ``"glorot_normal"``,
``"he_normal"`` or ``"uniform"`` (Keras' RandomUniform, U(-0.05, 0.05)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightnets.checks import check_choice, check_int, check_number, check_positive
from lightnets.errors import UserError
from lightnets.models.registry import register_model
from lightnets.nn.binary import MODES, BinaryConv2d, BinaryLinear

LATENT_INITS = ("glorot_uniform", "glorot_normal", "he_normal", "uniform")
BINARYNET_WIDTHS = (128, 128, "M", 256, 256, "M", 512, 512, "M")
#: Keras' BatchNormalization defaults, which the original Bop code kept: momentum 0.99 (the
#: weight of the old running value; PyTorch's momentum is the new value's: 1 - 0.99) and eps.
KERAS_BN_MOMENTUM = 0.01
KERAS_BN_EPS = 1e-3


def _check(name: str, mode: str, latent_init: str, init_scale: float, num_classes: int) -> None:
    check_choice(mode, "mode", name, MODES)
    check_choice(latent_init, "latent_init", name, LATENT_INITS)
    check_positive(init_scale, "init_scale", name)
    check_int(num_classes, "num_classes", name)


def init_latent_weights_(model: nn.Module, latent_init: str, init_scale: float = 1.0) -> None:
    """Re-initialize the latent weight of every binary layer in latent mode of `model`."""
    for m in model.modules():
        if not isinstance(m, (BinaryConv2d, BinaryLinear)) or m.mode != "latent":
            continue
        w = m.weight
        fan_out, fan_in = w.shape[0], w[0].numel()
        receptive = w[0, 0].numel()
        fan_out *= receptive
        with torch.no_grad():
            if latent_init == "glorot_uniform":
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                w.uniform_(-bound, bound)
            elif latent_init == "glorot_normal":
                w.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
            elif latent_init == "he_normal":
                w.normal_(0.0, math.sqrt(2.0 / fan_in))
            else:  # uniform: Keras' RandomUniform default
                w.uniform_(-0.05, 0.05)
            w.mul_(init_scale)


def _norm(kind: str, channels: int, scale: bool, momentum: float, eps: float) -> nn.Module:
    bn = (nn.BatchNorm2d if kind == "2d" else nn.BatchNorm1d)(channels, eps=eps, momentum=momentum)
    if not scale:  # the original code's BatchNorm(scale=False): shift only, gamma fixed at 1
        bn.weight.requires_grad_(False)
    return bn


class BinaryNet(nn.Module):
    """Binary conv blocks (conv [pool] BN) then binary linear blocks (linear BN)."""

    def __init__(
        self,
        convs: tuple[int | str, ...],
        fcs: tuple[int, ...],
        in_chans: int,
        num_classes: int,
        image_size: int,
        *,
        mode: str,
        clip_weights: bool,
        first_padding: int,
        padding: int,
        pool_before_norm: bool,
        bn_scale: bool,
        bn_momentum: float,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        kw = {"kernel_quantizer": "ste_sign", "mode": mode, "clip_weights": clip_weights}
        layers: list[nn.Module] = []
        cin, size, first = in_chans, image_size, True
        items = list(convs)
        for i, item in enumerate(items):
            if item == "M":
                continue
            pad = first_padding if first else padding
            layers.append(
                BinaryConv2d(
                    cin,
                    int(item),
                    3,
                    padding=pad,
                    input_quantizer=None if first else "ste_sign",
                    **kw,
                )
            )
            size = size + 2 * pad - 2
            pooled = i + 1 < len(items) and items[i + 1] == "M"
            norm = _norm("2d", int(item), bn_scale, bn_momentum, bn_eps)
            if pooled:
                layers += [nn.MaxPool2d(2), norm] if pool_before_norm else [norm, nn.MaxPool2d(2)]
                size //= 2
            else:
                layers.append(norm)
            cin, first = int(item), False
        self.features = nn.Sequential(*layers)
        if size < 1:
            raise UserError(f"image_size={image_size} is too small for this network")
        head: list[nn.Module] = [nn.Flatten()]
        fin = cin * size * size
        for width in (*fcs, num_classes):
            head += [
                BinaryLinear(fin, width, input_quantizer="ste_sign", **kw),
                _norm("1d", width, bn_scale, bn_momentum, bn_eps),
            ]
            fin = width
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def bnn_mnist(
    num_classes: int = 10,
    in_chans: int = 1,
    mode: str = "latent",
    clip_weights: bool = True,
    latent_init: str = "glorot_uniform",
    init_scale: float = 1.0,
    bn_scale: bool = True,
    bn_momentum: float = KERAS_BN_MOMENTUM,
    bn_eps: float = KERAS_BN_EPS,
) -> nn.Module:
    """[Re] Sec. 3.1.1: binary 3x3 convs 32, 64, 64 (no padding), each with 2x2 max-pool and BN,
    then binary linear 64 and 10 with BN; latent weights clipped to [-1, 1] (Larq's MNIST
    example). 28 -> 26 -> 13 -> 11 -> 5 -> 3 -> 1: 60,320 binary weights.

    The paper built this network with Larq / Keras, so BatchNorm has Keras' defaults:
    `bn_momentum` 0.01 (Keras' momentum 0.99: an average over ~100 steps; runs much shorter
    than the paper's need a faster one) and `bn_eps` 1e-3."""
    _check("bnn_mnist", mode, latent_init, init_scale, num_classes)
    bn_momentum = check_number(
        bn_momentum, "bn_momentum", "bnn_mnist", minimum=0, maximum=1, open_minimum=True
    )
    bn_eps = check_positive(bn_eps, "bn_eps", "bnn_mnist")
    model = BinaryNet(
        (32, "M", 64, "M", 64, "M"),
        (64,),
        in_chans,
        num_classes,
        28,
        mode=mode,
        clip_weights=clip_weights and mode == "latent",
        first_padding=0,
        padding=0,
        pool_before_norm=False,
        bn_scale=bn_scale,
        bn_momentum=bn_momentum,
        bn_eps=bn_eps,
    )
    init_latent_weights_(model, latent_init, init_scale)
    return model


@register_model
def binarynet_cifar(
    num_classes: int = 10,
    in_chans: int = 3,
    mode: str = "bop",
    original: bool = False,
    clip_weights: bool = False,
    latent_init: str = "glorot_uniform",
    init_scale: float = 1.0,
) -> nn.Module:
    """[Re] Sec. 3.3 BinaryNet: binary 3x3 convs 128-128-pool-256-256-pool-512-512-pool, binary
    linear 1024-1024-10, BatchNorm after every layer: 14.0M binary weights at 32x32.

    ``original=True`` makes the original code's choices: Keras' BatchNormalization defaults
    (no scale, i.e. shift only; momentum 0.99, which is PyTorch's momentum 0.01; epsilon 1e-3),
    the first conv without padding (32 -> 30, so 10.3M binary weights), and max-pool before
    BatchNorm. Default: the [Re] paper's text and PyTorch code (conv - BN - pool, padding 1
    everywhere, PyTorch's BatchNorm: scale, momentum 0.1, epsilon 1e-5).
    """
    _check("binarynet_cifar", mode, latent_init, init_scale, num_classes)
    model = BinaryNet(
        BINARYNET_WIDTHS,
        (1024, 1024),
        in_chans,
        num_classes,
        32,
        mode=mode,
        clip_weights=clip_weights and mode == "latent",
        first_padding=0 if original else 1,
        padding=1,
        pool_before_norm=original,
        bn_scale=not original,
        bn_momentum=KERAS_BN_MOMENTUM if original else 0.1,
        bn_eps=KERAS_BN_EPS if original else 1e-5,
    )
    init_latent_weights_(model, latent_init, init_scale)
    return model
