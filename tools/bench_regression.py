"""How well does the regression predict sub-models it has not seen? (issue 7's diagnosis)

Samples many masks for the first round of a real model, scores every mask on the calibration
tokens and on held-out tokens, then refits the regression on the first n masks for several n,
estimators and mask designs, and reports Kendall's tau between predicted and measured scores of the
last masks (which no fit saw):

- ``tau_calib``: against their calibration loss (what the CV inside a prune measures);
- ``tau_heldout``: against their loss on other text (what the pruned model is judged on);
- ``ceiling``: tau between the two losses of those masks, the best any fit on calibration loss
  can reach with this many tokens per mask.

Mask losses are cached in OUT/masks-*.pt, so new fits cost seconds.

    python tools/bench_regression.py --model runs/smollm2 --out runs/bench_regression \
        --masks 160 --test 32 --design fixed varied
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem_bonsai.model.checkpoint import Checkpoint  # noqa: E402
from lowmem_bonsai.data import load_tokenizer, tokenize_file, windows  # noqa: E402
from lowmem_bonsai.engine.forward import streamed_nll, streamed_pass  # noqa: E402
from lowmem_bonsai.model.plan import Plan  # noqa: E402
from lowmem_bonsai.profiles import load_profile  # noqa: E402
from lowmem_bonsai.method.prior import layer_priors  # noqa: E402
from lowmem_bonsai.method.prune import design_of, mask_set, profile_modules, sample_round  # noqa: E402
from lowmem_bonsai.method.regression import fit, kendall_tau  # noqa: E402
from lowmem_bonsai.texts import bundled_path  # noqa: E402

WIKITEXT = bundled_path("wikitext2-valid")  # shipped in the package (lowmem_bonsai/_texts)


def mean_nll(ckpt, tokens, plan, masks=None, wave=16, soft=None) -> torch.Tensor:
    n = masks[0].masks.shape[0] if masks else 1
    out = []
    for a in range(0, n, wave):
        b = min(a + wave, n)
        ms = mask_set(masks, plan, a, b) if masks else None
        nll = streamed_nll(ckpt, tokens, plan=plan, masks=ms, soft=soft)
        out.append(nll.sum(1) / (tokens.shape[0] * (tokens.shape[1] - 1)))
        logging.info("masks %d/%d", b, n)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=WIKITEXT)
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--set", nargs="*", default=[], help="profile overrides, key=value (e.g. calib_seqs=16)")
    ap.add_argument("--masks", type=int, default=160, help="masks sampled per design (even)")
    ap.add_argument("--test", type=int, default=32, help="last masks kept out of every fit (even)")
    ap.add_argument("--design", nargs="+", default=["fixed", "varied"])
    ap.add_argument("--heldout-seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--perturb-all", action="store_true",
                    help="also perturb modules too coarse to prune at this round's rate")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    prof = load_profile(a.profile)
    for kv in a.set:
        k, v = kv.split("=", 1)
        prof = prof.replace(**{k: type(getattr(prof, k))(v)})
    a.out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(a.model)
    ids = tokenize_file(load_tokenizer(a.model), a.data)
    calib = windows(ids, seq_len=prof.seq_len, max_seqs=prof.calib_seqs)
    # Held-out windows of 128 tokens start well after anything the calibration reads.
    held = windows(ids, seq_len=128, max_seqs=a.heldout_seqs,
                   skip=math.ceil(prof.calib_seqs * prof.seq_len / 128) + 64)
    plan = Plan.dense(ckpt.config)
    first = streamed_pass(ckpt, calib, plan=plan, want_stats=True, want_teacher=True)
    stats, teacher = first.stats, first.teacher
    gen = torch.Generator().manual_seed(a.seed)
    priors = layer_priors(ckpt, stats, prof.prior, gen, prof.head_unit)
    modules = profile_modules(ckpt.config, plan, prof)
    results_path = a.out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    for design in a.design:
        tag = "all" if a.perturb_all else "prunable"
        cache = a.out / f"masks-{design}-{tag}-{a.masks}-{prof.calib_seqs}x{prof.seq_len}-s{a.seed}.pt"
        g = torch.Generator().manual_seed(a.seed)
        per_module = sample_round(modules, priors, prof.prune_frac, a.masks, g, varied=design == "varied",
                                  skip_coarse=not a.perturb_all)
        cache = cache.with_suffix(f".h{a.heldout_seqs}.pt")
        if cache.is_file():
            ys = torch.load(cache)
        else:
            ys = {"nll": -mean_nll(ckpt, calib, plan, per_module),
                  "kl": -mean_nll(ckpt, calib, plan, per_module, soft=teacher),
                  "held": -mean_nll(ckpt, held, plan, per_module)}
            torch.save(ys, cache)
        d = design_of(per_module)
        te = slice(a.masks - a.test, a.masks)
        y_held = ys["held"]
        for score in ("nll", "kl"):
            new = fits(d, ys[score], y_held, te, a, design, tag, score, g)
            for r in new:
                r.update(masks=a.masks, test=a.test, calib_tokens=prof.calib_seqs * prof.seq_len,
                         heldout_tokens=held.numel())
            key = lambda r: (r["design"], r["perturbed"], r["score"], r.get("masks"), r.get("calib_tokens"),
                             r.get("heldout_tokens"))
            rows = [r for r in rows if key(r) != key(new[0])] + new
        results_path.write_text(json.dumps(rows, indent=2, default=str))


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no NaN


def fits(d, y_cal, y_held, te, a, design, tag, score, g) -> list[dict]:
    rows = []
    ceiling = kendall_tau(y_cal[te], y_held[te])
    for n in sorted({16, 32, 64, 96, a.masks - a.test} & set(range(2, a.masks - a.test + 1))):
        tr = slice(0, n)
        for est in ("prior", "ridge", "lasso"):
            for modscale in ((False, True) if design == "varied" else (False,)):
                f = fit(d.x[tr], y_cal[tr], prior=d.prior, kinds=d.kinds, estimator=est, gen=g,
                        groups=d.groups if modscale else None)
                pred = d.x[te].double() @ f.beta + f.intercept
                row = {"design": design, "perturbed": tag, "score": score, "train_masks": n,
                       "estimator": est, "module_scales": modscale,
                       "tau_calib": _num(kendall_tau(pred, y_cal[te].double())),
                       "tau_heldout": _num(kendall_tau(pred, y_held[te].double())),
                       "ceiling": _num(ceiling), "cv_tau": _num(f.cv_tau),
                       "loss_std": float(y_cal.std())}
                rows.append(row)
                logging.info("%s", row)
    return rows


if __name__ == "__main__":
    main()
