"""analysis: parameter and MAC counts (profile), per-layer tables."""

from lightnets.analysis.profile import LayerRow, Profile, format_count, profile

__all__ = ["LayerRow", "Profile", "format_count", "profile"]
