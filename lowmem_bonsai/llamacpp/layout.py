"""How llama.cpp lays out a Llama-family model, shared by GGUF import and export.

- Tensor names: the GGUF column of the tensor table (:mod:`lowmem_bonsai.model.tensors`).
- q/k row order: llama.cpp's ``llama`` and ``deci`` graphs rotate adjacent pairs of a head, HF
  rotates its two halves, so the converter interleaves the halves of every head of q_proj and
  k_proj (weights and biases). Rows never cross heads, so each layer's own head count is used.
  Architectures whose graph rotates halves (``qwen2``: NEOX rope) keep the HF order.
- Llama 3 rope scaling travels as ``rope_freqs.weight``: one divisor per rotary frequency
  (:func:`lowmem_bonsai.engine.rope.llama3_rope_factors`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError

# Not a weight of the HF model: Llama 3's rope frequency divisors (config.json's rope_scaling).
ROPE_FREQS = "rope_freqs.weight"


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> llama.cpp q/k rows: within each head, the two halves become interleaved pairs."""
    d = w.shape[0] // n_heads
    # (n_heads, 2, d/2, *in) -> (n_heads, d/2, 2, *in): row j*d/2+i of a head goes to 2i+j
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp -> HF q/k rows: the inverse of :func:`permute_qk`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_gguf_file(path: Path, *, hint: str = "pass a llama.cpp .gguf model") -> Path:
    """``path`` if it is a file that starts with the GGUF magic, else a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        raise UserError(f"{path}: {what}; expected a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); {hint}")
    return path
