"""Errors the user caused (bad config, missing file, unknown name), and failed writes.

The CLI prints a UserError as one line and exits with code 2, a StorageError (the disk is
full, a file cannot be written) as one line with code 1, both without a traceback;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib


class UserError(ValueError):
    """Something the caller passed is wrong; the message names it and what was expected."""


class StorageError(OSError):
    """A file could not be written (disk full, no permission, file too large); the message
    names the file and says that what was there before is intact."""


class ExportCheckError(RuntimeError):
    """An exported file does not compute what the model computes (a bug, not a user error)."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
