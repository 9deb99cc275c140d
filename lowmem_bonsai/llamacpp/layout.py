"""How llama.cpp lays out a Llama-family model, shared by GGUF import and export.

- :data:`TENSOR_NAMES`: GGUF tensor name -> Hugging Face name ("{}" is the layer index).
- q/k row order: llama.cpp's ``llama`` and ``deci`` graphs rotate adjacent pairs of a head, HF
  rotates its two halves, so the converter interleaves the halves of every head of q_proj and
  k_proj (weights and biases). Rows never cross heads, so each layer's own head count is used.
  Architectures whose graph rotates halves (``qwen2``: NEOX rope) keep the HF order.
- Llama 3 rope scaling travels as ``rope_freqs.weight``: one divisor per rotary frequency.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

# GGUF name -> HF name; "{}" is the layer index.
TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blk.{}.ffn_gate.bias": "model.layers.{}.mlp.gate_proj.bias",
    "blk.{}.ffn_up.bias": "model.layers.{}.mlp.up_proj.bias",
    "blk.{}.ffn_down.bias": "model.layers.{}.mlp.down_proj.bias",
}
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


def llama3_rope_factors(*, theta: float, head_dim: int, factor: float, low: float = 1.0,
                        high: float = 4.0, original: int = 8192) -> np.ndarray:
    """The ``rope_freqs`` divisors llama.cpp's converter computes for Llama 3.1+.  # (head_dim/2,)

    Short wavelengths keep their frequency (divisor 1), long ones are divided by ``factor``, and
    a smooth ramp in between; llama.cpp divides each rotary frequency by its entry.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def check_gguf_file(path: Path, *, hint: str = "pass a llama.cpp .gguf model") -> Path:
    """``path`` if it is a file that starts with the GGUF magic, else a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); {hint}")
    return path
