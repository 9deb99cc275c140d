"""Mask sampler: which units each sub-model of a round drops.

Per module (one layer's attention or MLP) only the eligible units are ever dropped: the lowest-prior
2p share of the module, or (``eligible = "global"``, prune.sample_round) the module's units among
the lowest 2p of all parameters in FLAP's cross-layer ranking. Masks come in antithetic pairs: the first drops ``n_drop`` eligible units drawn without
replacement with probability proportional to (max prior - prior), its partner drops the rest of the
eligible set. Every unit thus appears dropped in exactly half of the masks, which decorrelates the
regression's features.

With ``varied`` counts, ``n_drop`` is drawn afresh for every pair and module (uniform on 0..eligible),
so how much of each module a sub-model loses varies from mask to mask. With fixed counts every mask
loses the same share of every module, and the regression cannot tell a sensitive layer from a robust
one: the module totals are constant, so only within-module differences are identifiable.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from ..model.config import ModelConfig
from ..model.plan import Plan
from ..profiles import Profile


@dataclass(frozen=True, slots=True)
class Module:
    """A group of same-sized units whose widths the plan changes together."""

    layer: int
    kind: str  # "attn" (units = KV groups) or "mlp" (units = channels)
    n_units: int  # current width
    unit_params: int  # parameters removed with one unit
    min_units: int  # never prune below this (exportability, the profile's min_width)
    piece: int = 1  # units that go together (MLP: align channels, so kept widths stay aligned)


def profile_modules(config: ModelConfig, plan: Plan, profile: Profile) -> list[Module]:
    """:func:`modules_of` with the profile's align, head unit and floor: the modules a prune with
    ``profile`` selects from (the tools call this too, so none of them forgets the floor)."""
    return modules_of(config, plan, profile.align, profile.head_unit, profile.min_width)


def modules_of(config: ModelConfig, plan: Plan, align: int, head_unit: str = "group",
               min_width: float = 0.0) -> list[Module]:
    """Attention and MLP (channels) of every layer, with their unit sizes.

    Attention units are KV groups ("attn": a KV head with its query heads) or, with
    ``head_unit="query"``, query-head slots ("heads": the j-th kept query head of every group, so
    every group keeps the same number, as llama.cpp requires).

    ``min_width``: every module keeps at least this share of its width in ``config`` (the source),
    rounded up to a whole unit (MLP: to a multiple of ``align``), and never less than one unit
    (one piece of ``align`` channels).
    """
    h, hd = config.hidden_size, config.head_dim
    bias = config.attention_bias

    def floor(source_units: int, step: int = 1) -> int:  # min_width of a source width, whole steps
        return step * max(1, math.ceil(min_width * source_units / step - 1e-9))

    out = []
    for layer, (lp, src) in enumerate(zip(plan.layers, config.layers)):
        n_kv = len(lp.kv_heads)
        q = len(lp.heads) // max(n_kv, 1)  # query heads per group now
        if head_unit == "query":
            q_src = src.num_attention_heads // max(src.num_key_value_heads, 1)
            out.append(Module(layer, "heads", q, n_kv * (2 * hd * h + (hd if bias else 0)),
                              min_units=min(q, floor(q_src))))
        else:
            group_params = (2 * q + 2) * hd * h + ((q + 2) * hd if bias else 0)
            out.append(Module(layer, "attn", n_kv, group_params,
                              min_units=min(n_kv, floor(src.num_key_value_heads))))
        width = len(lp.channels)
        piece = min(align, width)
        out.append(Module(layer, "mlp", width, 3 * h, min_units=min(width, floor(src.intermediate_size, align)),
                          piece=piece))
    return out


def eligible_units(prior: torch.Tensor, *, n_eligible: int) -> torch.Tensor:
    """Indices of the ``n_eligible`` lowest-prior units, ascending by index.  # (n_eligible,)"""
    if n_eligible <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.argsort(prior, stable=True)[:n_eligible]).values


def sample_masks(prior: torch.Tensor, eligible: torch.Tensor, *, n_units: int, n_masks: int,
                 gen: torch.Generator, varied: bool = False) -> torch.Tensor:
    """Keep-masks of one module for ``n_masks`` sub-models (pairs).  # (n_masks, n_units) float32

    Row 2i drops some of the eligible units (half, or a random count when ``varied``), row 2i+1
    drops the rest.
    """
    masks = torch.ones(n_masks, n_units)
    e = eligible.numel()
    if e < 2:
        return masks
    n_drop = e // 2
    p = prior[eligible].double()
    weight = (p.max() - p) + 1e-6 * (p.max() - p.min() + 1e-12) + 1e-12  # (e,) never all zero
    for i in range(0, n_masks, 2):
        if varied:
            n_drop = int(torch.randint(0, e + 1, (1,), generator=gen))
        first = torch.zeros(e, dtype=torch.bool)
        if n_drop:
            first[torch.multinomial(weight, n_drop, replacement=False, generator=gen)] = True
        masks[i, eligible[first]] = 0
        if i + 1 < n_masks:
            masks[i + 1, eligible[~first]] = 0
    return masks
