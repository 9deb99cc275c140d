"""Quality benchmark on the real SmolLM2-135M: perplexity after pruning, per method and sparsity.

Calibration uses the first windows of WikiText-2 valid; perplexity is measured on windows after
them (never seen by the pruner). Writes JSON, a PNG plot and a Markdown table.

    python tools/bench_quality.py --model runs/smollm2 --out runs/bench_quality \
        --sparsity 0.2 0.5 --methods bonsai prior random --profile quick
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem_bonsai.evaluate import evaluate  # noqa: E402
from lowmem_bonsai.pipeline import prune_model  # noqa: E402
from lowmem_bonsai.profiles import load_profile  # noqa: E402
from lowmem_bonsai.texts import bundled_path  # noqa: E402

WIKITEXT = bundled_path("wikitext2-valid")  # shipped in the package (lowmem_bonsai/_texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="imported SmolLM2 checkpoint folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=WIKITEXT)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--methods", nargs="+", default=["bonsai", "prior", "random"])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--set", nargs="*", default=[], help="profile overrides, key=value")
    ap.add_argument("--label", default="", help="suffix for method names in the table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=32)
    ap.add_argument("--eval-skip", type=int, default=None,
                    help="windows of --eval-seq-len skipped before evaluating (default: just past the "
                    "calibration); fix it to compare runs with different calibration sizes")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    profile = load_profile(a.profile)
    for kv in a.set:
        k, v = kv.split("=", 1)
        cur = getattr(profile, k)
        profile = profile.replace(**{k: type(cur)(v)})
    a.out.mkdir(parents=True, exist_ok=True)
    results_path = a.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    # Evaluation starts after every window the calibration could have read.
    skip = math.ceil(profile.calib_seqs * profile.seq_len / a.eval_seq_len)
    if a.eval_skip is not None:
        if a.eval_skip < skip:
            ap.error(f"--eval-skip {a.eval_skip} would evaluate on calibration text (need >= {skip})")
        skip = a.eval_skip
    settings = {k: getattr(profile, k) for k in profile.__dataclass_fields__}

    def record(row: dict) -> None:
        results.append(row)
        results_path.write_text(json.dumps(results, indent=2))
        logging.info("%s", row)

    if not any(r["method"] == "dense" and r["eval_skip"] == skip for r in results):
        ev = evaluate(model_dir=a.model, data=a.data, seq_len=a.eval_seq_len, max_seqs=a.eval_seqs, skip=skip)
        record({"method": "dense", "sparsity": 0.0, "achieved": 0.0, "perplexity": ev.perplexity,
                "forward_tokens": 0, "prune_seconds": 0.0, "eval_tokens": ev.tokens, "eval_skip": skip})
    for sparsity in a.sparsity:
        for method in a.methods:
            name = method + a.label
            out = a.out / f"{name}-{sparsity}"
            t = time.perf_counter()
            rep = prune_model(model_dir=a.model, out_dir=out, sparsity=sparsity, profile=profile,
                              calib=a.data, method=method, seed=a.seed, force=True)
            seconds = time.perf_counter() - t
            ev = evaluate(model_dir=out, data=a.data, seq_len=a.eval_seq_len, max_seqs=a.eval_seqs, skip=skip)
            record({"method": name, "sparsity": sparsity, "achieved": rep["achieved_sparsity"],
                    "perplexity": ev.perplexity, "forward_tokens": rep["forward_tokens"],
                    "prune_seconds": seconds, "eval_tokens": ev.tokens, "eval_skip": skip,
                    "rounds": len(rep["rounds"]),
                    "cv_tau": [r["cv_tau"] for r in rep["rounds"]], "settings": settings,
                    "layers": rep["layers"]})
    write_table(results, a.out)


def write_table(results: list[dict], out: Path) -> None:
    lines = ["| method | target | achieved | perplexity | forward tokens | prune time (s) | calibration "
             "| eval skip |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["eval_skip"], r["sparsity"], r["method"])):
        st = r.get("settings") or {}
        calib = f"{st['calib_seqs']} x {st['seq_len']}" if st else "-"
        lines.append(f"| {r['method']} | {r['sparsity']:.2f} | {r['achieved']:.3f} | {r['perplexity']:.2f} | "
                     f"{r['forward_tokens']:,} | {r['prune_seconds']:.0f} | {calib} | {r['eval_skip']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [r for r in results if r["method"] == "dense"]
    for m in sorted({r["method"] for r in results} - {"dense"}):
        rows = sorted((r for r in results if r["method"] == m), key=lambda r: r["sparsity"])
        ax.plot([0.0] + [r["sparsity"] for r in rows],
                [dense[0]["perplexity"] if dense else float("nan")] + [r["perplexity"] for r in rows],
                "o-", label=m)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of block parameters removed)")
    ax.set_ylabel("WikiText-2 perplexity (held out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=110)


if __name__ == "__main__":
    main()
