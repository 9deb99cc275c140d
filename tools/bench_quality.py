"""Quality benchmark on the real SmolLM2-135M: perplexity after pruning, per method and sparsity.

Calibration uses the first windows of WikiText-2 valid; perplexity is measured on windows after
them (never seen by the pruner). Writes JSON, a PNG plot and a Markdown table.

    python tools/bench_quality.py --model runs/smollm2 --out runs/bench_quality \
        --sparsity 0.2 0.5 --methods bonsai prior random --profile quick

With ``--split tune`` or ``--split test`` the evaluation windows are fixed at the end of the file:
``test`` is the last --eval-seqs windows, ``tune`` the --eval-seqs windows before them. Settings
are chosen on ``tune``; ``test`` reports what no choice has seen. Calibration (the masks' and the
reconstruction's) must end before ``tune`` begins; the tool refuses otherwise.
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
from lowmem_bonsai.data import load_tokenizer, tokenize_file  # noqa: E402
from lowmem_bonsai.model.checkpoint import Checkpoint  # noqa: E402
from lowmem_bonsai.evaluate import evaluate  # noqa: E402
from lowmem_bonsai.pipeline import (  # noqa: E402
    prune_model, repair_plan, repair_windows, write_checkpoint)
from lowmem_bonsai.model.plan import Plan  # noqa: E402
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
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed")
    ap.add_argument("--repairs", nargs="*", default=[],
                    help="after each prune (made with reconstruct = none), also evaluate these "
                    "reconstructions of the same plan: bias, lsq, bias-oneshot, lsq-oneshot (the profile's "
                    "reconstruct_seqs / _seq_len / _ridge apply; a one-shot repair's target is the layer's "
                    "own and it runs once, reconstruct_gap_weight = 0); rows are labelled METHOD+REPAIR")
    ap.add_argument("--repair-label", default="",
                    help="suffix for the --repairs rows' names (METHOD+REPAIR+SUFFIX), to tell apart "
                    "repairs of one plan with different reconstruct_* settings")
    ap.add_argument("--reuse-prunes", action="store_true",
                    help="with --repairs: where OUT already holds a finished prune of the same method, "
                    "sparsity, seed and prune settings, repair that plan instead of pruning again (to "
                    "compare repairs of one plan, or to measure one on another split); its own row is recorded "
                    "once per split")
    ap.add_argument("--split", choices=["after-calib", "tune", "test"], default="after-calib",
                    help="evaluation windows: just after the calibration (the earlier protocol), or "
                    "the held-out tune / test windows at the end of the file")
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
        if isinstance(cur, bool):
            if v.lower() not in ("true", "false"):
                ap.error(f"--set {kv}: expected true or false")
            profile = profile.replace(**{k: v.lower() == "true"})
        else:
            profile = profile.replace(**{k: type(cur)(v)})
    a.out.mkdir(parents=True, exist_ok=True)
    results_path = a.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    # Evaluation starts after every window the calibration could have read.
    calib_tokens = profile.tokens_read(profile.reconstruct != "none" or bool(a.repairs))
    skip = math.ceil(calib_tokens / a.eval_seq_len)
    if a.split != "after-calib":
        n_windows = len(tokenize_file(load_tokenizer(a.model), a.data)) // a.eval_seq_len
        tune = n_windows - 2 * a.eval_seqs
        if tune < skip:
            ap.error(f"calibration ({calib_tokens} tokens) reaches into the tune windows (from window "
                     f"{tune} of {a.eval_seq_len} tokens)")
        skip = tune if a.split == "tune" else tune + a.eval_seqs
    elif a.eval_skip is not None:
        if a.eval_skip < skip:
            ap.error(f"--eval-skip {a.eval_skip} would evaluate on calibration text (need >= {skip})")
        skip = a.eval_skip
    if a.repairs:
        for r in a.repairs:
            if r.split("-")[0] not in ("bias", "lsq") or r.split("-")[1:] not in ([], ["oneshot"]):
                ap.error(f"--repairs {r}: expected bias, lsq, bias-oneshot or lsq-oneshot")
        if profile.reconstruct_in_rounds:
            ap.error("--repairs repairs an unrepaired prune after it ends; reconstruct_in_rounds repairs "
                     "inside the prune: leave out --repairs (the prune's own repair is measured)")
        # the prune itself is made without repair; calibration must still end before evaluation
        repair_profile = profile.replace(reconstruct="lsq") if profile.reconstruct == "none" else profile
        profile = profile.replace(reconstruct="none")
    settings = {k: getattr(profile, k) for k in profile.__dataclass_fields__}

    def record(row: dict) -> None:
        results.append(row)
        results_path.write_text(json.dumps(results, indent=2))
        logging.info("%s", row)

    if not any(r["method"] == "dense" and r["eval_skip"] == skip and r.get("eval_seqs", a.eval_seqs) == a.eval_seqs
               for r in results):
        ev = evaluate(model_dir=a.model, data=a.data, seq_len=a.eval_seq_len, max_seqs=a.eval_seqs, skip=skip)
        record({"method": "dense", "sparsity": 0.0, "achieved": 0.0, "perplexity": ev.perplexity,
                "forward_tokens": 0, "prune_seconds": 0.0, "eval_tokens": ev.tokens, "eval_skip": skip,
                "eval_seqs": a.eval_seqs, "split": a.split})
    for sparsity in a.sparsity:
        for method in a.methods:
            for seed in a.seed:
                name = method + a.label
                out = a.out / f"{name}-{sparsity}-s{seed}"
                old = reusable(out, settings) if a.reuse_prunes and a.repairs else None
                if old is not None:
                    rep, seconds = old
                    logging.info("reusing the prune in %s", out)
                else:
                    t = time.perf_counter()
                    rep = prune_model(model_dir=a.model, out_dir=out, sparsity=sparsity, profile=profile,
                                      calib=a.data, method=method, seed=seed, force=True)
                    seconds = time.perf_counter() - t
                ev = evaluate(model_dir=out, data=a.data, seq_len=a.eval_seq_len, max_seqs=a.eval_seqs,
                              skip=skip)
                repair = rep.get("reconstruction") or {}
                if not any(r["method"] == name and r["sparsity"] == sparsity and r.get("seed") == seed
                           and r["eval_skip"] == skip for r in results):  # a reused prune: once per split
                    record({"method": name, "sparsity": sparsity, "seed": seed,
                        "achieved": rep["achieved_sparsity"], "perplexity": ev.perplexity,
                            "forward_tokens": rep["forward_tokens"] + repair.get("forward_tokens", 0),
                            "prune_seconds": seconds, "eval_tokens": ev.tokens, "eval_skip": skip,
                            "eval_seqs": a.eval_seqs, "split": a.split, "rounds": len(rep["rounds"]),
                            "reconstruction": {k: v for k, v in repair.items() if k != "layers"},
                            "cv_tau": [r["cv_tau"] for r in rep["rounds"]], "settings": settings,
                            "layers": rep["layers"], "host": rep.get("host")})  # older prunes: none
                for r in a.repairs:
                    mode, oneshot = r.split("-")[0], r.endswith("-oneshot")
                    # one-shot: the dense model's statistics, the layer's own target, one repair
                    oneshot_keys = {"reconstruct_target": "layer", "reconstruct_gap_weight": 0.0} if oneshot else {}
                    prof = repair_profile.with_repair(mode).replace(reconstruct_sequential=not oneshot, **oneshot_keys)
                    fixed_dir = a.out / f"{name}+{r}{a.repair_label}-{sparsity}-s{seed}"
                    t = time.perf_counter()
                    info = repair_existing(a.model, out, fixed_dir, prof, a.data)
                    rseconds = time.perf_counter() - t
                    ev = evaluate(model_dir=fixed_dir, data=a.data, seq_len=a.eval_seq_len,
                                  max_seqs=a.eval_seqs, skip=skip)
                    record({"method": f"{name}+{r}{a.repair_label}", "sparsity": sparsity, "seed": seed,
                            "achieved": rep["achieved_sparsity"], "perplexity": ev.perplexity,
                            "forward_tokens": rep["forward_tokens"] + info["forward_tokens"],
                            "prune_seconds": seconds + rseconds, "eval_tokens": ev.tokens,
                            "eval_skip": skip, "eval_seqs": a.eval_seqs, "split": a.split,
                            "reconstruction": info, "settings": {
                                k: getattr(prof, k) for k in prof.__dataclass_fields__}})
    write_table(results, a.out)


def reusable(out: Path, settings: dict) -> tuple[dict, float] | None:
    """A finished prune in ``out`` made with ``settings`` (its report and the seconds it took), or None."""
    try:
        rep = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    made = (rep.get("settings") or {}).get("profile") or {}
    if any(made.get(k) != v for k, v in settings.items() if k in made and not k.startswith("reconstruct")):
        return None
    return rep, float(rep.get("seconds", 0.0))


def repair_existing(model: Path, pruned: Path, out: Path, profile, data: Path) -> dict:
    """Reconstruct the plan of an existing prune (``pruned/plan.json``) into ``out``."""
    import shutil
    import tempfile

    ckpt = Checkpoint(model)
    plan = Plan.load(pruned / "plan.json")
    tokenizer = load_tokenizer(model)
    tokens = repair_windows(tokenizer, model, tokenize_file(tokenizer, data), data, profile)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        rep = repair_plan(ckpt, plan, tokens, Path(tmp), profile)
        write_checkpoint(ckpt.with_overlay(rep.files), rep.plan, out, model_dir=model, profile=profile)
    return {"mode": rep.mode, "sequential": rep.sequential, "tokens": rep.tokens,
            "forward_tokens": rep.forward_tokens, "ridge": profile.reconstruct_ridge,
            "target": rep.target}


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
