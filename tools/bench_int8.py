"""Would int8 GEMMs make mask scoring faster on a CPU without hurting it? (issue 5; the answer was no)

torch's fbgemm dynamic-quantized linear (int8 weights per output channel, activations quantized per
tensor at run time; on AVX2 to 7 bits, ``reduce_range``) is the one int8 GEMM in torch that beats fp32 on
these CPUs. This scores the same round-1 masks of the real model twice, with fp32 GEMMs and with
that int8 linear swapped into every block, and reports the GEMM rates, the mean calibration NLL and
Kendall's tau between the two rankings of the masks (what the regression consumes).

    python tools/bench_int8.py --model runs/smollm2 --out runs/bench_int8.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowmem_bonsai.engine.block as block_module  # noqa: E402
from lowmem_bonsai.model.checkpoint import Checkpoint  # noqa: E402
from lowmem_bonsai.data import load_tokenizer, tokenize_file, windows  # noqa: E402
from lowmem_bonsai.engine.forward import streamed_nll, streamed_pass  # noqa: E402
from lowmem_bonsai.model.plan import Plan  # noqa: E402
from lowmem_bonsai.profiles import load_profile  # noqa: E402
from lowmem_bonsai.method.prior import layer_priors  # noqa: E402
from lowmem_bonsai.method.prune import mask_set, profile_modules, sample_round  # noqa: E402
from lowmem_bonsai.method.regression import kendall_tau  # noqa: E402
from lowmem_bonsai.texts import bundled_path  # noqa: E402

WIKITEXT = bundled_path("wikitext2-valid")  # shipped in the package (lowmem_bonsai/_texts)


class Int8Functional:
    """torch.nn.functional with ``linear`` replaced by fbgemm's dynamic int8 linear."""

    def __init__(self) -> None:
        self.packed: dict[tuple, object] = {}

    def __getattr__(self, name):
        return getattr(F, name)

    def linear(self, x, w, b=None):
        key = (w.data_ptr(), tuple(w.shape))
        if key not in self.packed:
            scale = (w.abs().amax(1).clamp_min(1e-8) / 127).double()
            qw = torch.quantize_per_channel(w.float(), scale, torch.zeros(w.shape[0], dtype=torch.long), 0,
                                            torch.qint8)
            self.packed[key] = torch.ops.quantized.linear_prepack(qw, b)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float().contiguous(),
                                               self.packed[key], True)
        return y.view(*x.shape[:-1], -1).to(x.dtype)


def gemm_rate(fn, m: int, k: int, n: int, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / sorted(times)[reps // 2] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_int8.json"))
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--masks", type=int, default=32)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")  # torch marks its quantized tensors deprecated
    torch.manual_seed(0)
    m, k, n = 2048, 2048, 5632
    x, w = torch.randn(m, k), torch.randn(n, k)
    q = Int8Functional()
    rates = {"fp32": gemm_rate(lambda: F.linear(x, w), m, k, n),
             "int8_dynamic": gemm_rate(lambda: q.linear(x, w), m, k, n)}

    prof = load_profile(a.profile)
    ckpt = Checkpoint(a.model)
    calib = windows(tokenize_file(load_tokenizer(a.model), WIKITEXT), seq_len=prof.seq_len,
                    max_seqs=prof.calib_seqs)
    plan = Plan.dense(ckpt.config)
    stats = streamed_pass(ckpt, calib, plan=plan, want_stats=True).stats
    priors = layer_priors(ckpt, stats, prof.prior, torch.Generator().manual_seed(0), prof.head_unit)
    modules = profile_modules(ckpt.config, plan, prof)
    per_module = sample_round(modules, priors, prof.prune_frac, a.masks, torch.Generator().manual_seed(0),
                              varied=True, skip_coarse=True)
    masks = mask_set(per_module, plan, 0, a.masks)
    scores, seconds = {}, {}
    for name, functional in (("fp32", F), ("int8_dynamic", Int8Functional())):
        block_module.F = functional
        t = time.perf_counter()
        scores[name] = streamed_nll(ckpt, calib, plan=plan, masks=masks).sum(1) / calib[:, 1:].numel()
        seconds[name] = time.perf_counter() - t
    block_module.F = F
    ref, q8 = scores["fp32"].double(), scores["int8_dynamic"].double()
    result = {"gemm_gflops": rates, "masks": a.masks, "calib_tokens": calib.numel(), "seconds": seconds,
              "mean_nll": {k: float(v.mean()) for k, v in scores.items()},
              "std_nll_across_masks": {k: float(v.std()) for k, v in scores.items()},
              "kendall_tau_int8_vs_fp32": kendall_tau(ref, q8)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
