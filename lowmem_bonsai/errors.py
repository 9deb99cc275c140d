"""The one exception users see.

Every problem a user can fix (a missing file, a shape that disagrees with config.json, a bad flag)
raises :class:`UserError` with what was found, what was expected and how to fix it. The CLI prints
its message on one line and exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input, stated so the user can fix it."""

    exit_code = 2
