"""Selection policies: which units a round removes, given an importance order, scores or betas.

Each policy is a function returning a :data:`~lowmem_bonsai.model.plan.Drop` (local unit indices per
(layer, kind)); the round loop (prune.py) picks one by method and profile. Kept MLP widths stay
multiples of ``align``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.plan import Drop
from .masks import Module

# Per layer: (attention units' priors, MLP channels' priors), fp64.
Priors = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True, slots=True)
class ModuleMasks:
    """One module's part of a round's sub-models."""

    module: Module
    prior: torch.Tensor  # (n_units,) fp64
    eligible: torch.Tensor  # (e,) local indices that masks may drop
    masks: torch.Tensor  # (M, n_units) 1 = kept


def order(prior: torch.Tensor, n_units: int, min_units: int) -> list[int]:
    """Removable local indices (all but ``min_units``), lowest prior first."""
    return torch.argsort(prior, stable=True)[: max(n_units - min_units, 0)].tolist()


def prior_of(priors: Priors, m: Module) -> torch.Tensor:
    """Module m's unit priors from the per-layer (attention, MLP) pairs."""
    return priors[m.layer][0 if m.kind != "mlp" else 1]


def prior_orders(modules: list[Module], priors: Priors) -> list[list[int]]:
    return [order(prior_of(priors, m), m.n_units, m.min_units) for m in modules]


def align_mlp(drop: list[int], order: list[int], n_units: int, align: int) -> list[int]:
    """Adjust one MLP's dropped channels so the kept width is a multiple of ``align``.

    ``order``: removable local indices, least important first, with ``drop`` as its prefix. The
    kept width moves to the nearest multiple that ``order`` can reach; otherwise nothing changes.
    """
    kept = n_units - len(drop)
    down = kept - kept % align
    targets = sorted((down, down + align), key=lambda w: (abs(w - kept), w))
    for width in targets:
        if width >= min(align, n_units) and 0 <= n_units - width <= len(order):
            return order[: n_units - width]
    return drop


def per_module(modules: list[Module], orders: list[list[int]], p: float, align: int) -> Drop:
    """Every module loses the first round(p * width) units of its order (MLP widths aligned).

    ``orders[i]``: module i's removable local indices, least important first.
    """
    drop: Drop = {}
    for m, o in zip(modules, orders):
        chosen = o[: min(round(p * m.n_units), len(o))]
        if m.kind == "mlp":
            chosen = align_mlp(chosen, o, m.n_units, align)
        drop[(m.layer, m.kind)] = chosen
    return drop


def beta_orders(masks: list[ModuleMasks], beta_of: dict[tuple[int, int], float]) -> list[list[int]]:
    """Per module: informed eligible units by increasing beta, then the rest by increasing prior.

    With :func:`per_module` this gives the baselines' widths with the regression deciding which
    units go (the ``uniform`` allocation).
    """
    orders = []
    for idx, mm in enumerate(masks):
        by_prior = order(mm.prior, mm.module.n_units, mm.module.min_units)
        scored = sorted((u for u in by_prior if (idx, u) in beta_of), key=lambda u: beta_of[(idx, u)])
        orders.append(scored + [u for u in by_prior if (idx, u) not in beta_of])
    return orders


def global_by_beta(masks: list[ModuleMasks], beta_of: dict[tuple[int, int], float], budget: float,
                   align: int, whole: bool = False) -> Drop:
    """Remove by increasing estimated loss per parameter across all modules until the budget is spent.

    The candidates are pieces: one attention unit, or the next ``align`` MLP channels of a module
    in increasing beta (the first piece is shorter when the width is not yet a multiple of
    ``align``), so every kept width stays aligned and the budget is met to within half a piece.
    Units the masks never varied carry no evidence and stay. A module loses at most what one
    sub-model dropped from it (half its eligible units, or all of them with ``whole``: masks of
    varied counts drop that many; at least one piece): beyond that the linear model extrapolates.
    """
    pieces = []  # (cost per parameter, module index, piece index, units, params)
    for idx, mm in enumerate(masks):
        m, elig = mm.module, mm.eligible
        ranked = sorted((int(u) for u in elig if (idx, int(u)) in beta_of), key=lambda u: beta_of[(idx, u)])
        cap = elig.numel() if whole else max(1, elig.numel() // 2)
        first = m.n_units % align or align
        ranked = ranked[: max(cap, first if m.kind == "mlp" else 1)]  # at least one piece
        if m.kind == "mlp":
            sizes = [first] + [align] * ((len(ranked) - first) // align) if len(ranked) >= first else []
        else:
            sizes = [1] * len(ranked)
        a = 0
        for k, size in enumerate(sizes):
            units = ranked[a : a + size]
            a += size
            params = size * m.unit_params
            pieces.append((sum(beta_of[(idx, u)] for u in units) / params, idx, k, units, params))
    drop: Drop = {(mm.module.layer, mm.module.kind): [] for mm in masks}
    blocked: set[int] = set()
    removed = 0.0
    for _, idx, _, units, params in sorted(pieces, key=lambda t: t[:3]):
        if idx in blocked:
            continue
        if removed + params > budget + 0.5 * params:
            blocked.add(idx)  # a module's pieces go in order: a skipped piece ends that module
            continue
        m = masks[idx].module
        drop[(m.layer, m.kind)] += units
        removed += params
    return drop


def flap(modules: list[Module], scores: list[tuple[torch.Tensor, torch.Tensor]], budget: float,
         align: int) -> Drop:
    """FLAP's adaptive structure: every unit of every layer ranked by its standardized score.

    Units go in increasing score until the removed parameters come closest to ``budget`` (FLAP's
    threshold on the cumulative parameter count), keeping each module's minimum; then each MLP's
    kept width is moved to a multiple of ``align`` along the same order.
    """
    units = []  # (score, module index, local unit)
    for idx, m in enumerate(modules):
        sc = scores[m.layer][0 if m.kind != "mlp" else 1]
        units += [(float(v), idx, u) for u, v in enumerate(sc.tolist())]
    units.sort()
    left = [m.n_units - m.min_units for m in modules]
    chosen: list[list[int]] = [[] for _ in modules]
    removed = 0.0
    for _, idx, u in units:
        params = modules[idx].unit_params
        if removed + 0.5 * params > budget:
            break
        if left[idx] > 0:
            chosen[idx].append(u)
            left[idx] -= 1
            removed += params
    drop: Drop = {}
    for idx, m in enumerate(modules):
        if m.kind == "mlp":
            sc = scores[m.layer][1]
            chosen[idx] = align_mlp(chosen[idx], order(sc, m.n_units, m.min_units), m.n_units, align)
        drop[(m.layer, m.kind)] = chosen[idx]
    return drop
