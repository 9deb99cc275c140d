"""One transformer block: loading it (sliced to a plan) and running it on many masked sub-models.

The forward is functional: weights come in a :class:`BlockWeights`, hidden states of many sequences
(and many masks) come in as rows. Two multipliers make pruning possible without touching weights:

- ``head_mask``  (N, n_heads):  scales each head's attention output before o_proj,
- ``channel_mask`` (N, n_ffn):  scales each MLP intermediate channel before down_proj,

with one row of multipliers per row of hidden states, so rows of different masks share every GEMM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.checkpoint import Checkpoint
from ..model.plan import LayerPlan
from .rope import apply_rope

STATS_ELEMENTS = 1 << 22  # activations a prior pass holds in fp64 at once (32 MB, squared in place)


@dataclass(slots=True)
class BlockWeights:
    """A resident block, already sliced to the units it keeps, in the compute dtype."""

    layer: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    attn_norm: torch.Tensor  # (H,) fp32
    qkv: torch.Tensor  # ((n_heads + 2 n_kv) hd, H)
    qkv_bias: torch.Tensor | None  # ((n_heads + 2 n_kv) hd,)
    o: torch.Tensor  # (H, n_heads hd)
    mlp_norm: torch.Tensor  # (H,) fp32
    gate_up: torch.Tensor  # (2 F, H)
    down: torch.Tensor  # (H, F)
    # Output biases: none in the source families; a reconstruction adds them (reconstruct.py).
    o_bias: torch.Tensor | None = None  # (H,)
    down_bias: torch.Tensor | None = None  # (H,)
    gate_up_bias: torch.Tensor | None = None  # (2 F,): HF Llama's mlp_bias

    @property
    def n_channels(self) -> int:
        return self.down.shape[1]

    def nbytes(self) -> int:
        ts = [self.attn_norm, self.qkv, self.qkv_bias, self.o, self.o_bias, self.mlp_norm,
              self.gate_up, self.down, self.down_bias, self.gate_up_bias]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def to(self, device: torch.device) -> BlockWeights:
        """The same block on ``device`` (itself when it is already there)."""
        if self.qkv.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockWeights(self.layer, self.n_heads, self.n_kv_heads, self.head_dim,
                            move(self.attn_norm), move(self.qkv), move(self.qkv_bias), move(self.o),
                            move(self.mlp_norm), move(self.gate_up), move(self.down),
                            move(self.o_bias), move(self.down_bias), move(self.gate_up_bias))


def head_rows(heads: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a (heads*head_dim, ...) projection."""
    idx = torch.tensor(heads, dtype=torch.long)
    return (idx[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def load_block(ckpt: Checkpoint, layer: int, keep: LayerPlan | None, *,
               dtype: torch.dtype) -> BlockWeights:
    """Read block ``layer`` from the checkpoint and slice it to ``keep`` (None: keep everything).

    Tensors are read one at a time and copied into preallocated fused buffers in ``dtype``, so the
    transient memory is one source tensor on top of the block itself.
    """
    cfg = ckpt.config
    s = cfg.layers[layer]
    hd, h = cfg.head_dim, cfg.hidden_size
    nq, nkv, ffn = s.num_attention_heads, s.num_key_value_heads, s.intermediate_size
    if keep is None:
        q_rows = kv_rows = ch = None
        kq, kkv, kf = nq, nkv, ffn
    else:
        q_rows, kv_rows = head_rows(keep.heads, hd), head_rows(keep.kv_heads, hd)
        ch = torch.tensor(keep.channels, dtype=torch.long)
        kq, kkv, kf = len(keep.heads), len(keep.kv_heads), len(keep.channels)

    def read(key: str, shape: tuple[int, ...], rows: torch.Tensor | None, axis: int,
             out: torch.Tensor) -> None:
        t = ckpt.get(ckpt.name(key, layer), expect=shape)
        out.copy_(t if rows is None else t.index_select(axis, rows))
        del t  # release the source copy before the next read

    qkv = torch.empty((kq + 2 * kkv) * hd, h, dtype=dtype)
    q_out, k_out, v_out = qkv.split([kq * hd, kkv * hd, kkv * hd])
    read("q", (nq * hd, h), q_rows, 0, q_out)
    read("k", (nkv * hd, h), kv_rows, 0, k_out)
    read("v", (nkv * hd, h), kv_rows, 0, v_out)
    qkv_bias = None
    if cfg.attention_bias:
        qkv_bias = torch.empty((kq + 2 * kkv) * hd, dtype=dtype)
        qb, kb, vb = qkv_bias.split([kq * hd, kkv * hd, kkv * hd])
        read("q_bias", (nq * hd,), q_rows, 0, qb)
        read("k_bias", (nkv * hd,), kv_rows, 0, kb)
        read("v_bias", (nkv * hd,), kv_rows, 0, vb)
    o = torch.empty(h, kq * hd, dtype=dtype)
    read("o", (h, nq * hd), q_rows, 1, o)
    gate_up = torch.empty(2 * kf, h, dtype=dtype)
    read("gate", (ffn, h), ch, 0, gate_up[:kf])
    read("up", (ffn, h), ch, 0, gate_up[kf:])
    down = torch.empty(h, kf, dtype=dtype)
    read("down", (h, ffn), ch, 1, down)

    def optional_bias(key: str) -> torch.Tensor | None:
        name = ckpt.name(key, layer)
        return ckpt.get(name, expect=(h,)).to(dtype) if ckpt.has(name) else None

    gate_up_bias = None
    if ckpt.has(ckpt.name("gate_bias", layer)) or ckpt.has(ckpt.name("up_bias", layer)):
        gate_up_bias = torch.zeros(2 * kf, dtype=dtype)  # one of the two may be absent: zeros
        for key, part in (("gate_bias", gate_up_bias[:kf]), ("up_bias", gate_up_bias[kf:])):
            if ckpt.has(ckpt.name(key, layer)):
                read(key, (ffn,), ch, 0, part)

    return BlockWeights(
        layer=layer,
        n_heads=kq,
        n_kv_heads=kkv,
        head_dim=hd,
        attn_norm=ckpt.get(ckpt.name("attn_norm", layer), expect=(h,)).float(),
        qkv=qkv,
        qkv_bias=qkv_bias,
        o=o,
        mlp_norm=ckpt.get(ckpt.name("mlp_norm", layer), expect=(h,)).float(),
        gate_up=gate_up,
        down=down,
        o_bias=optional_bias("o_bias"),
        down_bias=optional_bias("down_bias"),
        gate_up_bias=gate_up_bias,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (as transformers does), result in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype)


@dataclass(slots=True)
class UnitStats:
    """Running sums over tokens of the inputs to o_proj and down_proj (for priors).  fp64"""

    head_sum: torch.Tensor  # (n_heads hd,)
    head_sq: torch.Tensor  # (n_heads hd,)
    chan_sum: torch.Tensor  # (F,)
    chan_sq: torch.Tensor  # (F,)
    tokens: int = 0

    @classmethod
    def zeros(cls, w: BlockWeights) -> UnitStats:
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=w.qkv.device)  # noqa: E731
        return cls(z(w.n_heads * w.head_dim), z(w.n_heads * w.head_dim), z(w.n_channels),
                   z(w.n_channels))

    def add(self, attn: torch.Tensor, act: torch.Tensor) -> None:
        rows = math.prod(act.shape[:-1])  # tokens (attn is (tokens, 0) in a layer without heads)
        a = attn.reshape(rows, attn.shape[-1])
        c = act.reshape(rows, act.shape[-1])
        for x, total, sq in ((a, self.head_sum, self.head_sq), (c, self.chan_sum, self.chan_sq)):
            # fp64 a slice of rows at a time: a whole row chunk in fp64, with its square, was
            # 2 x 8 bytes per element beside the block's activations (0.9 GB for a 13B MLP)
            step = max(1, STATS_ELEMENTS // max(x.shape[1], 1))
            for i in range(0, x.shape[0], step):
                d = x[i : i + step].to(torch.float64, copy=True)  # squared in place below
                total += d.sum(0)
                sq += d.square_().sum(0)
        self.tokens += rows

    def cpu(self) -> UnitStats:
        return UnitStats(self.head_sum.cpu(), self.head_sq.cpu(), self.chan_sum.cpu(), self.chan_sq.cpu(),
                         self.tokens)


def attention_heads(x: torch.Tensor, w: BlockWeights, cos: torch.Tensor, sin: torch.Tensor, *,
                    eps: float, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every head's attention output, the input of o_proj.  x: (N, T, H) -> (N, T, n_heads hd)"""
    n, t, _ = x.shape
    nq, nkv, hd = w.n_heads, w.n_kv_heads, w.head_dim
    h = rms_norm(x, w.attn_norm, eps)
    qkv = F.linear(h, w.qkv, w.qkv_bias)  # (N, T, (nq + 2 nkv) hd)
    q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(n, t, nq, hd).transpose(1, 2)  # (N, nq, T, hd)
    k = k.view(n, t, nkv, hd).transpose(1, 2)  # (N, nkv, T, hd)
    v = v.view(n, t, nkv, hd).transpose(1, 2)  # (N, nkv, T, hd)
    q = apply_rope(q.float(), cos, sin).to(x.dtype)
    k = apply_rope(k.float(), cos, sin).to(x.dtype)
    if attn_mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nq != nkv)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=nq != nkv)
    return y.transpose(1, 2).reshape(n, t, nq * hd)  # (N, T, nq hd)


def mlp_channels(x: torch.Tensor, w: BlockWeights, *, eps: float) -> torch.Tensor:
    """Every MLP channel's activation, the input of down_proj.  x: (N, T, H) -> (N, T, F)"""
    gate, up = F.linear(rms_norm(x, w.mlp_norm, eps), w.gate_up, w.gate_up_bias).chunk(2, dim=-1)  # (N, T, F) each
    return F.silu(gate) * up


@dataclass(slots=True)
class ColumnStats:
    """What the prior needs of one block, gathered while it is resident.  fp64"""

    act: UnitStats
    o_abs_mean: torch.Tensor  # (n_heads hd,)  mean_i |W_o[i, c]|
    o_sq: torch.Tensor  # (n_heads hd,)  ||W_o[:, c]||^2
    down_abs_mean: torch.Tensor  # (F,)
    down_sq: torch.Tensor  # (F,)
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, w: BlockWeights, act: UnitStats) -> ColumnStats:
        o, down = w.o.double(), w.down.double()
        # Kept on the host: the block (maybe on a GPU) is about to go.
        return cls(act.cpu(), o.abs().mean(0).cpu(), o.pow(2).sum(0).cpu(), down.abs().mean(0).cpu(),
                   down.pow(2).sum(0).cpu(), w.n_heads, w.n_kv_heads, w.head_dim)


def block_forward(
    x: torch.Tensor,
    w: BlockWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float,
    head_mask: torch.Tensor | None = None,
    channel_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    stats: UnitStats | None = None,
    head_fill: torch.Tensor | None = None,
    channel_fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (N, T, H) -> (N, T, H). Masks are per row: head_mask (N, n_heads), channel_mask (N, F).

    With ``head_fill`` (n_heads hd,) / ``channel_fill`` (F,), a dropped unit's input to o_proj /
    down_proj is that constant instead of 0 (fill + mask (y - fill)): with the inputs' means,
    every sub-model carries FLAP's bias compensation.
    """
    n, t, _ = x.shape
    nq, hd = w.n_heads, w.head_dim
    if nq:
        y = attention_heads(x, w, cos, sin, eps=eps, attn_mask=attn_mask)  # (N, T, nq hd)
        if head_mask is not None:
            m = head_mask[:, None, :, None].to(y.dtype)
            if head_fill is None:
                y = (y.view(n, t, nq, hd) * m).view(n, t, nq * hd)
            else:
                f = head_fill.to(y.dtype).view(nq, hd)
                y = (f + m * (y.view(n, t, nq, hd) - f)).view(n, t, nq * hd)
        if stats is not None:
            a = y
        x = x + F.linear(y, w.o, w.o_bias)
    elif w.o_bias is not None:
        x = x + w.o_bias
    act = mlp_channels(x, w, eps=eps)  # (N, T, F)
    if channel_mask is not None:
        m = channel_mask[:, None, :].to(act.dtype)
        if channel_fill is None:
            act = act * m
        else:
            f = channel_fill.to(act.dtype)
            act = f + m * (act - f)
    if stats is not None:
        stats.add(a if nq else act.new_zeros(n * t, 0), act)
    return x + F.linear(act, w.down, w.down_bias)
