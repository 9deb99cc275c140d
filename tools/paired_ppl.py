"""How far one method's perplexity lies below another's, with an interval over the held-out windows.

A result such as "8.4 % below FLAP" comes from 32 windows of text. This tool says how much it
depends on which windows were held out: a paired bootstrap that draws the windows with
replacement, the same draw for every model, and reports the central interval of
1 - mean(perplexity of the models) / perplexity of the reference. Pass one model per seed of a
method to compare the mean of its seeds, as the README's tables do; the seeds themselves are not
resampled, so seed-to-seed spread is not in the interval (the tables give the seeds' range).

Each input is the JSON of `lowmem-bonsai eval ... --json OUT.json` (which records the mean NLL of
every window), all measured on the same text, windows and window length:

    lowmem-bonsai eval runs/flap-0.1 --data wikitext2-valid --seq-len 256 --max-seqs 32 --skip 1037 --json flap.json
    lowmem-bonsai eval runs/bonsai-0.1-s0 ... --json s0.json   (and s1, s2)
    python tools/paired_ppl.py --reference flap.json --models s0.json s1.json s2.json --goal 0.10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowmem_bonsai.errors import UserError  # noqa: E402
from lowmem_bonsai.evaluate import paired_below  # noqa: E402

SAME = ("seq_len", "sequences", "skip", "tokens")  # what must match for the windows to be the same


def load(path: Path) -> dict:
    try:
        got = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: cannot read an eval JSON ({type(e).__name__}: {e})") from None
    if not isinstance(got, dict) or not got.get("window_nll"):
        raise UserError(f"{path}: no per-window NLLs (window_nll); write it with `lowmem-bonsai eval ... "
                        "--json` from this version")
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="eval JSON of the model to compare with")
    ap.add_argument("--models", type=Path, nargs="+", required=True,
                    help="eval JSONs of the models whose mean perplexity is compared (e.g. one per seed)")
    ap.add_argument("--goal", type=float, help="also report the share of resamples at least this far below "
                    "(0.10 = 10 %% lower perplexity)")
    ap.add_argument("--samples", type=int, default=10_000, help="bootstrap resamples (default 10,000)")
    ap.add_argument("--level", type=float, default=0.95, help="the interval's coverage (default 0.95)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    ap.add_argument("--label", default="", help="a name for this comparison, kept in the JSON")
    ap.add_argument("--json", type=Path, help="also write the result here")
    a = ap.parse_args(argv)
    try:
        ref = load(a.reference)
        models = [load(p) for p in a.models]
        for p, m in zip(a.models, models):
            differ = [k for k in SAME if m.get(k) != ref.get(k)]
            if differ or Path(str(m.get("data"))).name != Path(str(ref.get("data"))).name:
                raise UserError(f"{p}: not measured on the reference's windows (differs in "
                                f"{', '.join(differ) or 'data'}): compare evals of the same text, --seq-len, "
                                "--max-seqs and --skip")
        res = paired_below(ref["window_nll"], [m["window_nll"] for m in models], samples=a.samples,
                           level=a.level, goal=a.goal, seed=a.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = (f"{len(models)} model(s), mean perplexity {res.mean:.2f}, against {res.reference:.2f}: "
            f"{res.below:+.1%} below, {res.level:.0%} interval [{res.low:+.1%}, {res.high:+.1%}]"
            f"{' (negative: above)' if res.low < 0 else ''} over {res.windows} windows "
            f"({res.samples:,} paired resamples)")
    if a.goal is not None:
        line += f"; at least {a.goal:.0%} below in {res.share_at_least:.1%} of them"
    print(line)
    if a.json:
        a.json.write_text(json.dumps({"label": a.label, "reference_file": a.reference.name,
                                      "model_files": [p.name for p in a.models],
                                      "windows": {k: ref.get(k) for k in SAME} | {"data": Path(str(ref["data"])).name},
                                      **res.to_json()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
