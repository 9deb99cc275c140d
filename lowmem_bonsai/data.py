"""Text -> token windows, with the evaluation protocol every number in this project uses.

Protocol: tokenize the whole file once with the model's tokenizer (no BOS added), cut it into
consecutive non-overlapping windows of ``seq_len`` tokens, drop the last partial window, keep the
first ``max_seqs``. Calibration takes windows from the start of a file; evaluation can skip those.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .errors import UserError
from .texts import BUNDLED, text_file


# Reading a text file for a bounded number of tokens: the first piece, then 4x larger ones.
_FIRST_PIECE = 1 << 16  # bytes; grown to 8 bytes per token wanted
_MARGIN_TOKENS = 64  # tokens past the ones kept, so that the cut cannot change them


def load_tokenizer(model_dir: Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; the checkpoint needs a tokenizer.json (fast tokenizer)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise UserError(f"{path}: not a valid tokenizer.json ({exc})") from None
    unk = getattr(tok.model, "unk_token", None)
    if unk and tok.token_to_id(unk) is None:  # else encoding an unknown word fails deep inside
        raise UserError(f"{path}: the unknown token {unk!r} is not in the vocabulary; add it to "
                        "the vocabulary or set the model's unk_token to one that is")
    return tok


def read_text(path: Path | str) -> str:
    """A UTF-8 text file, or a bundled text by name (:mod:`lowmem_bonsai.texts`)."""
    return read_text_part(path)[0]


def read_text_part(path: Path | str, max_bytes: int | None = None) -> tuple[str, bool]:
    """Like :func:`read_text`: the text and True, or (``max_bytes``) about its first ``max_bytes``
    bytes and whether that is all of it.

    A prefix ends after the last whitespace byte in it (never inside a word or a UTF-8 character),
    so tokenizing it gives the file's first tokens; only that much is read.
    """
    path = text_file(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found; pass a UTF-8 text file, or a bundled "
                        f"text: {', '.join(BUNDLED)}")
    if max_bytes is not None and max_bytes >= path.stat().st_size:
        max_bytes = None  # the whole file (read(n) would first allocate n bytes, however large n is)
    with open(path, "rb") as f:
        raw = f.read() if max_bytes is None else f.read(max_bytes + 1)
    complete = max_bytes is None or len(raw) <= max_bytes
    if not complete:
        raw = raw[:max_bytes]
        cut = max(raw.rfind(b" "), raw.rfind(b"\n"), raw.rfind(b"\t"))
        if cut >= 0:
            raw = raw[: cut + 1]
        else:  # one long word: stop before a partial UTF-8 character
            while raw and raw[-1] & 0xC0 == 0x80:
                raw = raw[:-1]
            raw = raw[:-1] if raw and raw[-1] >= 0xC0 else raw
    if b"\x00" in raw[:65536]:
        raise UserError(f"{path}: looks binary (NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 (byte {exc.start}); convert it with iconv first") from None
    if complete and not text.strip():
        raise UserError(f"{path}: is empty; pass a text file with some content")
    return text, complete


def read_tokens(encode: Callable[[str], list[int]], path: Path | str, *,
                max_tokens: int | None = None) -> torch.Tensor:
    """``encode`` of the file's text, or (``max_tokens``) of just enough of it for that many tokens.

    A huge file is read in growing pieces until they hold the tokens wanted, never whole when a
    few tokens are used.  # (n_tokens,) int64
    """
    size = None if max_tokens is None else max(_FIRST_PIECE, 8 * (max_tokens + _MARGIN_TOKENS))
    while True:
        text, complete = read_text_part(path, max_bytes=size)
        ids = encode(text)
        if complete:
            return torch.tensor(ids, dtype=torch.long)
        if max_tokens is not None and len(ids) >= max_tokens + _MARGIN_TOKENS:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        size *= 4


def tokenize_file(tokenizer: Tokenizer, path: Path | str, *, max_tokens: int | None = None) -> torch.Tensor:
    """The file's tokens, no BOS (with ``max_tokens``: its first ones).  # (n_tokens,) int64"""
    def encode(text: str) -> list[int]:
        try:
            return tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise UserError(f"{path}: the model's tokenizer failed on this text ({exc}); check the "
                            "checkpoint's tokenizer.json") from None

    return read_tokens(encode, path, max_tokens=max_tokens)


def check_windows(*, seq_len: int, max_seqs: int | None, skip: int) -> int | None:
    """Refuse window flags that cannot mean anything; the tokens they use (None: all)."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: need at least 2 tokens per window")
    if skip < 0:
        raise UserError(f"--skip {skip}: expected 0 or more windows to skip")
    if max_seqs is not None and max_seqs < 1:
        raise UserError(f"--max-seqs {max_seqs}: expected at least 1 window")
    return None if max_seqs is None else (skip + max_seqs) * seq_len


def windows(ids: torch.Tensor, *, seq_len: int, max_seqs: int | None = None, skip: int = 0,
            source: str = "data") -> torch.Tensor:
    """Consecutive non-overlapping windows, after skipping the first ``skip``.  # (S, seq_len)"""
    check_windows(seq_len=seq_len, max_seqs=max_seqs, skip=skip)
    n = ids.numel() // seq_len
    if n <= skip:
        raise UserError(
            f"{source}: {ids.numel()} tokens give {n} windows of {seq_len}, "
            f"{'none' if skip == 0 else f'none after the {skip} used for calibration'}; "
            "use more text or a smaller --seq-len"
        )
    out = ids[: n * seq_len].view(n, seq_len)[skip:]
    return out[:max_seqs] if max_seqs is not None else out
