"""Text -> token windows, with the evaluation protocol every number in this project uses.

Protocol: tokenize the whole file once with the model's tokenizer (no BOS added), cut it into
consecutive non-overlapping windows of ``seq_len`` tokens, drop the last partial window, keep the
first ``max_seqs``. Calibration takes windows from the start of a file; evaluation can skip those.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from .errors import UserError
from .texts import BUNDLED, text_file


def load_tokenizer(model_dir: Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; the checkpoint needs a tokenizer.json (fast tokenizer)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise UserError(f"{path}: not a valid tokenizer.json ({exc})") from None


def read_text(path: Path | str) -> str:
    """A UTF-8 text file, or a bundled text by name (:mod:`lowmem_bonsai.texts`)."""
    path = text_file(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found; pass a UTF-8 text file, or a bundled "
                        f"text: {', '.join(BUNDLED)}")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise UserError(f"{path}: looks binary (NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 (byte {exc.start}); convert it with iconv first") from None
    if not text.strip():
        raise UserError(f"{path}: is empty; pass a text file with some content")
    return text


def tokenize_file(tokenizer: Tokenizer, path: Path | str) -> torch.Tensor:
    """All tokens of the file, no BOS.  # (n_tokens,) int64"""
    ids = tokenizer.encode(read_text(path), add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, *, seq_len: int, max_seqs: int | None = None, skip: int = 0,
            source: str = "data") -> torch.Tensor:
    """Consecutive non-overlapping windows, after skipping the first ``skip``.  # (S, seq_len)"""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: need at least 2 tokens per window")
    n = ids.numel() // seq_len
    if n <= skip:
        raise UserError(
            f"{source}: {ids.numel()} tokens give {n} windows of {seq_len}, "
            f"{'none' if skip == 0 else f'none after the {skip} used for calibration'}; "
            "use more text or a smaller --seq-len"
        )
    out = ids[: n * seq_len].view(n, seq_len)[skip:]
    return out[:max_seqs] if max_seqs is not None else out
