"""Where along a window a pruned model loses against its dense source: per position bucket, the mean
next-token NLL of both and their difference; the difference by how well the dense model itself
predicted each token (fifths of the tokens by its NLL); and per layer the relative error of the
pruned model's normalised residual stream against the dense one's.

Why: a repair fits each layer's stream error with every token alike. If the stream error is flat
along the window while the loss gap grows, a late token's error costs more, and the fit can weigh
it more (`reconstruct_position_power`; docs/quality-history.md, "Late tokens weigh more").

    python tools/position_gap.py --dense runs/smollm2 --pruned runs/bq/bonsai+lsq@def-0.1-s0 \\
        --skip 1037 --windows 32 --json gap.json

Streams both checkpoints block by block through the project's executor, in float32 on the CPU (the
pruned one is read as written: its own widths, repaired biases included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowmem_bonsai.data import load_tokenizer, tokenize_file, windows  # noqa: E402
from lowmem_bonsai.engine.block import block_forward, rms_norm  # noqa: E402
from lowmem_bonsai.engine.forward import embed_tokens, token_nll  # noqa: E402
from lowmem_bonsai.engine.rope import rope_tables  # noqa: E402
from lowmem_bonsai.engine.streamer import BlockStreamer  # noqa: E402
from lowmem_bonsai.model.checkpoint import Checkpoint  # noqa: E402
from lowmem_bonsai.texts import text_file  # noqa: E402


def buckets(seq_len: int) -> list[tuple[int, int]]:
    """Ranges [lo, hi) of the positions that predict a next token (0 to T - 2): 0, 1-3, 4-15,
    16-63, 64-127, then up to the window's end."""
    edges = [e for e in (0, 1, 4, 16, 64, 128) if e < seq_len - 1] + [seq_len - 1]
    return list(zip(edges[:-1], edges[1:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True, type=Path, help="the source checkpoint folder")
    ap.add_argument("--pruned", required=True, type=Path, help="a pruned (and repaired) checkpoint folder")
    ap.add_argument("--data", default="wikitext2-valid", help="text: a file, or a shipped text's name")
    ap.add_argument("--skip", type=int, default=1037, help="windows skipped before the measured ones")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)

    text = text_file(a.data)
    need = (a.skip + a.windows) * a.seq_len
    ids = tokenize_file(load_tokenizer(a.dense), text, max_tokens=need)
    toks = windows(ids, seq_len=a.seq_len, max_seqs=a.windows, skip=a.skip, source=str(text))
    dense, pruned = Checkpoint(a.dense), Checkpoint(a.pruned)
    cfg = dense.config
    cos, sin = rope_tables(cfg, a.seq_len)
    hd = embed_tokens(dense, toks, dtype=torch.float32)
    hp = hd.clone()  # pruning leaves the embeddings as they are
    spans = buckets(a.seq_len)
    one = torch.ones(cfg.hidden_size)
    stream: dict[int, list[float]] = {}
    for wd, wp in zip(BlockStreamer(dense, plan=None, dtype=torch.float32),
                      BlockStreamer(pruned, plan=None, dtype=torch.float32)):
        for s in range(toks.shape[0]):
            hd[s : s + 1] = block_forward(hd[s : s + 1], wd, cos, sin, eps=cfg.rms_norm_eps)
            hp[s : s + 1] = block_forward(hp[s : s + 1], wp, cos, sin, eps=cfg.rms_norm_eps)
        nd, np_ = rms_norm(hd, one, cfg.rms_norm_eps), rms_norm(hp, one, cfg.rms_norm_eps)
        err = ((nd - np_).square().sum(-1) / nd.square().sum(-1)).mean(0)  # (T,)
        stream[wd.layer] = [float(err[lo:hi].mean()) for lo, hi in spans]
    # each position's NLL through the final norm and the head, in vocabulary chunks  (S, T - 1) fp64
    td, tp = (token_nll(c, h, toks[:, 1:], dtype=torch.float32, rows_per_chunk=1, per_token=True)
              for c, h in ((dense, hd), (pruned, hp)))
    ld, lp = td.mean(0), tp.mean(0)  # (T - 1,)
    rows = [{"positions": f"{lo}-{hi - 1}", "dense_nll": float(ld[lo:hi].mean()),
             "pruned_nll": float(lp[lo:hi].mean()), "gap_nats": float((lp - ld)[lo:hi].mean())}
            for lo, hi in spans]  # position p predicts the token at p + 1 (row p of the NLL)
    print(f"{'positions':>10} {'dense NLL':>10} {'pruned NLL':>11} {'gap (nats)':>11}")
    for r in rows:
        print(f"{r['positions']:>10} {r['dense_nll']:10.4f} {r['pruned_nll']:11.4f} {r['gap_nats']:11.4f}")
    edges = torch.quantile(td[:, 1:].flatten(), torch.linspace(0, 1, 6, dtype=td.dtype))  # position 0 left out
    by_nll = []  # [lo, hi) but the last [lo, hi]: every token once (ties at an edge go up, so not exact fifths)
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = (td >= lo) & ((td < hi) if i < 4 else (td <= hi))
        sel[:, 0] = False
        n = int(sel.sum())
        mean = (lambda v: float(v[sel].mean())) if n else (lambda v: None)  # an empty fifth: null, not NaN
        by_nll.append({"dense_nll_range": [float(lo), float(hi)], "tokens": n, "dense_nll": mean(td),
                       "pruned_nll": mean(tp), "gap_nats": mean(tp - td)})
    print("by the dense model's own NLL of the token (fifths of the tokens, position 0 left out):")
    for r in by_nll:
        lo, hi = r["dense_nll_range"]
        gap = "-" if r["gap_nats"] is None else f"{r['gap_nats']:+.4f}"
        print(f"{lo:6.2f}-{hi:<6.2f} {r['tokens']:6d} tokens, gap {gap} nats")
    print("relative error of the normalised stream, per layer, same position buckets:")
    for layer, e in stream.items():
        print(f"  layer {layer:2d}: " + " ".join(f"{v:.5f}" for v in e))
    if a.json:
        a.json.write_text(json.dumps({
            "dense": str(a.dense), "pruned": str(a.pruned), "data": a.data, "skip": a.skip,
            "windows": a.windows, "seq_len": a.seq_len, "gap_by_position": rows,
            "all_gap_nats": float((lp - ld).mean()), "gap_by_dense_nll": by_nll,
            "stream_error_by_layer": {str(k): v for k, v in stream.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
