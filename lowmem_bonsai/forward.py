"""The streamed, batched, masked forward pass: tokens in, next-token NLL per (mask, sequence) out.

Data flow: embed all sequences once -> copy them once per mask into one hidden-state store of
rows = masks x sequences -> for each block (streamed from disk) push every row through it in row
chunks -> final norm and lm_head in token chunks (vocab x tokens logits never exist at once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block import UnitStats, block_forward, rms_norm
from .checkpoint import Checkpoint
from .plan import Plan
from .prior import ColumnStats
from .rope import rope_tables
from .streamer import BlockStreamer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class MaskSet:
    """Per-layer unit multipliers for G sub-models (1 keeps a unit, 0 drops it)."""

    head: list[torch.Tensor]  # per layer: (G, n_heads_l)
    channel: list[torch.Tensor]  # per layer: (G, F_l)

    @property
    def n_masks(self) -> int:
        return self.head[0].shape[0]


def lm_head_weight(ckpt: Checkpoint) -> torch.Tensor:
    """The output projection (the embedding when tied).  # (vocab, H)"""
    cfg = ckpt.config
    name = ckpt.name("lm_head")
    if ckpt.has(name):
        return ckpt.get(name, expect=(cfg.vocab_size, cfg.hidden_size))
    if cfg.tie_word_embeddings:
        return ckpt.get(ckpt.name("embed"), expect=(cfg.vocab_size, cfg.hidden_size))
    return ckpt.get(name)  # raises: missing lm_head in an untied model


def sliding_mask(seq_len: int, window: int | None) -> torch.Tensor | None:
    """Boolean (T, T) attention mask for a sliding window, or None when plain causal suffices."""
    if window is None or seq_len <= window:
        return None
    i = torch.arange(seq_len)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def streamed_nll(
    ckpt: Checkpoint,
    tokens: torch.Tensor,
    *,
    plan: Plan | None = None,
    masks: MaskSet | None = None,
    dtype: torch.dtype = torch.float32,
    prefetch: int = 1,
    chunk_tokens: int = 4096,
    stats: list[ColumnStats] | None = None,
    on_block: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sum of next-token NLL of every sequence under every mask.

    tokens: (S, T) token ids. Returns (G, S) fp64, G = number of masks (1 without masks); each
    sequence contributes T-1 predicted positions. ``stats``, if given, is filled with one
    :class:`ColumnStats` per layer for the priors (only meaningful without masks).
    """
    cfg = ckpt.config
    s_count, t = tokens.shape
    g_count = masks.n_masks if masks is not None else 1
    rows_per_chunk = max(1, chunk_tokens // t)
    cos, sin = rope_tables(cfg, t)
    attn_mask = sliding_mask(t, cfg.sliding_window)

    embed = ckpt.get(ckpt.name("embed"), expect=(cfg.vocab_size, cfg.hidden_size))
    x0 = F.embedding(tokens, embed).to(dtype)  # (S, T, H)
    del embed
    hidden = x0.repeat(g_count, 1, 1)  # (G S, T, H); row r belongs to mask r // S
    del x0
    row_mask = torch.arange(g_count * s_count) // s_count  # (G S,)

    for w in BlockStreamer(ckpt, plan=plan, dtype=dtype, prefetch=prefetch):
        layer_stats = UnitStats.zeros(w) if stats is not None else None
        for a in range(0, hidden.shape[0], rows_per_chunk):
            b = min(a + rows_per_chunk, hidden.shape[0])
            hm = cm = None
            if masks is not None:
                hm = masks.head[w.layer][row_mask[a:b]]  # (rows, n_heads)
                cm = masks.channel[w.layer][row_mask[a:b]]  # (rows, F)
            hidden[a:b] = block_forward(hidden[a:b], w, cos, sin, eps=cfg.rms_norm_eps,
                                        head_mask=hm, channel_mask=cm, attn_mask=attn_mask,
                                        stats=layer_stats)
        if stats is not None:
            stats.append(ColumnStats.of(w, layer_stats))
        if on_block is not None:
            on_block(w.layer)
        del w

    norm = ckpt.get(ckpt.name("final_norm"), expect=(cfg.hidden_size,)).float()
    head = lm_head_weight(ckpt).to(dtype)
    targets = tokens[:, 1:].repeat(g_count, 1)  # (G S, T-1)
    nll = torch.zeros(g_count * s_count, dtype=torch.float64)
    for a in range(0, hidden.shape[0], rows_per_chunk):
        b = min(a + rows_per_chunk, hidden.shape[0])
        h = rms_norm(hidden[a:b, :-1], norm, cfg.rms_norm_eps)  # (rows, T-1, H)
        logits = F.linear(h, head).float()  # (rows, T-1, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), targets[a:b].flatten(), reduction="none")
        nll[a:b] = loss.view(b - a, t - 1).sum(1).double()
    return nll.view(g_count, s_count)
