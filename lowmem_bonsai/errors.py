"""The one exception users see.

Every problem a user can fix (a missing file, a shape that disagrees with config.json, a bad flag)
raises :class:`UserError` with what was found, what was expected and how to fix it. The CLI prints
its message on one line and exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """A problem in the user's input, stated so the user can fix it."""

    exit_code = 2


class WriteError(UserError):
    """An output could not be written, most often because the disk is full.

    It keeps the ``OSError`` so that a caller that knows more (a prune whose progress is saved) can
    restate the fix with :meth:`again`.
    """

    def __init__(self, path: Path | str, error: OSError, *,
                 then: str = "or pick another --out") -> None:
        self.path, self.error, self.then = Path(path), error, then
        self.disk_full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        what, fix = (("the disk is full", "free disk space") if self.disk_full
                     else ("could not be written", "make it writable"))
        super().__init__(f"{path}: {what} ({error.strerror or error}); {fix} {then}")

    def again(self, *, path: Path | str | None = None, then: str | None = None) -> WriteError:
        """The same failure, named at ``path`` and with another way to continue."""
        return WriteError(self.path if path is None else path, self.error,
                          then=self.then if then is None else then)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (temporary files removed,
    a prune's progress saved); the CLI installs the handler and exits with status 143."""

    exit_code = 143
