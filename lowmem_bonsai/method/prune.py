"""Bonsai rounds, as their steps: prior pass -> choose -> remove -> record.

Every pass streams the blocks from the source checkpoint, sliced to the current plan, so later rounds
run smaller GEMMs. The ``prior``, ``magnitude`` and ``random`` methods skip the masks and remove the
lowest-prior share of every module in the same rounds (the forward-only baselines); ``bonsai``
chooses by a regression on the losses of masked sub-models (draw masks -> score them in waves ->
fit -> select). With a ``repair`` callable (reconstruct_in_rounds), rounds after the first stream
the source with the repair of the plan entering them laid over it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..engine.block import ColumnStats, UnitStats
from ..engine.device import free_bytes, resolve_device
from ..engine.forward import MaskSet, SoftTargets, streamed_nll, streamed_pass
from ..engine.memory import pick_compute_dtype, plan_memory
from ..engine.ranks import SINGLE, Ranks
from ..errors import UserError
from ..model.checkpoint import Checkpoint
from ..model.config import DTYPES, ModelConfig
from ..model.plan import Drop, Plan
from ..outputs.resume import RunState
from ..profiles import Profile
from ..settings import Coarse, Eligible, MaskFill, Method, PriorScope, names
from . import select
from .masks import Module, eligible_units, modules_of, profile_modules, sample_masks
from .prior import flap_scores, layer_priors
from .regression import fit
from .select import ModuleMasks, Priors, prior_of

log = logging.getLogger(__name__)

# Methods that aim at the whole target in their first round (later rounds, ranked afresh, only top
# up what the first left where its units were too coarse to land on the target).
ONE_SHOT = (Method.FLAP,)


def planned_rounds(profile: Profile, sparsity: float, method: str) -> int:
    """The rounds a prune is planned to take: one for a one-shot method, else prune_frac's share per
    round (a prune may take more where its units are too coarse to land on a round's budget)."""
    return 1 if method in ONE_SHOT else profile.rounds_for(sparsity)

# progress(stage, done, total): stage is "prior", "masks" (blocks of all waves) or "round"
Progress = Callable[[str, int, int], None]
# What a dropped unit's o_proj / down_proj input becomes (mask_fill = mean), per layer
Fills = tuple[list[torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True, slots=True)
class Repaired:
    """What a round scores in place of the source when the plan entering it was repaired between
    the rounds (profile key reconstruct_in_rounds)."""

    weights: Checkpoint  # the source with the repaired tensors laid over it
    forward_tokens: int  # what the repair costs (counted in the round's report, resumed or not)
    computed: int  # forward tokens this rank computed for it in this run (0: found already made)


# repair(round number, plan entering it): the weights that round scores (rounds 2, 3, ...)
RepairBetween = Callable[[int, Plan], Repaired]

__all__ = ["PruneResult", "Repaired", "RepairBetween", "RoundReport", "check_settings", "design_of",
           "mask_set", "modules_of", "planned_rounds", "profile_modules", "run_rounds", "sample_round", "wave_size"]


@dataclass(frozen=True, slots=True)
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
    repair_tokens: int = 0  # forward tokens of the repair this round scored (in forward_tokens)


@dataclass(frozen=True, slots=True)
class PruneResult:
    plan: Plan
    rounds: tuple[RoundReport, ...] = ()
    rank_tokens: tuple[int, ...] = ()  # forward tokens each rank computed in this run (not resumed work)


@dataclass(frozen=True, slots=True)
class Forward:
    """How the streamed passes compute (the same for every pass of a prune)."""

    dtype: torch.dtype
    prefetch: int
    chunk_tokens: int
    device: torch.device

    def kwargs(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, prefetch=self.prefetch, chunk_tokens=self.chunk_tokens,
                    device=self.device)


@dataclass(frozen=True, slots=True)
class RoundStart:
    """What a round may remove: its number, the model entering it and its parameter budget."""

    number: int
    params_before: int
    budget: float  # parameters to remove
    modules: tuple[Module, ...]

    @property
    def share(self) -> float:
        """The share of the current model this round removes (p)."""
        return self.budget / self.params_before


@dataclass(frozen=True, slots=True)
class PriorPass:
    """The unmasked pass of a round: its loss, the priors and (score kl) the teacher."""

    calib_loss: float  # mean next-token NLL
    stats: tuple[ColumnStats, ...]
    priors: Priors
    teacher: SoftTargets | None
    tokens: int  # forward tokens this rank computed


@dataclass(frozen=True, slots=True)
class FitSummary:
    """How the round's regression went (recorded in the round's report)."""

    mask_loss_mean: float
    mask_loss_std: float
    cv_tau: float
    train_tau: float
    penalty: float | None
    module_penalty: float | None  # None: no per-module scales


@dataclass(frozen=True, slots=True)
class Choice:
    """The units a round removes and the evidence it cost."""

    drop: Drop
    masks: int = 0  # sub-models scored (0: a method without masks)
    fit: FitSummary | None = None
    tokens: int = 0  # forward tokens this rank computed for the masks


@dataclass(frozen=True, slots=True)
class MaskScores:
    """The losses of a round's masks."""

    loss: torch.Tensor  # (M,) fp64 mean next-token NLL per mask
    tokens: int  # forward tokens this rank computed


def check_settings(*, sparsity: float, method: str, profile: Profile | None = None) -> None:
    if method not in names(Method):
        raise UserError(f"--method {method}: expected one of {', '.join(names(Method))}")
    if not 0 < sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: must be between 0 and 1 (exclusive)")
    if profile is not None and profile.reconstruct_in_rounds and method in ONE_SHOT:
        raise UserError(f"--method {method} aims at the whole target in its first round (later ones "
                        f"only top it up), so there is no round to repair between: set "
                        f"reconstruct_in_rounds = false in profile '{profile.name}'")


def check_reachable(cfg: ModelConfig, sparsity: float, profile: Profile) -> None:
    """Refuse a sparsity that the profile's min_width leaves no room for. (Where the modules'
    single-unit minimums alone stop it, the prune goes as far as it can and the report says why.)"""
    def room(mods: list[Module]) -> int:
        return sum((m.n_units - m.min_units) * m.unit_params for m in mods)

    dense = Plan.dense(cfg)
    mods, total = profile_modules(cfg, dense, profile), cfg.non_embedding_params()
    floored, smallest = room(mods), min(m.unit_params * m.piece for m in mods)
    unfloored = room(modules_of(cfg, dense, profile.align, profile.head_unit))
    if sparsity * total > floored + 0.5 * smallest and floored < unfloored:
        raise UserError(f"--sparsity {sparsity}: profile '{profile.name}' keeps at least min_width = "
                        f"{profile.min_width:g} of every module, which leaves {floored / total:.1%} of the "
                        "non-embedding parameters removable; lower the sparsity or min_width")


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
    ranks: Ranks = SINGLE,
    repair: RepairBetween | None = None,
) -> PruneResult:
    """Prune ``ckpt`` to ``sparsity`` (fraction of non-embedding params removed); returns the plan.

    With ``repair``, every round after the first scores ``repair(round, plan entering it)``'s
    weights instead of ``ckpt``'s (its prior pass, masks and selection); the round that reaches the
    target is the last one repaired for, so the final repair is the caller's.

    With ``state``, progress is checkpointed after every wave and round, and a state holding
    earlier progress is continued from where it stopped. With several ``ranks``, every rank calls
    this with the same arguments (only rank 0's ``state`` writes): the prior pass splits the
    calibration sequences, the waves of masks are shared out whole, and every rank ends with rank
    0's plan.
    """
    check_settings(sparsity=sparsity, method=method)
    cfg = ckpt.config
    prior_calib = calib  # the prior pass's windows; the masks take the first calib_seqs
    if profile.prior_seqs > profile.calib_seqs:
        calib = calib[: profile.calib_seqs]
    if calib.shape[0] < ranks.world:
        raise UserError(f"{ranks.world} ranks need at least as many calibration windows; the profile "
                        f"gives {calib.shape[0]} (raise calib_seqs, or start fewer ranks)")
    fwd = forward_settings(profile)
    wave = wave_size(cfg, calib, profile, fwd.device)  # refuses now, not hours in, if the budget cannot work
    log.info("waves of %d masks (%d per round)", wave, profile.masks_per_round)
    gen = torch.Generator().manual_seed(seed)
    prior_kind = {"magnitude": "magnitude", "random": "random"}.get(method, profile.prior)
    plan = Plan.dense(cfg)
    rounds: list[RoundReport] = []
    if state is not None and state.rounds:
        plan = state.plan()
        rounds = [RoundReport(**r) for r in state.rounds]
        state.restore_generator(gen)
        log.info("resuming after round %d", len(rounds))
    expected_rounds = planned_rounds(profile, sparsity, method)
    tokens = 0  # computed by this rank
    # A round that removed nothing ends the prune; so it does when resuming right after it.
    while not (rounds and rounds[-1].params_after == rounds[-1].params_before):
        start = next_round(cfg, plan, number=len(rounds) + 1, sparsity=sparsity, profile=profile,
                           method=method)
        if start is None:
            break
        t0 = time.perf_counter()
        if state is not None:
            state.begin_round(start.number, gen)
        if progress:
            progress("round", start.number - 1, max(expected_rounds, start.number))
        weights, repaired = ckpt, None
        if repair is not None and start.number > 1:  # (a resumed round asks again: same weights)
            repaired = repair(start.number, plan)
            weights, tokens = repaired.weights, tokens + repaired.computed
        on_prior = (lambda l: progress("prior", l + 1, cfg.num_hidden_layers)) if progress else None
        prior = prior_pass(weights, prior_calib, plan, kind=prior_kind, gen=gen, head_unit=profile.head_unit,
                           teacher=method == Method.BONSAI and profile.score == "kl", fwd=fwd,
                           on_block=on_prior, ranks=ranks, mask_rows=calib.shape[0])
        choice = choose(weights, calib, plan, start, prior, method=method, profile=profile, gen=gen,
                        fwd=fwd, wave=wave, state=state, progress=progress, ranks=ranks)
        tokens += prior.tokens + choice.tokens
        plan = agree(plan.without(cfg, choice.drop), gen, ranks, round_number=start.number)
        report = record(start, prior, choice, params_after=plan.params(cfg), pass_tokens=calib.numel(),
                        prior_tokens=prior_calib.numel(), repair_tokens=repaired.forward_tokens if repaired else 0,
                        seconds=time.perf_counter() - t0)
        rounds.append(report)
        if state is not None:
            state.end_round(plan, report, gen)
        log.info("round %d: %d -> %d params, calib loss %.4f, %.1f s", report.round, report.params_before,
                 report.params_after, report.calib_loss, report.seconds)
        if report.params_after == report.params_before:
            log.warning("round %d removed nothing (units too coarse for the budget); stopping", report.round)
    if progress:
        progress("round", len(rounds), len(rounds))
    rank_tokens = ranks.gather(tokens, what="the end of the rounds")
    return PruneResult(plan, tuple(rounds), tuple(rank_tokens))


def agree(plan: Plan, gen: torch.Generator, ranks: Ranks, *, round_number: int) -> Plan:
    """Rank 0's plan and generator on every rank (they compute the same; this makes it certain)."""
    if ranks.world == 1:
        return plan
    plan_json, gen_state = ranks.broadcast((plan.to_json(), gen.get_state()),
                                           what=f"the end of round {round_number}")
    gen.set_state(gen_state)
    return plan if ranks.main else Plan.from_json(plan_json, source="rank 0's plan")


def forward_settings(profile: Profile) -> Forward:
    """The compute device and dtype of the profile (the dtype measured when ``auto``)."""
    device = resolve_device(profile.device)  # refuses a GPU profile where there is no GPU
    dtype_name, rates = pick_compute_dtype(profile.compute_dtype, device)
    if rates:
        log.info("compute dtype %s on %s (measured matmul GFLOP/s: %s)", dtype_name, device,
                 ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    return Forward(DTYPES[dtype_name], profile.prefetch, profile.chunk_tokens, device)


def next_round(cfg: ModelConfig, plan: Plan, *, number: int, sparsity: float, profile: Profile,
               method: str) -> RoundStart | None:
    """Round ``number``'s budget, or None when what is left to remove is too small to be worth it."""
    total = cfg.non_embedding_params()
    before = plan.params(cfg)
    budget = sparsity * total - (total - before)
    if method not in ONE_SHOT:
        budget = min(profile.prune_frac * total, budget)
    modules = profile_modules(cfg, plan, profile)
    # Stop when what is left is smaller than half the smallest removable piece (one attention
    # unit, or `align` channels: MLP widths stay aligned), instead of spending a round on nothing.
    smallest = min((m.unit_params * m.piece for m in modules if m.n_units > m.min_units), default=0)
    if not smallest or budget < 0.5 * smallest:
        return None
    return RoundStart(number, before, budget, tuple(modules))


def prior_pass(ckpt: Checkpoint, calib: torch.Tensor, plan: Plan, *, kind: str, gen: torch.Generator,
               head_unit: str, teacher: bool, fwd: Forward,
               on_block: Callable[[int], None] | None = None, ranks: Ranks = SINGLE,
               mask_rows: int | None = None) -> PriorPass:
    """One unmasked pass of the current model: its calibration loss, column statistics and priors.

    ``mask_rows``: the teacher (score kl) covers only the first ``mask_rows`` windows, the masks'.

    With several ranks, each passes its share of the sequences; the column statistics are summed
    (fp64) and the per-sequence losses and teacher distributions gathered, so every rank ends with
    the same priors.
    """
    s_count, t = calib.shape
    mine = ranks.share(s_count)
    base = streamed_pass(ckpt, calib[mine.start : mine.stop], plan=plan, want_stats=True,
                         want_teacher=teacher, on_block=on_block, **fwd.kwargs())
    nll, stats, soft = base.nll, base.stats, base.teacher
    if ranks.world > 1:
        what = "the prior pass"
        nll = torch.cat(ranks.gather(nll, what=what), dim=1)  # (1, S) in sequence order
        stats = summed_stats(stats, ranks)
        if soft is not None:
            parts = ranks.gather(soft, what=what)
            soft = SoftTargets(torch.cat([p.ids for p in parts]), torch.cat([p.probs for p in parts]))
    calib_loss = float(nll.sum()) / (s_count * (t - 1))
    priors = tuple(layer_priors(ckpt, list(stats), kind, gen, head_unit))
    if not math.isfinite(calib_loss):  # a non-finite lm_head or final norm (or a random prior)
        raise ckpt.nonfinite_error(found="the calibration loss")
    if soft is not None and mask_rows is not None:
        soft = SoftTargets(soft.ids[:mask_rows], soft.probs[:mask_rows])
    return PriorPass(calib_loss, stats, priors, soft, base.tokens)


def summed_stats(stats: tuple[ColumnStats, ...], ranks: Ranks) -> tuple[ColumnStats, ...]:
    """Every rank's activation sums added up, in one exchange (the weights' terms are the same)."""
    parts = [(s.act.head_sum, s.act.head_sq, s.act.chan_sum, s.act.chan_sq) for s in stats]
    flat = torch.cat([torch.cat([*p, torch.tensor([float(s.act.tokens)], dtype=torch.float64)])
                      for p, s in zip(parts, stats)])
    total = ranks.sum(flat, what="the prior pass")
    out, a = [], 0
    for p, s in zip(parts, stats):
        got = []
        for x in p:
            got.append(total[a : a + x.numel()].clone())
            a += x.numel()
        tokens = int(total[a])
        a += 1
        out.append(replace(s, act=UnitStats(*got, tokens=tokens)))
    return tuple(out)


def choose(ckpt: Checkpoint, calib: torch.Tensor, plan: Plan, start: RoundStart, prior: PriorPass, *,
           method: str, profile: Profile, gen: torch.Generator, fwd: Forward, wave: int,
           state: RunState | None, progress: Progress | None, ranks: Ranks = SINGLE) -> Choice:
    """The units round ``start`` removes, by the method's policy."""
    modules = list(start.modules)
    if method == Method.BONSAI:
        return bonsai_choice(ckpt, calib, plan, start, prior, profile=profile, gen=gen, fwd=fwd,
                             wave=wave, state=state, progress=progress, ranks=ranks)
    if method == Method.FLAP:
        scores = [flap_scores(st, head_unit=profile.head_unit) for st in prior.stats]
        return Choice(select.flap(modules, scores, start.budget, profile.align))
    return Choice(select.per_module(modules, select.prior_orders(modules, prior.priors), start.share,
                                    profile.align))


def record(start: RoundStart, prior: PriorPass, choice: Choice, *, params_after: int, pass_tokens: int,
           prior_tokens: int, seconds: float, repair_tokens: int = 0) -> RoundReport:
    """The round's report: what it removed, what it saw, what it cost."""
    f = choice.fit
    kinds = {"attn": 0, "heads": 0, "mlp": 0}
    for (_, kind), units in choice.drop.items():
        kinds[kind] += len(units)
    return RoundReport(
        round=start.number, params_before=start.params_before, params_after=params_after,
        calib_loss=prior.calib_loss, masks=choice.masks,
        forward_tokens=prior_tokens + choice.masks * pass_tokens + repair_tokens, seconds=seconds,
        mask_loss_mean=f.mask_loss_mean if f else None, mask_loss_std=f.mask_loss_std if f else None,
        cv_tau=f.cv_tau if f else None, train_tau=f.train_tau if f else None,
        penalty=f.penalty if f else None, module_penalty=f.module_penalty if f else None,
        removed_groups=kinds["attn"], removed_head_slots=kinds["heads"], removed_channels=kinds["mlp"],
        repair_tokens=repair_tokens)


def draw_masks(modules: list[Module], priors: Priors, p: float, n_masks: int, gen: torch.Generator,
               varied: bool, ranking: Priors | None = None, skip_coarse: bool = True) -> list[ModuleMasks] | None:
    """The round's sub-models; None when every module is at its minimum width."""
    per_module = sample_round(modules, priors, p, n_masks, gen, varied, skip_coarse=skip_coarse,
                              ranking=ranking)
    if not any(mm.eligible.numel() for mm in per_module):
        # Every module is too coarse for this round's rate: perturb the coarse ones after all (a
        # small last round, or a model already near its minimum widths).
        per_module = sample_round(modules, priors, p, n_masks, gen, varied, skip_coarse=False,
                                  ranking=ranking)
    if not any(mm.eligible.numel() for mm in per_module):
        return None
    return per_module


def wave_bounds(n_masks: int, wave: int) -> list[tuple[int, int]]:
    """Masks a..b of every wave of a round, in order."""
    return [(a, min(a + wave, n_masks)) for a in range(0, n_masks, wave)]


def score_wave(ckpt: Checkpoint, calib: torch.Tensor, plan: Plan, per_module: list[ModuleMasks],
               a: int, b: int, *, fwd: Forward, soft: SoftTargets | None,
               on_block: Callable[[int], None] | None = None, fill: Fills | None = None) -> torch.Tensor:
    """Mean next-token NLL of masks a..b, from one streamed pass.  # (b - a,) fp64"""
    nll = streamed_nll(ckpt, calib, plan=plan, masks=mask_set(per_module, plan, a, b, fill), soft=soft,
                       on_block=on_block, **fwd.kwargs())
    return nll.sum(1) / (calib.shape[0] * (calib.shape[1] - 1))


def score_masks(ckpt: Checkpoint, calib: torch.Tensor, plan: Plan, per_module: list[ModuleMasks], *,
                wave: int, fwd: Forward, soft: SoftTargets | None, state: RunState | None,
                progress: Progress | None, ranks: Ranks = SINGLE, round_number: int = 0,
                fill: Fills | None = None) -> MaskScores:
    """Every mask's loss, wave by wave; waves the state already holds are not scored again.

    With several ranks the waves still to score are dealt out in steps of one wave per rank, so
    each mask's loss is computed exactly as one process computes it. A last step with fewer waves
    than ranks (a large model's round is often one wave) cuts each of its waves into one slice per
    rank: every rank still works, and those masks' losses agree with one process's to rounding
    (smaller batches can take other matmul kernels). After each step every rank receives the step's
    losses and rank 0 saves them, whole waves only, so a resume may use any number of ranks.
    """
    n_layers = ckpt.config.num_hidden_layers
    bounds = wave_bounds(per_module[0].masks.shape[0], wave)
    losses: dict[int, torch.Tensor] = {}
    for index, (a, b) in enumerate(bounds):
        saved = state.wave_loss(index) if state is not None else None
        if saved is not None and saved.numel() == b - a:
            losses[index] = saved
    todo = [i for i in range(len(bounds)) if i not in losses]
    steps = [todo[s : s + ranks.world] for s in range(0, len(todo), ranks.world)]
    mine = [wave_shares(step, bounds, world=ranks.world, rank=ranks.rank) for step in steps]
    blocks_total = sum(len(m) for m in mine) * n_layers
    done = 0

    def on_block(_l: int) -> None:
        nonlocal done
        done += 1
        if progress:
            progress("masks", done, blocks_total)

    tokens = 0
    for step, shares in zip(steps, mine):
        pieces = []
        for index, a, b in shares:
            loss = score_wave(ckpt, calib, plan, per_module, a, b, fwd=fwd, soft=soft, on_block=on_block,
                              fill=fill)
            pieces.append((index, a, loss))
            tokens += (b - a) * calib.numel()
        got = [p for rank_pieces in ranks.gather(pieces, what=f"the masked passes of round {round_number}")
               for p in rank_pieces]
        for index in step:
            losses[index] = torch.cat([loss for i, _, loss in sorted(got, key=lambda p: (p[0], p[1]))
                                       if i == index])
            if state is not None:
                state.save_wave(index, losses[index])
    return MaskScores(torch.cat([losses[i] for i in range(len(bounds))]), tokens)


def wave_shares(step: list[int], bounds: list[tuple[int, int]], *, world: int,
                rank: int) -> list[tuple[int, int, int]]:
    """The (wave, a, b) slices that ``rank`` scores in one step of :func:`score_masks`: a whole wave
    when the step has one per rank, else its share of every wave of the step (contiguous masks,
    the first ranks taking one more where the wave does not divide)."""
    if len(step) == world:
        return [(step[rank], *bounds[step[rank]])]
    out = []
    for index in step:
        a, b = bounds[index]
        lo, hi = a + (b - a) * rank // world, a + (b - a) * (rank + 1) // world
        if hi > lo:
            out.append((index, lo, hi))
    return out


def bonsai_choice(ckpt: Checkpoint, calib: torch.Tensor, plan: Plan, start: RoundStart, prior: PriorPass,
                  *, profile: Profile, gen: torch.Generator, fwd: Forward, wave: int,
                  state: RunState | None, progress: Progress | None, ranks: Ranks = SINGLE) -> Choice:
    """Draw masks -> score them -> regress the scores on the masks -> select by the betas."""
    n_masks = profile.masks_per_round
    varied = profile.mask_counts == "varied"
    ranking = None
    if profile.eligible == Eligible.GLOBAL:
        ranking = tuple(flap_scores(st, head_unit=profile.head_unit) for st in prior.stats)
    per_module = draw_masks(list(start.modules), prior.priors, start.share, n_masks, gen, varied, ranking,
                            skip_coarse=profile.coarse == Coarse.SKIP)
    if per_module is None:  # no module offers a unit to drop: no mask is scored (nor counted)
        nan = float("nan")
        return Choice({}, 0, FitSummary(nan, nan, nan, nan, None, None))
    fill = input_means(prior.stats) if profile.mask_fill == MaskFill.MEAN else None
    scores = score_masks(ckpt, calib, plan, per_module, wave=wave, fwd=fwd, soft=prior.teacher,
                         state=state, progress=progress, ranks=ranks, round_number=start.number, fill=fill)
    loss = scores.loss
    d = design_of(per_module, ranking if profile.prior_scope == PriorScope.GLOBAL else None)
    f = fit(d.x, -loss, prior=d.prior, kinds=d.kinds, estimator=profile.estimator, gen=gen,
            groups=d.groups if varied else None)
    beta_of = {d.owners[i]: float(f.beta[i]) for i in range(len(d.owners)) if f.informed[i]}
    if profile.allocation == "uniform":
        # Same widths as the baselines; the regression decides which units go.
        drop = select.per_module(list(start.modules), select.beta_orders(per_module, beta_of), start.share,
                                 profile.align)
    else:
        drop = select.global_by_beta(per_module, beta_of, start.budget, profile.align, whole=varied)
    log.info("regression: cv tau %.3f, penalty %g, module penalty %g, per-unit scale (attention group, "
             "MLP channel) %s", f.cv_tau, f.penalty, f.module_penalty, f.kind_scale)
    summary = FitSummary(float(loss.mean()), float(loss.std()), f.cv_tau, f.train_tau, f.penalty,
                         f.module_penalty if math.isfinite(f.module_penalty) else None)
    return Choice(drop, n_masks, summary, scores.tokens)


def sample_round(modules: list[Module], priors: Priors, p: float, n_masks: int, gen: torch.Generator,
                 varied: bool = False, skip_coarse: bool = True, ranking: Priors | None = None,
                 ) -> list[ModuleMasks]:
    """Eligible units and the keep-masks of every module for one round (``p``: share removed).

    Each module's eligible units are its lowest-prior 2p share, or, with ``ranking`` (scores
    comparable across layers, e.g. FLAP's), as many of its lowest-ranked units as a ranking of all
    units together puts among the lowest 2p of the parameters (:func:`global_eligible`), so the
    masks can probe, and the selection reach, very uneven widths.

    With ``skip_coarse``, a module too coarse to lose a unit at this round's rate (round(p * width)
    = 0, e.g. 3 KV groups at p = 0.1) is neither perturbed nor pruned: on SmolLM2, dropping one of
    the first layers' three KV groups multiplies the loss, and those few masks then dominate the
    scores' variance that the regression should spend on the units it can remove
    (tools/bench_regression.py). Without it (profile key ``coarse = "ranked"``, with a ranking)
    such a module's units compete in the cross-layer ranking like any other, so only the groups it
    puts among the lowest 2p of the parameters are perturbed.
    """
    skipped = [skip_coarse and round(p * m.n_units) == 0 for m in modules]
    if ranking is not None:
        counts = global_eligible(modules, ranking, p, skipped)
    out = []
    for i, m in enumerate(modules):
        prior = prior_of(priors, m)
        room = m.n_units - m.min_units
        # MLP modules offer at least two pieces of `align` channels: a small last round must still
        # have a whole piece to remove.
        least = 2 * m.piece
        if ranking is None:
            e = min(max(math.ceil(2 * p * m.n_units), least), room) if room >= 2 else 0
            e = 0 if skipped[i] else e
            elig = eligible_units(prior, n_eligible=e)
        else:
            e = min(max(counts[i], least), room) if counts[i] and room >= 2 else 0
            elig = eligible_units(prior_of(ranking, m), n_eligible=e)
        masks = sample_masks(prior, elig, n_units=m.n_units, n_masks=n_masks, gen=gen, varied=varied)
        if e and (ranking is None or m.kind != "mlp"):
            # Coarse modules (few large units) are perturbed only in some pairs, so each mask drops
            # about p of every module on average, as for fine modules. (A globally ranked MLP's
            # eligible share is what the ranking gives it: every pair perturbs it.)
            active = min(1.0, 2 * p * m.n_units / e)
            idle = torch.rand(n_masks // 2, generator=gen) >= active
            masks.view(n_masks // 2, 2, -1)[idle] = 1.0
        out.append(ModuleMasks(m, prior, elig, masks))
    return out


def global_eligible(modules: list[Module], ranking: Priors, p: float, skipped: list[bool]) -> list[int]:
    """Per module, how many of its units are among the lowest-ranked 2p of all parameters.

    All removable units of the modules not ``skipped`` are ranked together by score (lowest
    first) and taken until their parameters reach 2p of the model's; an MLP's count is rounded to
    the nearest multiple of its ``piece`` (the alignment), since it loses whole pieces.
    """
    units = []  # (score, module index, unit params)
    total = sum(m.n_units * m.unit_params for m in modules)
    for i, m in enumerate(modules):
        if skipped[i] or m.n_units <= m.min_units:
            continue
        scores = torch.sort(prior_of(ranking, m)).values[: m.n_units - m.min_units]
        units += [(float(v), i, m.unit_params) for v in scores.tolist()]
    units.sort(key=lambda t: t[:2])
    counts = [0] * len(modules)
    taken = 0.0
    for _, i, params in units:
        if taken >= 2 * p * total:
            break
        counts[i] += 1
        taken += params
    for i, m in enumerate(modules):
        if m.kind == "mlp" and counts[i]:
            counts[i] = m.piece * round(counts[i] / m.piece)
    return counts


def input_means(stats: tuple[ColumnStats, ...]) -> Fills:
    """Every layer's mean o_proj and down_proj input over the prior pass's tokens (mask_fill = mean)."""
    return ([(s.act.head_sum / max(s.act.tokens, 1)).float() for s in stats],
            [(s.act.chan_sum / max(s.act.tokens, 1)).float() for s in stats])


def mask_set(per_module: list[ModuleMasks], plan: Plan, a: int, b: int, fill: Fills | None = None) -> MaskSet:
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
    return MaskSet(head, chan) if fill is None else MaskSet(head, chan, *fill)


@dataclass(slots=True)
class Design:
    """The regression's view of a round: one column per eligible unit."""

    x: torch.Tensor  # (M, D) 1 = kept
    prior: torch.Tensor  # (D,) normalised to mean 1 within each module, or a rank in (0, 1]
    kinds: torch.Tensor  # (D,) 0 = attention unit, 1 = MLP channel
    groups: torch.Tensor  # (D,) index into per_module
    owners: list[tuple[int, int]]  # (index into per_module, local unit index) per column


def design_of(per_module: list[ModuleMasks], ranking: Priors | None = None) -> Design:
    """The masks' eligible columns and the regression's base prior for each.

    The base prior is each module's prior normalised to mean 1 over its eligible units, or, with
    ``ranking`` (scores comparable across layers), the unit's rank among all eligible units,
    scaled to (0, 1]: the regression then starts from the ranking's order across layers and the
    masks correct it.
    """
    cols, pri, kinds, groups, owners = [], [], [], [], []
    for idx, mm in enumerate(per_module):
        elig = mm.eligible
        if not elig.numel():
            continue
        cols.append(mm.masks[:, elig])
        if ranking is None:
            pe = mm.prior[elig]
            pri.append(pe / pe.mean().clamp_min(1e-30))  # mean 1 over the module's eligible units
        else:
            pri.append(prior_of(ranking, mm.module)[elig].double())  # ranked across modules below
        kinds.append(torch.full((elig.numel(),), 0 if mm.module.kind != "mlp" else 1))
        groups.append(torch.full((elig.numel(),), idx))
        owners += [(idx, int(u)) for u in elig]
    prior = torch.cat(pri)
    if ranking is not None:
        ranks = torch.empty_like(prior)
        ranks[torch.argsort(prior, stable=True)] = torch.arange(1, prior.numel() + 1, dtype=prior.dtype)
        prior = ranks / prior.numel()
    return Design(torch.cat(cols, 1), prior, torch.cat(kinds), torch.cat(groups), owners)


def wave_size(cfg: ModelConfig, calib: torch.Tensor, profile: Profile, device: torch.device) -> int:
    """Masks per streamed pass: the profile's, or the largest wave the memory planner fits."""
    fitted = profile.replace(calib_seqs=calib.shape[0], seq_len=calib.shape[1])
    return plan_memory(cfg, fitted, device_free_bytes=free_bytes(device)).wave_masks
