"""Errors the user caused (bad config, missing file, unknown name).

The CLI prints these as one line and exits with code 2, without a traceback; everything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the caller passed is wrong; the message names it and what was expected."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' (did you mean X?)' when a close match exists, else ''."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
