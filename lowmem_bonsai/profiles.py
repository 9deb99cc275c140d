"""Profiles: a machine's budget and the method's sampling settings, as data (TOML).

A profile is parsed into a frozen :class:`Profile`; unknown keys and wrong types are refused.
``--profile NAME`` looks in the package's ``profiles/`` folder, ``--profile FILE.toml`` reads a file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .settings import (AUTO, Allocation, CalibWindows, Coarse, DType, Eligible, Estimator, HeadUnit, MaskCounts,
                       MaskFill, Prior, PriorScope, Reconstruct, RepairTarget, Score, names, one_of)

# An installed wheel carries the profiles in the package (pyproject maps profiles/ to
# lowmem_bonsai/_profiles); a checkout reads the repository's top-level profiles/.
_PACKAGED = Path(__file__).resolve().parent / "_profiles"
PROFILE_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "profiles"
DEFAULT_PROFILE = "laptop-16gb"
_DTYPE_OR_AUTO = (AUTO, *names(DType))
# The profile keys that name a choice, and the names each allows.
CHOICES: dict[str, tuple[str, ...]] = {
    "compute_dtype": _DTYPE_OR_AUTO, "storage_dtype": _DTYPE_OR_AUTO, "reconstruct_dtype": _DTYPE_OR_AUTO,
    "prior": names(Prior),
    "estimator": names(Estimator), "head_unit": names(HeadUnit), "allocation": names(Allocation),
    "mask_counts": names(MaskCounts), "eligible": names(Eligible), "coarse": names(Coarse), "score": names(Score),
    "prior_scope": names(PriorScope), "mask_fill": names(MaskFill), "calib_windows": names(CalibWindows),
    "reconstruct": names(Reconstruct), "reconstruct_target": names(RepairTarget),
}


@dataclass(frozen=True, slots=True)
class Profile:
    name: str = "custom"
    description: str = ""
    # machine
    memory_gb: float = 16.0  # peak resident memory the run may use
    threads: int = 0  # 0: torch's default
    device: str = "cpu"  # cpu | cuda | cuda:N: where the masked forward computes
    device_memory_gb: float = 0.0  # GPU memory the run may use; 0 = 90% of what is free at start
    compute_dtype: str = AUTO  # auto (fastest matmul, measured) | float32 | bfloat16 | float16;
    #                              norms, softmax and losses stay fp32 whatever is chosen
    storage_dtype: str = AUTO  # dtype of the written shards; auto = the source's
    prefetch: int = 1  # blocks loaded ahead of the one computing
    chunk_tokens: int = 4096  # tokens per GEMM row chunk inside a block
    # method
    masks_per_round: int = 64  # sub-models scored per round (antithetic pairs: must be even)
    wave_masks: int = 0  # masks per streamed pass; 0 = sized from memory_gb
    calib_seqs: int = 8  # windows of seq_len tokens each sub-model (mask) is scored on
    prior_seqs: int = 0  # windows of seq_len tokens for each round's unmasked prior pass (priors,
    #                      FLAP's ranking); 0 = calib_seqs. Its first calib_seqs are the masks' windows
    seq_len: int = 256  # tokens per calibration window of the rounds (masks and prior pass)
    calib_windows: str = CalibWindows.FIRST.value  # first: the prior pass reads the text's first
    #                             prior_seqs windows (the masks the first calib_seqs of them); spread:
    #                             as many, evenly spaced over the text the prune reads (calib_span_tokens),
    #                             the masks' calib_seqs evenly spaced among them (only those move
    #                             where the prior's windows are all of it), so that the masks see
    #                             more than the text's first article
    prune_frac: float = 0.05  # fraction of the original non-embedding params removed per round
    align: int = 32  # kept MLP widths are multiples of this (quantization wants 32 or 256)
    min_width: float = 0.0  # every module (a layer's attention, its MLP) keeps at least this share of
    #                         its source width, rounded up to a whole unit (MLP: to align channels):
    #                         the methods choose uneven widths within that floor
    prior: str = Prior.WANDA.value  # see settings.Prior
    estimator: str = Estimator.LASSO.value  # lasso | ridge | prior (no per-unit correction: an ablation)
    head_unit: str = HeadUnit.GROUP.value  # group: a KV head with its query heads; query: the j-th query head of
    #                           every group (groups keep equal numbers of query heads)
    allocation: str = Allocation.GLOBAL.value  # global: units ranked by beta per parameter across modules (the
    #                             masks decide how much each layer loses); uniform: every module loses p
    score: str = Score.NLL.value  # what a sub-model is scored by: nll (of the calibration text's next tokens)
    #                     or kl (cross-entropy to the round's unpruned model's top-k distribution)
    mask_counts: str = MaskCounts.VARIED.value  # fixed: every mask drops half of each module's eligible units;
    #                             varied: a random count per module and pair, plus per-module scales
    #                             in the regression, so that layers' sensitivities are identifiable
    eligible: str = Eligible.MODULE.value  # which units the masks may drop: module (each module's
    #                             lowest-prior 2p share, so widths stay near-uniform) or global (all
    #                             units ranked together by FLAP's standardized fluctuation; the lowest
    #                             2p of the parameters, so the masks probe uneven widths)
    coarse: str = Coarse.SKIP.value  # a module too coarse to lose a unit at the round's rate (SmolLM2's
    #                             3 KV groups at p = 0.1): skip (left alone: bonsai never prunes its
    #                             attention) or ranked (eligible = global: its units join FLAP's
    #                             cross-layer ranking like every other unit)
    prior_scope: str = PriorScope.MODULE.value  # the regression's base (beta = scale x prior + a
    #                             correction): module (each module's prior normalised to mean 1, so
    #                             cross-layer differences come from the masks alone) or global (the
    #                             unit's rank among all eligible units by FLAP's score; eligible = global)
    mask_fill: str = MaskFill.ZERO.value  # what a sub-model's dropped unit feeds o_proj / down_proj:
    #                             zero, or mean (its mean over the round's calibration tokens: FLAP's
    #                             bias compensation in every sub-model, so the masks score what a
    #                             repair cannot restore)
    # reconstruction, after the units are chosen (reconstruct.py)
    reconstruct: str = "none"  # none | bias (FLAP's compensation) | lsq (ridge refit of the kept
    #                            columns of o_proj / down_proj and a bias)
    reconstruct_seqs: int = 64  # calibration windows for it (one pass, from the start of the text)
    reconstruct_seq_len: int = 256  # tokens per window of the repair's text
    reconstruct_ridge: float = 1e-3  # lsq's ridge, relative to the mean diagonal of the Gram matrix
    reconstruct_dtype: str = "float32"  # the repair's block matmuls (its passes through the blocks)
    #                             on the CPU: float32 | bfloat16 | float16 | auto (the CPU's fastest,
    #                             measured); the streams, the moments and the solves stay fp32 / fp64
    reconstruct_position_power: float = 0.0  # each token's share of the refit's squared error grows
    #                             as (its position in the window + 1) ** power, position 0 (the
    #                             attention sink) weighing as the last (mean 1): a stream error costs
    #                             more late in a window, where the model reads more context
    #                             (SmolLM2, power 1: better at 10-50 %; the profiles that reselect set it)
    reconstruct_gap_weight: float = 0.0  # a > 0: the repair runs twice; the second weighs each
    #                             token's error also by (1 - a) + a g / mean(g), g = how much more
    #                             the first repair's model loses on the next token than the dense
    #                             one (0 where it loses less): the refit spends itself where the
    #                             pruned model still loses (needs an explicit reconstruct_target;
    #                             twice the final repair's work, those between the rounds stay
    #                             single; quick sets 0.75: SmolLM2 10-50 %, docs/quality-history.md)
    reconstruct_sequential: bool = True  # inputs from the repaired earlier layers (else one-shot:
    #                                      statistics of the dense model, as FLAP takes them)
    reconstruct_target: str = RepairTarget.LAYER.value  # what a repaired projection reproduces:
    #                             layer (the unpruned projection on the pruned model's inputs), dense
    #                             (the dense model's output of it, on the dense model's inputs), stream
    #                             (the dense model's residual stream after it, so earlier layers' drift
    #                             is corrected too); dense and stream carry the dense model's stream
    #                             beside the pruned one (sequential only)
    reconstruct_unpruned: bool = False  # with target dense / stream: also refit the o_proj / down_proj
    #                                     of layers that lost nothing there (all columns)
    reconstruct_reselect: bool = False  # with lsq: the repair also chooses which MLP channels each
    #                                     layer keeps (as many as the plan keeps; the heads too with
    #                                     reconstruct_reselect_heads), by greedy structured OBS on its
    #                                     own moments; the widths stay the plan's
    #                                     (the final repair only: never those between the rounds)
    reconstruct_reselect_heads: bool = False  # with reconstruct_reselect: where the plan drops
    #                                     heads, the repair chooses those too; false keeps the plan's
    #                                     heads and reselects only the MLP channels (SmolLM2, FLAP's
    #                                     plans under quick's repair, test windows: heads kept 53.51 /
    #                                     63.89 / 138.56 at 20 / 30 / 50 % against 53.65 / 64.20 /
    #                                     136.93 reselected; 181.11 against 206.75 at 50 % without the
    #                                     position weighting; docs/quality-history.md)
    reconstruct_chat: float = 0.0  # share of the repair's windows whose text is written as chat
    #                                turns with the checkpoint's chat template (none without one),
    #                                so that the repair keeps what the template's tokens use
    reconstruct_chat_extra: bool = False  # the chat windows come on top of the reconstruct_seqs
    #                                       plain ones (the same text twice, as text and as chat
    #                                       turns) rather than in place of the last of them
    reconstruct_in_rounds: bool = False  # also repair the plan after every round but the last, so
    #                                     the next round's prior, masks and selection score the
    #                                     repaired model (the final repair is still refit from the
    #                                     source's weights; each in-round repair costs as much as it)
    # distributed (torchrun): how long a rank waits for the others at an exchange before it names
    # the ranks that did not come and stops; must exceed one wave's time (ranks wait for the slowest)
    dist_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a budget of inf or nan would plan nothing sensible
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"profile '{self.name}': {f.name} = {value} must be a finite number")
        checks = [
            (self.masks_per_round >= 2 and self.masks_per_round % 2 == 0,
             "masks_per_round must be an even number >= 2 (masks come in antithetic pairs)"),
            (0 < self.prune_frac <= 0.5, "prune_frac must be in (0, 0.5]"),
            (self.calib_seqs >= 1, "calib_seqs must be >= 1"),
            (self.seq_len >= 2, "seq_len must be >= 2"),
            (self.prior_seqs >= 0, "prior_seqs must be >= 0 (0: calib_seqs)"),
            (self.align >= 1, "align must be >= 1"),
            (0 <= self.min_width < 1, "min_width must be in [0, 1) (a share of each module's width)"),
            (self.chunk_tokens >= 1, "chunk_tokens must be >= 1"),
            *((getattr(self, key) in allowed, f"{key} must be {one_of(allowed)}")
              for key, allowed in CHOICES.items()),
            (re.fullmatch(r"cpu|cuda(:[0-9]+)?", self.device) is not None,
             "device must be cpu, cuda or cuda:N (N a GPU's index)"),
            (self.device_memory_gb >= 0, "device_memory_gb must be >= 0"),
            (self.reconstruct_seqs >= 1, "reconstruct_seqs must be >= 1"),
            (self.reconstruct_seq_len >= 2, "reconstruct_seq_len must be >= 2"),
            (self.reconstruct_ridge >= 0, "reconstruct_ridge must be >= 0"),
            (0 <= self.reconstruct_position_power <= 4, "reconstruct_position_power must be in [0, 4]"),
            (0 <= self.reconstruct_gap_weight <= 1, "reconstruct_gap_weight must be in [0, 1]"),
            (0 <= self.reconstruct_chat <= 1, "reconstruct_chat must be in [0, 1] (a share of the "
             "repair's windows)"),
            (self.reconstruct_target == RepairTarget.LAYER or self.reconstruct_sequential,
             f"reconstruct_target = \"{self.reconstruct_target}\" needs reconstruct_sequential = true "
             "(one-shot statistics are the dense model's: its target is the layer's own)"),
            (self.reconstruct_gap_weight == 0 or self.reconstruct_target != RepairTarget.LAYER,
             "reconstruct_gap_weight > 0 needs reconstruct_target = \"dense\" or \"stream\" (the dense "
             "model's losses come from its stream beside the repair's; reconstruct_gap_weight = 0 repairs once)"),
            (self.reconstruct != Reconstruct.BIAS or not self.reconstruct_reselect,
             "reconstruct_reselect = true needs reconstruct = \"lsq\" (it chooses from the Gram matrix)"),
            (self.reconstruct_reselect or not self.reconstruct_reselect_heads,
             "reconstruct_reselect_heads = true needs reconstruct_reselect = true (the heads are chosen "
             "with the channels)"),
            (self.reconstruct != Reconstruct.NONE or not self.reconstruct_in_rounds,
             "reconstruct_in_rounds = true needs reconstruct = bias or lsq (the repair it runs "
             "between the rounds)"),
            (self.dist_timeout_s > 0, "dist_timeout_s must be > 0"),
            (self.coarse == Coarse.SKIP or self.eligible == Eligible.GLOBAL,
             "coarse = \"ranked\" needs eligible = \"global\" (the cross-layer ranking)"),
            (self.prior_scope == PriorScope.MODULE or self.eligible == Eligible.GLOBAL,
             "prior_scope = \"global\" needs eligible = \"global\" (the cross-layer ranking)"),
            (self.memory_gb > 0 and self.prefetch >= 0 and self.threads >= 0 and self.wave_masks >= 0,
             "memory_gb > 0, prefetch >= 0, threads >= 0, wave_masks >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"profile '{self.name}': {msg}")

    @property
    def prior_windows(self) -> int:
        """Windows of the prior pass: prior_seqs, at least calib_seqs (the masks' windows)."""
        return max(self.prior_seqs, self.calib_seqs)

    @property
    def calib_span_tokens(self) -> int:
        """Tokens from the start of the calibration text that a prune reads: the prior pass's windows,
        or the repair's text where that is longer (its reconstruct_seqs windows, read whether or not
        this profile repairs, so that ``calib_windows = "spread"`` picks the same windows either way)."""
        return max(self.prior_windows * self.seq_len, self.reconstruct_seqs * self.reconstruct_seq_len)

    def tokens_read(self, repair: bool) -> int:
        """Tokens from the start of the calibration text that a prune reads, with or without its
        repair: the span where it repairs or spreads its windows, else the prior pass's windows."""
        if repair or self.calib_windows == CalibWindows.SPREAD:
            return self.calib_span_tokens
        return self.prior_windows * self.seq_len

    @property
    def chat_seqs(self) -> int:
        """The repair's windows written as chat turns, at most (none without a chat template)."""
        return min(self.reconstruct_seqs, round(self.reconstruct_chat * self.reconstruct_seqs))

    @property
    def repair_seqs(self) -> int:
        """The repair's windows, at most: reconstruct_seqs, and the chat windows on top of them with
        reconstruct_chat_extra."""
        return self.reconstruct_seqs + (self.chat_seqs if self.reconstruct_chat_extra else 0)

    def rounds_for(self, sparsity: float) -> int:
        """Rounds to reach ``sparsity`` at prune_frac per round (the last one may be smaller)."""
        return math.ceil(sparsity / self.prune_frac - 1e-9)

    def with_repair(self, mode: str | None) -> Profile:
        """This profile repairing with ``mode`` (none | bias | lsq; None keeps its own). Choosing
        the channels needs lsq's Gram matrix, so ``bias`` also turns reconstruct_reselect (and
        reconstruct_reselect_heads) off (a profile file that sets both is refused instead: there
        the choice is the file's)."""
        if mode is None:
            return self
        off = False if mode == Reconstruct.BIAS else None
        return self.replace(reconstruct=mode, reconstruct_reselect=off, reconstruct_reselect_heads=off)

    def replace(self, **changes: Any) -> Profile:
        """The profile with the ``changes`` that are not None (a command's flags); a value the
        checks refuse is named as the flag that gave it."""
        changes = {k: v for k, v in changes.items() if v is not None}
        try:
            return dataclasses.replace(self, **changes)
        except UserError as exc:
            flags = [f"--{k.replace('_', '-')} {v}" for k, v in changes.items()
                     if re.search(rf"(?<!\w){k}(?!\w)", str(exc))]  # the key itself, not a longer one
            if not flags:
                raise
            raise UserError(f"{exc} (given by {', '.join(flags)})") from None


def parse_profile(data: dict[str, Any], *, source: str, name: str) -> Profile:
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    kwargs: dict[str, Any] = {"name": name}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{source}: unknown key '{key}'; known keys: {', '.join(sorted(fields))}")
        want = type(getattr(Profile(), key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            kind = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(
                want.__name__, f"a {want.__name__}")
            raise UserError(f"{source}: '{key}' = {value!r} should be {kind}")
        kwargs[key] = value
    return Profile(**kwargs)


def profile_names() -> list[str]:
    """The shipped profiles, by name."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(spec: str | Path | None) -> Profile:
    """A profile by name (from profiles/) or by path; None gives the default profile."""
    spec = str(spec) if spec is not None else DEFAULT_PROFILE
    path = Path(spec)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{spec}.toml"
        if not path.is_file():
            raise UserError(f"profile '{spec}' not found; known profiles: {', '.join(profile_names())} "
                            "(or pass a path to a .toml file)")
    if not path.is_file():
        raise UserError(f"{path}: profile file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    return parse_profile(data, source=str(path), name=path.stem)
