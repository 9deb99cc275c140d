"""Model geometry, read from a checkpoint's config.json.

Field names are the Hugging Face keys. A pruned checkpoint written by lowmem-bonsai keeps the source's
keys and adds three per-layer arrays (documented in the README):

- ``num_attention_heads_per_layer``: query heads kept in each layer,
- ``num_key_value_heads_per_layer``: KV heads kept in each layer,
- ``intermediate_size_per_layer``: MLP channels kept in each layer.

Without them every layer has the scalar widths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..settings import DType

# Compute and storage dtypes by the names config.json, profiles and flags use.
DTYPES: dict[str, torch.dtype] = {d.value: getattr(torch, d.value) for d in DType}

PER_LAYER_KEYS = (
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
    "intermediate_size_per_layer",
)


@dataclass(frozen=True, slots=True)
class LayerShape:
    """Widths of one transformer block."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What the executor needs to know about a decoder-only model (HF key names)."""

    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    layers: tuple[LayerShape, ...]
    raw: dict[str, Any]

    @property
    def queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_uniform(self) -> bool:
        return all(layer == self.layers[0] for layer in self.layers)

    def layer_params(self, layer: int) -> int:
        """Weights of block ``layer`` (norms excluded, biases included)."""
        s = self.layers[layer]
        hd, h = self.head_dim, self.hidden_size
        attn = (2 * s.num_attention_heads + 2 * s.num_key_value_heads) * hd * h
        if self.attention_bias:
            attn += (s.num_attention_heads + 2 * s.num_key_value_heads) * hd
        return attn + 3 * h * s.intermediate_size

    def non_embedding_params(self) -> int:
        """Parameters of all blocks: what sparsity is measured against (norms excluded)."""
        return sum(self.layer_params(i) for i in range(self.num_hidden_layers))

    def with_layers(self, layers: list[LayerShape]) -> ModelConfig:
        """This geometry with new per-layer widths (the result of pruning)."""
        raw = dict(self.raw)
        raw["num_attention_heads_per_layer"] = [s.num_attention_heads for s in layers]
        raw["num_key_value_heads_per_layer"] = [s.num_key_value_heads for s in layers]
        raw["intermediate_size_per_layer"] = [s.intermediate_size for s in layers]
        raw["head_dim"] = self.head_dim
        return parse_config(raw, source="<pruned>")

    def to_json(self) -> dict[str, Any]:
        return dict(self.raw)


def _need(cfg: dict[str, Any], key: str, kind: type, source: str) -> Any:
    if key not in cfg:
        raise UserError(f"{source}: key '{key}' is missing; a Llama-family config.json has it")
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise UserError(f"{source}: '{key}' is {value!r}, expected {kind.__name__}")
    return value


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from either the classic keys or transformers 5's rope_parameters."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if theta is None:
        theta = 10000.0
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), scaling


def parse_config(cfg: dict[str, Any], *, source: str) -> ModelConfig:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise UserError(f"{source}: 'architectures' is missing; expected e.g. [\"LlamaForCausalLM\"]")
    hidden = _need(cfg, "hidden_size", int, source)
    n_layers = _need(cfg, "num_hidden_layers", int, source)
    n_heads = _need(cfg, "num_attention_heads", int, source)
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or hidden // n_heads
    ffn = _need(cfg, "intermediate_size", int, source)
    if n_heads % n_kv:
        raise UserError(
            f"{source}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}"
        )
    theta, scaling = _rope(cfg)
    per_layer = [cfg.get(k) for k in PER_LAYER_KEYS]
    if any(v is not None for v in per_layer):
        if any(not isinstance(v, list) or len(v) != n_layers for v in per_layer):
            raise UserError(
                f"{source}: {', '.join(PER_LAYER_KEYS)} must all be lists of {n_layers} integers"
            )
        layers = tuple(LayerShape(int(a), int(b), int(c)) for a, b, c in zip(*per_layer))
    else:
        layers = tuple(LayerShape(n_heads, n_kv, ffn) for _ in range(n_layers))
    for i, s in enumerate(layers):
        if s.num_key_value_heads and s.num_attention_heads % s.num_key_value_heads:
            raise UserError(
                f"{source}: layer {i} has {s.num_attention_heads} query heads for "
                f"{s.num_key_value_heads} KV heads; the first must be a multiple of the second"
            )
    from .adapters import adapter_for, check_rope  # adapters import this module

    adapter = adapter_for(str(archs[0]), source=source)
    check_rope(scaling, source=source)
    window = adapter.sliding_window(cfg)
    return ModelConfig(
        architecture=str(archs[0]),
        model_type=str(cfg.get("model_type", "")),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=int(head_dim),
        intermediate_size=ffn,
        vocab_size=_need(cfg, "vocab_size", int, source),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=adapter.attention_bias(cfg),
        sliding_window=window,
        layers=layers,
        raw=dict(cfg),
    )


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: not a directory; expected a checkpoint folder with config.json")
    if not path.is_file():
        raise UserError(
            f"{path}: missing; a checkpoint folder needs config.json (a GGUF can be converted with "
            "'lowmem-bonsai import-gguf')"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return parse_config(cfg, source=str(path))
