"""Mask-evaluation throughput, side by side in one run: this executor against the in-memory way.

The same masks on the same tokens of the same checkpoint, each way in its own process under
../shared/bin/memcap (so peak memory is measured by the kernel, not estimated):

- ``stream``:   this project's executor, weights streamed from the shards, all masks of a wave per block;
- ``ram``:      the same executor with every tensor read into RAM first (isolates the cost of streaming);
- ``inmemory``: the reference code's way: the whole model in transformers, one mask at a time,
                zero-masking forward pre-hooks on o_proj and down_proj;
- ``accelerate``: transformers + accelerate disk offload (weights paged from an offload folder).

    python tools/make_checkpoint.py tinyllama-1.1b runs/tinyllama-random
    python tools/bench_throughput.py runs/tinyllama-random --masks 8 --out runs/bench_throughput.json

On a GPU (tools/check_cuda.sh): ``--device cuda --dtype bfloat16``; every way then computes there.
``--op-profile``: where this executor's time goes instead (torch.profiler, GEMM share and rate).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lowmem_bonsai.model.checkpoint import Checkpoint  # noqa: E402
from lowmem_bonsai.engine.forward import MaskSet, streamed_nll  # noqa: E402
from lowmem_bonsai.engine.device import resolve_device, synchronize  # noqa: E402
from lowmem_bonsai.engine.memory import measure_matmul_gflops  # noqa: E402

MEMCAP = ROOT.parent / "shared" / "bin" / "memcap"


def inputs(cfg, masks: int, seqs: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, min(cfg.vocab_size, 30000), (seqs, seq_len), generator=g)
    head = [(torch.rand(masks, s.num_attention_heads, generator=g) > 0.1).float() for s in cfg.layers]
    chan = [(torch.rand(masks, s.intermediate_size, generator=g) > 0.1).float() for s in cfg.layers]
    return tokens, MaskSet(head, chan)


class RamCheckpoint(Checkpoint):
    """A Checkpoint whose tensors were all read into RAM up front."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self._ram = {name: super(RamCheckpoint, self).get(name) for name in self.tensors}

    def get(self, name, *, expect=None, rows=None):
        t = self._ram[name]
        return t if rows is None else t[rows]


def run_way(way: str, model: Path, masks: int, seqs: int, seq_len: int, device: str = "cpu",
            dtype: str = "float32") -> dict:
    torch.manual_seed(0)
    dev = resolve_device(device)
    dt = getattr(torch, dtype)
    ckpt = Checkpoint(model)
    cfg = ckpt.config
    tokens, maskset = inputs(cfg, masks, seqs, seq_len)
    start = time.perf_counter()
    if way in ("stream", "ram"):
        if way == "ram":
            ckpt = RamCheckpoint(model)
            start = time.perf_counter()  # loading into RAM is not part of mask evaluation
        nll = streamed_nll(ckpt, tokens, masks=maskset, chunk_tokens=4096, device=dev, dtype=dt).sum(1)
    else:
        from transformers import AutoModelForCausalLM

        if way == "inmemory":
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=dt).eval().to(dev)
        else:
            from accelerate import disk_offload

            hf = AutoModelForCausalLM.from_pretrained(model, dtype=dt).eval()
            offload = tempfile.mkdtemp(prefix="offload-")
            disk_offload(hf, offload_dir=offload, execution_device=dev)
        tokens = tokens.to(dev)
        synchronize(dev)
        start = time.perf_counter()
        nll = torch.zeros(masks, dtype=torch.float64)
        hd = cfg.head_dim
        for m in range(masks):
            hooks = []
            for l, layer in enumerate(hf.model.layers):
                hm = maskset.head[l][m].repeat_interleave(hd).to(device=dev, dtype=dt)
                cm = maskset.channel[l][m].to(device=dev, dtype=dt)
                hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
                    lambda mod, args, hm=hm: (args[0] * hm,)))
                hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                    lambda mod, args, cm=cm: (args[0] * cm,)))
            with torch.no_grad():
                logits = hf(tokens).logits.float()
            nll[m] = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").double().cpu()
            for h in hooks:
                h.remove()
    synchronize(dev)
    seconds = time.perf_counter() - start
    flops_per_token = 2 * (cfg.non_embedding_params() + cfg.vocab_size * cfg.hidden_size) + sum(
        2 * s.num_attention_heads * cfg.head_dim * seq_len for s in cfg.layers)
    flops = masks * seqs * seq_len * flops_per_token
    peaks = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if dev.type == "cuda":
        peaks["device_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 1024**3
    return {"way": way, "device": str(dev), "dtype": dtype, "masks": masks, "seconds": seconds, **peaks,
            "masks_per_s": masks / seconds,
            "gflops_achieved": flops / seconds / 1e9, "nll": nll.tolist()}


def op_profile(a) -> None:
    """Share of the executor's time in GEMMs, and their rate (GEMM FLOPs / GEMM time)."""
    from torch.profiler import ProfilerActivity, profile

    ckpt = RamCheckpoint(a.model)
    cfg = ckpt.config
    tokens, maskset = inputs(cfg, a.masks, a.seqs, a.seq_len)
    streamed_nll(ckpt, tokens[:, :16], masks=None)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        streamed_nll(ckpt, tokens, masks=maskset, chunk_tokens=4096)
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops)
    gemm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))
    flops = a.masks * a.seqs * a.seq_len * 2 * cfg.non_embedding_params() + \
        a.masks * a.seqs * (a.seq_len - 1) * 2 * cfg.vocab_size * cfg.hidden_size  # projections + lm_head
    rate = measure_matmul_gflops(torch.float32, seconds=2.0, n=2048, k=2048)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    print(f"GEMMs: {gemm / total:.0%} of the time, {flops / (gemm / 1e6) / 1e9:.0f} GFLOP/s "
          f"(matmul rate measured now: {rate:.0f} GFLOP/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--masks", type=int, default=8)
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ways", nargs="+", default=["stream", "ram", "inmemory", "accelerate"])
    ap.add_argument("--cap", default="20G", help="memcap limit for every way")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (every way computes there)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_throughput.json"))
    ap.add_argument("--op-profile", action="store_true",
                    help="instead: where this executor's time goes (torch.profiler over one pass from RAM)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one way, print JSON
    a = ap.parse_args()
    if a.op_profile:
        op_profile(a)
        return
    if a.one:
        print(json.dumps(run_way(a.one, a.model, a.masks, a.seqs, a.seq_len, a.device, a.dtype)))
        return
    rows = []
    for way in a.ways:
        with tempfile.NamedTemporaryFile(suffix=".json") as mc:
            cmd = [sys.executable, __file__, str(a.model),
                   "--masks", str(a.masks), "--seqs", str(a.seqs), "--seq-len", str(a.seq_len),
                   "--device", a.device, "--dtype", a.dtype, "--one", way]
            if MEMCAP.exists():  # not on a lent GPU machine: there the rows' own peaks must do
                cmd = [str(MEMCAP), "--json", mc.name, a.cap, "--"] + cmd
            proc = subprocess.run(cmd, capture_output=True, text=True)
            mem = json.loads(Path(mc.name).read_text() or "{}") if Path(mc.name).stat().st_size else {}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "way": way, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
        row["memcap"] = mem
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "nll"}), flush=True)
    dev = resolve_device(a.device)
    cpu_size = dict(n=2048, k=2048) if dev.type == "cpu" else {}
    rate = measure_matmul_gflops(getattr(torch, a.dtype), seconds=2.0, device=dev, **cpu_size)
    ok = [r for r in rows if "error" not in r]
    ref = next((r for r in ok if r["way"] == "inmemory"), None)
    for r in ok:
        r["fraction_of_matmul_rate"] = r["gflops_achieved"] / rate
        if ref:
            r["speedup_vs_inmemory"] = r["masks_per_s"] / ref["masks_per_s"]
            r["max_nll_rel_diff_vs_inmemory"] = max(
                abs(x - y) / abs(y) for x, y in zip(r["nll"], ref["nll"]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model.name, "device": str(dev), "dtype": a.dtype,
                                 "matmul_gflops": rate, "rows": rows}, indent=2))
    print(f"matmul rate {a.dtype} on {dev}: {rate:.0f} GFLOP/s; wrote {a.out}")


if __name__ == "__main__":
    main()
