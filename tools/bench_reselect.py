"""The repair's greedy elimination of MLP channels on a 13B model's shape: deferred against
one-at-a-time downdates, side by side, and what `estimate` models for it.

`reconstruct.greedy_keep` drops one channel at a time, each the one whose removal (the rest
refit) raises the layer's error least. The plain algorithm downdates the refit W* (out x in) and
the inverse A^-1 (in x in) after every drop: two rank-1 updates, each reading and writing a whole
matrix, 2.1 GB of traffic per drop on Llama-2-13B's down_proj in fp32. `greedy_keep` defers them
over blocks of drops and applies each block as two matmuls. This tool times both on the same
moments (random correlated inputs of the given width and a target with noise), checks that they
keep the same channels, and prints the per-drop times and the estimate's model of the deferred
one (bytes read per drop over the measured read rate, plus its matmuls at the float32 rate).

    python tools/bench_reselect.py --json runs/reselect_13b.json

Both timings exclude the common start (the Gram matrix's inverse and the full refit), which is
timed twice: with the inverse from the Cholesky factor (what `greedy_keep` does) and with LU's
(what it did). Which channels an fp32 start drops is only as exact as its inverse: the random
moments here (fewer tokens than inputs) make A = G + ridge badly conditioned, and both fp32
inverses lie about 1.7 % from an fp64 one, so the two starts may exchange a few near-tied
channels. Each start's dropped set is therefore scored exactly, against the set dropped from an
fp64 start: the growth of the regularised fit's error when those channels go, the rest refit, in
fp64. The Cholesky start's set must cost at most 1e-4 more than the fp64 start's (LU's is
reported beside it). The whole run peaks at about 8.2 GiB at the 13B shape. A 50 % prune of the layer
drops 6,912 channels; --drops times the first ones (each drop of either algorithm costs the same
whatever is left).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem_bonsai.engine.memory import ELIMINATION_BLOCK, measure_matmul_gflops, measure_read_gbps  # noqa: E402
from lowmem_bonsai.estimate import mlp_elimination  # noqa: E402
from lowmem_bonsai.method import reconstruct  # noqa: E402
from lowmem_bonsai.method.reconstruct import Moments, greedy_keep  # noqa: E402


def one_at_a_time(fit: torch.Tensor, inv: torch.Tensor, drops: int) -> torch.Tensor:
    """The plain greedy elimination (the code before the deferred one): both rank-1 downdates
    after every drop. Returns the alive mask."""
    n = fit.shape[1] - 1
    alive = torch.ones(n, dtype=torch.bool)
    for _ in range(drops):
        cost = fit[:, :-1].square().sum(0) / inv.diagonal()[:-1]
        cost[~alive] = float("inf")
        j = int(cost.argmin())
        row, col, pivot = inv[j].clone(), inv[:, j].clone(), float(inv[j, j])
        fit.addr_(fit[:, j].clone(), row, alpha=-1 / pivot)
        inv.addr_(col, row, alpha=-1 / pivot)
        alive[j] = False
    return alive


def exact_choices(m: Moments, w: torch.Tensor, drops: int, starts: dict) -> dict:
    """Each fp32 start's inverse against an fp64 one from the same moments, and the channels the
    deferred elimination drops from each start, scored exactly: the growth of the regularised
    fit's error when they all go, the rest refit (tr(W*_J (A^-1_JJ)^-1 W*_J^T), fp64). Also the
    same for the set dropped from the fp64 start and how many of each set's channels it shares."""
    n = w.shape[1]
    # the same start, solved in fp64 as narrower layers are
    fit64, inv64 = reconstruct._elimination_start(m, w, 1e-3, dtype=torch.float64)

    def dropped(fit: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        kept = greedy_keep(m, w, n - drops, ridge=1e-3, start=(fit.clone(), inv.clone()))
        alive = torch.zeros(n, dtype=torch.bool)
        alive[kept] = True
        return torch.nonzero(~alive).flatten()

    def cost(cols: torch.Tensor) -> float:
        return reconstruct._block_cost(fit64, inv64, cols)

    ref = dropped(fit64, inv64)
    out = {"fp64_cost": cost(ref)}
    for name, (fit, inv) in starts.items():
        got = dropped(fit, inv)
        out[f"{name}_inverse_error"] = float((inv - inv64.to(inv.dtype)).norm() / inv64.norm())
        out[f"{name}_common"] = len(set(got.tolist()) & set(ref.tolist()))
        out[f"{name}_cost"] = cost(got)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=13824, help="MLP channels (Llama-2-13B: 13,824)")
    ap.add_argument("--out", type=int, default=5120, help="hidden size (Llama-2-13B: 5,120)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the random moments")
    ap.add_argument("--drops", type=int, default=256, help="channels each algorithm drops")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n, out = args.n, args.out
    z = torch.relu(torch.randn(args.tokens, n, generator=g) + 0.5 * torch.randn(args.tokens, 1, generator=g))
    w = torch.randn(out, n, generator=g) / n ** 0.5
    m = Moments(n, full=True, n_out=out)
    m.add(z, z @ w.T + 0.1 * torch.randn(args.tokens, out, generator=g))
    del z
    t0 = time.perf_counter()
    fit, inv = reconstruct._elimination_start(m, w, 1e-3)
    start_s = time.perf_counter() - t0
    print(f"start (inverse from the Cholesky factor, and refit, in {inv.dtype}): {start_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    fit_lu, inv_lu = reconstruct._elimination_start(m, w, 1e-3, inverse=torch.linalg.inv)  # the start as it was
    start_lu_s = time.perf_counter() - t0
    print(f"start with LU's inverse: {start_lu_s:.1f} s", flush=True)
    rel = float((inv_lu - inv).norm() / inv_lu.norm())
    exact = exact_choices(m, w, args.drops, {"cholesky": (fit, inv), "lu": (fit_lu, inv_lu)})
    del fit_lu, inv_lu

    t0 = time.perf_counter()
    alive = one_at_a_time(fit.clone(), inv.clone(), args.drops)
    ref_s = time.perf_counter() - t0
    print(f"one at a time: {args.drops} drops in {ref_s:.1f} s", flush=True)

    t0 = time.perf_counter()
    kept = greedy_keep(m, w, n - args.drops, ridge=1e-3, start=(fit, inv))  # the same start, not timed again
    new_s = time.perf_counter() - t0
    same = kept.tolist() == torch.nonzero(alive).flatten().tolist()
    print(f"deferred (blocks of {ELIMINATION_BLOCK}): {args.drops} drops in {new_s:.1f} s; same choices: {same}", flush=True)
    print(f"the starts' inverses differ by {rel:.1e} relative; from fp64's: Cholesky "
          f"{exact['cholesky_inverse_error']:.1e}, LU {exact['lu_inverse_error']:.1e}; channels dropped as from "
          f"fp64's start: Cholesky {exact['cholesky_common']}, LU {exact['lu_common']} of {args.drops}; exact cost "
          f"of the dropped set: fp64 {exact['fp64_cost']:.6g}, Cholesky {exact['cholesky_cost']:.6g}, LU "
          f"{exact['lu_cost']:.6g}", flush=True)

    gflops = measure_matmul_gflops(torch.float32)
    gbps = measure_read_gbps()
    _, flops, reads = mlp_elimination(n, out, args.drops)  # estimate's model of the deferred drops
    model_s = reads / (gbps * 1e9) + flops / (0.8 * gflops * 1e9)
    start_flops = mlp_elimination(n, out, 0)[0]  # estimate's model of the start (the target given)
    result = {
        "n": n, "out": out, "tokens": args.tokens, "drops": args.drops, "dtype": str(inv.dtype),
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "start_s": start_s, "start_lu_s": start_lu_s, "start_speedup": start_lu_s / start_s,
        "start_estimate_model_s": start_flops / (0.8 * gflops * 1e9),
        "start_inverse_relative_difference": rel, **exact,
        "one_at_a_time_s": ref_s, "deferred_s": new_s,
        "one_at_a_time_ms_per_drop": 1e3 * ref_s / args.drops, "deferred_ms_per_drop": 1e3 * new_s / args.drops,
        "speedup": ref_s / new_s, "same_choices": same,
        "matmul_gflops_fp32": gflops, "read_gbps": gbps, "estimate_model_s": model_s,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not same:
        sys.exit("the deferred elimination kept other channels than the plain one")
    if exact["cholesky_cost"] > exact["fp64_cost"] * (1 + 1e-4):
        sys.exit("the channels the Cholesky start drops cost more than 1e-4 above the fp64 start's")


if __name__ == "__main__":
    main()
