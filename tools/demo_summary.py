"""The summary that tools/demo.sh ends with, read from the JSON files the demo wrote.

    python tools/demo_summary.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> dict | list:
    if not path.is_file():
        sys.exit(f"error: {path}: missing; run bash tools/demo.sh first")
    return json.loads(path.read_text(encoding="utf-8"))


def summary(out: Path) -> str:
    dense, pruned = load(out / "eval-dense.json"), load(out / "eval-bonsai-20.json")
    gguf = load(out / "eval-bonsai-20-gguf.json")
    report = load(out / "smollm2-bonsai-20" / "report.json")
    speed = {row["model"]: row for row in load(out / "speed" / "results.json")}
    timings = [line.split("\t") for line in (out / "timings.tsv").read_text().splitlines() if line]
    answer = (out / "answer.txt").read_text(encoding="utf-8").strip() if (out / "answer.txt").is_file() else ""
    rounds = len(report["rounds"])
    d, p = speed["dense"], speed["bonsai20"]
    lines = [
        "",
        "=" * 78,
        f"lowmem-bonsai demo: SmolLM2-135M-Instruct, Bonsai to {report['target_sparsity']:.0%} "
        f"(profile {report['settings']['profile']['name']})",
        "=" * 78,
        f"perplexity, {dense['sequences']} windows of {dense['seq_len']} tokens of WikiText-2 valid "
        f"after the calibration text (lower is better):",
        f"  {'dense':<30} {dense['perplexity']:8.2f}",
        f"  {'pruned':<30} {pruned['perplexity']:8.2f}   ({pruned['perplexity'] / dense['perplexity'] - 1:+.0%})",
        f"  {'pruned, ' + d['type'].upper() + ' GGUF in llama.cpp':<30} {gguf['perplexity']:8.2f}",
        f"prune: {report['achieved_sparsity']:.1%} of the block parameters removed "
        f"({report['params_before']:,} -> {report['params_after']:,}) in {rounds} "
        f"round{'' if rounds == 1 else 's'}, {report['forward_tokens']:,} forward tokens"
        + (f" + {report['reconstruction']['forward_tokens']:,} in the repair" if report.get("reconstruction") else "")
        + ", "
        f"{report['seconds']:.0f} s",
        f"llama.cpp, {d['type'].upper()}, {d['threads']} thread{'' if d['threads'] == 1 else 's'}, "
        f"median of {d['repeats']} (prompt of 256 tokens, then 64 generated):",
        "             file     prompt tok/s   generation tok/s",
        f"  dense   {d['file_mb']:6.0f} MB   {d['prompt_tok_s']:10.0f}   {d['gen_tok_s']:14.1f}",
        f"  pruned  {p['file_mb']:6.0f} MB   {p['prompt_tok_s']:10.0f}   {p['gen_tok_s']:14.1f}"
        f"   ({p['prompt_tok_s'] / d['prompt_tok_s']:.2f}x / {p['gen_tok_s'] / d['gen_tok_s']:.2f}x)",
    ]
    if answer:
        short = " ".join(answer.split())
        lines.append(f"the pruned model, asked 'What is the capital of France?': "
                     f"{short[:160]}{'...' if len(short) > 160 else ''}")
    lines.append(f"plot of kept widths and loss by round: {out / 'smollm2-bonsai-20' / 'pruning.png'}")
    if timings:
        lines.append("seconds per step: " + ", ".join(f"{name} {sec}" for name, sec in timings)
                     + f" (total {sum(int(sec) for _, sec in timings)})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", default=Path("runs/demo"), help="the demo's output folder")
    print(summary(ap.parse_args().out))


if __name__ == "__main__":
    main()
