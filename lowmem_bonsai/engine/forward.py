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

from ..errors import UserError
from ..machine import release_freed_memory
from ..model.checkpoint import Checkpoint
from ..model.plan import Plan
from .block import ColumnStats, UnitStats, block_forward, rms_norm
from .memory import LOGIT_BUDGET
from .rope import rope_tables
from .streamer import BlockStreamer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class MaskSet:
    """Per-layer unit multipliers for G sub-models (1 keeps a unit, 0 drops it)."""

    head: list[torch.Tensor]  # per layer: (G, n_heads_l)
    channel: list[torch.Tensor]  # per layer: (G, F_l)
    # What a dropped unit's o_proj / down_proj input becomes instead of 0 (None: 0), per layer:
    head_fill: list[torch.Tensor] | None = None  # (n_heads_l hd,)
    channel_fill: list[torch.Tensor] | None = None  # (F_l,)

    @property
    def n_masks(self) -> int:
        return self.head[0].shape[0]


@dataclass(slots=True)
class SoftTargets:
    """A reference model's next-token distribution, truncated to its top k and renormalised.

    Scoring a sub-model by cross-entropy to these instead of to the one token the text has
    (= KL to the reference + a constant) removes the noise of which token happened to follow
    (docs/quality-history.md, "Where the gain comes from").
    """

    ids: torch.Tensor  # (S, T-1, K) int64
    probs: torch.Tensor  # (S, T-1, K) fp32, rows sum to 1


def lm_head_name(ckpt: Checkpoint) -> str:
    """The output projection's tensor (the embedding when tied)."""
    name = ckpt.name("lm_head")
    if ckpt.has(name) or not ckpt.config.tie_word_embeddings:
        return name  # a missing lm_head of an untied model is reported when it is read
    return ckpt.name("embed")


def vocab_slices(ckpt: Checkpoint, name: str, chunk: int):
    """Row ranges of a (vocab, H) matrix, read one range at a time.  yields (start, (rows, H))"""
    cfg = ckpt.config
    if ckpt.has(name) and ckpt.shape(name) != (cfg.vocab_size, cfg.hidden_size):
        ckpt.get(name, expect=(cfg.vocab_size, cfg.hidden_size))  # raises with both shapes
    for a in range(0, cfg.vocab_size, chunk):
        yield a, ckpt.get(name, rows=slice(a, min(a + chunk, cfg.vocab_size)))


def embed_tokens(ckpt: Checkpoint, tokens: torch.Tensor, *, dtype: torch.dtype,
                 chunk: int = 8192) -> torch.Tensor:
    """Embedding rows of ``tokens`` (S, T), reading the table in row ranges.  # (S, T, H)"""
    cfg = ckpt.config
    flat = tokens.flatten()
    if flat.numel() and (int(flat.max()) >= cfg.vocab_size or int(flat.min()) < 0):
        raise UserError(f"token id {int(flat.max())} is outside the model's vocabulary of "
                        f"{cfg.vocab_size}; the tokenizer does not belong to this model")
    out = torch.empty(flat.numel(), cfg.hidden_size, dtype=dtype)
    for a, rows in vocab_slices(ckpt, ckpt.name("embed"), chunk):
        sel = (flat >= a) & (flat < a + rows.shape[0])
        out[sel] = rows[flat[sel] - a].to(dtype)
    return out.view(*tokens.shape, cfg.hidden_size)


def token_nll(ckpt: Checkpoint, hidden: torch.Tensor, targets: torch.Tensor, *, dtype: torch.dtype,
              rows_per_chunk: int, weights: torch.Tensor | None = None, top_k: int = 0,
              per_token: bool = False) -> torch.Tensor | tuple[torch.Tensor, SoftTargets]:
    """Next-token NLL from final hidden states, lm_head read in vocab ranges (online logsumexp).

    hidden: (N, T, H), normalised in place; targets: (S, T-1), or (S, T-1, K) with ``weights``
    (S, T-1, K) for a cross-entropy to a soft distribution, where row r of ``hidden`` predicts
    targets[r % S] (rows are mask-major). Returns (N,) sums, fp64 (``per_token``: each position's
    NLL, (N, T-1)); with ``top_k``, also each position's top-k distribution as :class:`SoftTargets`.
    """
    cfg = ckpt.config
    n, t, _ = hidden.shape
    dev = hidden.device
    norm = ckpt.get(ckpt.name("final_norm"), expect=(cfg.hidden_size,)).float().to(dev)
    for a in range(0, n, rows_per_chunk):
        hidden[a : a + rows_per_chunk] = rms_norm(hidden[a : a + rows_per_chunk], norm, cfg.rms_norm_eps)
    run_max = torch.full((n, t - 1), -torch.inf, device=dev)  # (N, T-1) fp32
    run_sum = torch.zeros(n, t - 1, device=dev)
    target_logit = torch.zeros(n, t - 1, device=dev)
    if targets.dim() == 2:
        targets, weights = targets[..., None], torch.ones(*targets.shape, 1)
    targets, weights = targets.to(dev), weights.to(dev)
    if top_k:
        best_val = torch.full((n, t - 1, top_k), -torch.inf, device=dev)
        best_id = torch.zeros(n, t - 1, top_k, dtype=torch.long, device=dev)
    vocab_chunk = max(256, LOGIT_BUDGET // max(rows_per_chunk * t, 1))
    for v0, w in vocab_slices(ckpt, lm_head_name(ckpt), vocab_chunk):
        w = w.to(device=dev, dtype=dtype)  # (Vc, H)
        v1 = v0 + w.shape[0]
        for a in range(0, n, rows_per_chunk):
            b = min(a + rows_per_chunk, n)
            # One 2-D GEMM: the strided (rows, T-1, H) view would go through a slower batched GEMM.
            x = hidden[a:b, :-1].reshape(-1, hidden.shape[-1])  # (rows (T-1), H), a copy
            logits = F.linear(x, w).float().view(b - a, t - 1, -1)  # (rows, T-1, Vc)
            seq = torch.arange(a, b, device=dev) % targets.shape[0]
            tg = targets[seq]  # (rows, T-1, K)
            inside = (tg >= v0) & (tg < v1)
            local = (tg - v0).clamp(0, v1 - v0 - 1)
            picked = logits.gather(-1, local)
            target_logit[a:b] += (torch.where(inside, picked, 0.0) * weights[seq]).sum(-1)
            if top_k:
                val, idx = logits.topk(min(top_k, v1 - v0), dim=-1)
                val = torch.cat([best_val[a:b], val], -1)
                idx = torch.cat([best_id[a:b], idx + v0], -1)
                keep = val.topk(top_k, dim=-1).indices
                best_val[a:b], best_id[a:b] = val.gather(-1, keep), idx.gather(-1, keep)
            # Last, in place: the chunk's logits are the only (rows, T-1, Vc) buffer held (not
            # three), so the head's peak is that buffer and, below fp32, the GEMM's output.
            m = torch.maximum(run_max[a:b], logits.amax(-1))
            run_sum[a:b] = run_sum[a:b] * torch.exp(run_max[a:b] - m) + logits.sub_(m[..., None]).exp_().sum(-1)
            run_max[a:b] = m
            del logits
        del w
    lse = run_max + torch.log(run_sum)  # (N, T-1)
    nll = (lse - target_logit).double()
    nll = (nll if per_token else nll.sum(1)).cpu()
    if not top_k:
        return nll
    probs = torch.exp(best_val - lse[..., None])
    return nll, SoftTargets(best_id.cpu(), (probs / probs.sum(-1, keepdim=True)).cpu())


def sliding_mask(seq_len: int, window: int | None) -> torch.Tensor | None:
    """Boolean (T, T) attention mask for a sliding window, or None when plain causal suffices."""
    if window is None or seq_len <= window:
        return None
    i = torch.arange(seq_len)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


@dataclass(frozen=True, slots=True)
class PassResult:
    """What one streamed pass computed: the losses, and what the prior and the teacher asked for."""

    nll: torch.Tensor  # (G, S) fp64: sum of next-token NLL per mask and sequence
    stats: tuple[ColumnStats, ...] | None  # per layer, with ``want_stats``
    teacher: SoftTargets | None  # the pass's own top-k distribution, with ``want_teacher``
    tokens: int  # forward tokens computed: G x S x T


def streamed_pass(
    ckpt: Checkpoint,
    tokens: torch.Tensor,
    *,
    plan: Plan | None = None,
    masks: MaskSet | None = None,
    dtype: torch.dtype = torch.float32,
    prefetch: int = 1,
    chunk_tokens: int = 4096,
    want_stats: bool = False,
    on_block: Callable[[int], None] | None = None,
    soft: SoftTargets | None = None,
    want_teacher: bool = False,
    top_k: int = 64,
    device: torch.device | None = None,
) -> PassResult:
    """Next-token NLL of every sequence under every mask, and (on request) what priors need.

    tokens: (S, T) token ids. The losses are (G, S) fp64, G = number of masks (1 without masks);
    each sequence contributes T-1 predicted positions. ``want_stats`` gathers one
    :class:`ColumnStats` per layer for the priors (only meaningful without masks). With ``soft``,
    the loss is the cross-entropy to that distribution instead of to the next token;
    ``want_teacher`` also returns this pass's own top-``top_k`` distribution (for a pass without
    masks). ``device``: where the blocks compute (default the CPU); inputs and results stay on the host.
    """
    cfg = ckpt.config
    s_count, t = tokens.shape
    g_count = masks.n_masks if masks is not None else 1
    rows_per_chunk = max(1, chunk_tokens // t)
    dev = device if device is not None else torch.device("cpu")
    cos, sin = (x.to(dev) for x in rope_tables(cfg, t))
    attn_mask = sliding_mask(t, cfg.sliding_window)
    if attn_mask is not None:
        attn_mask = attn_mask.to(dev)

    x0 = embed_tokens(ckpt, tokens, dtype=dtype).to(dev)  # (S, T, H)
    hidden = x0.repeat(g_count, 1, 1)  # (G S, T, H); row r belongs to mask r // S
    del x0
    row_mask = torch.arange(g_count * s_count, device=dev) // s_count  # (G S,)
    stats: list[ColumnStats] = []

    for w in BlockStreamer(ckpt, plan=plan, dtype=dtype, prefetch=prefetch, device=dev):
        layer_stats = UnitStats.zeros(w) if want_stats else None
        hf = cf = None
        if masks is not None:
            head_m, chan_m = masks.head[w.layer].to(dev), masks.channel[w.layer].to(dev)
            if masks.head_fill is not None and masks.channel_fill is not None:
                hf, cf = masks.head_fill[w.layer].to(dev), masks.channel_fill[w.layer].to(dev)
        for a in range(0, hidden.shape[0], rows_per_chunk):
            b = min(a + rows_per_chunk, hidden.shape[0])
            hm = cm = None
            if masks is not None:
                hm = head_m[row_mask[a:b]]  # (rows, n_heads)
                cm = chan_m[row_mask[a:b]]  # (rows, F)
            hidden[a:b] = block_forward(hidden[a:b], w, cos, sin, eps=cfg.rms_norm_eps,
                                        head_mask=hm, channel_mask=cm, attn_mask=attn_mask,
                                        stats=layer_stats, head_fill=hf, channel_fill=cf)
        if layer_stats is not None:
            stats.append(ColumnStats.of(w, layer_stats))
        if on_block is not None:
            on_block(w.layer)
        del w

    release_freed_memory()  # the blocks' row-chunk buffers, before the lm_head's
    if soft is not None:
        targets, weights = soft.ids, soft.probs  # (S, T-1, K)
    else:
        targets, weights = tokens[:, 1:], None  # (S, T-1)
    out = token_nll(ckpt, hidden, targets, dtype=dtype, rows_per_chunk=rows_per_chunk, weights=weights,
                    top_k=top_k if want_teacher else 0)
    del hidden
    release_freed_memory()
    dist = None
    if want_teacher:
        out, dist = out
    return PassResult(out.view(g_count, s_count), tuple(stats) if want_stats else None, dist,
                      g_count * s_count * t)


def streamed_nll(ckpt: Checkpoint, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    """The losses of :func:`streamed_pass` alone.  # (G, S) fp64"""
    return streamed_pass(ckpt, tokens, **kwargs).nll
