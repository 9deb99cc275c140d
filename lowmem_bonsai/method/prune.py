"""Bonsai rounds: prior pass -> eligible units -> masks -> batched masked passes -> regression -> plan.

Every pass streams the blocks from the source checkpoint, sliced to the current plan, so later rounds
run smaller GEMMs. The ``prior``, ``magnitude`` and ``random`` methods skip the masks and remove the
lowest-prior share of every module in the same rounds (the forward-only baselines).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engine.block import ColumnStats
from ..engine.device import free_bytes, resolve_device
from ..engine.forward import MaskSet, streamed_nll
from ..engine.memory import pick_compute_dtype, plan_memory
from ..errors import UserError
from ..model.checkpoint import Checkpoint
from ..model.config import DTYPES, ModelConfig
from ..model.plan import LayerPlan, Plan
from ..outputs.resume import RunState
from ..profiles import Profile
from ..settings import Method, names
from .masks import Module, eligible_units, sample_masks
from .prior import flap_scores, layer_priors
from .regression import fit

log = logging.getLogger(__name__)

ONE_SHOT = (Method.FLAP,)  # methods that remove the whole target in one round

# progress(stage, done, total): stage is "prior", "masks" (blocks of all waves) or "round"
Progress = Callable[[str, int, int], None]


@dataclass(slots=True)
class RoundReport:
    round: int
    params_before: int
    params_after: int
    calib_loss: float  # mean next-token NLL of the model entering the round
    masks: int
    forward_tokens: int
    seconds: float
    mask_loss_mean: float | None = None
    mask_loss_std: float | None = None
    cv_tau: float | None = None
    train_tau: float | None = None
    penalty: float | None = None
    module_penalty: float | None = None  # None: no per-module scales
    removed_groups: int = 0
    removed_head_slots: int = 0
    removed_channels: int = 0


@dataclass(slots=True)
class PruneResult:
    plan: Plan
    rounds: list[RoundReport] = field(default_factory=list)


def modules_of(config: ModelConfig, plan: Plan, align: int, head_unit: str = "group") -> list[Module]:
    """Attention and MLP (channels) of every layer, with their unit sizes.

    Attention units are KV groups ("attn": a KV head with its query heads) or, with
    ``head_unit="query"``, query-head slots ("heads": the j-th kept query head of every group, so
    every group keeps the same number, as llama.cpp requires).
    """
    h, hd = config.hidden_size, config.head_dim
    bias = config.attention_bias
    out = []
    for layer, lp in enumerate(plan.layers):
        n_kv = len(lp.kv_heads)
        q = len(lp.heads) // max(n_kv, 1)  # query heads per group now
        if head_unit == "query":
            out.append(Module(layer, "heads", q, n_kv * (2 * hd * h + (hd if bias else 0)), min_units=1))
        else:
            group_params = (2 * q + 2) * hd * h + ((q + 2) * hd if bias else 0)
            out.append(Module(layer, "attn", n_kv, group_params, min_units=1))
        out.append(Module(layer, "mlp", len(lp.channels), 3 * h,
                          min_units=min(align, len(lp.channels))))
    return out


def plan_params(config: ModelConfig, plan: Plan) -> int:
    return config.with_layers(plan.shapes()).non_embedding_params()


def _remove(plan: Plan, config: ModelConfig, drop: dict[tuple[int, str], list[int]]) -> Plan:
    """Drop units given by local (current) indices; returns the plan in original indices."""
    qpk = config.queries_per_kv
    layers = []
    for layer, lp in enumerate(plan.layers):
        gone_kv = {lp.kv_heads[i] for i in drop.get((layer, "attn"), [])}
        gone_ch = {lp.channels[i] for i in drop.get((layer, "mlp"), [])}
        slots = set(drop.get((layer, "heads"), []))
        gone_q = {hs[j] for kv in lp.kv_heads for hs in [[q for q in lp.heads if q // qpk == kv]]
                  for j in slots}  # the j-th kept query head of every group
        layers.append(LayerPlan(
            heads=tuple(q for q in lp.heads if q // qpk not in gone_kv and q not in gone_q),
            kv_heads=tuple(k for k in lp.kv_heads if k not in gone_kv),
            channels=tuple(c for c in lp.channels if c not in gone_ch),
        ))
    return Plan(tuple(layers), plan.meta)


def _align_mlp(drop: list[int], order: list[int], n_units: int, align: int) -> list[int]:
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


def check_settings(*, sparsity: float, method: str) -> None:
    if method not in names(Method):
        raise UserError(f"--method {method}: expected one of {', '.join(names(Method))}")
    if not 0 < sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: must be between 0 and 1 (exclusive)")


def run_rounds(
    ckpt: Checkpoint,
    calib: torch.Tensor,
    *,
    sparsity: float,
    profile: Profile,
    method: str = "bonsai",
    seed: int = 0,
    progress: Progress | None = None,
    state: RunState | None = None,
) -> PruneResult:
    """Prune ``ckpt`` to ``sparsity`` (fraction of non-embedding params removed); returns the plan.

    With ``state``, progress is checkpointed after every wave and round, and a state holding
    earlier progress is continued from where it stopped.
    """
    check_settings(sparsity=sparsity, method=method)
    cfg = ckpt.config
    device = resolve_device(profile.device)  # refuses a GPU profile where there is no GPU
    dtype_name, rates = pick_compute_dtype(profile.compute_dtype, device)
    dtype = DTYPES[dtype_name]
    if rates:
        log.info("compute dtype %s on %s (measured matmul GFLOP/s: %s)", dtype_name, device,
                 ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    wave = wave_size(cfg, calib, profile, device)  # refuses now, not hours in, if the budget cannot work
    log.info("waves of %d masks (%d per round)", wave, profile.masks_per_round)
    gen = torch.Generator().manual_seed(seed)
    prior_kind = {"magnitude": "magnitude", "random": "random"}.get(method, profile.prior)
    total = cfg.non_embedding_params()
    target = sparsity * total
    plan = Plan.dense(cfg)
    result = PruneResult(plan)
    if state is not None and state.rounds:
        plan = state.plan()
        result.rounds = [RoundReport(**r) for r in state.rounds]
        state.restore_generator(gen)
        log.info("resuming after round %d", len(result.rounds))
    s_count, t = calib.shape
    pass_tokens = s_count * t
    expected_rounds = profile.rounds_for(sparsity)
    fwd = dict(dtype=dtype, prefetch=profile.prefetch, chunk_tokens=profile.chunk_tokens, device=device)
    r = len(result.rounds)
    # A round that removed nothing ends the prune; so it does when resuming right after it.
    while not (result.rounds and result.rounds[-1].params_after == result.rounds[-1].params_before):
        before = plan_params(cfg, plan)
        budget = target - (total - before)
        if method not in ONE_SHOT:
            budget = min(profile.prune_frac * total, budget)
        modules = modules_of(cfg, plan, profile.align, profile.head_unit)
        # Stop when what is left is smaller than half the smallest removable piece (one attention
        # unit, or `align` channels: MLP widths stay aligned), instead of spending a round on nothing.
        smallest = min((m.unit_params * (m.min_units if m.kind == "mlp" else 1)  # min_units: align
                        for m in modules if m.n_units > m.min_units), default=0)
        if not smallest or budget < 0.5 * smallest:
            break
        r += 1
        start = time.perf_counter()
        if state is not None:
            state.begin_round(r, gen)
        if progress:
            progress("round", r - 1, max(expected_rounds, r))
        stats: list[ColumnStats] = []
        on_prior = (lambda l: progress("prior", l + 1, cfg.num_hidden_layers)) if progress else None
        teacher = [] if method == "bonsai" and profile.score == "kl" else None
        base = streamed_nll(ckpt, calib, plan=plan, stats=stats, on_block=on_prior, teacher=teacher, **fwd)
        calib_loss = float(base.sum()) / (s_count * (t - 1))
        priors = layer_priors(ckpt, stats, prior_kind, gen, profile.head_unit)
        if not math.isfinite(calib_loss):  # a non-finite lm_head or final norm (or a random prior)
            raise ckpt.nonfinite_error(found="the calibration loss")
        p = budget / before  # share of the current model this round removes
        report = RoundReport(r, before, before, calib_loss, 0, pass_tokens, 0.0)
        if method == Method.BONSAI:
            drop, fit_info = _bonsai_choice(ckpt, calib, plan, modules, priors, p, budget, profile,
                                            gen, dict(fwd, soft=teacher[0] if teacher else None),
                                            progress, state, wave)
            report.masks = profile.masks_per_round
            report.forward_tokens += profile.masks_per_round * pass_tokens
            (report.mask_loss_mean, report.mask_loss_std, report.cv_tau, report.train_tau,
             report.penalty, report.module_penalty) = fit_info
        elif method == Method.FLAP:
            drop = _flap_choice(modules, [flap_scores(st, head_unit=profile.head_unit) for st in stats],
                                budget, profile.align)
        else:
            drop = _per_module_choice(modules, _prior_orders(modules, priors), p, profile.align)
        plan = _remove(plan, cfg, drop)
        report.params_after = plan_params(cfg, plan)
        report.removed_groups = sum(len(v) for (_, k), v in drop.items() if k == "attn")
        report.removed_head_slots = sum(len(v) for (_, k), v in drop.items() if k == "heads")
        report.removed_channels = sum(len(v) for (_, k), v in drop.items() if k == "mlp")
        report.seconds = time.perf_counter() - start
        result.rounds.append(report)
        if state is not None:
            state.end_round(plan, report, gen)
        log.info("round %d: %d -> %d params, calib loss %.4f, %.1f s", r, before,
                 report.params_after, calib_loss, report.seconds)
        if report.params_after == before:
            log.warning("round %d removed nothing (units too coarse for the budget); stopping", r)
    if progress:
        progress("round", r, r)
    result.plan = plan
    return result


def _order(prior: torch.Tensor, n_units: int, min_units: int) -> list[int]:
    return torch.argsort(prior, stable=True)[: max(n_units - min_units, 0)].tolist()


def _per_module_choice(modules: list[Module], orders: list[list[int]], p: float,
                       align: int) -> dict[tuple[int, str], list[int]]:
    """Every module loses the first round(p * width) units of its order (MLP widths aligned).

    ``orders[i]``: module i's removable local indices, least important first.
    """
    drop: dict[tuple[int, str], list[int]] = {}
    for m, order in zip(modules, orders):
        chosen = order[: min(round(p * m.n_units), len(order))]
        if m.kind == "mlp":
            chosen = _align_mlp(chosen, order, m.n_units, align)
        drop[(m.layer, m.kind)] = chosen
    return drop


def _prior_of(priors, m: Module) -> torch.Tensor:
    """Module m's unit priors from the per-layer (attention, MLP) pairs."""
    return priors[m.layer][0 if m.kind != "mlp" else 1]


def _prior_orders(modules: list[Module], priors) -> list[list[int]]:
    return [_order(_prior_of(priors, m), m.n_units, m.min_units) for m in modules]


@dataclass(slots=True)
class ModuleMasks:
    """One module's part of a round's sub-models."""

    module: Module
    prior: torch.Tensor  # (n_units,) fp64
    eligible: torch.Tensor  # (e,) local indices that masks may drop
    masks: torch.Tensor  # (M, n_units) 1 = kept


def sample_round(modules: list[Module], priors, p: float, n_masks: int, gen: torch.Generator,
                 varied: bool = False, skip_coarse: bool = True) -> list[ModuleMasks]:
    """Eligible units and the keep-masks of every module for one round (``p``: share removed).

    With ``skip_coarse``, a module too coarse to lose a unit at this round's rate (round(p * width)
    = 0, e.g. 3 KV groups at p = 0.1) is neither perturbed nor pruned: on SmolLM2, dropping one of
    the first layers' three KV groups multiplies the loss, and those few masks then dominate the
    scores' variance that the regression should spend on the units it can remove
    (tools/bench_regression.py).
    """
    out = []
    for m in modules:
        prior = _prior_of(priors, m)
        room = m.n_units - m.min_units
        # MLP modules offer at least two pieces of `align` (= min_units) channels: a small last
        # round must still have a whole piece to remove.
        least = 2 * m.min_units if m.kind == "mlp" else 2
        e = min(max(math.ceil(2 * p * m.n_units), least), room) if room >= 2 else 0
        if skip_coarse and round(p * m.n_units) == 0:
            e = 0
        elig = eligible_units(prior, n_eligible=e)
        masks = sample_masks(prior, elig, n_units=m.n_units, n_masks=n_masks, gen=gen, varied=varied)
        if e:
            # Coarse modules (few large units) are perturbed only in some pairs, so each mask drops
            # about p of every module on average, as for fine modules.
            active = min(1.0, 2 * p * m.n_units / e)
            idle = torch.rand(n_masks // 2, generator=gen) >= active
            masks.view(n_masks // 2, 2, -1)[idle] = 1.0
        out.append(ModuleMasks(m, prior, elig, masks))
    return out


def mask_set(per_module: list[ModuleMasks], plan: Plan, a: int, b: int) -> MaskSet:
    """Masks a..b of a round as the forward pass takes them (per-layer head and channel masks)."""
    head, chan = [], []
    for mm in per_module:
        m, masks = mm.module, mm.masks[a:b]
        lp = plan.layers[m.layer]
        if m.kind == "attn":  # (M, n_heads): a group's heads are contiguous
            head.append(masks.repeat_interleave(len(lp.heads) // len(lp.kv_heads), dim=1))
        elif m.kind == "heads":  # (M, n_heads): slot j is head j of every group
            head.append(masks.repeat(1, len(lp.kv_heads)))
        else:
            chan.append(masks)
    return MaskSet(head, chan)


@dataclass(slots=True)
class Design:
    """The regression's view of a round: one column per eligible unit."""

    x: torch.Tensor  # (M, D) 1 = kept
    prior: torch.Tensor  # (D,) normalised to mean 1 within each module
    kinds: torch.Tensor  # (D,) 0 = attention unit, 1 = MLP channel
    groups: torch.Tensor  # (D,) index into per_module
    owners: list[tuple[int, int]]  # (index into per_module, local unit index) per column


def design_of(per_module: list[ModuleMasks]) -> Design:
    cols, pri, kinds, groups, owners = [], [], [], [], []
    for idx, mm in enumerate(per_module):
        elig = mm.eligible
        if not elig.numel():
            continue
        cols.append(mm.masks[:, elig])
        pe = mm.prior[elig]
        pri.append(pe / pe.mean().clamp_min(1e-30))  # mean 1 over the module's eligible units
        kinds.append(torch.full((elig.numel(),), 0 if mm.module.kind != "mlp" else 1))
        groups.append(torch.full((elig.numel(),), idx))
        owners += [(idx, int(u)) for u in elig]
    return Design(torch.cat(cols, 1), torch.cat(pri), torch.cat(kinds), torch.cat(groups), owners)


def _bonsai_choice(ckpt, calib, plan, modules, priors, p, budget, profile, gen, fwd, progress, state,
                   wave):
    cfg = ckpt.config
    n_masks = profile.masks_per_round
    varied = profile.mask_counts == "varied"
    per_module = sample_round(modules, priors, p, n_masks, gen, varied)
    if not any(mm.eligible.numel() for mm in per_module):
        # Every module is too coarse for this round's rate: perturb the coarse ones after all (a
        # small last round, or a model already near its minimum widths).
        per_module = sample_round(modules, priors, p, n_masks, gen, varied, skip_coarse=False)
    if not any(mm.eligible.numel() for mm in per_module):  # every module is at its minimum
        return {}, (float("nan"),) * 4 + (None, None)
    losses = []
    blocks_total = math.ceil(n_masks / wave) * cfg.num_hidden_layers
    done = 0
    for index, a in enumerate(range(0, n_masks, wave)):
        b = min(a + wave, n_masks)
        saved = state.wave_loss(index) if state is not None else None
        if saved is not None and saved.numel() == b - a:
            losses.append(saved)
            done += cfg.num_hidden_layers
            continue

        def on_block(_l: int) -> None:
            nonlocal done
            done += 1
            if progress:
                progress("masks", done, blocks_total)

        nll = streamed_nll(ckpt, calib, plan=plan, masks=mask_set(per_module, plan, a, b),
                           on_block=on_block, **fwd)
        losses.append(nll.sum(1) / (calib.shape[0] * (calib.shape[1] - 1)))
        if state is not None:
            state.save_wave(index, losses[-1])
    loss = torch.cat(losses)  # (M,) mean NLL per mask
    y = -loss

    d = design_of(per_module)
    f = fit(d.x, y, prior=d.prior, kinds=d.kinds, estimator=profile.estimator, gen=gen,
            groups=d.groups if varied else None)

    beta_of = {d.owners[i]: float(f.beta[i]) for i in range(len(d.owners)) if f.informed[i]}
    if profile.allocation == "uniform":
        # Same widths as the baselines; the regression decides which units go: informed eligible
        # units by increasing beta, then the rest of the module by increasing prior.
        orders = []
        for idx, mm in enumerate(per_module):
            by_prior = _order(mm.prior, mm.module.n_units, mm.module.min_units)
            scored = sorted((u for u in by_prior if (idx, u) in beta_of), key=lambda u: beta_of[(idx, u)])
            orders.append(scored + [u for u in by_prior if (idx, u) not in beta_of])
        drop = _per_module_choice(modules, orders, p, profile.align)
    else:
        drop = _global_choice(per_module, beta_of, budget, profile.align, whole=varied)
    log.info("regression: cv tau %.3f, penalty %g, module penalty %g, per-unit scale (attention group, "
             "MLP channel) %s", f.cv_tau, f.penalty, f.module_penalty, f.kind_scale)
    info = (float(loss.mean()), float(loss.std()), f.cv_tau, f.train_tau, f.penalty,
            f.module_penalty if math.isfinite(f.module_penalty) else None)
    return drop, info


def _global_choice(per_module: list[ModuleMasks], beta_of: dict[tuple[int, int], float], budget: float,
                   align: int, whole: bool = False) -> dict[tuple[int, str], list[int]]:
    """Remove by increasing estimated loss per parameter across all modules until the budget is spent.

    The candidates are pieces: one attention unit, or the next ``align`` MLP channels of a module
    in increasing beta (the first piece is shorter when the width is not yet a multiple of
    ``align``), so every kept width stays aligned and the budget is met to within half a piece.
    Units the masks never varied carry no evidence and stay. A module loses at most what one
    sub-model dropped from it (half its eligible units, or all of them with ``whole``: masks of
    varied counts drop that many; at least one piece): beyond that the linear model extrapolates.
    """
    pieces = []  # (cost per parameter, module index, piece index, units, params)
    for idx, mm in enumerate(per_module):
        m, elig = mm.module, mm.eligible
        order = sorted((int(u) for u in elig if (idx, int(u)) in beta_of), key=lambda u: beta_of[(idx, u)])
        cap = elig.numel() if whole else max(1, elig.numel() // 2)
        first = m.n_units % align or align
        order = order[: max(cap, first if m.kind == "mlp" else 1)]  # at least one piece
        if m.kind == "mlp":
            sizes = [first] + [align] * ((len(order) - first) // align) if len(order) >= first else []
        else:
            sizes = [1] * len(order)
        a = 0
        for k, size in enumerate(sizes):
            units = order[a : a + size]
            a += size
            params = size * m.unit_params
            pieces.append((sum(beta_of[(idx, u)] for u in units) / params, idx, k, units, params))
    drop: dict[tuple[int, str], list[int]] = {(mm.module.layer, mm.module.kind): [] for mm in per_module}
    blocked: set[int] = set()
    removed = 0.0
    for _, idx, _, units, params in sorted(pieces, key=lambda t: t[:3]):
        if idx in blocked:
            continue
        if removed + params > budget + 0.5 * params:
            blocked.add(idx)  # a module's pieces go in order: a skipped piece ends that module
            continue
        m = per_module[idx].module
        drop[(m.layer, m.kind)] += units
        removed += params
    return drop


def _flap_choice(modules: list[Module], scores: list[tuple[torch.Tensor, torch.Tensor]], budget: float,
                 align: int) -> dict[tuple[int, str], list[int]]:
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
    drop = {}
    for idx, m in enumerate(modules):
        if m.kind == "mlp":
            sc = scores[m.layer][1]
            chosen[idx] = _align_mlp(chosen[idx], _order(sc, m.n_units, m.min_units), m.n_units, align)
        drop[(m.layer, m.kind)] = chosen[idx]
    return drop


def wave_size(cfg: ModelConfig, calib: torch.Tensor, profile: Profile, device: torch.device) -> int:
    """Masks per streamed pass: the profile's, or the largest wave the memory planner fits."""
    fitted = profile.replace(calib_seqs=calib.shape[0], seq_len=calib.shape[1])
    return plan_memory(cfg, fitted, device_free_bytes=free_bytes(device)).wave_masks
