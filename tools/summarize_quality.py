"""Summarize bench_quality.py results: mean and range over seeds, and perplexity against forward tokens.

    python tools/summarize_quality.py runs/bq/results.json --out tools/results/quality_smollm2_repair

Writes OUT.md (a table per sparsity: method, seeds, perplexity mean [min-max], x dense, forward
tokens) and OUT.png (perplexity against forward tokens, one marker per method and sparsity).
``--only METHOD=LABEL ...`` keeps just those methods, in that order, under readable names (the
README's plot of the defaults):

    python tools/summarize_quality.py tools/results/quality_smollm2_test_reselect.json \
        --only "bonsai.c16=bonsai, no repair" ... --out tools/results/quality_smollm2_defaults
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def summarize(rows: list[dict]) -> tuple[float, list[dict]]:
    dense = [r["perplexity"] for r in rows if r["method"] == "dense"]
    # the same windows measured on two machines agree to about 1e-8 (float sums in another order)
    if any(abs(d - dense[0]) > 1e-6 * dense[0] for d in dense):
        raise SystemExit(f"several dense rows with different perplexities ({dense}): mixed windows?")
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] != "dense":
            groups[(r["method"], r["sparsity"])].append(r)
    out = []
    for (method, sparsity), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ppl = [r["perplexity"] for r in rs]
        out.append({"method": method, "sparsity": sparsity, "seeds": sorted(r.get("seed", 0) for r in rs),
                    "perplexity_mean": statistics.fmean(ppl), "perplexity_min": min(ppl),
                    "perplexity_max": max(ppl), "x_dense": statistics.fmean(ppl) / dense[0],
                    "forward_tokens": int(statistics.fmean(r["forward_tokens"] for r in rs)),
                    "achieved": statistics.fmean(r["achieved"] for r in rs)})
    return dense[0], out


def positions(summary: list[dict], methods: list[str], step: float = 1.04) -> list[float]:
    """The plot's x of each summary row: its forward tokens, except that rows of one budget at one
    sparsity (FLAP's and the prior's plans under the same repair) would hide one marker under
    another, so each such group is spread sideways, ``step`` apart on the log axis, centred on the
    budget, in the methods' order."""
    group: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(summary):
        group[(s["forward_tokens"], s["sparsity"])].append(i)
    x = [float(s["forward_tokens"]) for s in summary]
    rank = {m: k for k, m in enumerate(methods)}
    for members in group.values():
        members.sort(key=lambda i: rank.get(summary[i]["method"], len(methods)))
        for k, i in enumerate(members):
            x[i] *= step ** (k - (len(members) - 1) / 2)
    return x


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+", help="results.json files of bench_quality.py")
    ap.add_argument("--out", type=Path, required=True, help="output prefix (.md, .png, .json)")
    ap.add_argument("--only", nargs="+", metavar="METHOD=LABEL",
                    help="keep only these methods (and dense), renamed, in this order")
    a = ap.parse_args(argv)
    rows = []
    for path in a.results:  # a bench's results.json (a list of rows) or a summary's JSON ({"raw": rows})
        got = json.loads(path.read_text())
        rows += got["raw"] if isinstance(got, dict) else got
    order = None
    if a.only:
        names = dict(o.split("=", 1) if "=" in o else (o, o) for o in a.only)
        missing = set(names) - {r["method"] for r in rows}
        if missing:
            raise SystemExit(f"--only: no rows of {sorted(missing)} in {[str(p) for p in a.results]}")
        rows = [r | {"method": names.get(r["method"], "dense")} for r in rows
                if r["method"] in names or r["method"] == "dense"]
        order = list(names.values())
    dense, summary = summarize(rows)
    lines = [f"dense: {dense:.2f}", "",
             "| sparsity | method | seeds | perplexity (mean [min-max]) | x dense | forward tokens |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        spread = (f" [{s['perplexity_min']:.2f}-{s['perplexity_max']:.2f}]" if len(s["seeds"]) > 1 else "")
        lines.append(f"| {s['sparsity']:.0%} | {s['method']} | {','.join(map(str, s['seeds']))} | "
                     f"{s['perplexity_mean']:.2f}{spread} | {s['x_dense']:.2f} | {s['forward_tokens']:,} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({"dense": dense, "rows": summary, "raw": rows}, indent=1))
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    methods = order or sorted({s["method"] for s in summary})
    markers = dict(zip(sorted({s["sparsity"] for s in summary}), "osD^v"))
    # tab10's colours repeat after ten methods; tab20 tells up to twenty apart
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colors = {m: palette(i % palette.N) for i, m in enumerate(methods)}
    for s, x in zip(summary, positions(summary, methods)):
        ax.errorbar(x, s["perplexity_mean"], fmt=markers[s["sparsity"]], color=colors[s["method"]],
                    yerr=[[s["perplexity_mean"] - s["perplexity_min"]], [s["perplexity_max"] - s["perplexity_mean"]]])
    for m in methods:
        ax.plot([], [], "-", lw=5, color=colors[m], label=m)  # a colour bar: the markers are the sparsities
    for sp, mk in markers.items():
        ax.plot([], [], mk, color="gray", label=f"{sp:.0%}")
    ax.axhline(dense, color="k", lw=0.8, ls="--", label="dense")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("forward tokens (prior passes, masks, reconstruction)\n(one budget's points at one sparsity spread sideways)")
    ax.set_ylabel("WikiText-2 perplexity (held-out test windows)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
