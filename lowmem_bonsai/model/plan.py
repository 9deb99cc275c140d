"""Pruning decisions as data: which heads, KV heads and MLP channels each layer keeps.

The plan is written as ``plan.json`` next to every pruned output; the block loader, the shard
writer, the GGUF exporter and the tests all read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config import LayerShape, ModelConfig

PLAN_VERSION = 1

# Units to remove: local (current) indices per (layer, kind), kind "attn", "heads" or "mlp".
Drop = dict[tuple[int, str], list[int]]


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """Original indices of the units one layer keeps, in increasing order."""

    heads: tuple[int, ...]  # query heads
    kv_heads: tuple[int, ...]  # KV heads (each kept query head's KV head is among them)
    channels: tuple[int, ...]  # MLP intermediate channels

    def shape(self) -> LayerShape:
        return LayerShape(len(self.heads), len(self.kv_heads), len(self.channels))


@dataclass(frozen=True, slots=True)
class Plan:
    layers: tuple[LayerPlan, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def dense(cls, config: ModelConfig) -> Plan:
        return cls(tuple(
            LayerPlan(tuple(range(s.num_attention_heads)), tuple(range(s.num_key_value_heads)),
                      tuple(range(s.intermediate_size)))
            for s in config.layers
        ))

    def shapes(self) -> list[LayerShape]:
        return [lp.shape() for lp in self.layers]

    def params(self, config: ModelConfig) -> int:
        """Non-embedding parameters of ``config`` pruned to this plan."""
        return config.with_layers(self.shapes()).non_embedding_params()

    def without(self, config: ModelConfig, drop: Drop) -> Plan:
        """This plan less the units ``drop`` names by local (current) index, per (layer, kind).

        Kinds: ``attn`` (KV groups, with their query heads), ``heads`` (query-head slots: slot j
        is the j-th kept query head of every group) and ``mlp`` (channels).
        """
        qpk = config.queries_per_kv
        layers = []
        for layer, lp in enumerate(self.layers):
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
        return Plan(tuple(layers), self.meta)

    def validate(self, config: ModelConfig) -> None:
        """Check the plan fits the model it prunes (indices in range, GQA groups consistent)."""
        if len(self.layers) != config.num_hidden_layers:
            raise UserError(f"plan has {len(self.layers)} layers, the model {config.num_hidden_layers}")
        for i, (lp, s) in enumerate(zip(self.layers, config.layers)):
            group = s.num_attention_heads // max(s.num_key_value_heads, 1)
            for name, idx, n in (("heads", lp.heads, s.num_attention_heads),
                                 ("kv_heads", lp.kv_heads, s.num_key_value_heads),
                                 ("channels", lp.channels, s.intermediate_size)):
                if list(idx) != sorted(set(idx)) or (idx and not 0 <= idx[0] <= idx[-1] < n):
                    raise UserError(f"plan layer {i}: {name} must be distinct sorted indices below {n}")
            if {h // group for h in lp.heads} - set(lp.kv_heads):
                raise UserError(f"plan layer {i}: a kept query head's KV head is not kept")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            **self.meta,
            "layers": [
                {"heads": list(lp.heads), "kv_heads": list(lp.kv_heads), "channels": list(lp.channels)}
                for lp in self.layers
            ],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, source: str = "plan.json") -> Plan:
        try:
            if obj.get("version") != PLAN_VERSION:
                raise UserError(f"{source}: plan version {obj.get('version')!r}, expected {PLAN_VERSION}")
            layers = tuple(
                LayerPlan(tuple(int(h) for h in lp["heads"]), tuple(int(h) for h in lp["kv_heads"]),
                          tuple(int(c) for c in lp["channels"]))
                for lp in obj["layers"]
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{source}: not a valid plan ({exc!r})") from None
        meta = {k: v for k, v in obj.items() if k not in ("version", "layers")}
        return cls(layers, meta)

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")), source=str(path))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise UserError(f"{path}: cannot read plan ({exc})") from None
