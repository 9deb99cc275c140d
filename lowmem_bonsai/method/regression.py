"""Regression of sub-model scores on their masks: y ~ b + sum_u beta_u m_u.

y = -calibration loss of a sub-model, m_u = 1 where unit u is kept, so beta_u estimates how much
keeping u lowers the loss. Features (eligible units) far outnumber samples (masks), so both
estimators shrink towards a prior-informed base: beta = s_k * prior_u + delta_u, where the scale
s_k of each unit kind (attention group / MLP channel) is fitted by least squares and delta is

- ``ridge``: the minimum-norm ridge correction, in closed form (dual: an M x M solve);
- ``lasso``: an L1-penalised correction (proximal gradient), the reference code's estimator family;
- ``prior``: no correction (the ablation: only the kind and module scales are fitted).

With ``groups`` (the module of every unit), each module also gets its own scale s_k + t_g, the
t_g fitted by ridge towards 0: the masks of varied counts make a module's total effect identifiable,
and this is where the regression learns which layers are sensitive.

The penalties are picked by k-fold cross-validation scored by Kendall's tau between predicted and
held-out scores, as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import Estimator

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # x mean squared row norm of the centered masks
LASSO_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # x the smallest penalty that zeroes delta
GRIDS = {Estimator.RIDGE: RIDGE_GRID, Estimator.LASSO: LASSO_GRID, Estimator.PRIOR: (0.0,)}
MODULE_GRID = (0.1, 1.0, 10.0, float("inf"))  # x mean squared column norm; inf: no module scales


@dataclass(frozen=True, slots=True)
class Fit:
    beta: torch.Tensor  # (D,) fp64
    intercept: float
    penalty: float  # the chosen multiplier from the grid
    module_penalty: float  # the chosen module-scale penalty (inf: none)
    cv_tau: float  # mean held-out Kendall tau at that penalty (nan if too few samples)
    train_tau: float
    informed: torch.Tensor  # (D,) bool: the unit was dropped in some masks and kept in others
    kind_scale: list[float]  # fitted effect of keeping one average unit, per kind


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's tau-b of two 1-D tensors (O(n^2), n = a few hundred)."""
    da = torch.sign(a[:, None] - a[None, :])
    db = torch.sign(b[:, None] - b[None, :])
    concord = (da * db).sum()
    norm = torch.sqrt((da != 0).sum().double() * (db != 0).sum().double())
    return float(concord / norm) if norm > 0 else float("nan")


def _base(xc: torch.Tensor, yc: torch.Tensor, prior: torch.Tensor, kinds: torch.Tensor,
          groups: torch.Tensor | None = None, module_penalty: float = float("inf"),
          ) -> tuple[torch.Tensor, list[float]]:
    """Prior scaled per kind by non-negative least squares on the centered data.  # (D,)

    Each kind's column is the prior-weighted count of kept units of that kind, so its coefficient
    is the effect of keeping one unit of average prior: a 2-4 parameter fit that the masks
    determine well even when the per-unit fit cannot.
    """
    ks = kinds.unique()
    a = torch.stack([xc @ torch.where(kinds == k, prior, 0.0) for k in ks], 1)  # (M, K)
    live = a.abs().sum(0) > 0  # kinds never perturbed get no scale
    s = torch.zeros(len(ks), dtype=xc.dtype)
    if live.any():
        al = a[:, live]
        s[live] = torch.linalg.lstsq(al.T @ al + 1e-12 * torch.eye(al.shape[1], dtype=al.dtype),
                                     al.T @ yc).solution
    s = s.clamp_min(0)
    scale = torch.zeros_like(prior)
    for i, k in enumerate(ks):
        scale = torch.where(kinds == k, s[i], scale)
    if groups is not None and module_penalty != float("inf"):
        # Per-module corrections t_g of the scale, ridge towards the kind's: (G,) from M masks.
        gs = groups.unique()
        a = torch.stack([xc @ torch.where(groups == g, prior, 0.0) for g in gs], 1)  # (M, G)
        r = yc - a @ torch.stack([scale[groups == g][0] for g in gs])
        gram = a.T @ a
        lam = module_penalty * gram.diagonal().mean().clamp_min(1e-12)
        t = torch.linalg.solve(gram + lam * torch.eye(len(gs), dtype=a.dtype), a.T @ r)
        for i, g in enumerate(gs):
            scale = torch.where(groups == g, scale + t[i], scale)
        scale = scale.clamp_min(0)
    return scale * prior, s.tolist()


def _ridge(xc: torch.Tensor, r: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge solution of r ~ xc delta, in the dual (M x M) form.  # (D,)"""
    gram = xc @ xc.T  # (M, M)
    scale = gram.diagonal().mean().clamp_min(1e-12)
    alpha = torch.linalg.solve(gram + lam * scale * torch.eye(gram.shape[0], dtype=gram.dtype), r)
    return xc.T @ alpha


def _lasso(xc: torch.Tensor, r: torch.Tensor, lam: float, iters: int = 300) -> torch.Tensor:
    """argmin_delta (1/M)||r - xc delta||^2 + lam * lam_max * ||delta||_1 by proximal gradient."""
    m = xc.shape[0]
    lipschitz = 2 * torch.linalg.matrix_norm(xc, ord=2) ** 2 / m
    step = 1 / lipschitz.clamp_min(1e-12)
    thresh = lam * (2 * (xc.T @ r).abs().max() / m) * step
    delta = torch.zeros(xc.shape[1], dtype=xc.dtype)
    for _ in range(iters):
        g = -2 * xc.T @ (r - xc @ delta) / m
        z = delta - step * g
        delta = torch.sign(z) * (z.abs() - thresh).clamp_min(0)
    return delta


def _solve(x: torch.Tensor, y: torch.Tensor, prior: torch.Tensor, kinds: torch.Tensor, estimator: str,
           penalty: float, groups: torch.Tensor | None = None,
           module_penalty: float = float("inf")) -> tuple[torch.Tensor, float, list[float]]:
    xm, ym = x.mean(0), y.mean()
    xc, yc = x - xm, y - ym
    base, scale = _base(xc, yc, prior, kinds, groups, module_penalty)
    resid = yc - xc @ base
    if estimator == Estimator.RIDGE:
        delta = _ridge(xc, resid, penalty)
    elif estimator == Estimator.LASSO:
        delta = _lasso(xc, resid, penalty)
    else:
        delta = torch.zeros_like(base)
    beta = base + delta
    return beta, float(ym - xm @ beta), scale


def fit(x: torch.Tensor, y: torch.Tensor, *, prior: torch.Tensor, kinds: torch.Tensor,
        estimator: str = Estimator.RIDGE, folds: int = 5, gen: torch.Generator | None = None,
        groups: torch.Tensor | None = None) -> Fit:
    """Fit beta on masks x (M, D) in {0, 1} and scores y (M,), penalty chosen by k-fold CV.

    ``prior`` (D,) is each unit's prior normalised to mean 1 over its module's eligible units;
    ``kinds`` (D,) says which
    units share a scale (0 = attention group, 1 = MLP channel); ``groups`` (D,), if given, which
    module each unit belongs to (per-module scales join the CV grid).
    """
    if estimator not in GRIDS:
        raise ValueError(f"estimator {estimator!r}")
    x, y, prior = x.double(), y.double(), prior.double()
    grid = [(p, q) for p in GRIDS[estimator]
            for q in (MODULE_GRID if groups is not None else (float("inf"),))]
    m = x.shape[0]
    scores = {p: float("nan") for p in grid}
    if m >= 2 * folds:
        # Folds keep antithetic pairs together, so a held-out mask's partner is held out too.
        pairs = torch.randperm(m // 2, generator=gen)
        fold_of_pair = torch.arange(m // 2) % folds
        fold = torch.empty(m, dtype=torch.long)
        fold[2 * pairs] = fold_of_pair
        fold[2 * pairs + 1] = fold_of_pair
        if m % 2:
            fold[-1] = 0
        for p, q in grid:
            taus = []
            for f in range(folds):
                tr, te = fold != f, fold == f
                beta, b, _ = _solve(x[tr], y[tr], prior, kinds, estimator, p, groups, q)
                taus.append(kendall_tau(x[te] @ beta + b, y[te]))
            scores[(p, q)] = float(torch.tensor(taus).nanmean())
    valid = {p: s for p, s in scores.items() if s == s}
    # Ties go to the larger penalties: the simpler model.
    best = max(valid, key=lambda p: (valid[p], p[1], p[0])) if valid else grid[len(grid) // 2]
    beta, b, scale = _solve(x, y, prior, kinds, estimator, best[0], groups, best[1])
    informed = (x.max(0).values > x.min(0).values)
    return Fit(beta=beta, intercept=b, penalty=best[0], module_penalty=best[1], cv_tau=scores[best],
               train_tau=kendall_tau(x @ beta + b, y), informed=informed, kind_scale=scale)
