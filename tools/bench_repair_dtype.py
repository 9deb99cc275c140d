"""The repair's passes through the blocks in float32 against bfloat16 (`reconstruct_dtype`), side by
side on a 13B model's shape, and what `estimate` models for each.

The repair (reconstruct.py) runs every calibration token through each block three times with the
default profile's target (the pruned stream's moments, its advance through the repaired
projections, the dense stream beside). On Llama-2-13B those passes are most of the repair's
arithmetic, and they ran in float32 on a CPU whose bf16 matmuls are about 2.3x faster. With
``reconstruct_dtype`` the blocks' weights and matmuls take that dtype; the residual streams, the
Gram matrices and the solves stay float32 (fp64). This tool repairs the same plan of a random
checkpoint of Llama-2-13B's shape (two blocks by default: tools/make_checkpoint.py) in both dtypes,
alternating, and reports the wall time of each run, how far the bf16 refit lands from the fp32 one,
and `estimate`'s repair ETA for the same settings at rates it measures alongside.

    python tools/bench_repair_dtype.py --scratch /tmp/rd --json tools/results/repair_dtype_13b.json

The plan keeps half of each layer's heads and MLP channels (random, fixed seed); the repair is the
default profile's (target stream, position weighting) without the channel reselection, whose
elimination works on the moments in float32 / fp64 whatever the dtype (timed by bench_reselect.py).
Tokens are random ids: the times do not depend on the text, and the weights' agreement is about
rounding, not quality (SmolLM2's perplexities are in README, Reconstruction).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lowmem_bonsai.estimate import estimate  # noqa: E402
from lowmem_bonsai.method.reconstruct import reconstruct, settings_of  # noqa: E402
from lowmem_bonsai.model.checkpoint import Checkpoint  # noqa: E402
from lowmem_bonsai.model.plan import LayerPlan, Plan  # noqa: E402
from lowmem_bonsai.profiles import load_profile  # noqa: E402


def half_plan(ckpt: Checkpoint, seed: int) -> Plan:
    """Half of every layer's KV groups (with their query heads) and of its MLP channels."""
    cfg = ckpt.config
    g = torch.Generator().manual_seed(seed)
    layers = []
    for s in cfg.layers:
        group = s.num_attention_heads // s.num_key_value_heads
        kv = sorted(torch.randperm(s.num_key_value_heads, generator=g)[: s.num_key_value_heads // 2].tolist())
        heads = tuple(k * group + q for k in kv for q in range(group))
        chans = tuple(sorted(torch.randperm(s.intermediate_size, generator=g)[: s.intermediate_size // 2].tolist()))
        layers.append(LayerPlan(heads=heads, kv_heads=tuple(kv), channels=chans))
    return Plan(tuple(layers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a checkpoint (default: make SHAPE's under --scratch)")
    ap.add_argument("--shape", default="llama2-13b", help="tools/make_checkpoint.py's shape")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "bench_repair_dtype")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows of 256 tokens")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each dtype, alternating")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    model = args.model
    if model is None:
        model = args.scratch / f"{args.shape}-x{args.layers}"
        if not (model / "config.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), args.shape, str(model),
                            "--force", "--bpe", "--layers", str(args.layers)], check=True)
    ckpt = Checkpoint(model)
    plan = half_plan(ckpt, seed=0)
    base = load_profile("laptop-16gb").replace(reconstruct_reselect=False, reconstruct_chat=0.0,
                                               reconstruct_seqs=args.windows)
    tokens = torch.randint(0, ckpt.config.vocab_size, (args.windows, base.reconstruct_seq_len),
                           generator=torch.Generator().manual_seed(1))
    dtypes = ("float32", "bfloat16")
    seconds: dict[str, list[float]] = {d: [] for d in dtypes}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    errors: dict[str, list] = {}
    for rep in range(args.repeats):
        for name in dtypes:
            profile = base.replace(reconstruct_dtype=name)
            out = args.scratch / f"repair-{name}"
            t0 = time.perf_counter()
            report = reconstruct(ckpt, plan, tokens, out, **settings_of(profile))
            seconds[name].append(time.perf_counter() - t0)
            print(f"{name} run {rep + 1}: {seconds[name][-1]:.1f} s", flush=True)
            if rep == 0:
                fixed = ckpt.with_overlay(report.files)
                weights[name] = {f"{k}{i}": fixed.get(ckpt.name(k, i)).float()
                                 for i in range(ckpt.config.num_hidden_layers) for k in ("o", "down")}
                errors[name] = [{k: v for k, v in info.items() if k.endswith("_error")} for info in report.layers]
    agree = {}
    for key, a in weights["float32"].items():
        b = weights["bfloat16"][key]
        agree[key] = float((a - b).norm() / a.norm())
    eta = {}
    for name in dtypes:
        e = estimate(model_dir=model, profile=base.replace(reconstruct_dtype=name), sparsity=0.5)
        eta[name] = {"eta_repair_s": 3600 * e["eta_hours_repair"],
                     "pass_gflops": e["repair_pass_gflops_measured"], "fp32_gflops": e["repair_gflops_measured"]}
    med = {d: statistics.median(seconds[d]) for d in dtypes}
    result = {
        "model": str(model), "shape": args.shape, "layers": ckpt.config.num_hidden_layers,
        "windows": args.windows, "seq_len": base.reconstruct_seq_len, "target": base.reconstruct_target,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "seconds": seconds, "median_s": med, "speedup": med["float32"] / med["bfloat16"],
        "relative_weight_difference": agree, "fit_errors": errors, "estimate": eta,
        "estimate_speedup": eta["float32"]["eta_repair_s"] / eta["bfloat16"]["eta_repair_s"],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
