"""bnn_mnist and binarynet_cifar: the [Re] paper's architectures, counted by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightnets.errors import UserError
from lightnets.models import create_model
from lightnets.nn.binary import BinaryConv2d, BinaryLinear
from lightnets.optim import binary_parameters, real_parameters

torch.set_num_threads(1)


def _binary_layers(model):
    return [m for m in model.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]


def test_bnn_mnist_is_section_3_1_1():
    model = create_model("bnn_mnist")
    layers = _binary_layers(model)
    # convs 32, 64, 64 (3x3, no padding), linear 64 and 10; 28-26-13-11-5-3-1 so 64 inputs
    shapes = [tuple(m.weight.shape) for m in layers]
    assert shapes == [(32, 1, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (64, 64), (10, 64)]
    assert sum(m.weight.numel() for m in layers) == 288 + 18432 + 36864 + 4096 + 640
    assert [m.input_quantizer for m in layers] == [None] + ["ste_sign"] * 4
    assert all(m.bias is None and m.mode == "latent" and m.clip_weights for m in layers)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()) == 5
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    # latent mode: every weight is real (for Adam); Glorot-uniform bounds
    assert binary_parameters(model) == []
    w = layers[1].weight
    assert w.abs().max() <= (6 / (32 * 9 + 64 * 9)) ** 0.5


@pytest.mark.parametrize("original, binary", [(False, 14_022_016), (True, 10_352_000)])
def test_binarynet_cifar_is_section_3_3(original, binary):
    model = create_model("binarynet_cifar", original=original)
    layers = _binary_layers(model)
    widths = [m.weight.shape[0] for m in layers]
    assert widths == [128, 128, 256, 256, 512, 512, 1024, 1024, 10]
    # convs: 3*128*9 + 128*128*9 + 128*256*9 + 256*256*9 + 256*512*9 + 512*512*9 = 4,574,592
    side = 3 if original else 4  # 30-15-7-3 without the first padding, else 32-16-8-4
    fc = 512 * side * side * 1024 + 1024 * 1024 + 1024 * 10
    assert binary == 4_574_592 + fc
    assert sum(p.numel() for p in binary_parameters(model)) == binary
    assert layers[0].padding == ((0, 0) if original else (1, 1))
    assert all(m.mode == "bop" and m.bias is None for m in layers)
    assert all(torch.all(m.weight.abs() == 1) for m in layers)  # sign of He-normal
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(norms) == 9
    # original: BatchNorm(scale=False) -> gamma is not trained; the real parameters are beta
    trainable_gamma = [n.weight.requires_grad for n in norms]
    assert trainable_gamma == [not original] * 9
    assert sum(p.numel() for p in real_parameters(model)) == sum(
        n.num_features * (1 if original else 2) for n in norms
    )
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("original", [False, True])
def test_binarynet_cifar_batchnorm_hyperparameters(original):
    """The original code's Keras BatchNormalization(): momentum 0.99 keeps 99% of the running
    value per step (PyTorch's momentum is the other 1%), epsilon 1e-3; the [Re] text's PyTorch
    code keeps torch's defaults (0.1, 1e-5). Checked on the running mean after one step."""
    model = create_model("binarynet_cifar", original=original)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    keep, eps = (0.99, 1e-3) if original else (0.9, 1e-5)
    assert all(n.eps == eps for n in norms)
    bn = norms[-1]
    x = torch.randn(8, bn.num_features) + 3.0
    bn.train()
    bn(x)
    torch.testing.assert_close(bn.running_mean, (1 - keep) * x.mean(0))


def test_bnn_mnist_batchnorm_is_keras_default():
    """[Re] §3.1.1 built the MNIST network with Larq / Keras: BatchNormalization's defaults,
    epsilon 1e-3 and momentum 0.99 (torch's 0.01)."""
    norms = [
        m
        for m in create_model("bnn_mnist").modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
    ]
    assert len(norms) == 5 and all(n.eps == 1e-3 and n.momentum == 0.01 for n in norms)
    with pytest.raises(UserError, match="bn_eps=0 is invalid: expected a finite number > 0"):
        create_model("bnn_mnist", bn_eps=0)


def test_latent_init_and_scale():
    a = create_model("bnn_mnist", latent_init="uniform")
    assert all(m.weight.abs().max() <= 0.05 for m in _binary_layers(a))
    torch.manual_seed(0)
    b = create_model("bnn_mnist", init_scale=0.01)
    torch.manual_seed(0)
    c = create_model("bnn_mnist")
    for lb, lc in zip(_binary_layers(b), _binary_layers(c)):
        assert torch.allclose(lb.weight, lc.weight * 0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "xnor"}, "mode='xnor'"),
        ({"latent_init": "zeros"}, "latent_init='zeros'"),
        ({"init_scale": 0}, "init_scale"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        create_model("bnn_mnist", **kwargs)
