"""Shard writer for pruned models: source checkpoint + plan -> a new checkpoint folder.

Every output tensor's name, dtype and shape follow from the plan and the source's headers, so the
streaming :class:`~lowmem_bonsai.outputs.shards.ShardWriter` lays out all shards first; then, tensor
by tensor, read it from the source shards, slice it to the plan, write it at its offset, drop it. The
embedding, final norm and lm_head are copied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.block import head_rows
from ..model.checkpoint import TOKENIZER_FILES, Checkpoint
from ..model.plan import Plan
from ..model.tensors import LAYER_TENSORS, Dim
from .atomic import write_bytes_atomic
from .shards import DEFAULT_SHARD_BYTES, PlannedTensor, ShardWriter

log = logging.getLogger(__name__)



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


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class _Job:
    name: str  # in the source and in the output
    axis: int | None  # the sliced axis, if any
    index: torch.Tensor | None  # the kept rows (or columns) along it
    layer: int | None = None
    zeros: tuple[int, ...] | None = None  # a zero tensor of this shape, not in the source
    like: str | None = None  # (zeros) the source tensor whose dtype it takes


def _jobs(ckpt: Checkpoint, plan: Plan) -> list[_Job]:
    """Every output tensor in writing order, from the plan and the source's headers (nothing read)."""
    cfg = ckpt.config
    hd = cfg.head_dim
    zero_biases = biased_modules(ckpt, plan)
    jobs = [_Job(ckpt.name("embed"), None, None)]
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
                    size = len(index[spec.unit]) if spec.unit else cfg.hidden_size
                    jobs.append(_Job(name, None, None, layer, zeros=(size,),
                                     like=ckpt.name("attn_norm", layer)))  # in the source's dtype
                    continue
                if not spec.required(attention_bias=cfg.attention_bias):
                    continue
                ckpt.get(name)  # raises a UserError naming the missing tensor
            if spec.unit is None:
                jobs.append(_Job(name, None, None, layer))
            else:
                jobs.append(_Job(name, spec.slice_axis, index[spec.unit], layer))
    jobs.append(_Job(ckpt.name("final_norm"), None, None))
    if ckpt.has(ckpt.name("lm_head")):
        jobs.append(_Job(ckpt.name("lm_head"), None, None))
    return jobs


def _planned(ckpt: Checkpoint, job: _Job, dtype: torch.dtype | None) -> PlannedTensor:
    if job.zeros is not None:
        like = _SAFETENSORS_DTYPES[ckpt.tensors[job.like].dtype]
        return PlannedTensor(name=job.name, dtype=dtype or like, shape=job.zeros)
    info = ckpt.tensors[job.name]
    shape = list(info.shape)
    if job.axis is not None:
        shape[job.axis] = len(job.index)
    return PlannedTensor(name=job.name, dtype=dtype or _SAFETENSORS_DTYPES[info.dtype], shape=tuple(shape))


def write_pruned(ckpt: Checkpoint, plan: Plan, stage: Path, *, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 on_block: Callable[[int], None] | None = None) -> list[Path]:
    """Write the pruned weights into ``stage`` (a folder being built); returns the shard paths.

    Every tensor's header entry is known from the plan before any is read, so the writer holds one
    tensor at a time (the source's, its slice and its cast), never a shard's worth.
    """
    jobs = _jobs(ckpt, plan)
    planned_tensors = [_planned(ckpt, j, dtype) for j in jobs]
    writer = ShardWriter(stage, planned_tensors, max_shard_bytes=max_shard_bytes)
    done = {i: job.layer for i, job in enumerate(jobs)  # position of each layer's last tensor
            if job.layer is not None and (i + 1 == len(jobs) or jobs[i + 1].layer != job.layer)}
    try:
        for i, (job, planned) in enumerate(zip(jobs, planned_tensors)):
            t = torch.zeros(job.zeros, dtype=planned.dtype) if job.zeros is not None else ckpt.get(job.name)
            if job.axis is not None:
                t = t.index_select(job.axis, job.index)
            if dtype is not None:
                t = t.to(dtype)
            writer.add(job.name, t)
            del t
            if on_block is not None and i in done:
                on_block(done[i])
        return writer.close()
    except BaseException:
        writer.abort()
        raise
