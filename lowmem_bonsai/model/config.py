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
import math
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


# Sizes beyond these are not a model but a corrupt or hostile config.json (and would make the
# per-layer table below, or the plan built from it, absurdly large).
MAX_LAYERS = 4096
MAX_WIDTH = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(cfg: dict[str, Any], key: str, source: str, *, default: int | None = None,
         maximum: int = MAX_WIDTH) -> int:
    """A positive integer at ``key`` (absent or null: ``default``; no default: required)."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise UserError(f"{source}: key '{key}' is missing; a Llama-family config.json has it")
        return default
    if not _is_int(value):
        raise UserError(f"{source}: '{key}' is {value!r}, expected a positive integer")
    if not 1 <= value <= maximum:
        raise UserError(f"{source}: '{key}' is {value}, expected a positive integer of at most "
                        f"{maximum}; the config is corrupt")
    return value


def _positive(cfg: dict[str, Any], key: str, source: str, *, default: float) -> float:
    """A positive finite number at ``key`` (absent or null: ``default``)."""
    value = cfg.get(key)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{source}: '{key}' is {value!r}, expected a positive finite number")
    return float(value)


def _bool(cfg: dict[str, Any], key: str, source: str, *, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"{source}: '{key}' is {value!r}, expected true or false")
    return value


def _dict(cfg: dict[str, Any], key: str, source: str) -> dict[str, Any] | None:
    value = cfg.get(key)
    if value is not None and not isinstance(value, dict):
        raise UserError(f"{source}: '{key}' is {value!r}, expected an object or null")
    return value


def _rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from either the classic keys or transformers 5's rope_parameters."""
    params = _dict(cfg, "rope_parameters", source)
    scaling = _dict(cfg, "rope_scaling", source)
    theta = _positive(cfg, "rope_theta", source, default=10000.0)
    if params is not None:
        theta = _positive(params, "rope_theta", f"{source}: rope_parameters", default=theta)
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if not isinstance(scaling["rope_type"], str):
            raise UserError(f"{source}: rope_scaling's 'rope_type' is {scaling['rope_type']!r}, "
                            "expected a string such as \"llama3\"")
        if scaling["rope_type"] == "default":
            return theta, None
    return theta, scaling


def _check_scaling(scaling: dict[str, Any] | None, source: str) -> None:
    """The numbers of a supported rope scaling (linear, llama3) are positive and finite."""
    for key, value in (scaling or {}).items():
        if key not in ("rope_type", "type") and (not _is_number(value) or not math.isfinite(value)
                                                 or value <= 0):
            raise UserError(f"{source}: rope_scaling's '{key}' is {value!r}, expected a positive "
                            "finite number")


def _per_layer(cfg: dict[str, Any], n_layers: int, source: str) -> list[list[int]] | None:
    """The three per-layer width lists of a pruned checkpoint, checked; None when absent."""
    lists = [cfg.get(k) for k in PER_LAYER_KEYS]
    if all(v is None for v in lists):
        return None
    for key, value in zip(PER_LAYER_KEYS, lists):
        if not isinstance(value, list) or len(value) != n_layers:
            raise UserError(f"{source}: '{key}' must be a list of {n_layers} integers "
                            f"(num_hidden_layers), like the other per-layer keys "
                            f"{', '.join(k for k in PER_LAYER_KEYS if k != key)}")
        for i, v in enumerate(value):  # 0: the prune removed the whole module
            if not _is_int(v) or not 0 <= v <= MAX_WIDTH:
                raise UserError(f"{source}: '{key}'[{i}] is {v!r}, expected an integer >= 0")
    return lists


def parse_config(cfg: dict[str, Any], *, source: str) -> ModelConfig:
    """Every value the executor uses, type- and range-checked once; a bad one is a UserError naming it."""
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise UserError(f"{source}: 'architectures' is {archs!r}; expected e.g. [\"LlamaForCausalLM\"]")
    model_type = cfg.get("model_type", "")
    if not isinstance(model_type, str):
        raise UserError(f"{source}: 'model_type' is {model_type!r}, expected a string")
    hidden = _int(cfg, "hidden_size", source)
    n_layers = _int(cfg, "num_hidden_layers", source, maximum=MAX_LAYERS)
    n_heads = _int(cfg, "num_attention_heads", source, maximum=hidden)
    n_kv = _int(cfg, "num_key_value_heads", source, default=n_heads, maximum=n_heads)
    if n_heads % n_kv:
        raise UserError(
            f"{source}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}"
        )
    if cfg.get("head_dim") is None and hidden % n_heads:
        raise UserError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads="
                        f"{n_heads} and there is no 'head_dim'; the config is corrupt")
    head_dim = _int(cfg, "head_dim", source, default=hidden // n_heads)
    if head_dim % 2:
        raise UserError(f"{source}: 'head_dim' is {head_dim}, expected an even number (rotary "
                        "embeddings rotate pairs)")
    ffn = _int(cfg, "intermediate_size", source)
    vocab = _int(cfg, "vocab_size", source)
    theta, scaling = _rope(cfg, source)
    per_layer = _per_layer(cfg, n_layers, source)
    if per_layer is not None:
        layers = tuple(LayerShape(a, b, c) for a, b, c in zip(*per_layer))
    else:
        layers = tuple(LayerShape(n_heads, n_kv, ffn) for _ in range(n_layers))
    for i, s in enumerate(layers):
        if s.num_key_value_heads == 0 and s.num_attention_heads or (
                s.num_key_value_heads and s.num_attention_heads % s.num_key_value_heads):
            raise UserError(
                f"{source}: layer {i} has {s.num_attention_heads} query heads for "
                f"{s.num_key_value_heads} KV heads; the first must be a multiple of the second"
            )
    for key in ("attention_bias", "use_sliding_window"):
        _bool(cfg, key, source, default=False)
    if cfg.get("sliding_window") is not None:
        _int(cfg, "sliding_window", source)
    from .adapters import adapter_for, check_rope  # adapters import this module

    adapter = adapter_for(archs[0], source=source)
    check_rope(scaling, source=source)
    _check_scaling(scaling, source)
    window = adapter.sliding_window(cfg)
    return ModelConfig(
        architecture=archs[0],
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=ffn,
        vocab_size=vocab,
        rms_norm_eps=_positive(cfg, "rms_norm_eps", source, default=1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int(cfg, "max_position_embeddings", source, default=2048),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", source, default=False),
        attention_bias=adapter.attention_bias(cfg),
        sliding_window=window,
        layers=layers,
        raw=dict(cfg),
    )


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        what = "is a file, not a folder" if Path(model_dir).exists() else "no such folder"
        raise UserError(f"{model_dir}: {what}; expected a checkpoint folder with config.json")
    if not path.is_file():
        raise UserError(
            f"{path}: missing; a checkpoint folder needs config.json (a GGUF can be converted with "
            "'lowmem-bonsai import-gguf')"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return parse_config(cfg, source=str(path))
