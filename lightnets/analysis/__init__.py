"""analysis: parameter and MAC counts (profile), per-layer tables."""

from lightnets.analysis.complexity import LayerRow, Profile, format_count, profile
from lightnets.analysis.counters import PTFLOPS_CUSTOM_HOOKS, THOP_CUSTOM_OPS, fbn_conv_ops

__all__ = [
    "PTFLOPS_CUSTOM_HOOKS",
    "THOP_CUSTOM_OPS",
    "LayerRow",
    "Profile",
    "fbn_conv_ops",
    "format_count",
    "profile",
]
