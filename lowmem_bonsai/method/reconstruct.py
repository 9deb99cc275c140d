"""Reconstruction: once the units are chosen, repair what is left, with forward passes only.

Removing heads or channels removes input columns of o_proj and down_proj. For such a projection
W (out x in) with full input z (the kept columns S and the removed ones R) over calibration tokens:

- ``bias`` (FLAP's compensation): keep W_S and add b = W_R mean(z_R), the removed columns' mean
  contribution;
- ``lsq``: refit the kept columns and a bias by ridge least squares, so that the pruned layer
  reproduces the unpruned layer's W z on the same inputs. With z+ = [z; 1] and G = sum z+ z+^T,

      [W_S' b] = W G[:in, S+] (G[S+, S+] + lambda I)^-1,   S+ = S and the constant,

  lambda = ``ridge`` x the mean of diag G[S, S] (the constant is not penalised).

Heads and channels are independent of each other, so a kept unit's input is the same in the dense
and the pruned layer: one Gram matrix of the full input serves every choice of S.

``sequential``: each layer's inputs come from the pruned model whose earlier layers (and the
layer's own attention, for its MLP) are already repaired, so errors do not compound; otherwise
all statistics come from one pass of the dense model (one-shot, as FLAP does).

The repaired tensors are written full-width (removed columns zero) in the source's names, one
safetensors file per layer, and laid over the source checkpoint (``Checkpoint.with_overlay``):
the streamer, the shard writer and the GGUF exporter then slice them like any other weight.

The refit always starts from the source's weights: its target is the unpruned layer's W z, and a
checkpoint with an earlier repair laid over it (reconstruct_in_rounds) holds a W already pruned (zero
columns) and a bias the target would leave out, so :func:`reconstruct` refuses one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save

from ..engine.block import attention_heads, head_rows, mlp_channels
from ..engine.forward import embed_tokens, sliding_mask
from ..engine.memory import SOLVE_FP64_MAX
from ..engine.ranks import SINGLE, Ranks
from ..engine.rope import rope_tables
from ..engine.streamer import BlockStreamer
from ..model.checkpoint import Checkpoint
from ..model.plan import Plan
from ..outputs.atomic import write_bytes_atomic
from ..profiles import Profile
from ..settings import Reconstruct

log = logging.getLogger(__name__)


def settings_of(profile: Profile) -> dict[str, Any]:
    """:func:`reconstruct`'s settings in ``profile`` (its reconstruct_* keys and how it streams)."""
    return dict(mode=profile.reconstruct, ridge=profile.reconstruct_ridge,
                sequential=profile.reconstruct_sequential, dtype=torch.float32,
                chunk_tokens=profile.chunk_tokens, prefetch=profile.prefetch)


@dataclass(frozen=True, slots=True)
class Repair:
    """A refit projection: kept columns (in the plan's order) and the bias."""

    weight: torch.Tensor  # (out, |S|)
    bias: torch.Tensor  # (out,)
    error_before: float  # relative squared output error of plain removal, on the calibration tokens
    error_after: float  # the same after the repair


@dataclass(slots=True)
class Moments:
    """Running first and second moments of a projection's input over tokens.  fp32 sums"""

    n_in: int
    full: bool  # the Gram matrix (lsq) or only the sums (bias)
    sums: torch.Tensor = field(init=False)  # (in,)
    gram: torch.Tensor | None = field(init=False)  # (in + 1, in + 1), last index: the constant 1
    tokens: int = 0

    def __post_init__(self) -> None:
        self.sums = torch.zeros(self.n_in, dtype=torch.float64)
        self.gram = torch.zeros(self.n_in + 1, self.n_in + 1) if self.full else None

    def add(self, z: torch.Tensor) -> None:
        z = z.reshape(-1, self.n_in).float()  # (tokens, in)
        self.sums += z.sum(0).double()
        self.tokens += z.shape[0]
        if self.gram is not None:
            zp = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)  # (tokens, in + 1)
            self.gram.addmm_(zp.T, zp)

    def summed(self, ranks: Ranks, *, what: str) -> Moments:
        """Every rank's moments added up (fp64 sums; the Gram matrix back in fp32), on every rank."""
        if ranks.world == 1:
            return self
        self.sums = ranks.sum(self.sums, what=what)
        if self.gram is not None:
            self.gram = ranks.sum(self.gram, what=what).float()
        self.tokens = int(ranks.sum(torch.tensor([float(self.tokens)]), what=what).item())
        return self

    def full_gram(self) -> torch.Tensor:
        """G with the constant's row and column exact, in :func:`solve_dtype`.  # (in + 1, in + 1)

        fp64 up to SOLVE_FP64_MAX inputs; wider ones (a 13B model's 13,824 channels) solve in fp32,
        in place of the accumulator, so a layer's solve holds about two Gram matrices, not five.
        """
        g = self.gram.double() if solve_dtype(self.n_in) == torch.float64 else self.gram
        g[-1, :-1] = g[:-1, -1] = self.sums.to(g.dtype)
        g[-1, -1] = self.tokens
        return g


def solve_dtype(n_in: int) -> torch.dtype:
    return torch.float64 if n_in <= SOLVE_FP64_MAX else torch.float32


def _relative_error(w: torch.Tensor, w_new: torch.Tensor, g: torch.Tensor) -> float:
    """||W z - W' z+||^2 / ||W z||^2 summed over the tokens of G.  W (out, in), W' (out, in + 1)"""
    d = torch.cat([w, w.new_zeros(w.shape[0], 1)], 1) - w_new  # (out, in + 1)
    num = ((d @ g) * d).sum()
    den = ((w @ g[:-1, :-1]) * w).sum()
    return float(num / den.clamp_min(1e-30))


def solve(w: torch.Tensor, m: Moments, keep: torch.Tensor, *, mode: str, ridge: float) -> Repair:
    """The repaired kept columns and bias of ``w`` (out, in) given its input moments.

    keep: (|S|,) column indices that stay, in increasing order. Computes in :func:`solve_dtype`.
    """
    out, n_in = w.shape
    w = w.to(solve_dtype(n_in))
    gone = torch.ones(n_in, dtype=torch.bool)
    gone[keep] = False
    g = m.full_gram() if m.gram is not None else None  # (in + 1, in + 1) fp64, once
    if mode == Reconstruct.BIAS:
        mean = (m.sums / max(m.tokens, 1)).to(w.dtype)  # (in,)
        weight, bias = w[:, keep], w[:, gone] @ mean[gone]
    elif mode == Reconstruct.LSQ:
        sp = torch.cat([keep, torch.tensor([n_in])])  # S+
        a = g[sp][:, sp]  # (|S|+1, |S|+1)
        lam = ridge * a.diagonal()[:-1].mean().clamp_min(1e-30)
        a.diagonal()[:-1] += lam
        x = torch.linalg.solve(a, (w @ g[:n_in, sp]).T).T  # a is symmetric: X a = W G[:in, S+]
        del a
        weight, bias = x[:, :-1], x[:, -1]
    else:
        raise ValueError(mode)
    errors = (float("nan"), float("nan"))
    if g is not None:
        new = torch.zeros(out, n_in + 1, dtype=w.dtype)
        new[:, keep] = w[:, keep]
        before = _relative_error(w, new, g)
        new[:, keep], new[:, -1] = weight, bias
        errors = (before, _relative_error(w, new, g))
    return Repair(weight, bias, *errors)


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What a reconstruction did, per layer: relative output errors before and after (lsq)."""

    mode: str
    sequential: bool
    tokens: int
    layers: list[dict]
    files: list[Path]


def reconstruct(
    ckpt: Checkpoint,
    plan: Plan,
    tokens: torch.Tensor,
    out_dir: Path,
    *,
    mode: str,
    ridge: float = 1e-3,
    sequential: bool = True,
    dtype: torch.dtype = torch.float32,
    chunk_tokens: int = 4096,
    prefetch: int = 1,
    on_block: Callable[[int], None] | None = None,
    ranks: Ranks = SINGLE,
    write: bool | None = None,
) -> RepairReport:
    """Repair o_proj and down_proj of every layer that lost units; writes ``out_dir/layer-N.safetensors``.

    tokens: (S, T) calibration windows. Returns the report; lay the files over the source with
    ``ckpt.with_overlay(report.files)``.

    With several ranks (every rank calls this with the same arguments) each streams its share of
    the windows, the moments of every projection are summed over the ranks before its solve, so
    every rank solves the same system and advances its windows with the same repaired layer; rank 0
    alone writes the files, unless ``write`` says whether this rank does.

    ``ckpt`` must be the source itself, not a checkpoint with a repair laid over it (see the
    module's notes).
    """
    if mode not in (Reconstruct.BIAS, Reconstruct.LSQ):
        raise ValueError(mode)
    if ckpt.overlays:
        raise ValueError(f"reconstruct refits from the source's weights; got {ckpt.dir} with "
                         f"{len(ckpt.overlays)} repaired files laid over it")
    write = ranks.main if write is None else write
    cfg = ckpt.config
    s_count, t = tokens.shape
    rows = max(1, chunk_tokens // t)
    cos, sin = rope_tables(cfg, t)
    attn_mask = sliding_mask(t, cfg.sliding_window)
    eps = cfg.rms_norm_eps
    mine = ranks.share(s_count)
    x = embed_tokens(ckpt, tokens[mine.start : mine.stop], dtype=dtype)  # (S', T, H): the stream
    out_dir = Path(out_dir)
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    files, layers = [], []

    def chunks():
        for a in range(0, len(mine), rows):
            yield slice(a, min(a + rows, len(mine)))

    for w in BlockStreamer(ckpt, plan=None, dtype=dtype, prefetch=prefetch):  # dense blocks
        lp = plan.layers[w.layer]
        head_cols = head_rows(lp.heads, w.head_dim) if lp.heads else torch.zeros(0, dtype=torch.long)
        chans = torch.tensor(lp.channels, dtype=torch.long)
        repaired: dict[str, torch.Tensor] = {}
        info: dict = {"layer": w.layer}

        def repair(key: str, error_key: str, weight: torch.Tensor, m: Moments, keep: torch.Tensor):
            """Solve one projection, record its full-width tensors; with ``sequential``, how the
            stream advances through it: (kept-column weight, bias, kept columns)."""
            r = solve(weight, m.summed(ranks, what=f"the reconstruction of layer {info['layer']}"), keep,
                      mode=mode, ridge=ridge)
            full = torch.zeros(weight.shape, dtype=r.weight.dtype)
            full[:, keep] = r.weight
            repaired[key], repaired[f"{key}_bias"] = full, r.bias
            info[error_key] = (r.error_before, r.error_after)
            return (r.weight.to(dtype), r.bias.to(dtype), keep) if sequential else None

        o_w, o_b, o_cols = w.o, w.o_bias, None  # how the stream advances through o_proj
        if w.n_heads and len(lp.heads) < w.n_heads:
            m = Moments(w.o.shape[1], full=mode == Reconstruct.LSQ)
            for c in chunks():
                m.add(attention_heads(x[c], w, cos, sin, eps=eps, attn_mask=attn_mask))
            o_w, o_b, o_cols = repair("o", "attn_error", w.o, m, head_cols) or (o_w, o_b, o_cols)
        d_w, d_b, d_cols = w.down, w.down_bias, None
        needs_mlp = len(lp.channels) < w.n_channels
        m = Moments(w.down.shape[1], full=mode == Reconstruct.LSQ) if needs_mlp else None
        for c in chunks():  # advance through attention; gather the MLP input's moments
            if w.n_heads:
                y = attention_heads(x[c], w, cos, sin, eps=eps, attn_mask=attn_mask)  # (rows, T, nq hd)
                x[c] += F.linear(y if o_cols is None else y[..., o_cols], o_w, o_b)
            if m is not None:
                m.add(mlp_channels(x[c], w, eps=eps))
        if m is not None:
            d_w, d_b, d_cols = repair("down", "mlp_error", w.down, m, chans) or (d_w, d_b, d_cols)
        for c in chunks():  # advance through the MLP
            act = mlp_channels(x[c], w, eps=eps)  # (rows, T, F)
            x[c] += F.linear(act if d_cols is None else act[..., d_cols], d_w, d_b)
        if repaired and write:
            like = ckpt.get(ckpt.name("o", w.layer), rows=slice(0, 1)).dtype  # the source's dtype
            store = {ckpt.name(k, w.layer): v.to(like).contiguous() for k, v in repaired.items()}
            path = out_dir / f"layer-{w.layer:04d}.safetensors"
            write_bytes_atomic(path, save(store))
            files.append(path)
        layers.append(info)
        log.info("reconstruction layer %d: %s", w.layer,
                 ", ".join(f"{k} {a:.4f} -> {b:.4f}" for k, (a, b) in
                           ((k, v) for k, v in info.items() if k != "layer")) or "nothing removed")
        if on_block is not None:
            on_block(w.layer)
        del w
    return RepairReport(mode, sequential, s_count * t, layers, files)
