"""register_variant: one class, several registered variants, each with the class's keyword
arguments less the fixed ones; the entry points keep their signatures."""

from __future__ import annotations

import inspect

import pytest
from torch import nn

from lightnets.errors import UserError
from lightnets.models import create_model
from lightnets.models.finet import SMALL_WIDTHS, Finet, finet_small
from lightnets.models.registry import MODELS, model_arguments, register_variant
from lightnets.models.resnet import resnet_mini


class Toy(nn.Module):
    def __init__(self, width: int, depth: int = 1, num_classes: int = 10, name: str = "toy"):
        super().__init__()
        self.width, self.depth, self.num_classes, self.name = width, depth, num_classes, name


@pytest.fixture
def toy_variant():
    entry = register_variant(
        "toy_wide", Toy, "A wide toy.", fixed={"width": 64}, defaults={"num_classes": 3}
    )
    yield entry
    MODELS.remove("toy_wide")


def test_a_variant_has_the_class_arguments_less_the_fixed_ones(toy_variant):
    params = model_arguments("toy_wide")
    assert list(params) == ["depth", "num_classes"]  # width fixed, name given by the variant
    assert params["num_classes"].default == 3 and params["depth"].default == 1
    assert toy_variant.__name__ == "toy_wide" and toy_variant.__doc__ == "A wide toy."
    model = toy_variant(2)  # positional, in the class's order
    assert (model.width, model.depth, model.num_classes, model.name) == (64, 2, 3, "toy_wide")
    with pytest.raises(TypeError):
        toy_variant(width=8)
    with pytest.raises(UserError, match=r"model 'toy_wide' has no option 'width'"):
        create_model("toy_wide", width=8)
    assert create_model("toy_wide", depth=3).depth == 3


def test_a_variant_must_fix_what_has_no_default():
    with pytest.raises(ValueError, match="width has no default and is not fixed"):
        register_variant("toy_bad", Toy, "")
    with pytest.raises(ValueError, match="takes no height"):
        register_variant("toy_bad", Toy, "", fixed={"width": 1, "height": 2})
    assert "toy_bad" not in MODELS


def test_family_variants_are_their_class_with_fixed_arguments():
    assert type(finet_small()) is Finet and finet_small().stage2[0].out_channels == SMALL_WIDTHS[0]
    params = inspect.signature(resnet_mini).parameters
    assert "cifar_stem" not in params and params["num_classes"].default == 10
    assert params["in_chans"].default == 1
