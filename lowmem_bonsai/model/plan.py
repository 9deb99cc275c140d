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
