"""Shard writer for pruned models: source checkpoint + plan -> a new checkpoint folder.

Block by block: read one block's tensors from the source shards, slice them to the plan, hand them to
:class:`~lowmem_bonsai.outputs.shards.ShardWriter`, drop them. The embedding, final norm and lm_head are copied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..engine.block import head_rows
from ..model.checkpoint import Checkpoint
from ..model.plan import Plan
from ..model.tensors import LAYER_TENSORS, Dim
from .atomic import write_bytes_atomic
from .shards import DEFAULT_SHARD_BYTES, ShardWriter

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json",
)


def pruned_config(ckpt: Checkpoint, plan: Plan) -> dict:
    """The source's config.json plus per-layer widths (scalars too when the widths are uniform)."""
    cfg = ckpt.config.with_layers(plan.shapes())
    raw = cfg.to_json()
    if cfg.is_uniform:  # then transformers itself can load the pruned model
        s = cfg.layers[0]
        raw["num_attention_heads"] = s.num_attention_heads
        raw["num_key_value_heads"] = s.num_key_value_heads
        raw["intermediate_size"] = s.intermediate_size
        for module, key in _HF_BIAS_FLAGS.items():
            if biased_modules(ckpt, plan)[module]:
                raw[key] = True
    return raw


# transformers' Llama gives every projection of a module a bias, or none: attention_bias (q, k, v,
# o) and mlp_bias (gate, up, down). A reconstruction adds only o_proj / down_proj biases.
_HF_BIAS_FLAGS = {"attn": "attention_bias", "mlp": "mlp_bias"}


def biased_modules(ckpt: Checkpoint, plan: Plan) -> dict[str, bool]:
    """Per module ("attn", "mlp"): whether the output of a uniform-width plan gives all of its
    projections biases (zeros where the source has none), so that transformers loads it.

    False everywhere for uneven widths (transformers cannot load those; our executor and llama.cpp
    take the biases that exist).
    """
    out = {m: False for m in _HF_BIAS_FLAGS}
    if not ckpt.config.with_layers(plan.shapes()).is_uniform:
        return out
    for module in out:
        out[module] = any(ckpt.has(ckpt.name(spec.key, layer))
                          for spec in LAYER_TENSORS if spec.is_bias and spec.module == module
                          for layer in range(len(plan.layers)))
    return out


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():  # a few MB at most: read whole, written atomically
            write_bytes_atomic(Path(dst) / name, (Path(src) / name).read_bytes())
            copied.append(name)
    return copied


def write_pruned(ckpt: Checkpoint, plan: Plan, stage: Path, *, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 on_block: Callable[[int], None] | None = None) -> list[Path]:
    """Write the pruned weights into ``stage`` (a folder being built); returns the shard paths."""
    cfg = ckpt.config
    hd = cfg.head_dim
    writer = ShardWriter(stage, max_shard_bytes=max_shard_bytes)
    zero_biases = biased_modules(ckpt, plan)

    def put(name: str, t: torch.Tensor) -> None:
        writer.add(name, t.to(dtype) if dtype is not None else t)

    put(ckpt.name("embed"), ckpt.get(ckpt.name("embed")))
    for layer, keep in enumerate(plan.layers):
        index = {  # the kept rows (or columns) of each unit kind
            Dim.HEADS: head_rows(keep.heads, hd),
            Dim.KV_HEADS: head_rows(keep.kv_heads, hd),
            Dim.CHANNELS: torch.tensor(keep.channels, dtype=torch.long),
        }
        for spec in LAYER_TENSORS:
            name = ckpt.name(spec.key, layer)
            if not ckpt.has(name):
                if spec.is_bias and zero_biases[spec.module]:  # see biased_modules
                    like = ckpt.get(ckpt.name("attn_norm", layer))  # (H,): the source's dtype
                    put(name, like.new_zeros(len(index[spec.unit]) if spec.unit else like.numel()))
                    continue
                if not spec.required(attention_bias=cfg.attention_bias):
                    continue
                ckpt.get(name)  # raises a UserError naming the missing tensor
            t = ckpt.get(name)
            if spec.unit is not None:
                t = t.index_select(spec.slice_axis, index[spec.unit]).contiguous()
            put(name, t)
        if on_block is not None:
            on_block(layer)
    put(ckpt.name("final_norm"), ckpt.get(ckpt.name("final_norm")))
    if ckpt.has(ckpt.name("lm_head")):
        put(ckpt.name("lm_head"), ckpt.get(ckpt.name("lm_head")))
    return writer.close()
