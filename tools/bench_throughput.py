"""Mask-evaluation throughput, side by side in one run: this executor against the in-memory way.

The same masks on the same tokens of the same checkpoint, each way in its own process under
../shared/bin/memcap (so peak memory is measured by the kernel, not estimated):

- ``stream``:   this project's executor, weights streamed from the shards, all masks of a wave per block;
- ``ram``:      the same executor with every tensor read into RAM first (isolates the cost of streaming);
- ``inmemory``: the reference code's way: the whole model in transformers, one mask at a time,
                zero-masking forward pre-hooks on o_proj and down_proj;
- ``accelerate``: transformers + accelerate disk offload (weights paged from an offload folder).

    python tools/make_checkpoint.py tinyllama-1.1b /work/scratch/tinyllama-random
    python tools/bench_throughput.py /work/scratch/tinyllama-random --masks 8 --out runs/bench_throughput.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lowmem_bonsai.checkpoint import Checkpoint  # noqa: E402
from lowmem_bonsai.forward import MaskSet, streamed_nll  # noqa: E402
from lowmem_bonsai.memory import measure_matmul_gflops  # noqa: E402

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


def run_way(way: str, model: Path, masks: int, seqs: int, seq_len: int) -> dict:
    torch.manual_seed(0)
    ckpt = Checkpoint(model)
    cfg = ckpt.config
    tokens, maskset = inputs(cfg, masks, seqs, seq_len)
    start = time.perf_counter()
    if way in ("stream", "ram"):
        if way == "ram":
            ckpt = RamCheckpoint(model)
            start = time.perf_counter()  # loading into RAM is not part of mask evaluation
        nll = streamed_nll(ckpt, tokens, masks=maskset, chunk_tokens=4096).sum(1)
    else:
        from transformers import AutoModelForCausalLM

        if way == "inmemory":
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        else:
            from accelerate import disk_offload

            hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
            offload = tempfile.mkdtemp(prefix="offload-")
            disk_offload(hf, offload_dir=offload, execution_device="cpu")
        start = time.perf_counter()
        nll = torch.zeros(masks, dtype=torch.float64)
        hd = cfg.head_dim
        for m in range(masks):
            hooks = []
            for l, layer in enumerate(hf.model.layers):
                hm = maskset.head[l][m].repeat_interleave(hd)
                cm = maskset.channel[l][m]
                hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
                    lambda mod, args, hm=hm: (args[0] * hm,)))
                hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
                    lambda mod, args, cm=cm: (args[0] * cm,)))
            with torch.no_grad():
                logits = hf(tokens).logits.float()
            nll[m] = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").double()
            for h in hooks:
                h.remove()
    seconds = time.perf_counter() - start
    flops_per_token = 2 * (cfg.non_embedding_params() + cfg.vocab_size * cfg.hidden_size) + sum(
        2 * s.num_attention_heads * cfg.head_dim * seq_len for s in cfg.layers)
    flops = masks * seqs * seq_len * flops_per_token
    return {"way": way, "masks": masks, "seconds": seconds, "masks_per_s": masks / seconds,
            "gflops_achieved": flops / seconds / 1e9, "nll": nll.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--masks", type=int, default=8)
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ways", nargs="+", default=["stream", "ram", "inmemory", "accelerate"])
    ap.add_argument("--cap", default="20G", help="memcap limit for every way")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_throughput.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one way, print JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_way(a.one, a.model, a.masks, a.seqs, a.seq_len)))
        return
    rows = []
    for way in a.ways:
        with tempfile.NamedTemporaryFile(suffix=".json") as mc:
            cmd = [str(MEMCAP), "--json", mc.name, a.cap, "--", sys.executable, __file__, str(a.model),
                   "--masks", str(a.masks), "--seqs", str(a.seqs), "--seq-len", str(a.seq_len), "--one", way]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            mem = json.loads(Path(mc.name).read_text() or "{}") if Path(mc.name).stat().st_size else {}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "way": way, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
        row["memcap"] = mem
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "nll"}), flush=True)
    rate = measure_matmul_gflops(torch.float32, n=2048, k=2048, seconds=2.0)
    ok = [r for r in rows if "error" not in r]
    ref = next((r for r in ok if r["way"] == "inmemory"), None)
    for r in ok:
        r["fraction_of_matmul_rate"] = r["gflops_achieved"] / rate
        if ref:
            r["speedup_vs_inmemory"] = r["masks_per_s"] / ref["masks_per_s"]
            r["max_nll_rel_diff_vs_inmemory"] = max(
                abs(x - y) / abs(y) for x, y in zip(r["nll"], ref["nll"]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": str(a.model), "matmul_gflops_fp32": rate, "rows": rows}, indent=2))
    print(f"matmul rate fp32: {rate:.0f} GFLOP/s; wrote {a.out}")


if __name__ == "__main__":
    main()
