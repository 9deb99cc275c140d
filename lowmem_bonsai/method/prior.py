"""Priors: cheap per-unit importance from one unmasked pass (higher = more important).

Units are the KV groups of each layer's attention (a KV head with its query heads; a plain head in
MHA) and the intermediate channels of each layer's MLP. Per column c of o_proj / down_proj the pass
records the input activation's mean and mean square over all calibration tokens.

- ``wanda``: mean_i |W[i, c]| * RMS(x_c)   (Sun et al.; averaged over a unit's columns)
- ``magnitude``: mean_i |W[i, c]|
- ``fluctuation``: Var(x_c) * ||W[:, c]||^2  (FLAP, An et al.; summed over a unit's columns)
- ``random``: uniform noise (a control)
"""

from __future__ import annotations

import torch

from ..engine.block import ColumnStats
from ..model.checkpoint import Checkpoint
from ..settings import HeadUnit, Prior


def _per_column(kind: str, w_abs: torch.Tensor, w_sq: torch.Tensor, s: torch.Tensor,
                sq: torch.Tensor, n: int) -> torch.Tensor:
    mean, mean_sq = s / n, sq / n
    if kind == Prior.WANDA:
        return w_abs * mean_sq.sqrt()
    if kind == Prior.MAGNITUDE:
        return w_abs
    if kind == Prior.FLUCTUATION:
        return (mean_sq - mean.pow(2)).clamp_min(0) * w_sq
    raise ValueError(kind)


def unit_priors(stats: ColumnStats, kind: str, gen: torch.Generator, *,
                head_unit: str = HeadUnit.GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior of every attention unit and every channel of one layer.  # (units,), (F,) fp64

    Attention units are KV groups (``head_unit="group"``, n_kv units) or query-head slots
    (``"query"``: slot j is the j-th kept query head of every group, q_per_kv units).
    """
    n_kv, n_f = stats.n_kv_heads, stats.down_abs_mean.numel()
    q = stats.n_heads // max(n_kv, 1)
    if kind == Prior.RANDOM:
        return (torch.rand(n_kv if head_unit == HeadUnit.GROUP else q, generator=gen, dtype=torch.float64),
                torch.rand(n_f, generator=gen, dtype=torch.float64))
    a, n = stats.act, max(stats.act.tokens, 1)
    head_cols = _per_column(kind, stats.o_abs_mean, stats.o_sq, a.head_sum, a.head_sq, n)
    chan = _per_column(kind, stats.down_abs_mean, stats.down_sq, a.chan_sum, a.chan_sq, n)
    heads = head_cols.view(n_kv, q, -1)  # (n_kv, q_per_kv, hd): a group's heads are contiguous
    axes = (1, 2) if head_unit == HeadUnit.GROUP else (0, 2)
    attn = heads.sum(axes) if kind == Prior.FLUCTUATION else heads.mean(axes)
    return attn, chan


def layer_priors(ckpt: Checkpoint, stats: list[ColumnStats], kind: str, gen: torch.Generator,
                 head_unit: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`unit_priors` of every layer; a non-finite prior is refused naming its layer."""
    out = []
    for layer, s in enumerate(stats):
        group, chan = unit_priors(s, kind, gen, head_unit=head_unit)
        for name, t in (("attention", group), ("MLP", chan)):
            if not torch.isfinite(t).all():
                raise ckpt.nonfinite_error(found=f"the {name} prior of layer {layer}", layer=layer)
        out.append((group, chan))
    return out


def _standardized(x: torch.Tensor) -> torch.Tensor:
    spread = x.std().clamp_min(1e-30) if x.numel() > 1 else x.new_tensor(1.0)
    return (x - x.mean()) / spread


def flap_scores(stats: ColumnStats, *, head_unit: str = HeadUnit.GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's adaptive-structure scores of one layer's attention units and channels.  fp64

    Per input column of o_proj / down_proj the fluctuation Var(x_c) * ||W[:, c]||^2 (o_proj's
    squared, as FLAP does), standardized over the module's columns; an attention unit scores the
    mean of its columns. Scores of different layers and modules are comparable: FLAP ranks them
    all together.
    """
    a, n = stats.act, max(stats.act.tokens, 1)
    chan = _standardized(_per_column(Prior.FLUCTUATION, stats.down_abs_mean, stats.down_sq, a.chan_sum,
                                     a.chan_sq, n))
    n_kv = stats.n_kv_heads
    if not n_kv:
        return torch.zeros(0, dtype=torch.float64), chan
    cols = _per_column(Prior.FLUCTUATION, stats.o_abs_mean, stats.o_sq, a.head_sum, a.head_sq, n).pow(2)
    heads = _standardized(cols).view(n_kv, stats.n_heads // n_kv, -1)  # (n_kv, q_per_kv, hd)
    return heads.mean((1, 2) if head_unit == HeadUnit.GROUP else (0, 2)), chan
