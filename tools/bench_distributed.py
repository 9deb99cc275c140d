"""Distributed scaling, side by side in one run: 1 rank x 1 thread against 2 ranks x 1 thread.

Both runs do the same round's work on the same checkpoint: the prior pass over the same calibration
windows and the same masks scored in the same waves, through the prune's own steps
(``prior_pass``, ``score_masks``), each rank a process joined on 127.0.0.1 as torchrun joins them.
Reported per run: masks/s, the round's seconds, the share of the round spent in exchanges (waiting
for the other rank included) and the pure communication share (the same exchanges timed again once
the ranks are in step), each rank's peak RSS; and whether both runs gave every mask the same loss.

    python tools/bench_distributed.py --out runs/bench_distributed.json      # TinyLlama-1.1B shape
    python tools/bench_distributed.py --shape smollm2-135m --layers 2 --masks 4 --wave 2 \\
        --seqs 2 --seq-len 16 --out /tmp/bench_distributed.json                # a check that it runs

The checkpoint (random weights in the real shape, ``--layers`` of them) is written by
tools/make_checkpoint.py's writer into ``--work`` unless ``--model`` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def build(shape: str, layers: int | None, out: Path) -> Path:
    import make_checkpoint as mc

    name = shape
    if layers is not None:
        h, _, heads, kv, ffn, vocab, tied = mc.SHAPES[shape]
        name = f"{shape}-{layers}l"
        mc.SHAPES[name] = (h, layers, heads, kv, ffn, vocab, tied)
    path = out / name
    if not (path / "config.json").is_file():
        mc.write(name, path, dtype=torch.bfloat16, seed=0, shard_gb=2.0, force=True)
    return path


def worker(a: argparse.Namespace) -> None:
    """One rank: the round's prior pass and masked passes, timed; JSON to a.result."""
    from lowmem_bonsai.engine.ranks import Ranks, join
    from lowmem_bonsai.method import prune
    from lowmem_bonsai.method.masks import profile_modules
    from lowmem_bonsai.model.checkpoint import Checkpoint
    from lowmem_bonsai.model.plan import Plan
    from lowmem_bonsai.profiles import load_profile

    torch.set_num_threads(a.threads)
    ranks = join(timeout_s=600, device="cpu")
    exchange = {"seconds": 0.0, "count": 0, "calls": []}
    real = {name: getattr(Ranks, name) for name in ("gather", "sum", "broadcast")}

    def timed(name):
        def call(self, obj, *, what):
            t0 = time.perf_counter()
            out = real[name](self, obj, what=what)
            exchange["seconds"] += time.perf_counter() - t0
            exchange["count"] += 1
            exchange["calls"].append((name, obj))
            return out
        return call
    for name in real:
        setattr(Ranks, name, timed(name))

    ckpt = Checkpoint(a.model)
    cfg = ckpt.config
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, min(cfg.vocab_size, 30000), (a.seqs, a.seq_len), generator=g)
    profile = load_profile(None).replace(compute_dtype=a.dtype, masks_per_round=a.masks, wave_masks=a.wave,
                                         calib_seqs=a.seqs, seq_len=a.seq_len, threads=a.threads)
    fwd = prune.forward_settings(profile)
    plan = Plan.dense(cfg)
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    prior = prune.prior_pass(ckpt, calib, plan, kind="wanda", gen=gen, head_unit="group", teacher=False,
                             fwd=fwd, ranks=ranks)
    t1 = time.perf_counter()
    modules = profile_modules(cfg, plan, profile)
    per_module = prune.draw_masks(modules, prior.priors, profile.prune_frac, a.masks, gen, varied=True)
    scores = prune.score_masks(ckpt, calib, plan, per_module, wave=a.wave, fwd=fwd, soft=None, state=None,
                               progress=None, ranks=ranks)
    t2 = time.perf_counter()
    waited = exchange["seconds"]
    # The same exchanges again, now that the ranks are in step: what moving the data costs.
    pure = 0.0
    if ranks.world > 1:
        ranks.gather(None, what="bench sync")
        t = time.perf_counter()
        for name, obj in list(exchange["calls"][:-1]):
            real[name](ranks, obj, what="bench repeat")
        pure = time.perf_counter() - t
    round_s = t2 - t0
    out = {
        "rank": ranks.rank, "world": ranks.world, "threads": torch.get_num_threads(),
        "prior_seconds": t1 - t0, "masks_seconds": t2 - t1, "round_seconds": round_s,
        "masks_per_s": a.masks / (t2 - t1), "exchanges": exchange["count"] - (ranks.world > 1),
        "exchange_seconds": waited, "exchange_fraction": waited / round_s,
        "comm_seconds": pure, "comm_fraction": pure / round_s,
        "forward_tokens": prior.tokens + scores.tokens,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "losses": [float(x) for x in scores.loss],
    }
    Path(a.result).write_text(json.dumps(out))
    ranks.close()


def run(a: argparse.Namespace, world: int, tmp: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, results = [], []
    for rank in range(world):
        result = tmp / f"w{world}-r{rank}.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        else:
            env.pop("WORLD_SIZE", None)
        args = [sys.executable, __file__, "--worker", "--model", str(a.model), "--result", str(result),
                "--masks", str(a.masks), "--wave", str(a.wave), "--seqs", str(a.seqs),
                "--seq-len", str(a.seq_len), "--threads", str(a.threads), "--dtype", a.dtype]
        procs.append(subprocess.Popen(args, env=env))
        results.append(result)
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a rank of the {world}-rank run failed (exit status {p.returncode})")
    return [json.loads(r.read_text()) for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an existing checkpoint (default: write one of --shape)")
    ap.add_argument("--shape", default="tinyllama-1.1b", help="a shape of tools/make_checkpoint.py")
    ap.add_argument("--layers", type=int, help="fewer layers than the shape has (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs", help="where the checkpoint is written")
    ap.add_argument("--masks", type=int, default=16)
    ap.add_argument("--wave", type=int, default=4, help="masks per wave (whole waves go to each rank)")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, help="the JSON to write (required)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    if a.out is None:
        ap.error("--out is required")
    if a.model is None:
        a.model = build(a.shape, a.layers, a.work)
    with tempfile.TemporaryDirectory() as tmp:
        one = run(a, 1, Path(tmp))
        two = run(a, 2, Path(tmp))
    speedup = two[0]["masks_per_s"] / one[0]["masks_per_s"]
    report = {
        "model": a.model.name, "masks": a.masks, "wave_masks": a.wave, "calib": [a.seqs, a.seq_len],
        "threads_per_rank": a.threads, "dtype": a.dtype,
        "one_rank": {k: v for k, v in one[0].items() if k != "losses"},
        "two_ranks": [{k: v for k, v in r.items() if k != "losses"} for r in two],
        "masks_per_s_speedup": speedup, "scaling_efficiency": speedup / 2,
        "round_speedup": one[0]["round_seconds"] / max(r["round_seconds"] for r in two),
        "same_losses": one[0]["losses"] == two[0]["losses"] == two[1]["losses"],
        "max_comm_fraction": max(r["comm_fraction"] for r in two),
        "max_exchange_fraction": max(r["exchange_fraction"] for r in two),
        "peak_rss_gb": {"one_rank": one[0]["peak_rss_gb"], "two_ranks": [r["peak_rss_gb"] for r in two]},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("masks_per_s_speedup", "scaling_efficiency", "round_speedup",
                                              "same_losses", "max_comm_fraction", "max_exchange_fraction",
                                              "peak_rss_gb")}, indent=2))


if __name__ == "__main__":
    main()
