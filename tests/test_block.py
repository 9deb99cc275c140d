"""Slicing units out of blocks, and masking them, must equal removing them from the dense model."""

from __future__ import annotations

import torch

from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.engine.forward import MaskSet, streamed_nll
from lowmem_bonsai.model.plan import LayerPlan, Plan
from lowmem_bonsai.engine.streamer import BlockStreamer

from .conftest import hf_nll, make_tiny, zero_removed

# Per layer: kept KV groups (query heads follow their group) and kept channels.
KEEP = [((0,), (1, 5, 7, 30, 95)), ((0, 1), tuple(range(0, 96, 3))), ((1,), (2,))]


def plan_for(n_heads: int, n_kv: int) -> Plan:
    group = n_heads // n_kv
    layers = []
    for kv, ch in KEEP:
        kv = tuple(k for k in kv if k < n_kv)
        heads = tuple(h for h in range(n_heads) if h // group in kv)
        layers.append(LayerPlan(heads, kv, ch))
    return Plan(tuple(layers))


def test_sliced_forward_equals_removed_units(tmp_path, family):
    model = make_tiny(tmp_path, family)
    ckpt = Checkpoint(tmp_path)
    cfg = ckpt.config
    plan = plan_for(cfg.num_attention_heads, cfg.num_key_value_heads)
    plan.validate(cfg)
    tokens = torch.randint(0, 211, (2, 24), generator=torch.Generator().manual_seed(3))
    sliced = streamed_nll(ckpt, tokens, plan=plan)[0]
    zero_removed(model, plan, cfg.head_dim)
    torch.testing.assert_close(sliced, hf_nll(model, tokens), rtol=1e-4, atol=0)


def test_masks_equal_slicing_and_rows_are_independent(tmp_path):
    make_tiny(tmp_path, "llama-gqa-tied")
    ckpt = Checkpoint(tmp_path)
    cfg = ckpt.config
    plan = plan_for(cfg.num_attention_heads, cfg.num_key_value_heads)
    tokens = torch.randint(0, 211, (2, 24), generator=torch.Generator().manual_seed(4))
    # mask 0 keeps everything, mask 1 keeps exactly the plan's units
    head = [torch.ones(2, cfg.num_attention_heads) for _ in range(cfg.num_hidden_layers)]
    chan = [torch.ones(2, cfg.intermediate_size) for _ in range(cfg.num_hidden_layers)]
    for l, lp in enumerate(plan.layers):
        head[l][1] = 0
        head[l][1, list(lp.heads)] = 1
        chan[l][1] = 0
        chan[l][1, list(lp.channels)] = 1
    # small chunks so that rows of both masks share chunks
    out = streamed_nll(ckpt, tokens, masks=MaskSet(head, chan), chunk_tokens=24 * 3)
    torch.testing.assert_close(out[0], streamed_nll(ckpt, tokens)[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[1], streamed_nll(ckpt, tokens, plan=plan)[0], rtol=1e-5, atol=0)


def test_streamer_holds_at_most_prefetch_plus_one(tmp_path):
    make_tiny(tmp_path, "llama-mha-untied", layers=5)
    ckpt = Checkpoint(tmp_path)
    for prefetch in (0, 1, 2):
        streamer = BlockStreamer(ckpt, plan=None, dtype=torch.float32, prefetch=prefetch)
        seen = [w.layer for w in streamer]
        assert seen == list(range(5))
        assert streamer.max_resident == prefetch + 1
        assert streamer.resident == 0
