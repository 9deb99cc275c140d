"""The tensor table: every weight of a Llama-family model, once (gguf-py's ``MODEL_TENSOR`` idea).

One :class:`TensorSpec` per role gives its Hugging Face name, its GGUF name, its shape in units of
the model's geometry, and from that shape which unit kind slices it along which axis, and whether
llama.cpp reorders its rows for rotary embeddings. The adapters' name tables, the GGUF import and
export and the shard writer all read it; a new role (a bias, say) is one more row.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Dim(StrEnum):
    """One axis of a tensor, in units of the model's geometry."""

    VOCAB = "vocab"
    HIDDEN = "hidden"
    HEADS = "heads"  # query heads x head_dim (rows of q_proj, columns of o_proj)
    KV_HEADS = "kv_heads"  # KV heads x head_dim
    CHANNELS = "channels"  # MLP intermediate channels


# The axes that pruning shrinks: a unit kind of the plan for each.
UNIT_DIMS = (Dim.HEADS, Dim.KV_HEADS, Dim.CHANNELS)


class Presence(StrEnum):
    """When a model has a tensor of this role."""

    ALWAYS = "always"
    ATTENTION_BIAS = "attention_bias"  # the q/k/v biases: when the config's attention_bias is set
    OPTIONAL = "optional"  # used when the checkpoint has it (written by the shard writer and
    #                        exported to GGUF as it is, or sliced along its unit dim)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor role. Names are templates: "{}" is the layer index."""

    key: str  # the executor's name for it
    hf: str
    gguf: str
    dims: tuple[Dim, ...]  # torch order
    presence: Presence = Presence.ALWAYS
    rotary: bool = False  # rows are heads rotated by rope: llama.cpp wants each head's halves interleaved
    module: str = ""  # "attn" or "mlp" for a projection of a block (its weight or bias)

    @property
    def per_layer(self) -> bool:
        return "{}" in self.hf

    @property
    def is_bias(self) -> bool:
        return self.key.endswith("_bias")

    @property
    def unit(self) -> Dim | None:
        """The unit kind that slices this tensor (None: pruning keeps it whole)."""
        return next((d for d in self.dims if d in UNIT_DIMS), None)

    @property
    def slice_axis(self) -> int:
        """The axis :attr:`unit` slices."""
        return self.dims.index(self.unit) if self.unit is not None else 0

    def required(self, *, attention_bias: bool) -> bool:
        """Whether a model with these settings must have this tensor (OPTIONAL: used when present)."""
        if self.presence is Presence.ATTENTION_BIAS:
            return attention_bias
        return self.presence is Presence.ALWAYS

    def shape(self, sizes: dict[Dim, int]) -> tuple[int, ...]:
        """Torch-order shape, given the size of every dim (see :func:`dim_sizes`)."""
        return tuple(sizes[d] for d in self.dims)


def dim_sizes(*, vocab: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
              channels: int) -> dict[Dim, int]:
    """The size of every :class:`Dim` for one layer's widths (heads counted in heads)."""
    return {Dim.VOCAB: vocab, Dim.HIDDEN: hidden, Dim.HEADS: heads * head_dim,
            Dim.KV_HEADS: kv_heads * head_dim, Dim.CHANNELS: channels}


V, H, Q, KV, F = Dim.VOCAB, Dim.HIDDEN, Dim.HEADS, Dim.KV_HEADS, Dim.CHANNELS
_ATTN_BIAS, _OPTIONAL = Presence.ATTENTION_BIAS, Presence.OPTIONAL
_L = "model.layers.{}."

# In GGUF file order (the exporter writes them in this order, layer by layer).
TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec("embed", "model.embed_tokens.weight", "token_embd.weight", (V, H)),
    TensorSpec("attn_norm", _L + "input_layernorm.weight", "blk.{}.attn_norm.weight", (H,)),
    TensorSpec("q", _L + "self_attn.q_proj.weight", "blk.{}.attn_q.weight", (Q, H), rotary=True,
               module="attn"),
    TensorSpec("q_bias", _L + "self_attn.q_proj.bias", "blk.{}.attn_q.bias", (Q,), _ATTN_BIAS,
               rotary=True, module="attn"),
    TensorSpec("k", _L + "self_attn.k_proj.weight", "blk.{}.attn_k.weight", (KV, H), rotary=True,
               module="attn"),
    TensorSpec("k_bias", _L + "self_attn.k_proj.bias", "blk.{}.attn_k.bias", (KV,), _ATTN_BIAS,
               rotary=True, module="attn"),
    TensorSpec("v", _L + "self_attn.v_proj.weight", "blk.{}.attn_v.weight", (KV, H), module="attn"),
    TensorSpec("v_bias", _L + "self_attn.v_proj.bias", "blk.{}.attn_v.bias", (KV,), _ATTN_BIAS,
               module="attn"),
    TensorSpec("o", _L + "self_attn.o_proj.weight", "blk.{}.attn_output.weight", (H, Q), module="attn"),
    # o_proj / down_proj biases: none in the source families; a reconstruction adds them.
    # gate / up biases: HF Llama's mlp_bias (zeros where our writer adds them for transformers)
    TensorSpec("o_bias", _L + "self_attn.o_proj.bias", "blk.{}.attn_output.bias", (H,), _OPTIONAL,
               module="attn"),
    TensorSpec("mlp_norm", _L + "post_attention_layernorm.weight", "blk.{}.ffn_norm.weight", (H,)),
    TensorSpec("gate", _L + "mlp.gate_proj.weight", "blk.{}.ffn_gate.weight", (F, H), module="mlp"),
    TensorSpec("gate_bias", _L + "mlp.gate_proj.bias", "blk.{}.ffn_gate.bias", (F,), _OPTIONAL,
               module="mlp"),
    TensorSpec("up", _L + "mlp.up_proj.weight", "blk.{}.ffn_up.weight", (F, H), module="mlp"),
    TensorSpec("up_bias", _L + "mlp.up_proj.bias", "blk.{}.ffn_up.bias", (F,), _OPTIONAL,
               module="mlp"),
    TensorSpec("down", _L + "mlp.down_proj.weight", "blk.{}.ffn_down.weight", (H, F), module="mlp"),
    TensorSpec("down_bias", _L + "mlp.down_proj.bias", "blk.{}.ffn_down.bias", (H,), _OPTIONAL,
               module="mlp"),
    TensorSpec("final_norm", "model.norm.weight", "output_norm.weight", (H,)),
    TensorSpec("lm_head", "lm_head.weight", "output.weight", (V, H)),
)
SPECS: dict[str, TensorSpec] = {s.key: s for s in TENSORS}
LAYER_TENSORS = tuple(s for s in TENSORS if s.per_layer)
# What the executor, the shard writer and the exporter use: every row.
USED = TENSORS
