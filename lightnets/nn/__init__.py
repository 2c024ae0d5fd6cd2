"""Layers: each file one concept (see DESIGN.md)."""

from lightnets.nn.binary import (
    QUANTIZERS,
    BinaryConv2d,
    BinaryLinear,
    approx_sign,
    clip_latent_weights_,
    get_quantizer,
    hard_sigmoid,
    is_binary_parameter,
    magnitude_aware_sign,
    ste_sign,
    stochastic_sign,
    swish_sign,
)
from lightnets.nn.fbn import FBNConv2d, FBNNormSlot
from lightnets.nn.fusion import (
    FUSION_KINDS,
    DynamicWeight,
    GatedFusion,
    WeightedConcat,
    make_fusion,
)
from lightnets.nn.norm import (
    LAYER_NORM_KINDS,
    NORM_KINDS,
    BatchRenorm,
    FrozenBatchNorm,
    NormSpec,
    make_norm,
)
from lightnets.nn.packed import PackedBinaryConv2d, PackedBinaryLinear, is_packed_layer

__all__ = [
    "FUSION_KINDS",
    "LAYER_NORM_KINDS",
    "NORM_KINDS",
    "QUANTIZERS",
    "BatchRenorm",
    "BinaryConv2d",
    "BinaryLinear",
    "DynamicWeight",
    "FBNConv2d",
    "FBNNormSlot",
    "FrozenBatchNorm",
    "GatedFusion",
    "NormSpec",
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "WeightedConcat",
    "approx_sign",
    "clip_latent_weights_",
    "get_quantizer",
    "hard_sigmoid",
    "is_binary_parameter",
    "is_packed_layer",
    "make_fusion",
    "magnitude_aware_sign",
    "make_norm",
    "ste_sign",
    "stochastic_sign",
    "swish_sign",
]
