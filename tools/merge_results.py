"""Merge the rows of several bench_quality.py result files into one, for one split.

    python tools/merge_results.py tools/results/quality_smollm2_position.json runs/fp1/results.json \
        --split test --methods "bonsai+lsq@sink=bonsai.c16+lsq@sink" "flap+lsq@sink" \
        --out tools/results/quality_smollm2_test_weighted.json

Keeps the split's dense row (refusing files whose dense rows disagree: other windows) and, of each
method named in ``--methods`` (``METHOD=NAME`` renames it), the last row of each (name, sparsity,
seed) in the order the files and their rows are given, so a later run replaces an earlier one, also
where two methods are given one name (the same models recorded under another name by an older run).
A row that came from ``lowmem-bonsai eval`` alone (the same model measured on another split) has no
forward tokens or achieved sparsity of its own; it takes them from the same method's row for the
same sparsity and seed on another split (the latest such row that has them), and its ``note`` says
so. Refuses a row that has neither, rows measured on other windows than the dense row's
(eval_skip / eval_seqs / eval_tokens), and files that are not results files, each in one line.
The output is sorted by sparsity, method and seed, and is what summarize_quality.py reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row_key(r: dict, names: dict[str, str]) -> tuple[str, float, int | None]:
    """The model a row measured: its name in the output, sparsity and seed."""
    return names[r["method"]], r["sparsity"], r.get("seed")


WINDOWS = ("eval_skip", "eval_seqs", "eval_tokens")  # which windows a row was measured on


def merge(rows: list[dict], split: str, names: dict[str, str]) -> list[dict]:
    """The split's dense row and the named methods' latest rows, renamed, gaps filled (see above)."""
    dense = [r for r in rows if r["method"] == "dense" and r.get("split") == split]
    if not dense:
        raise SystemExit(f"no dense row on the {split} windows")
    if any(abs(d["perplexity"] - dense[0]["perplexity"]) > 1e-6 * dense[0]["perplexity"] for d in dense):
        raise SystemExit(f"dense rows on the {split} windows differ "
                         f"({sorted({d['perplexity'] for d in dense})}): other windows?")
    latest: dict[tuple, dict] = {}
    earlier: dict[tuple, list[dict]] = {}  # the rows a later one replaced
    other: dict[tuple, list[dict]] = {}  # the same models' rows on other splits
    for r in rows:
        if r["method"] not in names:
            continue
        key = row_key(r, names)
        if r.get("split") != split:
            other.setdefault(key, []).append(r)
            continue
        if key in latest:
            earlier.setdefault(key, []).append(latest[key])
        latest[key] = r  # a later row replaces an earlier one, under either name
    missing = set(names) - {r["method"] for r in rows if r.get("split") == split}
    if missing:
        raise SystemExit(f"--methods: no {split} rows of {sorted(missing)}")
    out = [dense[0]]
    for key, r in latest.items():
        for f in WINDOWS:
            if f in r and f in dense[0] and r[f] != dense[0][f]:
                raise SystemExit(f"{key[0]} at {key[1]}, seed {key[2]}: {f} {r[f]} on the {split} windows, "
                                 f"the dense row's is {dense[0][f]}: other windows")
        r = dict(r)
        filled = [f for f in ("forward_tokens", "achieved") if r.get(f) is None]
        if filled:
            # the latest row of the same model on another split that has them all, else the
            # latest earlier row of it on this split (an eval-only row that replaced a full one)
            twins = [*reversed(other.get(key, [])), *reversed(earlier.get(key, []))]
            twin = next((t for t in twins if all(t.get(f) is not None for f in filled)), None)
            if twin is None:
                raise SystemExit(f"{key[0]} at {key[1]}, seed {key[2]}: the {split} row has no "
                                 f"{' or '.join(filled)}, and no other row of the same model has")
            r.update({f: twin[f] for f in filled})
            note = f"{' and '.join(filled)} from the same model's row on the {twin.get('split')} windows"
            r["note"] = f"{r['note']}; {note}" if r.get("note") else note
        r["method"] = key[0]
        out.append(r)
    return [out[0]] + sorted(out[1:], key=lambda r: (r["sparsity"], r["method"], r.get("seed") or 0))


def read_rows(path: Path) -> list[dict]:
    """A bench_quality.py results file's rows; anything else is refused in one line."""
    try:
        got = json.loads(path.read_text())
    except OSError as e:
        raise SystemExit(f"{path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(got, list):
        raise SystemExit(f"{path}: not a list of rows (a bench_quality.py results file)")
    for i, r in enumerate(got):
        lacks = [k for k in ("method", "sparsity", "perplexity") if not isinstance(r, dict) or k not in r]
        if lacks:
            raise SystemExit(f"{path}: row {i} has no {', '.join(lacks)} (a bench_quality.py results file?)")
        number = [k for k in ("sparsity", "perplexity")
                  if isinstance(r[k], bool) or not isinstance(r[k], (int, float))]
        if not isinstance(r["method"], str) or number:
            raise SystemExit(f"{path}: row {i}: expected a method name and numbers for sparsity and "
                             f"perplexity, got {r['method']!r}, {r['sparsity']!r}, {r['perplexity']!r}")
    return got


def parse_names(methods: list[str]) -> dict[str, str]:
    """--methods METHOD[=NAME] as {method: name}; refuses empty names and a method given twice."""
    names: dict[str, str] = {}
    for m in methods:
        method, name = m.split("=", 1) if "=" in m else (m, m)
        if not method or not name:
            raise SystemExit(f"--methods {m!r}: expected METHOD or METHOD=NAME, neither empty")
        if method in names:
            raise SystemExit(f"--methods: {method} given twice")
        names[method] = name
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+", help="results files of bench_quality.py (lists of rows)")
    ap.add_argument("--split", required=True, help="the windows whose rows are kept (tune, test, ...)")
    ap.add_argument("--methods", nargs="+", required=True, metavar="METHOD[=NAME]",
                    help="the methods kept, renamed where NAME is given")
    ap.add_argument("--out", type=Path, required=True, help="the merged JSON (a list of rows)")
    a = ap.parse_args()
    names = parse_names(a.methods)
    rows = [r for path in a.results for r in read_rows(path)]
    merged = merge(rows, a.split, names)
    lines = [f"{r['method']:28s} {r['sparsity']:.2f} seed {r.get('seed')!s:4s} {r['perplexity']:9.3f} "
             f"{r.get('forward_tokens') or 0:>9,}" for r in merged]
    a.out.write_text(json.dumps(merged, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
