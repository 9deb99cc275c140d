"""Merge the rows of several bench_quality.py result files into one, for one split.

    python tools/merge_results.py tools/results/quality_smollm2_position.json runs/fp1/results.json \
        --split test --methods "bonsai+lsq@sink=bonsai.c16+lsq@sink" "flap+lsq@sink" \
        --out tools/results/quality_smollm2_test_weighted.json

Keeps the split's dense row (refusing files whose dense rows disagree: other windows) and, of each
method named in ``--methods`` (``METHOD=NAME`` renames it), the last row of each (method, sparsity,
seed) in the order the files and their rows are given, so a later run replaces an earlier one.
A row that came from ``lowmem-bonsai eval`` alone (the same model measured on another split) has no
forward tokens or achieved sparsity of its own; it takes them from the same method's row for the
same sparsity and seed on another split, and its ``note`` says so. Refuses a row that has neither.
The output is sorted by sparsity, method and seed, and is what summarize_quality.py reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row_key(r: dict) -> tuple[str, float, int | None]:
    return r["method"], r["sparsity"], r.get("seed")


def merge(rows: list[dict], split: str, names: dict[str, str]) -> list[dict]:
    """The split's dense row and the named methods' latest rows, renamed, gaps filled (see above)."""
    dense = [r for r in rows if r["method"] == "dense" and r.get("split") == split]
    if not dense:
        raise SystemExit(f"no dense row on the {split} windows")
    if any(abs(d["perplexity"] - dense[0]["perplexity"]) > 1e-6 * dense[0]["perplexity"] for d in dense):
        raise SystemExit(f"dense rows on the {split} windows differ "
                         f"({sorted({d['perplexity'] for d in dense})}): other windows?")
    latest: dict[tuple, dict] = {}
    for r in rows:
        if r.get("split") == split and r["method"] in names:
            latest[row_key(r)] = r  # a later row replaces an earlier one
    missing = set(names) - {k[0] for k in latest}
    if missing:
        raise SystemExit(f"--methods: no {split} rows of {sorted(missing)}")
    other = {}
    for r in rows:
        if r.get("split") != split and r["method"] in names:
            other.setdefault(row_key(r), r)
    out = [dense[0]]
    for key, r in latest.items():
        r = dict(r)
        filled = [f for f in ("forward_tokens", "achieved") if r.get(f) is None]
        if filled:
            twin = other.get(key)
            if twin is None or any(twin.get(f) is None for f in filled):
                raise SystemExit(f"{key[0]} at {key[1]}, seed {key[2]}: the {split} row has no "
                                 f"{' or '.join(filled)}, and no row of the same model on another split has")
            r.update({f: twin[f] for f in filled})
            note = f"{' and '.join(filled)} from the same model's row on the {twin['split']} windows"
            r["note"] = f"{r['note']}; {note}" if r.get("note") else note
        r["method"] = names[key[0]]
        out.append(r)
    return [out[0]] + sorted(out[1:], key=lambda r: (r["sparsity"], r["method"], r.get("seed") or 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+", help="results files of bench_quality.py (lists of rows)")
    ap.add_argument("--split", required=True, help="the windows whose rows are kept (tune, test, ...)")
    ap.add_argument("--methods", nargs="+", required=True, metavar="METHOD[=NAME]",
                    help="the methods kept, renamed where NAME is given")
    ap.add_argument("--out", type=Path, required=True, help="the merged JSON (a list of rows)")
    a = ap.parse_args()
    rows = []
    for path in a.results:
        got = json.loads(path.read_text())
        if not isinstance(got, list):
            raise SystemExit(f"{path}: not a list of rows (a bench_quality.py results file)")
        rows += got
    names = dict(m.split("=", 1) if "=" in m else (m, m) for m in a.methods)
    merged = merge(rows, a.split, names)
    a.out.write_text(json.dumps(merged, indent=1) + "\n")
    for r in merged:
        print(f"{r['method']:28s} {r['sparsity']:.2f} seed {r.get('seed')!s:4s} {r['perplexity']:9.3f} "
              f"{r['forward_tokens']:>9,}")


if __name__ == "__main__":
    main()
