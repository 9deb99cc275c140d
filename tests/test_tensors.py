"""The tensor table against what transformers and llama.cpp's converter call each tensor."""

from __future__ import annotations

import gguf
import pytest

from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.model.tensors import TENSORS, Dim, dim_sizes

from .conftest import make_tiny


def test_every_tensor_of_every_family_is_a_row_with_its_shape(tmp_path, family):
    model = make_tiny(tmp_path, family)
    cfg = Checkpoint(tmp_path).config
    sizes = dim_sizes(vocab=cfg.vocab_size, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                      kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                      channels=cfg.intermediate_size)
    expected = {}
    for spec in TENSORS:
        if not spec.required(attention_bias=cfg.attention_bias):
            continue
        if spec.key == "lm_head" and cfg.tie_word_embeddings:
            continue
        for layer in range(cfg.num_hidden_layers) if spec.per_layer else [None]:
            expected[spec.hf.format(layer)] = spec.shape(sizes)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    assert actual == expected


@pytest.mark.parametrize("spec", TENSORS, ids=lambda s: s.key)
def test_gguf_names_are_llama_cpp_s(spec):
    # gguf-py's own table for the llama architecture, "{bid}" for the layer
    known = {name.replace("{bid}", "{}") for t, name in gguf.TENSOR_NAMES.items()
             if t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]}
    stem, _, suffix = spec.gguf.rpartition(".")
    assert stem in known and suffix in ("weight", "bias")


def test_slices_follow_the_unit_dims():
    by_key = {s.key: s for s in TENSORS}
    assert (by_key["q"].unit, by_key["q"].slice_axis) == (Dim.HEADS, 0)
    assert (by_key["o"].unit, by_key["o"].slice_axis) == (Dim.HEADS, 1)
    assert (by_key["v_bias"].unit, by_key["v_bias"].slice_axis) == (Dim.KV_HEADS, 0)
    assert (by_key["down"].unit, by_key["down"].slice_axis) == (Dim.CHANNELS, 1)
    assert by_key["down_bias"].unit is None and by_key["attn_norm"].unit is None
    assert {s.key for s in TENSORS if s.rotary} == {"q", "q_bias", "k", "k_bias"}
