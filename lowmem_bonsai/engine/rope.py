"""Rotary position embeddings in the Hugging Face convention (rotate halves, not pairs)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..model.config import ModelConfig


def base_freq(theta: float, head_dim: int) -> torch.Tensor:
    """Unscaled inverse wavelength of every rotary frequency.  # (head_dim/2,) fp64"""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def llama3_rope_factors(*, theta: float, head_dim: int, factor: float, low: float = 1.0,
                        high: float = 4.0, original: int = 8192) -> torch.Tensor:
    """Llama 3.1+ rope scaling as one divisor per rotary frequency.  # (head_dim/2,) fp64

    Short wavelengths keep their frequency (divisor 1), long ones are divided by ``factor``, and a
    smooth ramp in between. The executor divides by it; GGUF stores it as ``rope_freqs.weight``.
    """
    wavelen = 2 * math.pi / base_freq(theta, head_dim)
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < original / high, 1.0,
                       torch.where(wavelen > original / low, factor, mid)).double()


def llama3_params(scaling: dict[str, Any]) -> dict[str, Any]:
    """:func:`llama3_rope_factors`'s arguments from a config's ``rope_scaling``."""
    return dict(factor=float(scaling["factor"]), low=float(scaling.get("low_freq_factor", 1.0)),
                high=float(scaling.get("high_freq_factor", 4.0)),
                original=int(scaling.get("original_max_position_embeddings", 8192)))


def inv_freq(config: ModelConfig) -> torch.Tensor:
    """Per-frequency inverse wavelengths, with 'linear' or 'llama3' scaling applied.  # (head_dim/2,)"""
    freq = base_freq(config.rope_theta, config.head_dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        freq = freq / float(scaling["factor"])
    elif kind == "llama3":
        freq = freq / llama3_rope_factors(theta=config.rope_theta, head_dim=config.head_dim,
                                          **llama3_params(scaling))
    return freq.float()


def rope_tables(config: ModelConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..seq_len-1.  # (T, head_dim) each, fp32"""
    t = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq(config))  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, T, head_dim); rotates the two halves of every head."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
