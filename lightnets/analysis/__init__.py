"""analysis: parameter and MAC counts (profile), per-layer tables."""

from lightnets.analysis.counters import PTFLOPS_CUSTOM_HOOKS, THOP_CUSTOM_OPS, fbn_conv_ops
from lightnets.analysis.profile import LayerRow, Profile, format_count, profile

__all__ = [
    "PTFLOPS_CUSTOM_HOOKS",
    "THOP_CUSTOM_OPS",
    "LayerRow",
    "Profile",
    "fbn_conv_ops",
    "format_count",
    "profile",
]
