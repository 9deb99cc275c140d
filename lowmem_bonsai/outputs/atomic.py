"""Writing outputs so that nothing half-written ever looks finished.

Files go to a temporary name, are fsynced and renamed. Whole output folders are built under a
staging name beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError, WriteError

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, exc) from None
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_output_path(out: Path, *, flag: str = "--out", folder: bool = True,
                      inputs: tuple[Path, ...] = ()) -> None:
    """Before any work: refuse an output that could not be put in place, or whose replacement
    would destroy the current folder or an input.

    Refused: '.', '..' and the like; a symbolic link (the result is renamed into place, which
    would replace the link, not fill its target); a path under a file; a folder that is read-only
    or on a read-only file system; the current folder, an input or a folder holding either (pass a
    checkpoint's files too, :func:`~lowmem_bonsai.model.checkpoint.inputs_of`, so that ``--force``
    never replaces its weights, config or tokenizer).
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise UserError(f"{flag} {out}: names the current or a parent folder; pass the path of a "
                        f"new {'folder' if folder else 'file'} (e.g. {flag} result)")
    if out.is_symlink():
        raise UserError(f"{out}: is a symbolic link (to {os.readlink(out)}); pass the real path "
                        f"as {flag}")
    parent = out.absolute().parent
    while not parent.exists() and not parent.is_symlink():  # the nearest existing folder
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{out}: cannot be created: {parent} is not a folder; pick another {flag}")
    read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    if read_only or not os.access(parent, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only else "is not writable"
        raise UserError(f"{out}: cannot be written: {parent} {why}; pick another {flag}")
    target = out.resolve()
    for other in (Path.cwd(), *inputs):
        other = Path(other).resolve()
        if target == other or target in other.parents:
            what = "the current folder" if other == Path.cwd().resolve() else f"the input {other}"
            raise UserError(f"{flag} {out}: would replace {what} or a folder holding it; pick "
                            f"another {flag}")
    if not folder and out.is_dir():
        raise UserError(f"{out}: is a folder; {flag} names the file to write")


def make_dirs(path: Path) -> None:
    """``mkdir -p``, an OSError becoming a one-line WriteError."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(path, exc) from None


def check_output_dir(out: Path, *, force: bool) -> None:
    """Refuse to overwrite a non-empty folder unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; pick another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: folder exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def staged_dir(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a staging folder that becomes ``out`` only if the block finishes without error."""
    out = Path(out)
    check_output_path(out)
    check_output_dir(out, force=force)
    stage = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    except OSError as exc:
        raise WriteError(out, exc) from None
    try:
        yield stage
        replace_dir(stage, out)
    except WriteError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise exc.again(path=out) from None  # the staging name means nothing to the user
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("wrote %s", out)


def replace_dir(src: Path, dst: Path) -> None:
    """Put the complete folder ``src`` in the place of ``dst`` (replacing it), durably."""
    try:
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(src, dst)
        fsync_dir(dst.parent)
    except OSError as exc:
        raise WriteError(dst, exc) from None
