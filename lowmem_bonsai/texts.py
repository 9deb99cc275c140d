"""Texts shipped inside the package, by name: calibration and evaluation from a clone alone.

``--calib`` and ``--data`` take a path or one of :data:`BUNDLED`'s names. Each bundled file's
sha256 is checked when it is first read, so a damaged install is refused instead of giving
perplexities that silently differ from everyone else's. Attribution and licences:
``lowmem_bonsai/_texts/README.md``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

TEXT_DIR = Path(__file__).resolve().parent / "_texts"


@dataclass(frozen=True, slots=True)
class BundledText:
    file: str  # inside TEXT_DIR
    sha256: str
    about: str  # one line for --help and errors


BUNDLED = {
    "wikitext2-valid": BundledText(
        file="wikitext2-valid.txt",
        sha256="f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        about="WikiText-2 validation split, tokenized release (CC BY-SA 3.0)",
    ),
}
DEFAULT_CALIB = "wikitext2-valid"
_VERIFIED: set[str] = set()


def bundled_path(name: str) -> Path:
    """The file of the bundled text ``name``, its sha256 checked (once per process)."""
    if name not in BUNDLED:
        raise UserError(f"'{name}' is not a bundled text; known: {', '.join(BUNDLED)}")
    text = BUNDLED[name]
    path = TEXT_DIR / text.file
    if name in _VERIFIED:
        return path
    if not path.is_file():
        raise UserError(f"{path}: the bundled text '{name}' is missing from this install; "
                        "reinstall lowmem-bonsai")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != text.sha256:
        raise UserError(f"{path}: sha256 {digest[:12]}... differs from the expected "
                        f"{text.sha256[:12]}... of '{name}'; the install is damaged: reinstall lowmem-bonsai")
    _VERIFIED.add(name)
    return path


def text_file(spec: Path | str) -> Path:
    """A user's ``--data`` / ``--calib``: a bundled text's name, else a path (returned as given).

    A bundled name wins over a file of the same name in the working folder; write ``./NAME`` for
    the file.
    """
    return bundled_path(str(spec)) if str(spec) in BUNDLED else Path(spec)


def names_help() -> str:
    """The bundled names, for --help."""
    return "; ".join(f"'{name}' = {t.about}" for name, t in BUNDLED.items())
