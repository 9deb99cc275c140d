"""Where the dense model's residual stream is large: per layer, the mean square of each token's
stream, and the share of the stream's sum of squares that the first token of each window holds.

Why: the lsq repair with the stream target fits the squared error of the residual stream. Where a
few tokens (the first of each window, with massive activations) hold most of its sum of squares,
they could decide the fit (docs/quality-history.md, "What moved the 10 % repair, and what did not").

    python tools/stream_norms.py --model runs/smollm2 --data wikitext2-valid --windows 16

Reads the checkpoint with transformers (a test dependency) in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowmem_bonsai.data import load_tokenizer, tokenize_file, windows  # noqa: E402
from lowmem_bonsai.texts import text_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (transformers loads it)")
    ap.add_argument("--data", default="wikitext2-valid", help="text: a file, or a shipped text's name")
    ap.add_argument("--windows", type=int, default=16, help="windows from the start of the text")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    text = text_file(a.data)
    ids = tokenize_file(load_tokenizer(Path(a.model)), text, max_tokens=a.windows * a.seq_len)
    x = windows(ids, seq_len=a.seq_len, max_seqs=a.windows, source=str(text))
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states  # embeddings, then after each layer
    rows = []
    for layer, h in enumerate(hidden[1:], start=1):
        ms = h.double().square().mean(-1)  # (windows, T): each token's mean square
        rows.append({"after_layer": layer, "first_token_share": float(ms[:, 0].sum() / ms.sum()),
                     "first_token_mean_square": float(ms[:, 0].mean()),
                     "median_mean_square": float(ms[:, 1:].median()),
                     "max_mean_square_other": float(ms[:, 1:].max())})
        r = rows[-1]
        print(f"after layer {layer:3d}: first token {r['first_token_share']:6.1%} of the sum of squares, "
              f"mean square {r['first_token_mean_square']:10.4g}; median token {r['median_mean_square']:8.4g}, "
              f"largest other {r['max_mean_square_other']:10.4g}")
    if a.json:
        a.json.write_text(json.dumps({"model": a.model.name, "windows": int(x.shape[0]),
                                      "seq_len": a.seq_len, "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
