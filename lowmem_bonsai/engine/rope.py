"""Rotary position embeddings in the Hugging Face convention (rotate halves, not pairs)."""

from __future__ import annotations

import math

import torch

from ..model.config import ModelConfig


def inv_freq(config: ModelConfig) -> torch.Tensor:
    """Per-frequency inverse wavelengths, with 'linear' or 'llama3' scaling applied.  # (head_dim/2,)"""
    d = config.head_dim
    freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        freq = freq / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, freq / factor, freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        freq = torch.where(mid, (1 - smooth) * freq / factor + smooth * freq, scaled)
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
