"""Slicing units out of blocks, and masking them, must equal removing them from the dense model."""

from __future__ import annotations

import os
import signal
import threading

import pytest
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


def test_mean_fill_equals_removal_with_flaps_bias(tmp_path):
    """mask_fill = mean: a dropped unit's input to o_proj / down_proj is a constant f, which is the
    plan's slicing plus the bias W[:, removed] f on o_proj and down_proj (FLAP's compensation)."""
    import shutil

    from safetensors.torch import load_file, save_file

    make_tiny(tmp_path / "m", "llama-gqa-tied")
    ckpt = Checkpoint(tmp_path / "m")
    cfg = ckpt.config
    plan = plan_for(cfg.num_attention_heads, cfg.num_key_value_heads)
    g = torch.Generator().manual_seed(5)
    n, hd, f_width = cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    head_fill = [torch.randn(n * hd, generator=g) for _ in plan.layers]
    chan_fill = [torch.randn(f_width, generator=g) for _ in plan.layers]
    head = [torch.zeros(1, n) for _ in plan.layers]
    chan = [torch.zeros(1, f_width) for _ in plan.layers]
    # The same model with the compensation as biases, sliced by the plan.
    shutil.copytree(tmp_path / "m", tmp_path / "b")
    (path,) = (tmp_path / "b").glob("*.safetensors")
    tensors = load_file(path)
    for l, lp in enumerate(plan.layers):
        head[l][0, list(lp.heads)] = 1
        chan[l][0, list(lp.channels)] = 1
        for proj, mask, fill in (("self_attn.o_proj", head[l][0].repeat_interleave(hd), head_fill[l]),
                                 ("mlp.down_proj", chan[l][0], chan_fill[l])):
            w = tensors[f"model.layers.{l}.{proj}.weight"]
            tensors[f"model.layers.{l}.{proj}.bias"] = (w.double() @ ((1 - mask) * fill).double()).to(w.dtype)
    save_file(tensors, path)
    tokens = torch.randint(0, 211, (2, 24), generator=torch.Generator().manual_seed(6))
    filled = streamed_nll(ckpt, tokens, masks=MaskSet(head, chan, head_fill, chan_fill))[0]
    biased = streamed_nll(Checkpoint(tmp_path / "b"), tokens, plan=plan)[0]
    torch.testing.assert_close(filled, biased, rtol=1e-5, atol=0)
    zeroed = streamed_nll(ckpt, tokens, masks=MaskSet(head, chan))[0]
    assert (filled - zeroed).abs().max() > 1e-3  # the fill does change the sub-model


def test_streamer_holds_at_most_prefetch_plus_one(tmp_path):
    make_tiny(tmp_path, "llama-mha-untied", layers=5)
    ckpt = Checkpoint(tmp_path)
    for prefetch in (0, 1, 2):
        streamer = BlockStreamer(ckpt, plan=None, dtype=torch.float32, prefetch=prefetch)
        seen = [w.layer for w in streamer]
        assert seen == list(range(5))
        assert streamer.max_resident == prefetch + 1
        assert streamer.resident == 0


def test_ctrl_c_as_the_loader_thread_starts_loads_nothing_after_it(tmp_path, monkeypatch):
    """A Ctrl-C that lands just after the pool started its loader thread, before the pool registered
    it (so nothing joins that thread): the thread must have no block to load. One left loading was
    still in torch while the interpreter finalized, and the prune aborted (SIGABRT) instead of exiting
    130 (tests/test_resume.py's Ctrl-C test, about 1 run in 12 on a loaded 2-core machine)."""
    make_tiny(tmp_path, "llama-mha-untied", layers=3)
    streamer = BlockStreamer(Checkpoint(tmp_path), plan=None, dtype=torch.float32, prefetch=1)
    load, loaded = streamer._load, []

    def recorded_load(layer: int):
        loaded.append(layer)
        return load(layer)

    start = threading.Thread.start

    def start_then_interrupt(thread: threading.Thread) -> None:
        start(thread)
        if thread.name.startswith("block-loader"):
            os.kill(os.getpid(), signal.SIGINT)  # raised in the pool's submit, before it registers the thread

    monkeypatch.setattr(streamer, "_load", recorded_load)
    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a runner may ignore SIGINT
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in streamer:
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
    for thread in threading.enumerate():
        if thread.name.startswith("block-loader"):
            thread.join(timeout=30)  # the pool's shutdown told it to stop
            assert not thread.is_alive()
    assert loaded == []


def test_unit_stats_sum_in_fp64_slices_and_take_a_layer_without_heads(monkeypatch):
    """The prior's statistics are fp64 sums over every token, taken a slice of rows at a time; a layer
    whose heads are all gone passes a (tokens, 0) attention input."""
    import lowmem_bonsai.engine.block as block

    gen = torch.Generator().manual_seed(0)
    attn, act = torch.randn(3, 50, 8, generator=gen), torch.randn(3, 50, 12, generator=gen)
    whole = block.UnitStats(*(torch.zeros(n, dtype=torch.float64) for n in (8, 8, 12, 12)))
    whole.add(attn, act)
    monkeypatch.setattr(block, "STATS_ELEMENTS", 40)  # a few rows a slice
    sliced = block.UnitStats(*(torch.zeros(n, dtype=torch.float64) for n in (8, 8, 12, 12)))
    sliced.add(attn, act)
    for x, ref in ((attn, sliced.head_sum), (act, sliced.chan_sum)):
        torch.testing.assert_close(ref, x.reshape(-1, x.shape[-1]).double().sum(0))
    torch.testing.assert_close(sliced.chan_sq, act.reshape(-1, 12).double().square().sum(0))
    torch.testing.assert_close(sliced.head_sq, whole.head_sq)
    assert sliced.tokens == whole.tokens == 150
    no_heads = block.UnitStats(*(torch.zeros(n, dtype=torch.float64) for n in (0, 0, 12, 12)))
    no_heads.add(act.new_zeros(150, 0), act)
    assert no_heads.tokens == 150
    torch.testing.assert_close(no_heads.chan_sum, sliced.chan_sum)
