"""Every choice a user names (a method, a prior, a dtype, ...), defined once.

Profile validation, the library's checks and the CLI's help all read these: a new choice is one
more member here. Members are strings (``StrEnum``), so profiles and flags use the plain names.
"""

from __future__ import annotations

from enum import StrEnum


class Setting(StrEnum):
    """A named choice; each member may carry a few words of help for ``--help``."""

    def __new__(cls, value: str, help: str = "") -> Setting:
        member = str.__new__(cls, value)
        member._value_ = value
        member.help = help
        return member


class Method(Setting):
    BONSAI = "bonsai", "regression on sub-model losses"
    PRIOR = "prior", "structured Wanda"
    MAGNITUDE = "magnitude"
    RANDOM = "random"
    FLAP = "flap", ("FLAP's fluctuation scores ranked across all layers, the whole target in one round "
                    "(small top-ups where it ends short)")


class Reconstruct(Setting):
    """What repairs the kept weights once the units are chosen (reconstruct.py)."""

    NONE = "none"
    BIAS = "bias", "the removed inputs' mean as a bias, FLAP's compensation"
    LSQ = "lsq", "ridge least-squares refit of o_proj / down_proj and a bias"


class RepairTarget(Setting):
    """What a repaired projection is fitted to reproduce (reconstruct.py)."""

    LAYER = "layer", "the unpruned projection on the pruned model's own inputs"
    DENSE = "dense", "the dense model's projection output, on the dense model's inputs"
    STREAM = "stream", "the dense model's residual stream after the projection"


class Prior(Setting):
    WANDA = "wanda"
    MAGNITUDE = "magnitude"
    FLUCTUATION = "fluctuation"
    RANDOM = "random"


class Estimator(Setting):
    RIDGE = "ridge"
    LASSO = "lasso"
    PRIOR = "prior", "fit only per-kind/per-module scales"


class HeadUnit(Setting):
    GROUP = "group", "whole KV groups"
    QUERY = "query", "the same query heads from every group"


class Allocation(Setting):
    UNIFORM = "uniform", "every module loses the round's share"
    GLOBAL = "global", "units ranked by estimated loss per parameter across modules"


class Eligible(Setting):
    MODULE = "module", "each module's lowest-prior 2p share"
    GLOBAL = "global", "FLAP's scores ranked across all layers: the lowest 2p of the parameters"


class Coarse(Setting):
    """What the masks do with a module too coarse to lose a unit at the round's rate
    (round(p x units) = 0, e.g. 3 KV groups at p = 0.1): prune.sample_round."""

    SKIP = "skip", "leave it alone: never perturbed, never pruned"
    RANKED = "ranked", ("rank its units with all others (eligible = global): those among the lowest 2p "
                        "of the parameters are perturbed and may go")


class PriorScope(Setting):
    MODULE = "module", "each module's prior normalised to mean 1"
    GLOBAL = "global", "the eligible units' rank in the cross-layer ranking (needs eligible = global)"


class MaskFill(Setting):
    ZERO = "zero", "a dropped unit's output is 0"
    MEAN = "mean", "a dropped unit's o_proj / down_proj input is its mean (FLAP's compensation)"


class MaskCounts(Setting):
    FIXED = "fixed", "every mask drops half of each module's eligible units"
    VARIED = "varied", "random counts, so layer sensitivities are identifiable"


class CalibWindows(Setting):
    """Which windows of the calibration text the prior pass and the masks read (pipeline.py)."""

    FIRST = "first", "the text's first windows"
    SPREAD = "spread", ("windows evenly spaced over the text the prune reads (the repair's too), the "
                        "masks' own evenly spaced among them")


class Score(Setting):
    NLL = "nll", "calibration text"
    KL = "kl", "to the unpruned model's top-64"


class DType(Setting):
    """Compute and storage dtypes by the names config.json, profiles and flags use."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


AUTO = "auto"  # a profile's compute_dtype (fastest measured) or storage_dtype (the source's)


def names(kind: type[Setting]) -> tuple[str, ...]:
    """The members' names, in definition order."""
    return tuple(m.value for m in kind)


def one_of(kind: type[Setting] | tuple[str, ...], *, helped: bool = False) -> str:
    """"a, b or c" (with ``helped``, each followed by its help in parentheses)."""
    items = [f"{m} ({m.help})" if helped and getattr(m, "help", "") else str(m) for m in kind]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]
