"""The streaming safetensors writer: save_file's bytes, one tensor held at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.model.plan import LayerPlan, Plan
from lowmem_bonsai.outputs.shards import PlannedTensor, ShardWriter
from lowmem_bonsai.outputs.writer import write_pruned


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3):
        out[f"t.{(7 * i) % 9}.w"] = torch.randn(3 + i, 5, generator=g).to(dtype)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out["scalar.norm"] = torch.ones(7, dtype=torch.float16)  # an odd byte count: header padding
    return out


@pytest.mark.parametrize("reverse", [False, True])
def test_streamed_shards_are_the_bytes_save_file_writes(tmp_path, reverse):
    tensors = mixed_tensors()
    planned = [PlannedTensor(name=n, dtype=t.dtype, shape=tuple(t.shape)) for n, t in tensors.items()]
    w = ShardWriter(tmp_path, planned, max_shard_bytes=200)  # several shards
    for name in (reversed(list(tensors)) if reverse else tensors):  # any order: offsets are fixed
        w.add(name, tensors[name])
    paths = w.close()
    assert len(paths) > 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for path in paths:
        names = [n for n, shard in index["weight_map"].items() if shard == path.name]
        ref = tmp_path / "ref.safetensors"
        save_file({n: tensors[n] for n in names}, str(ref), metadata={"format": "pt"})
        assert path.read_bytes() == ref.read_bytes(), path.name
        loaded = load_file(str(path))
        assert all(torch.equal(loaded[n], tensors[n]) for n in names)
    assert not list(tmp_path.glob(".shard-*"))


def test_writer_refuses_what_was_not_declared(tmp_path):
    w = ShardWriter(tmp_path, [PlannedTensor(name="a", dtype=torch.float32, shape=(2, 3)),
                               PlannedTensor(name="b", dtype=torch.float16, shape=(4,))])
    with pytest.raises(ValueError, match="not declared"):
        w.add("c", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="declared"):
        w.add("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="declared"):
        w.add("b", torch.zeros(4))  # float32, not float16
    w.add("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="twice"):
        w.add("a", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()
    w.abort()
    assert list(tmp_path.iterdir()) == []  # the begun shard is gone
    with pytest.raises(ValueError, match="declared twice"):
        ShardWriter(tmp_path, [PlannedTensor(name="a", dtype=torch.float32, shape=(1,))] * 2)


def test_writer_holds_one_tensor_not_a_shard(tmp_path):
    """48 tensors of 8 MiB into one 2 GiB shard: after the allocator's slack of the first few
    tensors, the process's peak resident memory stops growing (a writer that buffered the shard
    would hold all 384 MiB)."""
    script = textwrap.dedent(f"""
        import resource, torch
        from lowmem_bonsai.outputs.shards import PlannedTensor, ShardWriter
        n, shape = 48, (1024, 2048)  # float32: 8 MiB each
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
        torch.full(shape, 1.0).sum()  # warm up the allocator and torch's kernels
        base = peak()
        w = ShardWriter({str(tmp_path)!r}, [PlannedTensor(name=f"t{{i}}", dtype=torch.float32, shape=shape)
                                            for i in range(n)])
        for i in range(n):
            w.add(f"t{{i}}", torch.full(shape, float(i)))
            if i == 11:
                mid = peak()
        w.close()
        print(mid - base, peak() - base)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    after_12, after_48 = map(float, res.stdout.split())
    assert after_48 - after_12 < 16, f"peak grew {after_48 - after_12:.0f} MiB over the last 36 tensors"
    assert after_48 < 12 * 8, f"peak grew {after_48:.0f} MiB while writing 48 tensors of 8 MiB"
    t = load_file(str(tmp_path / "model.safetensors"))
    assert len(t) == 48 and float(t["t47"][5, 7]) == 47.0


def test_write_pruned_is_save_file_of_the_sliced_tensors(tmp_path, tiny_llama):
    ckpt = Checkpoint(tiny_llama)
    cfg = ckpt.config
    dense = Plan.dense(cfg)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    layers = []
    for i, lp in enumerate(dense.layers):
        kv = lp.kv_heads[:1] if i == 0 else lp.kv_heads  # layer 0 keeps one KV group
        layers.append(LayerPlan(tuple(h for h in lp.heads if h // group in kv), kv, lp.channels[::3]))
    plan = Plan(layers=tuple(layers))
    out = tmp_path / "out"
    out.mkdir()
    [path] = write_pruned(ckpt, plan, out, dtype=torch.bfloat16)
    written = load_file(str(path))
    ref = tmp_path / "ref.safetensors"
    save_file(written, str(ref), metadata={"format": "pt"})
    assert path.read_bytes() == ref.read_bytes()
    down = ckpt.get(ckpt.name("down", 1))[:, list(plan.layers[1].channels)].to(torch.bfloat16)
    assert torch.equal(written[ckpt.name("down", 1)], down)
    assert written[ckpt.name("k", 0)].shape[0] == cfg.head_dim  # one KV head kept
