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

``target`` (sequential only): what the refit reproduces on the pruned model's inputs z.

- ``layer``: the unpruned projection on the same inputs, W z (above);
- ``dense``: the dense model's output of the projection, W z_d, where z_d is the input the dense
  model gives it on the same tokens (its stream is carried beside the pruned one);
- ``stream``: the dense model's residual stream after the projection, W z_d + (x_d - x): the
  refit also takes back what the earlier layers' removals moved the stream by.

``unpruned`` (with ``dense`` or ``stream``): the projections that lost nothing are refit too (all
their columns), so they can take back drift as well; with ``layer`` their target is their own
output, and they are left alone.

For the last two the fit needs the cross moments C = sum t z+^T (out x in + 1) besides G, and

    [W_S' b] = C[:, S+] (G[S+, S+] + lambda I)^-1;   bias: b = (sum t - W_S sum z_S) / tokens.

With t = W z, C = W G[:in] and both reduce to the formulas above.

``position_power``: every moment weighs each token by w = (p + 1) ** position_power / mean, p its
position in its window, except position 0 (the attention sink), which weighs as the last position
(G = sum w z+ z+^T, C = sum w t z+^T, the bias's sums and count weighted alike), so the fits
minimise sum w |t - W' z+|^2; 0 (every w = 1) is the plain fit. The report's per-layer errors are
then the weighted ones.

``reconstruct_gap_weight`` a (:func:`profile_repair`): the repair runs twice. The first ends with
the repaired model's stream and the dense model's beside it; through the final norm and the head
they give each token's NLL under both, and g = max(0, NLL repaired - NLL dense) of the next token.
The second repair multiplies every token's weight by (1 - a) + a g / mean(g): the refit spends
itself on the tokens the first repair's model still loses, not on those it already predicts as
dense does. Twice the repair's passes; the head's cost besides.

``reselect`` (lsq): the repair also chooses which MLP channels (and with ``reselect_heads`` heads) a
layer keeps, as many as the plan keeps there, from the same moments: greedy structured OBS (as ZipLM's structured pruner). From the
refit on every channel, W* = C A^-1 (A = G + lambda I, the constant unpenalised), channels are
dropped one at a time, each the one whose removal, the rest refit, raises the error least,

    cost(j) = |W*[:, j]|^2 / (A^-1)[j, j],

and W* and A^-1 are downdated after each (Sherman-Morrison on the inverse). Heads are chosen the
same way on o_proj's moments, a head being a block J of head_dim columns:

    cost(J) = tr(W*_J ((A^-1)_JJ)^-1 W*_J^T),

whole KV groups first (as many as the plan drops), then query heads, as many from every kept group
(GQA: a group's heads share its K and V, and llama.cpp needs n_head / n_head_kv whole);
``reselect_heads`` false keeps the plan's heads and reselects only the channels. The plan's
widths stay (the method chose how much each layer loses); the report's plan is the one to write.

The repaired tensors are written full-width (removed columns zero) in the source's names, one
safetensors file per layer, and laid over the source checkpoint (``Checkpoint.with_overlay``):
the streamer, the shard writer and the GGUF exporter then slice them like any other weight.

The refit always starts from the source's weights: its target is the unpruned layer's W z, and a
checkpoint with an earlier repair laid over it (reconstruct_in_rounds) holds a W already pruned (zero
columns) and a bias the target would leave out, so :func:`reconstruct` refuses one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save

from ..engine.block import attention_heads, head_rows, mlp_channels
from ..engine.forward import embed_tokens, sliding_mask, token_nll
from ..engine.memory import ELIMINATION_BLOCK, SOLVE_FP64_MAX, pick_compute_dtype
from ..engine.ranks import SINGLE, Ranks
from ..engine.rope import rope_tables
from ..engine.streamer import BlockStreamer
from ..errors import UserError
from ..machine import release_freed_memory
from ..model.checkpoint import Checkpoint
from ..model.plan import LayerPlan, Plan
from ..outputs.atomic import write_bytes_atomic
from ..profiles import Profile
from ..settings import Reconstruct, RepairTarget

log = logging.getLogger(__name__)


def settings_of(profile: Profile) -> dict[str, Any]:
    """:func:`reconstruct`'s settings in ``profile`` (its reconstruct_* keys and how it streams)."""
    return dict(mode=profile.reconstruct, ridge=profile.reconstruct_ridge,
                sequential=profile.reconstruct_sequential, target=profile.reconstruct_target,
                unpruned=profile.reconstruct_unpruned, reselect=profile.reconstruct_reselect,
                reselect_heads=profile.reconstruct_reselect_heads,
                position_power=profile.reconstruct_position_power,
                block_dtype=getattr(torch, pick_compute_dtype(profile.reconstruct_dtype)[0]),
                chunk_tokens=profile.chunk_tokens, prefetch=profile.prefetch)


@dataclass(frozen=True, slots=True)
class Repair:
    """A refit projection: kept columns (in the plan's order) and the bias."""

    weight: torch.Tensor  # (out, |S|)
    bias: torch.Tensor  # (out,)
    error_before: float | None  # relative squared output error of plain removal, on the calibration
    error_after: float | None  # tokens, and the same after the repair; None without a Gram matrix (bias)


@dataclass(slots=True)
class Moments:
    """Running first and second moments of a projection's input over tokens, and with ``n_out``
    the moments of an explicit target t (see the module's notes).  fp32 sums"""

    n_in: int
    full: bool  # the Gram matrix (lsq) or only the sums (bias)
    n_out: int = 0  # > 0: a target is given with every input (reconstruct_target dense / stream)
    sums: torch.Tensor = field(init=False)  # (in,)
    gram: torch.Tensor | None = field(init=False)  # (in + 1, in + 1), last index: the constant 1
    t_sums: torch.Tensor | None = field(init=False)  # (out,) sum t
    cross: torch.Tensor | None = field(init=False)  # (out, in + 1) sum t z+^T (lsq)
    t_sq: float = 0.0  # sum |t|^2
    tokens: int = 0
    weight_sum: float = 0.0  # sum of the tokens' weights (= tokens when unweighted)
    reduced: bool = False  # summed over the ranks already

    def __post_init__(self) -> None:
        self.sums = torch.zeros(self.n_in, dtype=torch.float64)
        self.gram = torch.zeros(self.n_in + 1, self.n_in + 1) if self.full else None
        self.t_sums = torch.zeros(self.n_out, dtype=torch.float64) if self.n_out else None
        self.cross = torch.zeros(self.n_out, self.n_in + 1) if self.n_out and self.full else None

    def add(self, z: torch.Tensor, target: torch.Tensor | None = None,
            weight: torch.Tensor | None = None) -> None:
        """Add tokens' inputs z (..., in), with their targets (..., out) when n_out is set, and
        with ``weight`` (...,) each token's share of the squared error (every moment weighted)."""
        z = z.reshape(-1, self.n_in).float()  # (tokens, in)
        w = None if weight is None else weight.reshape(-1, 1).float()  # (tokens, 1)
        root = None if w is None else w.sqrt()  # on both sides of every product: sum w z+ z+^T, sum w t z+^T
        self.sums += (z if w is None else z * w).sum(0).double()
        self.tokens += z.shape[0]
        self.weight_sum += z.shape[0] if w is None else float(w.double().sum())
        zp = torch.cat([z, z.new_ones(z.shape[0], 1)], 1) if self.gram is not None else None  # (tokens, in + 1)
        if zp is not None:
            if root is not None:
                zp *= root
            self.gram.addmm_(zp.T, zp)
        if (target is None) != (self.t_sums is None):
            raise ValueError("a target goes with every input exactly when n_out is set")
        if target is not None:
            t = target.reshape(-1, self.n_out).float()  # (tokens, out)
            self.t_sums += (t if w is None else t * w).sum(0).double()
            sq = t.double().square()
            self.t_sq += float((sq if w is None else sq * w.double()).sum())
            if zp is not None:
                self.cross.addmm_((t if root is None else t * root).T, zp)

    def summed(self, ranks: Ranks, *, what: str) -> Moments:
        """Every rank's moments added up (fp64 sums; the Gram matrix back in fp32), on every rank."""
        if ranks.world == 1 or self.reduced:
            return self
        self.reduced = True
        self.sums = ranks.sum(self.sums, what=what)
        if self.gram is not None:
            self.gram = ranks.sum(self.gram, what=what).float()
        if self.t_sums is not None:
            self.t_sums = ranks.sum(self.t_sums, what=what)
            self.t_sq = float(ranks.sum(torch.tensor([self.t_sq], dtype=torch.float64), what=what).item())
        if self.cross is not None:
            self.cross = ranks.sum(self.cross, what=what).float()
        self.tokens = int(ranks.sum(torch.tensor([float(self.tokens)]), what=what).item())
        self.weight_sum = float(ranks.sum(torch.tensor([self.weight_sum], dtype=torch.float64),
                                          what=what).item())
        return self

    def full_gram(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """G with the constant's row and column exact, in ``dtype`` (default :func:`solve_dtype`).  # (in + 1, in + 1)

        fp64 up to SOLVE_FP64_MAX inputs; wider ones (a 13B model's 13,824 channels) solve in fp32,
        in place of the accumulator, so a layer's solve holds about two Gram matrices, not five.
        """
        dtype = dtype or solve_dtype(self.n_in)
        g = self.gram if self.gram.dtype == dtype else self.gram.to(dtype)
        g[-1, :-1] = g[:-1, -1] = self.sums.to(g.dtype)
        g[-1, -1] = self.weight_sum
        return g

    def full_cross(self, dtype: torch.dtype) -> torch.Tensor:
        """An explicit target's C = sum t z+^T with the constant's column exact, in ``dtype``.  (out, in + 1)"""
        c = self.cross.to(dtype)
        c[:, -1] = self.t_sums.to(dtype)
        return c


def _cholesky(a: torch.Tensor) -> torch.Tensor | None:
    """A's lower Cholesky factor; None where A is not numerically positive definite."""
    factor, info = torch.linalg.cholesky_ex(a)
    return factor if int(info) == 0 else None


def spd_inverse(a: torch.Tensor) -> torch.Tensor:
    """A^-1 of the regularised Gram matrix A (symmetric): by its Cholesky factor, about n^3 flops
    against LU's 2 n^3 (a 6,000-wide fp32 inverse: 3.2 s against 7.2 s on one core; the 13B shape
    with tools/bench_reselect.py); by LU where A is not numerically positive definite (a zero ridge
    on a dead channel), as before."""
    factor = _cholesky(a)
    return torch.linalg.inv(a) if factor is None else torch.cholesky_inverse(factor)


def spd_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X = A^-1 rhs for A symmetric: Cholesky (n^3 / 3 flops), LU (2 n^3 / 3) where A is not
    numerically positive definite."""
    factor = _cholesky(a)
    return torch.linalg.solve(a, rhs) if factor is None else torch.cholesky_solve(rhs, factor)


def _elimination_start(m: Moments, w: torch.Tensor, ridge: float, *, dtype: torch.dtype | None = None,
                       inverse=spd_inverse) -> tuple[torch.Tensor, torch.Tensor]:
    """The refit on every input and the inverse it starts from: (W* (out, in + 1), A^-1 (in + 1,
    in + 1)), lambda = ``ridge`` x the mean diagonal over all inputs (the same for every subset, so
    each elimination step's cost is exact for the regularised fit). In ``dtype`` (default
    :func:`solve_dtype`); ``inverse`` inverts A (tools/bench_reselect.py passes LU's to compare)."""
    n = w.shape[1]
    g = m.full_gram(dtype)  # (in + 1, in + 1)
    c = m.full_cross(g.dtype) if m.t_sums is not None else w.to(g.dtype) @ g[:n]  # target W z: C = W G
    a = g.clone() if g is m.gram else g  # the fp32 accumulator is the later solve's: not changed
    a.diagonal()[:-1] += ridge * a.diagonal()[:-1].mean().clamp_min(1e-30)
    inv = inverse(a)
    del a, g
    return c @ inv, inv


def _drop_block(fit: torch.Tensor, inv: torch.Tensor, cols: torch.Tensor) -> None:
    """Remove inputs ``cols`` from the fit, the rest refit: W* -= W*_J (A^-1_JJ)^-1 A^-1_J., and
    the same downdate of A^-1 (in place)."""
    s = torch.linalg.inv(inv[cols][:, cols])  # (|J|, |J|)
    rows = inv[cols].clone()  # (|J|, in + 1)
    fit.addmm_(fit[:, cols] @ s, rows, alpha=-1)  # in place: no second (in + 1)^2 beside the inverse
    inv.addmm_(inv[:, cols] @ s, rows, alpha=-1)


def _block_cost(fit: torch.Tensor, inv: torch.Tensor, cols: torch.Tensor) -> float:
    """How much the fit's error grows when inputs ``cols`` go, the rest refit:
    tr(W*_J (A^-1_JJ)^-1 W*_J^T)."""
    f = fit[:, cols]
    return float((torch.linalg.solve(inv[cols][:, cols], f.T) * f.T).sum())


def greedy_keep(m: Moments, w: torch.Tensor, k: int, *, ridge: float,
                start: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``reselect``: the ``k`` inputs of ``w`` (out, in) to keep, by greedy elimination (see the
    module's notes) on the moments ``m`` (target W z, or ``m``'s own). Sorted indices.  (k,)
    ``start``: the elimination's start (W*, A^-1) when the caller has it (:func:`_elimination_start`
    of the same moments; updated in place), else computed here.

    Each channel's downdates of W* and A^-1 are rank-1 updates; done one at a time they read and
    write both matrices once per dropped channel, and on a 13B model's 13,824 channels that
    memory traffic, not arithmetic, took the time. They are deferred instead: within a block of
    up to ELIMINATION_BLOCK drops, W*_t = W* - F R and A^-1_t = A^-1 - C R (R the dropped rows of
    the inverse as they were when dropped, C and F their columns of A^-1 and W* over the pivots),
    the chosen channel's row, column and refit column come from those factors, the diagonal and
    the columns' squared norms are downdated in place (one read of W* per drop, for f^T W*), and
    each block is applied as two matmuls. The same choices as the one-at-a-time downdates, to
    rounding."""
    n = w.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"greedy_keep: k = {k} of {n} inputs")
    fit, inv = start if start is not None else _elimination_start(m, w, ridge)  # (out, n + 1), (n + 1, n + 1)
    alive = torch.ones(n, dtype=torch.bool)
    todo = n - k
    while todo:
        block = min(todo, ELIMINATION_BLOCK)
        d = inv.diagonal()[:-1].clone()  # (A^-1_t)_jj
        norms = fit[:, :-1].square().sum(0)  # |W*_t[:, j]|^2
        cs = inv.new_empty(inv.shape[0], block)  # columns of A^-1 over the pivots
        fs = fit.new_empty(fit.shape[0], block)  # columns of W* over the pivots
        rs = inv.new_empty(block, inv.shape[1])  # rows of A^-1
        for i in range(block):
            cost = norms / d
            cost[~alive] = float("inf")
            j = int(cost.argmin())
            c_, f_, r_ = cs[:, :i], fs[:, :i], rs[:i]
            row = inv[j] - c_[j] @ r_  # (A^-1_t)[j, :]
            col = inv[:, j] - c_ @ r_[:, j]  # (A^-1_t)[:, j]
            f = fit[:, j] - f_ @ r_[:, j]  # W*_t[:, j]
            pivot = float(row[j])
            # W*_t+1 = W*_t - f row^T / pivot: |column i|^2 loses 2 a_i (f . W*_t[:, i]) and gains
            # a_i^2 |f|^2, a_i = row_i / pivot
            a_ = row[:-1] / pivot
            dots = f @ fit[:, :-1] - (f @ f_) @ r_[:, :-1]  # f . W*_t[:, i]
            norms.add_(a_ * (a_ * float(f @ f) - 2 * dots))
            d.sub_(col[:-1] * a_)
            cs[:, i], fs[:, i], rs[i] = col / pivot, f / pivot, row
            alive[j] = False
        fit.addmm_(fs, rs, alpha=-1)
        inv.addmm_(cs, rs, alpha=-1)
        todo -= block
    return torch.nonzero(alive).flatten()


def greedy_heads(m: Moments, w: torch.Tensor, head_dim: int, n_kv: int, kv_keep: int, per_group: int,
                 *, ridge: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``reselect`` for attention: which ``kv_keep`` KV groups o_proj ``w`` (out, n_heads head_dim)
    keeps, and in each which ``per_group`` query heads, by greedy block elimination on its input
    moments ``m``: a head is its head_dim columns, a group its heads'. Whole groups go first, then
    heads, ``n_heads / n_kv - per_group`` from every kept group, so each keeps as many as the
    others (GQA; llama.cpp's n_head / n_head_kv). Returns sorted (heads, kv_heads)."""
    n_heads = w.shape[1] // head_dim
    qpk = n_heads // n_kv
    fit, inv = _elimination_start(m, w, ridge)
    cols = [torch.arange(h * head_dim, (h + 1) * head_dim) for h in range(n_heads)]
    kv = set(range(n_kv))
    while len(kv) > kv_keep:
        group = {g: torch.cat(cols[g * qpk:(g + 1) * qpk]) for g in kv}
        g = min(kv, key=lambda g: _block_cost(fit, inv, group[g]))
        _drop_block(fit, inv, group[g])
        kv.remove(g)
    heads = {h for h in range(n_heads) if h // qpk in kv}
    left = dict.fromkeys(kv, qpk - per_group)  # heads each kept group still gives up
    while any(left.values()):
        h = min((h for h in heads if left[h // qpk]), key=lambda h: _block_cost(fit, inv, cols[h]))
        _drop_block(fit, inv, cols[h])
        heads.remove(h)
        left[h // qpk] -= 1
    return tuple(sorted(heads)), tuple(sorted(kv))


def solve_dtype(n_in: int) -> torch.dtype:
    return torch.float64 if n_in <= SOLVE_FP64_MAX else torch.float32


def _relative_error_on(x: torch.Tensor, g: torch.Tensor, c: torch.Tensor, scale: float) -> float:
    """||t - X z+_S||^2 / ||t||^2 summed over the tokens, from the moments on the kept inputs alone:
    (scale - 2 <X, C_S> + <X G_SS, X>) / scale, scale = sum |t|^2.  X, C_S (out, |S| + 1), G_SS
    (|S| + 1, |S| + 1): out x |S|^2 per error, where the full products cost out x in^2 (the
    target W z still forms W G once, for C and the scale)."""
    num = scale - 2 * float((x * c).sum()) + float(((x @ g) * x).sum())
    return max(num, 0.0) / max(scale, 1e-30)


def solve(w: torch.Tensor, m: Moments, keep: torch.Tensor, *, mode: str, ridge: float) -> Repair:
    """The repaired kept columns and bias of ``w`` (out, in) given its input moments.

    keep: (|S|,) column indices that stay, in increasing order. Computes in :func:`solve_dtype`.
    The target is W z unless ``m`` carries one (``m.n_out``).
    """
    out, n_in = w.shape
    w = w.to(solve_dtype(n_in))
    gone = torch.ones(n_in, dtype=torch.bool)
    gone[keep] = False
    given = m.t_sums is not None
    g = m.full_gram() if m.gram is not None else None  # (in + 1, in + 1), once
    if mode not in (Reconstruct.BIAS, Reconstruct.LSQ):
        raise ValueError(mode)
    if mode == Reconstruct.BIAS:
        weight = w[:, keep]
        if given:  # b = mean(t) - W_S mean(z_S)
            bias = ((m.t_sums - weight.double() @ m.sums[keep]) / max(m.weight_sum, 1e-30)).to(w.dtype)
        else:
            mean = (m.sums / max(m.weight_sum, 1e-30)).to(w.dtype)  # (in,)
            bias = w[:, gone] @ mean[gone]
        if g is None:
            return Repair(weight, bias, None, None)
    sp = torch.cat([keep, torch.tensor([n_in])])  # S+
    a = g[sp][:, sp]  # G_S+S+  (|S| + 1, |S| + 1)
    # sum t z+^T, given or for the target W z: W G (its kept columns are the solve's right-hand
    # side; all of it gives the errors' scale, sum |t|^2)  (out, in + 1)
    c = m.full_cross(g.dtype) if given else w @ g[:n_in]
    scale = m.t_sq if given else float((c[:, :n_in] * w).sum())
    c = c[:, sp]
    plain = torch.cat([w[:, keep], w.new_zeros(out, 1)], 1)  # the kept columns as they were, no bias
    before = _relative_error_on(plain, a, c, scale)
    if mode == Reconstruct.LSQ:
        lam = ridge * a.diagonal()[:-1].mean().clamp_min(1e-30)
        a.diagonal()[:-1] += lam
        x = spd_solve(a, c.T).T  # a is symmetric: X a = rhs
        a.diagonal()[:-1] -= lam  # G_S+S+ again (to rounding), for the error
        weight, bias = x[:, :-1], x[:, -1]
    else:
        x = torch.cat([weight, bias[:, None]], 1)
    return Repair(weight, bias, before, _relative_error_on(x, a, c, scale))


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What a reconstruction did, per layer: relative output errors before and after (lsq)."""

    mode: str
    sequential: bool
    tokens: int
    layers: list[dict]
    files: list[Path]
    plan: Plan  # the plan repaired: the given one, or with ``reselect`` its channels
    target: str = RepairTarget.LAYER
    block_dtype: str = "float32"  # the passes' (reconstruct_dtype, resolved)
    token_gap: torch.Tensor | None = None  # with ``gaps``: (S', T - 1) NLL repaired - dense, fp64
    repairs: int = 1  # how many repairs the report's passes count (reconstruct_gap_weight: 2)

    @property
    def forward_tokens(self) -> int:
        """Tokens through the blocks (:func:`passes`), over every repair it took."""
        return self.repairs * passes(self.target, self.sequential) * self.tokens


def repairs_of(profile: Profile) -> int:
    """How many repairs the profile's reconstruction runs: 2 with reconstruct_gap_weight (the first
    only measures where its model still loses), else 1."""
    return 2 if profile.reconstruct != Reconstruct.NONE and profile.reconstruct_gap_weight > 0 else 1


def profile_repair(ckpt: Checkpoint, plan: Plan, tokens: torch.Tensor, out_dir: Path, profile: Profile, *,
                   on_block: Callable[[int], None] | None = None, ranks: Ranks = SINGLE) -> RepairReport:
    """The profile's reconstruction of ``plan`` on ``tokens`` (files in ``out_dir``, by rank 0).
    With reconstruct_gap_weight a first repair, which writes nothing, measures each token's loss
    against the dense model's, and the second weighs each token's error by it as well
    (:func:`gap_weights`). ``on_block`` counts the layers of every repair: 0 to repairs x layers - 1."""
    settings = settings_of(profile)
    if repairs_of(profile) == 1:
        return reconstruct(ckpt, plan, tokens, out_dir, **settings, on_block=on_block, ranks=ranks)
    first = reconstruct(ckpt, plan, tokens, out_dir, **settings, gaps=True, on_block=on_block, ranks=ranks,
                        write=False)
    gap = first.token_gap
    weights = gap_weights(gap, profile.reconstruct_gap_weight, ranks)
    if gap.numel():  # a rank may hold none of the windows
        log.info("reconstruction: the first repair's model loses %.4f nats a token against dense here (%.0f %% "
                 "of its tokens lose); the second repair weighs them by that (share %g; weights %.2f to %.2f)",
                 float(gap.mean()), 100 * float((gap > 0).double().mean()), profile.reconstruct_gap_weight,
                 float(weights.min()), float(weights.max()))
    del first, gap
    release_freed_memory()  # the first repair's streams, before the second's
    n = ckpt.config.num_hidden_layers
    later = None if on_block is None else (lambda layer: on_block(n + layer))
    second = reconstruct(ckpt, plan, tokens, out_dir, **settings, token_weights=weights, on_block=later, ranks=ranks)
    return dataclasses.replace(second, repairs=2)


def passes(target: str, sequential: bool = True) -> int:
    """How many times a reconstruction runs each calibration token through the blocks: one-shot,
    once (the dense stream's moments and its advance share the block's work); sequential, twice (the
    moments, then the advance through the repaired projection); with an explicit target, once more
    for the dense stream beside."""
    if not sequential:
        return 1
    return 2 if target == RepairTarget.LAYER else 3


def position_weights(seq_len: int, power: float) -> torch.Tensor | None:
    """Each position's weight in a window, (p + 1) ** power, except position 0, which weighs as
    much as the last; scaled to mean 1. None for power 0. Returns (1, T).

    Why: on SmolLM2 the repaired model's normalised stream is as close to the dense one at the end
    of a 256-token window as at its start, yet its loss against dense grows along the window (test
    windows, 10 %: +0.04 nats at positions 4-63, +0.08 at 128-254): the same error costs more where
    the dense model reads more context. Weighing late tokens more spends the fit where it pays.

    Position 0 is the exception: its state is the attention sink (it carries the massive
    activations) that every later token's attention reads. Weighted as (0 + 1) ** power, 1/128 of
    the mean over 256 tokens, the fit all but dropped it, and at 20 % its stream error rose a
    hundredfold (0.003 -> 0.30 after layer 0) and the test perplexity rose 3.7-3.9 % instead of
    falling; weighed as the last token, it falls on every plan measured at 10-50 %
    (docs/quality-history.md, "Position 0 is the attention sink" and the section after it).
    """
    if power == 0:
        return None
    w = torch.arange(1, seq_len + 1, dtype=torch.float64) ** power
    w[0] = w[-1]
    return (w / w.mean()).float()[None, :]


def gap_weights(gap: torch.Tensor, share: float, ranks: Ranks = SINGLE) -> torch.Tensor:
    """Each token's weight in a second repair from the first's ``gap`` (S', T - 1; row t: the
    NLL of the token at t + 1, repaired - dense): (1 - share) + share g / mean(g), g = max(gap, 0),
    the mean over every rank's positions 1 to T - 2. Position 0 (the attention sink, already weighed
    as the last position) and the last (no next token) weigh 1, as does every token where the
    repaired model nowhere loses. This rank's windows.  (S', T) fp32"""
    g = gap.clamp(min=0).double()
    total = ranks.sum(torch.tensor([float(g[:, 1:].sum()), float(g[:, 1:].numel())], dtype=torch.float64),
                      what="the repair's token gaps")
    f = torch.ones(gap.shape[0], gap.shape[1] + 1, dtype=torch.float64)
    if float(total[0]) > 0:
        f[:, 1:-1] = g[:, 1:] / (total[0] / total[1])
    return ((1 - share) + share * f).float()


def reconstruct(
    ckpt: Checkpoint,
    plan: Plan,
    tokens: torch.Tensor,
    out_dir: Path,
    *,
    mode: str,
    ridge: float = 1e-3,
    sequential: bool = True,
    target: str = RepairTarget.LAYER,
    unpruned: bool = False,
    reselect: bool = False,
    reselect_heads: bool = False,
    position_power: float = 0.0,
    token_weights: torch.Tensor | None = None,
    gaps: bool = False,
    dtype: torch.dtype = torch.float32,
    block_dtype: torch.dtype | None = None,
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

    ``dtype``: the residual streams' (the pruned one and the dense one beside it) and the moments'
    accumulators (fp32; the solves in :func:`solve_dtype`); ``block_dtype`` (default ``dtype``): the
    blocks' weights and matmuls, so the moments' inputs and the targets' projections come out in
    it, cast up where they meet a stream or an accumulator (bfloat16 roughly doubles a CPU's rate
    where it has bf16 matmuls). The solves and the written tensors start from the source's own
    o_proj / down_proj, never the block's rounded copy.

    ``position_power``: each token's share of every fit's squared error grows as (position in its
    window + 1) ** position_power, position 0 weighing as the last (mean 1 over a window); 0 weighs
    every token alike. ``token_weights`` (S', T), this rank's windows (``ranks.share``), multiply
    those weights (:func:`gap_weights`).

    ``gaps`` (explicit target only): the report also carries, per token of this rank's windows,
    how much more the repaired model's next-token NLL is than the dense model's, from the two final
    streams the repair ends with (``token_gap``, (S', T - 1)); the head's cost only.
    """
    if mode not in (Reconstruct.BIAS, Reconstruct.LSQ):
        raise ValueError(mode)
    if target not in (RepairTarget.LAYER, RepairTarget.DENSE, RepairTarget.STREAM):
        raise ValueError(target)
    if target != RepairTarget.LAYER and not sequential:
        raise ValueError(f"target {target} needs sequential statistics")
    if reselect and mode != Reconstruct.LSQ:
        raise ValueError("reselect needs mode lsq (the Gram matrix)")
    if gaps and target == RepairTarget.LAYER:
        raise ValueError("gaps need an explicit target (the dense stream beside)")
    if ckpt.overlays:
        raise ValueError(f"reconstruct refits from the source's weights; got {ckpt.dir} with "
                         f"{len(ckpt.overlays)} repaired files laid over it")
    write = ranks.main if write is None else write
    cfg = ckpt.config
    s_count, t = tokens.shape
    mine = ranks.share(s_count)
    pos_w = position_weights(t, position_power)  # (1, T) or None
    pos_w = None if pos_w is None else pos_w.expand(len(mine), -1)  # (S', T), a view
    if token_weights is not None:
        if token_weights.shape != (len(mine), t):
            raise ValueError(f"token_weights {tuple(token_weights.shape)} for {len(mine)} windows of {t}")
        pos_w = token_weights.float() * (1.0 if pos_w is None else pos_w)  # (S', T)
    x = embed_tokens(ckpt, tokens[mine.start : mine.stop], dtype=dtype)  # (S', T, H): the stream
    cos, sin = rope_tables(cfg, t)
    run = _Pass(ckpt=ckpt, ranks=ranks, mode=mode, ridge=ridge, sequential=sequential, target=target,
                every=unpruned and target != RepairTarget.LAYER, reselect=reselect,
                reselect_heads=reselect_heads, dtype=dtype, bd=dtype if block_dtype is None else block_dtype,
                x=x, xd=x.clone() if target != RepairTarget.LAYER else None, pos_w=pos_w,
                rows=max(1, chunk_tokens // t), cos=cos, sin=sin, attn_mask=sliding_mask(t, cfg.sliding_window),
                eps=cfg.rms_norm_eps)
    del x  # run.x from here
    out_dir = Path(out_dir)
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    files, layers = [], []
    kept = list(plan.layers)  # with reselect, the channels the repair chose
    log.info("reconstruction: passes through the blocks in %s, streams and moments in %s",
             str(run.bd).removeprefix("torch."), str(dtype).removeprefix("torch."))
    for w in BlockStreamer(ckpt, plan=None, dtype=run.bd, prefetch=prefetch):  # dense blocks
        repaired, info, kept[w.layer] = _repair_layer(run, w, plan.layers[w.layer])
        if repaired and write:
            like = ckpt.get(ckpt.name("o", w.layer), rows=slice(0, 1)).dtype  # the source's dtype
            store = {ckpt.name(k, w.layer): v.to(like).contiguous() for k, v in repaired.items()}
            path = out_dir / f"layer-{w.layer:04d}.safetensors"
            write_bytes_atomic(path, save(store))
            files.append(path)
            del store
        layers.append(info)
        log.info("reconstruction layer %d: %s", w.layer, ", ".join(
            f"{k} {v[0]:.4f} -> {v[1]:.4f}" if v else f"{k.split('_')[0]} bias only (no error measured)"
            for k, v in info.items() if k.endswith("_error")) or "nothing removed")
        if "heads_changed" in info:
            log.info("reconstruction layer %d: %d of the plan's kept query heads exchanged", w.layer,
                     info["heads_changed"])
        if "channels_changed" in info:
            log.info("reconstruction layer %d: %d of the plan's kept channels exchanged", w.layer,
                     info["channels_changed"])
        if on_block is not None:
            on_block(w.layer)
        del w, repaired
        release_freed_memory()  # the layer's block, moments and solve
    token_gap = None
    if gaps:  # the two final streams through the final norm and the head (in place: their last use)
        nexts = tokens[mine.start : mine.stop, 1:]
        token_gap = (token_nll(ckpt, run.x, nexts, dtype=dtype, rows_per_chunk=run.rows, per_token=True)
                     - token_nll(ckpt, run.xd, nexts, dtype=dtype, rows_per_chunk=run.rows, per_token=True))
    return RepairReport(mode, sequential, s_count * t, layers, files,
                        Plan(tuple(kept), meta=plan.meta) if reselect else plan, target,
                        str(run.bd).removeprefix("torch."), token_gap)


@dataclass
class _Pass:
    """What one :func:`reconstruct` carries from layer to layer: its settings, the rank's windows'
    streams (``x`` the pruned model's, ``xd`` the dense model's beside it for an explicit target) and
    what every block's attention needs."""

    ckpt: Checkpoint
    ranks: Ranks
    mode: str
    ridge: float
    sequential: bool
    target: str
    every: bool  # refit the projections that lost nothing, too (unpruned, explicit target)
    reselect: bool
    reselect_heads: bool
    dtype: torch.dtype  # the streams' and the moments' accumulators'
    bd: torch.dtype  # the blocks' weights and matmuls
    x: torch.Tensor  # (S', T, H)
    xd: torch.Tensor | None  # (S', T, H)
    pos_w: torch.Tensor | None  # (S', T) each token's weight in the fits
    rows: int  # windows per chunk
    cos: torch.Tensor
    sin: torch.Tensor
    attn_mask: torch.Tensor | None
    eps: float

    def chunks(self):
        for a in range(0, self.x.shape[0], self.rows):
            yield slice(a, min(a + self.rows, self.x.shape[0]))


def _repair_layer(run: _Pass, w, lp: LayerPlan) -> tuple[dict[str, torch.Tensor], dict, LayerPlan]:
    """Repair one dense block ``w`` to the plan's layer ``lp`` and advance the streams through it.

    Returns the full-width tensors to write (empty where nothing is refit: the layer lost nothing
    and ``run.every`` is off), the report's entry for the layer, and the layer's plan (with
    reselect, the heads and channels it kept)."""
    ckpt, mode, ridge, bd, x, xd = run.ckpt, run.mode, run.ridge, run.bd, run.x, run.xd
    sequential, target, lsq = run.sequential, run.target, run.mode == Reconstruct.LSQ
    head_cols = head_rows(lp.heads, w.head_dim) if lp.heads else torch.zeros(0, dtype=torch.long)
    chans = torch.tensor(lp.channels, dtype=torch.long)
    kept = lp
    repaired: dict[str, torch.Tensor] = {}
    info: dict = {"layer": w.layer}

    def exact(key: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """The projection's weight and bias as the source holds them: the block's, or where the
        blocks compute in a narrower dtype the source's own (the solve, the target W z, bias
        mode's kept columns and the written tensors must not inherit the block's rounding)."""
        if bd == run.dtype:
            return weight, bias
        name, bias_name = ckpt.name(key, w.layer), ckpt.name(f"{key}_bias", w.layer)
        return ckpt.get(name), (ckpt.get(bias_name) if ckpt.has(bias_name) else None)

    def summed(m: Moments, key: str) -> Moments:
        """The moments over every rank, refused where they are not finite (a narrow
        reconstruct_dtype that overflowed: one clear line, not a repair of garbage)."""
        m = m.summed(run.ranks, what=f"the reconstruction of layer {w.layer}")
        if not (torch.isfinite(m.sums).all() and (m.gram is None or torch.isfinite(m.gram.diagonal()).all())
                and math.isfinite(m.t_sq)):
            raise UserError(f"the repair's moments of layer {w.layer}'s {key}_proj input are not finite "
                            f"(its passes computed in {str(bd).removeprefix('torch.')}); set "
                            "reconstruct_dtype = \"float32\" in the profile (--reconstruct-dtype float32)")
        return m

    def repair(key: str, error_key: str, weight: torch.Tensor, source_bias: torch.Tensor | None,
               m: Moments, keep: torch.Tensor):
        """Solve one projection (``weight``, ``source_bias``: :func:`exact`'s; ``m``: :func:`summed`'s),
        record its full-width tensors; with ``sequential``, how the stream advances through it:
        (kept-column weight, bias, kept columns). The fit leaves a source's own bias out of its
        target, so that bias is added back."""
        r = solve(weight, m, keep, mode=mode, ridge=ridge)
        bias = r.bias if source_bias is None else r.bias + source_bias.to(r.bias.dtype)
        full = torch.zeros(weight.shape, dtype=r.weight.dtype)
        full[:, keep] = r.weight
        repaired[key], repaired[f"{key}_bias"] = full, bias
        info[error_key] = None if r.error_before is None else (r.error_before, r.error_after)
        return (r.weight.to(bd), bias.to(bd), keep) if sequential else None

    def goal(c: slice, z_dense: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The explicit target (``target`` dense / stream) of a projection whose input in the
        dense model is ``z_dense`` on windows ``c``."""
        t = F.linear(z_dense, weight)  # (rows, T, out)
        return t + (xd[c] - x[c]) if target == RepairTarget.STREAM else t

    def moments(weight: torch.Tensor) -> Moments:
        return Moments(weight.shape[1], full=lsq, n_out=weight.shape[0] if xd is not None else 0)

    def heads_of(s: torch.Tensor) -> torch.Tensor:
        # (rows, T, nq hd)
        return attention_heads(s.to(bd), w, run.cos, run.sin, eps=run.eps, attn_mask=run.attn_mask)

    def gather(m: Moments, z_of: Callable, weight: torch.Tensor, bias: torch.Tensor | None, c: slice):
        """Windows ``c``' moments of one projection's input (``z_of``: the sub-block up to it). The
        stream the repair does not change advances through the projection here, so each block's
        work is done once for it: the dense stream beside (explicit target), or one-shot the
        stream itself, which is the dense model's."""
        w_c = None if run.pos_w is None else run.pos_w[c]  # (rows, T)
        if xd is None:
            z = z_of(x[c])
            m.add(z, weight=w_c)
            if not sequential:
                x[c] += F.linear(z, weight, bias)
            return
        zd = z_of(xd[c])
        m.add(z_of(x[c]), goal(c, zd, weight), w_c)
        xd[c] += F.linear(zd, weight, bias)

    def mlp_of(s: torch.Tensor) -> torch.Tensor:
        return mlp_channels(s.to(bd), w, eps=run.eps)  # (rows, T, F)

    o_w, o_b, o_cols = w.o, w.o_bias, None  # how the stream advances through o_proj
    o_fit = bool(w.n_heads) and (len(lp.heads) < w.n_heads or run.every)
    if o_fit:
        m = moments(w.o)
        for c in run.chunks():
            gather(m, heads_of, w.o, w.o_bias, c)
        even = bool(lp.kv_heads) and len(lp.heads) % len(lp.kv_heads) == 0  # every group as many
        o_src = exact("o", w.o, w.o_bias)  # read once for the choice and the solve
        m = summed(m, "o")  # once for the choice and the solve
        if run.reselect and run.reselect_heads and even and len(lp.heads) < w.n_heads:
            heads, kv_heads = greedy_heads(m, o_src[0], w.head_dim, w.n_kv_heads, len(lp.kv_heads),
                                           len(lp.heads) // len(lp.kv_heads), ridge=ridge)
            kept = dataclasses.replace(kept, heads=heads, kv_heads=kv_heads)
            info["heads_changed"] = len(set(lp.heads) - set(heads))
            head_cols = head_rows(heads, w.head_dim)
        o_w, o_b, o_cols = repair("o", "attn_error", *o_src, m, head_cols) or (o_w, o_b, o_cols)
    d_w, d_b, d_cols = w.down, w.down_bias, None
    needs_mlp = len(lp.channels) < w.n_channels or run.every
    m = moments(w.down) if needs_mlp else None
    for c in run.chunks():  # advance through attention (unless gather did); the MLP input's moments
        if w.n_heads and (sequential or not o_fit):
            y = heads_of(x[c])
            x[c] += F.linear(y if o_cols is None else y[..., o_cols], o_w, o_b)
            if xd is not None and not o_fit:
                xd[c] += F.linear(heads_of(xd[c]), w.o, w.o_bias)
        if m is not None:
            gather(m, mlp_of, w.down, w.down_bias, c)
    if m is not None:
        d_src = exact("down", w.down, w.down_bias)  # read once for the choice and the solve
        m = summed(m, "down")  # once for the choice and the solve
        if run.reselect and len(lp.channels) < w.n_channels:
            chans = greedy_keep(m, d_src[0], len(lp.channels), ridge=ridge)
            kept = dataclasses.replace(kept, channels=tuple(chans.tolist()))
            info["channels_changed"] = len(set(lp.channels) - set(kept.channels))
        d_w, d_b, d_cols = repair("down", "mlp_error", *d_src, m, chans) or (d_w, d_b, d_cols)
    for c in (run.chunks() if sequential or m is None else ()):  # advance through the MLP (unless gather did)
        act = mlp_of(x[c])
        x[c] += F.linear(act if d_cols is None else act[..., d_cols], d_w, d_b)
        if xd is not None and m is None:
            xd[c] += F.linear(mlp_of(xd[c]), w.down, w.down_bias)
    return repaired, info, kept
